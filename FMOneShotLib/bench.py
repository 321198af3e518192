"""The benchmark: seconds per stage, memory and the speed-up over the naive path on a large volume.

The volume is the bundled sample CT resampled to ``slices`` x ``size`` x ``size`` (default 100 x 512 x 512);
the structure is the gallbladder, which lies on 13 of its 30 slices (44 of the 100; a typical organ search
over a whole scan finds its structure on a third to a half of the slices), marked on its largest slice. The
chain runs as the product runs it (features at the grid in batches, similarity maps upsampled, the segmenter
only where the adapter localised the structure). The naive path (features upsampled to every pixel,
similarity at pixel level, the segmenter on every slice and encoding it afresh, float32 even where the chain
runs bf16, one slice at a time) runs in the same process on a few slices and is extrapolated to the whole
volume.
"""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .correspond import correspond
from .datasets import load_dataset
from .demo import SAMPLE
from .errors import FMOneShotError
from .image import Volume, intensity_window, normalize, read_volume, write_volume
from .pipeline import OneShot
from .template import Template, sample_prompts

BENCH_LABEL = "gallbladder"


def bench_volume(slices: int = 100, size: int = 512):
    """The sample CT resampled to (slices, size, size) with its reference labels, and the geometry to match."""
    if slices < 2 or size < 32:
        raise FMOneShotError(f"A benchmark volume of {slices} slices of {size}x{size} is too small.",
                             "use at least 2 slices of 32x32.")
    case = load_dataset(SAMPLE).cases[0]
    ct, ref = case.read_image(), case.read_mask()
    zoom = (slices / ct.array.shape[0], size / ct.array.shape[1], size / ct.array.shape[2])
    image = ndi.zoom(ct.array.astype(np.float32), zoom, order=1)
    labels = ndi.zoom(ref, zoom, order=0)
    spacing = tuple(s * n / m for s, n, m in zip(ct.spacing, ct.array.shape[::-1], image.shape[::-1]))
    vol = Volume(image.astype(np.int16), spacing, ct.origin, ct.direction, name="bench", modality="CT")
    return vol, labels


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def naive_slice(engine: OneShot, image01: np.ndarray, spacing, name: str) -> dict:
    """One slice the naive way (float32, pixel-level features, the segmenter whatever the slice holds);
    returns the seconds spent per stage."""
    if hasattr(engine.segmenter, "forget_encoding"):  # the naive path encodes every slice, even one the chain did
        engine.segmenter.forget_encoding()
    parts = [p for p in (engine.extractor, engine.segmenter) if hasattr(p, "precision")]
    saved = [p.precision for p in parts]
    for p in parts:
        p.precision = "fp32"
    try:
        return _naive_slice(engine, image01, spacing, name)
    finally:
        for p, precision in zip(parts, saved):
            p.precision = precision


def _naive_slice(engine, image01, spacing, name) -> dict:
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
              seed: int = 0, progress=None, segmenter_options: dict | None = None,
              chain_options: dict | None = None) -> dict:
    vol, ref = bench_volume(slices, size)
    value = load_dataset(SAMPLE).label_value(BENCH_LABEL)
    on = (ref == value).any(axis=(1, 2))
    z = int(np.argmax((ref == value).sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z] == value, 5, 5, seed)
    template = Template.from_volume(vol, z, {BENCH_LABEL: pos}, {BENCH_LABEL: neg}, {BENCH_LABEL: ref[z] == value})
    with tempfile.TemporaryDirectory() as tmp:
        src = write_volume(vol, Path(tmp) / "bench.nii.gz")
        t0 = time.perf_counter()
        volume = read_volume(src)
        io_seconds = time.perf_counter() - t0
        t = time.perf_counter()
        engine = OneShot(template, backend=backend, adapter=adapter, segmenter=segmenter,
                         backend_options=backend_options, segmenter_options=segmenter_options, seed=seed,
                         **(chain_options or {})).fit()
        fit_seconds = time.perf_counter() - t
        result = engine.apply(volume, progress=progress)
        t = time.perf_counter()
        write_volume(result.labels, Path(tmp) / "bench-labels.nii.gz")
        io_seconds += time.perf_counter() - t
        total = time.perf_counter() - t0
    timings = {k: round(v, 3) for k, v in result.timings.items()}
    stages = {"io": round(io_seconds, 3), "fit": round(fit_seconds, 3), **timings}
    forwards = result.timings["features"] + getattr(engine.segmenter, "forward_seconds", 0.0)
    # The naive path on a few slices spread over the volume, extrapolated to all of them.
    window = intensity_window(volume)
    picks = np.linspace(0, volume.n_slices - 1, max(1, naive_slices)).round().astype(int)
    naive = {"features": 0.0, "correspondence": 0.0, "segmenter": 0.0}
    for k in picks:
        for stage, sec in naive_slice(engine, normalize(volume.array[k], window), volume.pixel_spacing,
                                      BENCH_LABEL).items():
            naive[stage] += sec
    naive_per_slice = sum(naive.values()) / len(picks)
    naive_total = naive_per_slice * volume.n_slices + io_seconds + fit_seconds
    report = {
        "volume": {"slices": volume.n_slices, "size": list(volume.slice_shape),
                   "structure": BENCH_LABEL, "slices_with_structure": int(on.sum()),
                   "slices_found": int(result.present[:, 0].sum())},
        "backend": backend, "adapter": engine.adapter.name if engine.adapter is not None else "none",
        "segmenter": engine.segmenter.name, "device": getattr(engine.extractor, "device", "cpu"),
        "precision": {"features": getattr(engine.extractor, "precision", "fp32"),
                      "segmenter": getattr(engine.segmenter, "precision", "fp32")},
        "threads": torch.get_num_threads(),
        "seconds": {"total": round(total, 3), **stages},
        "seconds_per_slice": round(total / volume.n_slices, 4),
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
