"""Feature backends behind one interface; select them by name with :func:`create_extractor`."""

from .base import (FeatureExtractor, available_backends, create_extractor, pixel_to_grid, register,
                   sample_features)
from . import offline  # noqa: F401  (registers "offline")

__all__ = ["FeatureExtractor", "available_backends", "create_extractor", "pixel_to_grid", "register",
           "sample_features"]
