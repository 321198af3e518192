"""What the library needs at run time: pip requirements and the module each one provides.

The Slicer module installs the missing ones at first use (never at import); torch and torchvision go through
the PyTorch extension when it is installed, so that the build matching the computer's GPU is chosen. A test
keeps this list equal to pyproject.toml's dependencies. Importing this module imports nothing else.
"""

from __future__ import annotations

import importlib.util

# requirement -> the module it provides
REQUIREMENTS = {
    "numpy>=1.24": "numpy",
    "scipy>=1.10": "scipy",
    "scikit-image>=0.21": "skimage",
    "SimpleITK>=2.2": "SimpleITK",
    "torch>=2.1": "torch",
    "torchvision>=0.16": "torchvision",
    "timm>=1.0": "timm",
    "segment-anything>=1.0": "segment_anything",
    "safetensors>=0.4": "safetensors",
    "tqdm>=4.60": "tqdm",
    "jsonschema>=4.18": "jsonschema",
}
TORCH = ("torch", "torchvision")


def missing() -> list:
    """The requirements whose module cannot be imported here, in REQUIREMENTS order."""
    return [req for req, module in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]


def package(requirement: str) -> str:
    """'torch>=2.1' -> 'torch'."""
    for sep in "<>=!~ ;[":
        requirement = requirement.split(sep)[0]
    return requirement
