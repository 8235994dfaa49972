"""The detector's module under its former name, so that `export.pkl` files written before it was renamed
(`models/detector.py`) still load: a pickle names the module and class of every object it holds."""
from .detector import *                                                        # noqa: F401,F403
from .detector import Detector as Localizer, FeaturePyramid as CentreNeck     # noqa: F401
