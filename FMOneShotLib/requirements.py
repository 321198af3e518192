"""What the library needs at run time: pip requirements and the module each one provides.

The Slicer module installs the missing and too old ones at first use (never at import); torch and torchvision go
through the PyTorch extension when it is installed, so that the build matching the computer's GPU is chosen. A
test keeps this list equal to pyproject.toml's dependencies. Importing this module imports nothing else (``packaging``
is imported by :func:`unmet` when it runs).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

# requirement -> the module it provides
REQUIREMENTS = {
    "numpy>=1.24": "numpy",
    "scipy>=1.10": "scipy",
    "SimpleITK>=2.2": "SimpleITK",
    "torch>=2.1": "torch",
    "torchvision>=0.16": "torchvision",
    "timm>=1.0": "timm",
    "segment-anything>=1.0": "segment_anything",
    "safetensors>=0.4": "safetensors",
    "tqdm>=4.60": "tqdm",
    "packaging>=20": "packaging",  # reads the versions below (Slicer ships it)
    "highdicom>=0.22": "highdicom",
    "jsonschema>=4.18": "jsonschema",
}
TORCH = ("torch", "torchvision")


def unmet() -> list:
    """``[(requirement, installed version or None)]`` for each requirement, in REQUIREMENTS order, whose module
    cannot be imported here or whose installed distribution is older than the requirement allows (an old
    torch or timm left by another Slicer extension). A module without distribution metadata (a build on
    ``sys.path``) is taken as it is. Uses ``importlib.metadata`` and ``packaging`` (PEP 440 specifiers)."""
    out = []
    for req, module in REQUIREMENTS.items():
        if importlib.util.find_spec(module) is None:
            out.append((req, None))
            continue
        try:
            have = importlib.metadata.version(package(req))
        except importlib.metadata.PackageNotFoundError:
            continue
        if not _satisfies(req, have):
            out.append((req, have))
    return out


def missing() -> list:
    """The requirements that :func:`unmet` lists (not importable, or too old), in REQUIREMENTS order."""
    return [req for req, _ in unmet()]


def _satisfies(requirement: str, version: str) -> bool:
    try:
        from packaging.requirements import Requirement
    except ImportError:  # nothing to compare with: installing packaging comes first
        return True
    return Requirement(requirement).specifier.contains(version, prereleases=True)


def package(requirement: str) -> str:
    """'torch>=2.1' -> 'torch'."""
    for sep in "<>=!~ ;[":
        requirement = requirement.split(sep)[0]
    return requirement
