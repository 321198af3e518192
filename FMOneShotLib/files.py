"""Writing files safely: never over something that exists unless asked, never half a file.

Every writer in FMOneShot (label volumes, templates, landmark tables) goes through these two helpers.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

from .errors import FMOneShotError

PARTIAL = ".partial-"  # the prefix of atomic_paths' temporary files


def refuse_existing(paths, force: bool, fix: str = "choose another output name, or pass --force (force=True).") -> None:
    """Raise before anything is written when one of ``paths`` exists and ``force`` is not set."""
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing and not force:
        verb = "exists" if len(existing) == 1 else "exist"
        raise FMOneShotError(f"{', '.join(existing)} already {verb}; nothing was written.", fix)


@contextlib.contextmanager
def atomic_paths(*paths):
    """Yield temporary paths beside ``paths`` to write to; when the block succeeds, all of them replace their
    targets, and when it fails, none does and the temporary files are removed (all or nothing).

    The temporary name keeps the whole file name at its end, so writers that choose the format by the
    extension (SimpleITK: ``.nii.gz``, ``.nrrd``) still do.
    """
    finals = [Path(p) for p in paths]
    temps = [f.with_name(f"{PARTIAL}{os.getpid()}-{f.name}") for f in finals]
    try:
        yield temps if len(temps) != 1 else temps[0]
        for tmp, final in zip(temps, finals):
            os.replace(tmp, final)
    finally:
        for tmp in temps:
            if tmp.exists():
                tmp.unlink()


def remove_partials(folder) -> list:
    """Remove the temporary files that :func:`atomic_paths` left in ``folder`` (not in its subfolders) when
    the process writing them was killed before its clean-up could run; return their paths. Only names with
    the ``.partial-PID-`` prefix are touched, so nothing else in the folder is."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    gone = []
    for path in folder.glob(f"{PARTIAL}*"):
        if path.is_file():
            path.unlink(missing_ok=True)
            gone.append(path)
    return gone
