"""The demo: liver and spleen marked once on the bundled sample CT, segmented on all 30 slices, scored."""

from __future__ import annotations

try:
    import resource  # the peak memory (POSIX only)
except ImportError:  # Windows: the library imports, the figure is nan
    resource = None
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .datasets import load_dataset
from .errors import FMOneShotError
from .files import refuse_existing
from .image import intensity_window, normalize, write_volume
from .metrics import dice
from .template import Label, Template, color_table_path, sample_prompts, write_color_table
from .viz import montage

SAMPLE = Path(__file__).resolve().parents[1] / "Testing" / "Data" / "totalseg-ct-small"
DEMO_LABELS = ("liver", "spleen")


def choose_template_slice(mask: np.ndarray, values) -> int:
    """The slice a radiologist would mark: where every label shows best (largest smallest relative area)."""
    areas = np.stack([(mask == v).sum(axis=(1, 2)) / max(1, (mask == v).sum(axis=(1, 2)).max()) for v in values], 1)
    return int(np.argmax(areas.min(axis=1)))


@dataclass
class DemoReport:
    template_slice: int
    n_slices: int
    dice: dict  # label -> mean Dice over the slices that contain it
    empty: dict  # label -> share of slices without it predicted empty (nan when every slice has it)
    seconds: float
    fit_seconds: float
    peak_memory_mb: float
    files: list  # every file written, in the order written
    segmenter: str = "offline"
    label_values: dict = field(default_factory=dict)  # label -> its value in the label file
    case: str = ""  # the case marked and segmented: the dataset's first
    dataset: str = ""  # the dataset's name (dataset.json)
    modality: str | None = None  # the case's modality (CT, MR, ...), None when the dataset gives none


def run_demo(output_dir, data=SAMPLE, labels=DEMO_LABELS, backend: str = "offline", segmenter: str = "auto",
             n_points: int = 5, seed: int = 0, force: bool = False, progress=None, backend_options: dict | None = None,
             segmenter_options: dict | None = None) -> DemoReport:
    data = Path(data)
    if not (data / "dataset.json").is_file():
        raise FMOneShotError(f"The sample data is not at {data}.",
                             "run the demo from a clone of the FMOneShot repository, or pass --data DATASET_DIR.")
    ds = load_dataset(data)
    case = ds.cases[0]
    out = Path(output_dir)
    labels_file, montage_file, template_file = (out / f"{case.id}-labels.nii.gz", out / "montage.png",
                                                out / "template.json")
    values = [ds.label_value(n) for n in labels]  # unknown names fail here, before anything is read
    volume = case.read_image()
    reference = case.read_mask(volume)
    z = choose_template_slice(reference, values)
    positive, negative, masks = {}, {}, {}
    for name, v in zip(labels, values):
        positive[name], negative[name] = sample_prompts(reference[z] == v, n_points, n_points, seed)
        masks[name] = reference[z] == v
    template = Template.from_volume(volume, z, positive, negative, masks,
                                    labels=[Label(n, v) for n, v in zip(labels, values)],
                                    settings={"backend": backend, "segmenter": segmenter})
    files = [labels_file, color_table_path(labels_file), montage_file, *template.files(template_file, adapter=True)]
    refuse_existing(files, force, "pass --force to overwrite them, or choose another --output folder.")
    from .pipeline import OneShot  # PyTorch: only once the inputs are checked

    t0 = time.perf_counter()
    engine = OneShot(template, backend=backend, segmenter=segmenter, seed=seed, backend_options=backend_options,
                     segmenter_options=segmenter_options).fit()
    result = engine.apply(volume, progress=progress)
    seconds = time.perf_counter() - t0
    scores, empty = {}, {}
    for name, v in zip(labels, values):
        pred, ref = result.mask(name), reference == v
        on = [k for k in range(volume.n_slices) if ref[k].any()]
        off = [k for k in range(volume.n_slices) if not ref[k].any()]
        scores[name] = float(np.mean([dice(pred[k], ref[k]) for k in on]))
        empty[name] = float(np.mean([not pred[k].any() for k in off])) if off else float("nan")
    out.mkdir(parents=True, exist_ok=True)
    write_volume(result.labels, labels_file, force=force)
    write_color_table(template.labels, color_table_path(labels_file), force=force)
    shown = np.where(np.isin(reference, values), reference, 0)
    montage(normalize(volume.array, intensity_window(volume)), result.labels.array,
            {lb.value: lb.color for lb in template.labels}, montage_file, reference=shown,
            direction=volume.direction)
    template.save(template_file, force=force)
    files = [labels_file, color_table_path(labels_file), montage_file, *template.files(template_file)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0 if resource else float("nan")
    return DemoReport(z, volume.n_slices, scores, empty, seconds, engine.fit_seconds, peak, [str(f) for f in files],
                      engine.segmenter.name, dict(zip(labels, values)), case.id, ds.name, volume.modality)
