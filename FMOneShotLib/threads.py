"""How many CPU threads PyTorch may use: the one place that decides it.

The policy: **small-tensor work runs on one thread; foundation-model forwards use the model threads.**

- Small work is everything in :class:`~FMOneShotLib.pipeline.OneShot` except the forwards: adapter training
  (200 full-batch Adam steps on a few thousand feature vectors), adapter inference, the offline backend,
  correspondences, the offline refiner. Each operation is too small to gain from a second thread, and
  PyTorch's OpenMP workers spin-wait between them: where another process keeps the cores busy, the workers
  wait for each other's time slices and the work gets 5-20x slower while using more CPU.
- The align stage's SimpleITK registration (ITK's own thread pool, not PyTorch's) counts as small work too
  (:func:`itk_threads` around the registration alone, in :func:`align.align`): it samples a few thousand to
  a hundred thousand voxels per iteration. One thread also makes its result independent of the machine (ITK sums the metric per thread, so a CHAOS pair's NMI moved in the fourth digit
  between 1 and 2 threads). Measured with two other engineers' jobs on the 2 cores (load average 4.5): a
  CHAOS MR pair took 4.2-6.4 s on one thread, 4.9-6.8 s on two; a cephalogram pair 1.6-1.7 s and 1.9-2.0 s.
- Model forwards (the ViT and SAM encoders, SAM's and SAM 2's mask decoders) are large matrix products,
  where a parallel region is long enough that more threads help on free cores and hurt little on busy ones.

Measured on the 2-core development machine (AMD EPYC, shared with other work; docs/results.md, "Threads"):
the demo (offline backend) took 7.6 s on one thread and 43.8 s on two with the machine's background load,
10.3 s and 205.5 s with two more busy processes; a d2s14 forward of 4 slices (448 px) took 10.6-11.9 s on one
thread and 15.3-17.7 s on two, and under the extra load 29-36 s and 25-28 s.

The model threads are, in this order: :func:`set_model_threads` (``fmoneshot bench --threads``), else the
number of threads PyTorch had when the outermost FMOneShot work began (``torch.get_num_threads()``: by
default the cores, or ``OMP_NUM_THREADS``). Every context restores the thread count it found, so callers (Slicer, a notebook) keep
theirs.
"""

from __future__ import annotations

import contextlib

from .errors import FMOneShotError

#: Threads for small-tensor work (adapters, offline features, correspondences).
SMALL_WORK_THREADS = 1

_configured: int | None = None  # set_model_threads
_outer: int = 0  # torch.get_num_threads() when the outermost context below began
_depth = 0  # nesting of the contexts below


def set_model_threads(threads: int | None) -> int | None:
    """Threads for foundation-model forwards from now on; ``None`` goes back to PyTorch's own number.
    Returns the previous setting (to restore it). Raises FMOneShotError for a count below 1."""
    global _configured
    if threads is not None and int(threads) < 1:
        raise FMOneShotError(f"{threads} threads were asked for.", "give at least 1 thread (--threads 1).")
    previous, _configured = _configured, None if threads is None else int(threads)
    return previous


def model_threads() -> int:
    """Threads a foundation-model forward runs on (see the module docstring for the order)."""
    import torch

    if _configured is not None:
        return _configured
    return _outer if _depth else torch.get_num_threads()


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with PyTorch's intra-op thread count set to ``threads``; restore it afterwards."""
    global _depth, _outer
    import torch

    before = torch.get_num_threads()
    if _depth == 0:
        _outer = before
    _depth += 1
    if threads != before:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        _depth -= 1
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


@contextlib.contextmanager
def itk_threads(threads: int):
    """Run the block with SimpleITK's global default thread count (what a filter or registration created in
    it uses) set to ``threads``; restore it afterwards."""
    import SimpleITK as sitk

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    try:
        yield threads
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


@contextlib.contextmanager
def small_work():
    """Context for small work: :data:`SMALL_WORK_THREADS` threads for PyTorch. (SimpleITK's registration sets
    ITK's to the same around itself alone: :func:`align.align`, so that ITK filters other modules run in
    Slicer's process meanwhile keep theirs but for those seconds.)"""
    with torch_threads(SMALL_WORK_THREADS):
        yield SMALL_WORK_THREADS


def model_forward():
    """Context for a foundation-model forward: :func:`model_threads` threads."""
    return torch_threads(model_threads())
