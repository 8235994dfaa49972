"""lesion_fastai: lesion localization on DeepLesion CT slices with fastai."""
import warnings

# fastai 2.8 scripts a few activations with torch.jit.script at import, which torch >= 2.9 deprecates with a
# FutureWarning on every command; it says nothing to a user of this package.
warnings.filterwarnings('ignore', message=r'`torch\.jit\.script` is deprecated', category=FutureWarning)
