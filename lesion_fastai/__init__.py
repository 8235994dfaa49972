"""lesion_fastai: lesion localization on DeepLesion CT slices with fastai."""
