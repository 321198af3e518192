"""Writing files safely: never over something that exists unless asked, never half a file.

Every writer in FMOneShot (label volumes, templates, landmark tables) goes through these helpers; the
command line checks every output with them before any work is done.
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


def same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file (after resolving links, ``..`` and the working folder; for
    existing files also hard links and case-insensitive file systems)."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return a.resolve() == b.resolve()


def refuse_inputs(outputs, inputs, what: str = "an output") -> None:
    """Raise, even where overwriting was allowed (``--force``), when an output path names an input file:
    nothing a user gave FMOneShot is ever replaced by what it computed. ``inputs`` may hold ``None``."""
    inputs = [Path(p) for p in inputs if p is not None]
    for out in outputs:
        for src in inputs:
            if same_file(out, src):
                raise FMOneShotError(f"{what.capitalize()} {out} is the input {src}; FMOneShot never writes over its "
                                     "inputs (not even with --force), and nothing was written.",
                                     "choose another output name or folder.")


def check_folder(path) -> None:
    """Raise when the folder that is to hold ``path`` cannot be: an existing file stands in its way."""
    for parent in Path(path).parents:
        if parent.exists():
            if not parent.is_dir():
                raise FMOneShotError(f"Cannot write {path}: {parent} is a file, not a folder.",
                                     "choose an output path inside a folder.")
            return


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
