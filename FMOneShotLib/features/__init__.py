"""Feature backends behind one interface; select them by name with :func:`create_extractor`."""

from .base import (AUTO_ORDER, FeatureExtractor, available_backends, create_extractor, log_bin, pixel_to_grid,
                   register, resolve_backend, sample_features)
from . import offline  # noqa: F401  (registers "offline")
from . import vit  # noqa: F401  (registers d1s8 ... d3b16, clip, sam; models load at first use)
from . import sd  # noqa: F401  (registers sd; diffusers is imported only when it is built)

__all__ = ["AUTO_ORDER", "FeatureExtractor", "available_backends", "create_extractor", "log_bin", "pixel_to_grid",
           "register", "resolve_backend", "sample_features"]
