"""The benchmark: seconds per stage, memory and the speed-up over the naive path on a large volume.

The volume is the bundled sample CT resampled to ``slices`` x ``size`` x ``size`` (default 100 x 512 x 512);
the structure is the gallbladder, which lies on 13 of its 30 slices (44 of the 100; a typical organ search
over a whole scan finds its structure on a third to a half of the slices), marked on its largest slice. The
chain runs as the product runs it (features at the grid in batches, similarity maps upsampled, the segmenter
only where the adapter localised the structure). The naive path (features upsampled to every pixel,
similarity at pixel level, the segmenter on every slice and encoding it afresh, float32 even where the chain
runs bf16, one slice at a time) runs in the same process on a few slices and is extrapolated to the whole
volume.

``segmenter_slices="reference"`` makes the segmenter's cost independent of what random weights happen to
find: the segmenter runs on exactly the slices that contain the structure in the reference (the chain's own
calls elsewhere return nothing; the reference slices the chain skipped are segmented after it, with its
correspondences as prompts, inside the timed total). That is the cost of pretrained weights that find the
structure where it is. The JSON records the rule and the slices.

Beside the seconds per stage the JSON records the process's CPU time over the chain and the machine's 1-minute
load average before and after it (``load_average``): on a machine shared with other work only figures read
beside the load mean something. ``fit_seconds`` splits the fit into building the segmenter (OneShot's
constructor) and the rest (the backend built, the template's features, the adapter trained);
``segmenter_seconds`` splits SAM's / SAM 2's time into the image encoder and the prompt decoder.
"""

from __future__ import annotations

try:
    import resource  # the peak memory (POSIX only)
except ImportError:  # Windows: the library imports, the figure is nan
    resource = None
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from .datasets import load_dataset
from .demo import SAMPLE
from .errors import FMOneShotError
from .image import Volume, intensity_window, normalize, read_volume, write_volume
from .template import Template, sample_prompts
from .threads import SMALL_WORK_THREADS, model_threads, set_model_threads, small_work

BENCH_LABEL = "gallbladder"
SEGMENTER_SLICES = ("found", "reference")


def bench_volume(slices: int = 100, size: int = 512):
    """The sample CT resampled to (slices, size, size) with its reference labels, and the geometry to match."""
    if slices < 2 or size < 32:
        raise FMOneShotError(f"A benchmark volume of {slices} slices of {size}x{size} is too small.",
                             "use at least 2 slices of 32x32.")
    case = load_dataset(SAMPLE).cases[0]
    ct = case.read_image()
    ref = case.read_mask(ct)
    zoom = (slices / ct.array.shape[0], size / ct.array.shape[1], size / ct.array.shape[2])
    image = ndi.zoom(ct.array.astype(np.float32), zoom, order=1)
    labels = ndi.zoom(ref, zoom, order=0)
    spacing = tuple(s * n / m for s, n, m in zip(ct.spacing, ct.array.shape[::-1], image.shape[::-1]))
    vol = Volume(image.astype(np.int16), spacing, ct.origin, ct.direction, name="bench", modality="CT")
    return vol, labels


def _load_average():
    """The 1-minute load average (None where the platform has none, e.g. Windows)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 if resource else float("nan")


def naive_slice(engine, image01: np.ndarray, spacing, name: str) -> dict:
    """One slice the naive way (float32, pixel-level features, the segmenter whatever the slice holds);
    returns the seconds spent per stage."""
    if hasattr(engine.segmenter, "forget_encoding"):  # the naive path encodes every slice, even one the chain did
        engine.segmenter.forget_encoding()
    parts = [p for p in (engine.extractor, engine.segmenter) if hasattr(p, "precision")]
    saved = [p.precision for p in parts]
    for p in parts:
        p.precision = "fp32"
    try:
        with small_work():  # the thread policy of the chain, so that the comparison is of the paths alone
            return _naive_slice(engine, image01, spacing, name)
    finally:
        for p, precision in zip(parts, saved):
            p.precision = precision


def _naive_slice(engine, image01, spacing, name) -> dict:
    import torch
    import torch.nn.functional as F

    from .correspond import correspond

    t = {}
    s = time.perf_counter()
    with torch.inference_mode():
        feats = engine.standardizer(engine.extractor.extract(image01[None], spacing))
        feats = engine.standardizer.for_similarity(feats)
    t["features"] = time.perf_counter() - s
    s = time.perf_counter()
    pixel = F.interpolate(feats, size=image01.shape, mode="bilinear", align_corners=False)[0]
    pos = correspond(engine.q_pos[name], pixel, image01.shape)
    neg = correspond(engine.q_neg[name], pixel, image01.shape)
    t["correspondence"] = time.perf_counter() - s
    s = time.perf_counter()
    engine.segmenter.segment(image01, pixel, pos.xy, neg.xy)
    t["segmenter"] = time.perf_counter() - s
    return t


def run_bench(slices: int = 100, size: int = 512, backend: str = "offline", segmenter: str = "auto",
              adapter: str | None = "auto", backend_options: dict | None = None, naive_slices: int = 3,
              seed: int = 0, progress=None, segmenter_options: dict | None = None, threads: int | None = None,
              segmenter_slices: str = "found", chain_options: dict | None = None) -> dict:
    """Time the chain on :func:`bench_volume`; ``threads``: threads of the model forwards (None: PyTorch's own
    number; small-tensor work always runs on :data:`~FMOneShotLib.threads.SMALL_WORK_THREADS`);
    ``segmenter_slices``: 'found' (where the chain finds the structure) or 'reference' (exactly the slices that
    contain it in the reference); ``chain_options``: more :class:`OneShot` arguments (``align``,
    ``search_radius``, ``prior_margin``). Returns the figures as a dict."""
    if segmenter_slices not in SEGMENTER_SLICES:
        raise FMOneShotError(f"Unknown segmenter slices {segmenter_slices!r}.",
                             f"choose one of: {', '.join(SEGMENTER_SLICES)}.")
    previous = set_model_threads(threads)
    try:
        return _run_bench(slices, size, backend, segmenter, adapter, backend_options, naive_slices, seed, progress,
                          segmenter_options, segmenter_slices, chain_options)
    finally:
        set_model_threads(previous)


def _run_bench(slices, size, backend, segmenter, adapter, backend_options, naive_slices, seed, progress,
               segmenter_options, segmenter_slices, chain_options) -> dict:
    vol, ref = bench_volume(slices, size)
    value = load_dataset(SAMPLE).label_value(BENCH_LABEL)
    on = (ref == value).any(axis=(1, 2))
    z = int(np.argmax((ref == value).sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z] == value, 5, 5, seed)
    template = Template.from_volume(vol, z, {BENCH_LABEL: pos}, {BENCH_LABEL: neg}, {BENCH_LABEL: ref[z] == value})
    import torch  # only once the inputs are checked

    from .pipeline import OneShot
    from .segmenters import OnChosenSlices

    with tempfile.TemporaryDirectory() as tmp:
        src = write_volume(vol, Path(tmp) / "bench.nii.gz")
        load_start = _load_average()
        t0, cpu0 = time.perf_counter(), time.process_time()
        volume = read_volume(src)
        io_seconds = time.perf_counter() - t0
        t = time.perf_counter()
        engine = OneShot(template, backend=backend, adapter=adapter, segmenter=segmenter,
                         backend_options=backend_options, segmenter_options=segmenter_options, seed=seed,
                         **(chain_options or {}))
        t_fit = time.perf_counter()
        engine.fit()
        # "fit" counts the segmenter's model being built (OneShot's constructor) and the template's features,
        # the backend's model and the adapter's training (OneShot.fit); "segmenter_build" is the constructor's share
        build_seconds, fit_seconds = t_fit - t, time.perf_counter() - t
        window = intensity_window(volume, template.modality or volume.modality)  # as the chain normalises
        reference = [int(k) for k in np.flatnonzero(on)]
        if segmenter_slices == "reference":
            engine.segmenter = OnChosenSlices(engine.segmenter,
                                                 {k: normalize(volume.array[k], window) for k in reference})
        result = engine.apply(volume, progress=progress)
        if segmenter_slices == "reference":
            t = time.perf_counter()
            for k in sorted(set(reference) - engine.segmenter.ran_on):  # the reference slices the chain skipped
                pos_xy, neg_xy = result.matches[(k, BENCH_LABEL)]
                engine.segmenter.segment(normalize(volume.array[k], window), None, pos_xy, neg_xy)
            result.timings["segmenter"] += time.perf_counter() - t
            ran_on = sorted(engine.segmenter.ran_on)
            engine.segmenter = engine.segmenter.inner
        else:
            ran_on = sorted(z for (z, name) in result.prompts if name == BENCH_LABEL)
        t = time.perf_counter()
        write_volume(result.labels, Path(tmp) / "bench-labels.nii.gz")
        io_seconds += time.perf_counter() - t
        total = time.perf_counter() - t0
        cpu_seconds = time.process_time() - cpu0
        load_chain = _load_average()
    timings = {k: round(v, 3) for k, v in result.timings.items()}
    stages = {"io": round(io_seconds, 3), "fit": round(fit_seconds, 3), **timings}
    fit_parts = {"segmenter_build": round(build_seconds, 3), "fit": round(fit_seconds - build_seconds, 3)}
    forwards = result.timings["features"] + getattr(engine.segmenter, "forward_seconds", 0.0)
    segmenter_parts = {"encodings": getattr(engine.segmenter, "encodings", None),
                       "encode": round(getattr(engine.segmenter, "forward_seconds", 0.0), 3),
                       "decode": round(getattr(engine.segmenter, "decode_seconds", 0.0), 3)}
    # The naive path on a few slices spread over the volume, extrapolated to all of them.
    window = intensity_window(volume)
    picks = np.linspace(0, volume.n_slices - 1, max(1, naive_slices)).round().astype(int)
    naive = {"features": 0.0, "correspondence": 0.0, "segmenter": 0.0}
    for k in picks:
        for stage, sec in naive_slice(engine, normalize(volume.array[k], window), volume.pixel_spacing,
                                      BENCH_LABEL).items():
            naive[stage] += sec
    load_end = _load_average()
    naive_per_slice = sum(naive.values()) / len(picks)
    naive_total = naive_per_slice * volume.n_slices + io_seconds + fit_seconds
    report = {
        "volume": {"slices": volume.n_slices, "size": list(volume.slice_shape),
                   "structure": BENCH_LABEL, "slices_with_structure": int(on.sum()),
                   "slices_found": int(result.present[:, 0].sum())},
        "backend": backend, "adapter": engine.adapter.name if engine.adapter is not None else "none",
        "segmenter": engine.segmenter.name,
        "segmenter_slices": {"rule": segmenter_slices, "slices": ran_on, "count": len(ran_on),
                             "reference_slices": reference},
        "device": getattr(engine.extractor, "device", "cpu"),
        "precision": {"features": getattr(engine.extractor, "precision", "fp32"),
                      "segmenter": getattr(engine.segmenter, "precision", "fp32")},
        "threads": {"model_forwards": model_threads(), "small_work": SMALL_WORK_THREADS},
        "seconds": {"total": round(total, 3), **stages},
        "fit_seconds": fit_parts,
        # SAM / SAM 2: the image encoder (once per slice) and the prompt decoder (once per label and slice)
        "segmenter_seconds": segmenter_parts,
        "seconds_per_slice": round(total / volume.n_slices, 4),
        # CPU time of the process (all threads) over the same span: on a machine shared with other work the
        # wall-clock total grows with the load, this does not; on an idle machine total ~ cpu / threads.
        "cpu_seconds": round(cpu_seconds, 2),
        # the machine's 1-minute load average (os.getloadavg) when the chain began, when it ended and after the
        # naive path: figures measured on a shared machine mean something only beside it
        "load_average": {"start": load_start, "after_chain": load_chain, "after_naive": load_end},
        "adapter_ms_per_slice": round(1000 * result.timings["adapter"] / volume.n_slices, 2),
        "model_forwards_seconds": round(forwards, 3),
        "overhead_ratio": round(total / forwards, 2) if forwards > 0 else None,
        "peak_memory_mb": round(_peak_mb(), 1),
        "naive": {"slices_measured": len(picks), "seconds_per_slice": round(naive_per_slice, 4),
                  "per_stage_per_slice": {k: round(v / len(picks), 4) for k, v in naive.items()},
                  "extrapolated_total": round(naive_total, 3)},
        "speedup_over_naive": round(naive_total / total, 2),
    }
    if torch.cuda.is_available() and report["device"].startswith("cuda"):
        report["peak_gpu_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return report
