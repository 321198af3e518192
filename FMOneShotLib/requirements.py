"""What the library needs at run time: pip requirements and the module each one provides.

The Slicer module installs the missing and too old ones at first use (never at import); torch and torchvision go
through the PyTorch extension when it is installed, so that the build matching the computer's GPU is chosen. A
test keeps this list equal to pyproject.toml's dependencies. Importing this module imports only the standard library
and :mod:`.errors` (``packaging`` is imported by :func:`unmet` when it runs); :func:`install_plan` decides how the
Slicer module installs what is unmet.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass, field

from .errors import FMOneShotError

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
    # dicomseg.cielab: sRGB -> CIE L*a*b* for a segment's colour (highdicom's own conversion, CIELabColor.from_rgb,
    # needs highdicom >= 0.23, which needs Python 3.10: Slicer 5.8 gets 0.22)
    "scikit-image>=0.21": "skimage",
}
# pyproject's optional dependencies that a backend or segmenter of the same name needs: name -> {requirement:
# module}, and the oldest Python each runs on (the sam2 package requires 3.10: Slicer 5.10 or later).
EXTRAS = {"sam2": {"sam2>=1.0": "sam2"},
          "sd": {"diffusers>=0.27": "diffusers", "transformers>=4.38": "transformers"}}
EXTRA_PYTHON = {"sam2": (3, 10)}
# How an extra is installed where pip's defaults fail it: the sam2 package is an sdist, built without its optional
# CUDA extension (SAM2_BUILD_CUDA=0) and without build isolation, against the PyTorch installed; with isolation pip
# downloads a second PyTorch to build it. extra -> (environment, pip options). pip_command gives the one command
# that README, docs/models.md, pyproject.toml's comment on the extra and .ci/run give too (a test keeps them equal).
EXTRA_BUILD = {"sam2": ({"SAM2_BUILD_CUDA": "0"}, ("--no-build-isolation",))}
TORCH = ("torch", "torchvision")
# Built by Slicer itself and never replaced by pip's wheel inside Slicer: Slicer's SimpleITK carries an image IO of
# its own (SlicerTotalSegmentator's setupPythonRequirements skips it for that reason).
SLICER_OWN = ("SimpleITK",)


def unmet(requirements: dict | None = None) -> list:
    """``[(requirement, installed version or None)]`` for each requirement, in REQUIREMENTS order (or of the
    ``{requirement: module}`` given, such as an entry of :data:`EXTRAS`), whose module
    cannot be imported here or whose installed distribution is older than the requirement allows (an old
    torch or timm left by another Slicer extension). A module without distribution metadata (a build on
    ``sys.path``) is taken as it is. Uses ``importlib.metadata`` and ``packaging`` (PEP 440 specifiers).

    The import system's cached folder listings are dropped first (``importlib.invalidate_caches``, as Slicer's
    own slicer/packaging.py does after pip): a package pip has just installed in this session is then seen,
    not reported missing because a listing cached before the install looks unchanged."""
    importlib.invalidate_caches()
    out = []
    for req, module in (REQUIREMENTS if requirements is None else requirements).items():
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


def pip_command(extra: str) -> str:
    """The shell command that installs the packages of ``extra`` (a key of :data:`EXTRAS`) into the Python whose
    pip runs, with what :data:`EXTRA_BUILD` needs: ``SAM2_BUILD_CUDA=0 pip install --no-build-isolation
    'sam2>=1.0'``, ``pip install 'diffusers>=0.27' 'transformers>=4.38'``."""
    env, options = EXTRA_BUILD.get(extra, ({}, ()))
    return " ".join([*(f"{k}={v}" for k, v in env.items()), "pip", "install", *options,
                     *(f"'{r}'" for r in EXTRAS[extra])])


def slicer_command(extra: str) -> str:
    """:func:`pip_command` for Slicer's Python console (``slicer.util.pip_install`` takes one string):
    ``import os; os.environ['SAM2_BUILD_CUDA'] = '0'; slicer.util.pip_install('--no-build-isolation
    sam2>=1.0')``, ``slicer.util.pip_install('diffusers>=0.27 transformers>=4.38')``."""
    env, options = EXTRA_BUILD.get(extra, ({}, ()))
    setup = "import os; " + "".join(f"os.environ[{k!r}] = {v!r}; " for k, v in env.items()) if env else ""
    return f"{setup}slicer.util.pip_install({' '.join([*options, *EXTRAS[extra]])!r})"


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


@dataclass(frozen=True)
class InstallPlan:
    """How the Slicer module installs the unmet requirements: ``torch`` holds the keyword arguments of the
    PyTorch extension's ``PyTorchUtilsLogic().installTorch`` (None: not used), ``pip`` the requirements for
    ``slicer.util.pip_install``."""

    torch: dict | None = None
    pip: list = field(default_factory=list)


def install_plan(unmet_requirements: list, pytorch_extension: bool) -> InstallPlan:
    """The install steps for ``unmet_requirements`` (``[(requirement, installed version or None)]`` as
    :func:`unmet` gives them) in Slicer, or FMOneShotError naming what to do when FMOneShot must not install
    them itself. Decided before anything is installed.

    - :data:`SLICER_OWN` packages (Slicer's SimpleITK) are never replaced with pip: an error asks for a newer
      Slicer.
    - With the PyTorch extension (``pytorch_extension``) and no torch installed, torch and torchvision are
      installed together by its ``installTorch(torchVersionRequirement=..., torchvisionVersionRequirement=...)``
      (SlicerPyTorch's PyTorchUtils.py: light-the-torch picks the build matching the GPU and installs both).
    - With the extension and a torch already installed (too old, or its torchvision missing or too old), nothing
      is installed: the torch of another extension is not replaced under it, and pip would pair it with a
      torchvision of another build. The error says to uninstall PyTorch in the PyTorch Util module (whose
      Install button does nothing while a torch is installed), restart, and apply again.
    - Without the extension, torch and torchvision go to pip with the rest (pip's default build).
    """
    own = [(req, have) for req, have in unmet_requirements if package(req) in SLICER_OWN]
    if own:
        raise FMOneShotError(
            "Slicer's own " + ", ".join(f"{package(r)} ({have or 'missing'})" for r, have in own)
            + " does not meet FMOneShot's " + ", ".join(r for r, _ in own) + ".",
            "use Slicer 5.8 or newer; FMOneShot does not replace the packages Slicer is built with.")
    torch_unmet = [(req, have) for req, have in unmet_requirements if package(req) in TORCH]
    rest = [req for req, _ in unmet_requirements if package(req) not in TORCH]
    if not torch_unmet:
        return InstallPlan(None, rest)
    if not pytorch_extension:
        return InstallPlan(None, [req for req, _ in torch_unmet] + rest)
    have = {package(req): version for req, version in torch_unmet}
    if "torch" not in have or have["torch"]:  # a torch is installed: met, or too old
        try:
            torch_version = have.get("torch") or importlib.metadata.version("torch")
        except importlib.metadata.PackageNotFoundError:
            torch_version = "(version unknown)"
        raise FMOneShotError(
            f"PyTorch {torch_version} is installed and FMOneShot needs "
            + " and ".join(f"{r} (installed: {h or 'missing'})" for r, h in torch_unmet) + ".",
            "in the PyTorch Util module, uninstall PyTorch, restart Slicer, and click Apply again: FMOneShot then "
            "installs torch and torchvision together, built for your GPU (other extensions using PyTorch get the "
            "new version too).")
    specs = {name: next((r[len(name):] for r in REQUIREMENTS if package(r) == name), "") for name in TORCH}
    return InstallPlan({"torchVersionRequirement": specs["torch"], "torchvisionVersionRequirement":
                        specs["torchvision"]}, rest)
