"""FMOneShot: one-shot segmentation and landmark localisation of medical images with foundation-model
features. Mark a structure once on a template slice; the library finds it on every slice of other volumes."""

__version__ = "0.1.0"
