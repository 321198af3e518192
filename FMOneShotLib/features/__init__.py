"""Feature backends behind one interface; select them by name with :func:`create_extractor`."""

from .base import (FeatureExtractor, available_backends, create_extractor, log_bin, pixel_to_grid, register,
                   sample_features)
from . import offline  # noqa: F401  (registers "offline")
from . import vit  # noqa: F401  (registers d1s8 ... d3b16, clip, sam; models load at first use)

__all__ = ["FeatureExtractor", "available_backends", "create_extractor", "log_bin", "pixel_to_grid", "register",
           "sample_features"]
