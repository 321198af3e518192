"""A cohort at scale: one template applied to many volumes on Dask (``dask.distributed``), resumable, with a
manifest of every volume.

The shape is nnU-Net's batch prediction, on Dask:

1. the inputs (files, DICOM folders, CSV manifests) are listed and checked before anything runs;
2. the template is fitted once, in one task on a worker (so it uses the workers' device), and the fitted
   template, with its trained adapter, is saved in the output folder and broadcast to every worker;
3. each volume is one task, a function of (fitted template, input, output folder, settings); every worker
   process builds its :class:`~FMOneShotLib.pipeline.OneShot` once (models loaded once) and keeps it for
   all the volumes it gets; the task writes the volume's label file and its record atomically
   (``files.atomic_paths``) and returns the record; a volume that fails (unreadable file, mask off the
   image's grid, out of memory) gives a record with the error and the batch goes on;
4. the client writes the manifest (``results.csv`` and ``results.json``) of every input.

The output folder holds::

    batch.json                  the batch's digest (template + settings) and its settings
    template.json (+ side files) the fitted template, trained adapter included
    ID-labels.nii.gz            the label volume of each input (on the input's grid)
    ID.result.json              each volume's record (status, seconds, slices, mL, landmarks, Dice, digest)
    results.csv, results.json   the manifest of the last run, one row per input

A rerun into the same folder with the same template and settings (same digest) skips every volume whose
label file and record are there, and reuses the fitted template; another template or other settings are
refused unless ``force``. An interrupt (Ctrl-C) cancels the pending volumes, writes the manifest (the
pending ones as ``not run``) and removes any temporary file: finished volumes stay finished, no partial
file is left.

A volume's numbers: ``slices`` are the slice indices, in the template's plane, where the label was found;
``volume_ml`` counts its voxels times the voxel volume; ``dice`` is the 3D Dice (``metrics.dice``) against
the voxels of the reference mask that carry the label's value; landmarks are the best slice's
correspondence (``Result.best_landmarks``) in pixels of that slice and in mm (LPS, the image's physical
space).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import __version__
from .errors import FMOneShotError
from .files import atomic_paths, refuse_existing, remove_partials

FORMAT = "fmoneshot-batch"
RECORD_SUFFIX = ".result.json"
LABEL_SUFFIX = "-labels"
MANIFEST_COLUMNS = ("id", "image", "mask", "status", "error", "seconds", "labels_file")
# the characters an id may hold: it names the volume's output files
ID_CHARACTERS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.+")


# ---------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Item:
    """One volume of the batch: its id (names its outputs), image (file or DICOM folder), optional mask."""

    id: str
    image: str
    mask: str | None = None


def _id_of(path: Path) -> str:
    return path.name.split(".")[0] or path.resolve().name


def _read_manifest(path: Path) -> list:
    """A CSV manifest with the columns id, image and optionally mask; paths relative to the CSV's folder."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise FMOneShotError(f"Cannot read the manifest {path} ({exc}).", "give a UTF-8 CSV file.") from None
    rows = list(csv.DictReader(io.StringIO(text)))
    columns = [c.strip() for c in (csv.DictReader(io.StringIO(text)).fieldnames or [])]
    if "id" not in columns or "image" not in columns:
        raise FMOneShotError(f"The manifest {path} has the columns {columns or '(none)'}; it needs id and image.",
                             "start the CSV with the header line id,image or id,image,mask.")
    items = []
    for k, row in enumerate(rows, start=2):
        row = {(key or "").strip(): (value or "").strip() for key, value in row.items()}
        if not row.get("id") or not row.get("image"):
            raise FMOneShotError(f"Line {k} of the manifest {path} has no id or no image.",
                                 "give every line an id and an image path.")
        image = (path.parent / row["image"]).absolute()
        mask = (path.parent / row["mask"]).absolute() if row.get("mask") else None
        items.append(Item(row["id"], str(image), str(mask) if mask else None))
    if not items:
        raise FMOneShotError(f"The manifest {path} lists no volume.", "add one line id,image[,mask] per volume.")
    return items


def collect_inputs(inputs) -> list:
    """The batch's volumes from ``inputs``: image files, folders (one DICOM series each) and CSV manifests
    (``id,image[,mask]``, paths relative to the CSV). The id of a file or folder is its name up to the
    first dot. Paths become absolute (workers elsewhere in the cluster do not share this directory).

    Raises FMOneShotError, before any work, when an input or a mask is missing, an id is not usable as a
    file name, or two volumes share an id. A file that exists but cannot be read is found later, by its
    task, and recorded as that volume's failure.
    """
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    items = []
    for given in inputs:
        path = Path(given)
        if path.suffix.lower() == ".csv" and path.is_file():
            items += _read_manifest(path)
        else:
            items.append(Item(_id_of(path), str(path.absolute())))
    if not items:
        raise FMOneShotError("No input volume was given.", "pass image files, DICOM folders or a CSV manifest.")
    missing = [p for it in items for p in (it.image, it.mask) if p is not None and not Path(p).exists()]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise FMOneShotError(f"Input not found: {shown}.", "check the paths (a manifest's paths are relative to "
                             "the CSV file's folder).")
    bad = [it.id for it in items if not set(it.id) <= ID_CHARACTERS or it.id.startswith(".")]
    if bad:
        raise FMOneShotError(f"The ids {bad[:5]} cannot name output files.",
                             "use letters, digits, '-', '_', '+' and '.' (not first) in ids; rename the files or "
                             "give ids in a CSV manifest.")
    repeated = sorted(i for i, n in Counter(it.id for it in items).items() if n > 1)
    if repeated:
        raise FMOneShotError(f"Two or more volumes have the id {repeated[:5]}, so their outputs would "
                             "collide.", "give each volume its own id (a CSV manifest id,image[,mask] sets them).")
    return items


# ---------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Settings:
    """How every volume is processed (the arguments of :class:`~FMOneShotLib.pipeline.OneShot`), the label
    file format, and per worker: PyTorch threads (0: leave as the worker has it) and whether each worker
    of a local cluster takes the GPU of its number."""

    backend: str = "offline"
    adapter: str | None = "auto"
    segmenter: str = "auto"
    seed: int = 0
    backend_options: dict = field(default_factory=dict)
    adapter_options: dict = field(default_factory=dict)
    segmenter_options: dict = field(default_factory=dict)
    modality: str | None = None
    format: str = ".nii.gz"
    torch_threads: int = 0
    gpu_per_worker: bool = False

    def result_settings(self) -> dict:
        """The settings that decide a volume's result (threads and GPU placement do not)."""
        d = asdict(self)
        d.pop("torch_threads")
        d.pop("gpu_per_worker")
        return d

    def oneshot_kwargs(self) -> dict:
        return {"backend": self.backend, "adapter": self.adapter, "segmenter": self.segmenter, "seed": self.seed,
                "backend_options": dict(self.backend_options), "adapter_options": dict(self.adapter_options),
                "segmenter_options": dict(self.segmenter_options)}


def batch_digest(template, settings: Settings) -> str:
    """sha256 of the template (``Template.digest``), the settings that decide results, and the FMOneShot
    version: two runs with the same digest give the same outputs."""
    doc = {"template": template.digest(), "settings": settings.result_settings(), "version": __version__}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


# ---------------------------------------------------------------------- on the workers
_ENGINES: dict = {}  # batch digest -> OneShot, one per worker process
_LOCK = threading.Lock()  # one volume at a time per worker process: the segmenter keeps per-image state
BUILDS: dict = {}  # batch digest -> OneShot objects this process built for it (tests check: at most one)


def _engine(template, settings: Settings, digest: str):
    """This worker's fitted OneShot for the batch ``digest``; built (models loaded, template features
    computed, the template's trained adapter reused) on the worker's first task only."""
    engine = _ENGINES.get(digest)
    if engine is not None:
        return engine
    import torch

    from .pipeline import OneShot

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    if settings.gpu_per_worker and torch.cuda.is_available():
        from distributed import get_worker

        name = get_worker().name  # a LocalCluster numbers its workers 0, 1, ...
        if isinstance(name, int):
            torch.cuda.set_device(name % torch.cuda.device_count())
    _ENGINES.clear()  # a worker keeps the models of one batch only
    engine = OneShot(template, **settings.oneshot_kwargs()).fit()
    BUILDS[digest] = BUILDS.get(digest, 0) + 1
    _ENGINES[digest] = engine
    return engine


def fit_template(template, settings: Settings, digest: str):
    """Task: fit the template once (trains its adapter) and return it, trained state included."""
    with _LOCK:
        return _engine(template, settings, digest).template


def _slice_ranges(slices) -> str:
    """[3, 4, 5, 9] -> '3-5 9'."""
    out, run = [], []
    for z in slices:
        if run and z != run[-1] + 1:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
            run = []
        run.append(z)
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return " ".join(out)


def summarise(result, volume, reference=None) -> dict:
    """A volume's numbers from its :class:`~FMOneShotLib.pipeline.Result`: per label the slices where it was
    found (indices in the template's plane), its volume in mL (voxels x voxel volume in mm^3 / 1000) and,
    with a ``reference`` label array (z, y, x) on the volume's grid, the 3D Dice against the reference's
    voxels of the label's value (``metrics.dice``); per landmark the best slice, pixel (x, y) on it, its
    position in mm (LPS) and the confidence."""
    import numpy as np

    from .metrics import dice

    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    labels = {}
    for i, (name, value) in enumerate(zip(result.label_names, result.label_values)):
        mask = result.mask(name)
        entry = {"value": int(value), "slices": [int(z) for z in np.flatnonzero(result.present[:, i])],
                 "volume_ml": round(float(mask.sum()) * voxel_ml, 4)}
        if reference is not None:
            entry["dice"] = round(dice(mask, reference == value), 6)
        labels[name] = entry
    landmarks = {name: {"slice": int(lm.slice), "x": round(lm.xy[0], 3), "y": round(lm.xy[1], 3),
                        "mm": [round(float(c), 3) for c in lm.physical], "confidence": round(lm.confidence, 6)}
                 for name, lm in result.best_landmarks().items()}
    return {"plane": result.orientation, "labels": labels, "landmarks": landmarks}


def _reference(mask_path: str, volume):
    """The reference label array of ``mask_path``, which must lie on ``volume``'s grid."""
    import numpy as np

    from .image import read_volume

    ref = read_volume(mask_path)
    same = (ref.array.shape == volume.array.shape and np.allclose(ref.spacing, volume.spacing, atol=1e-3)
            and np.allclose(ref.origin, volume.origin, atol=1e-2)
            and np.allclose(ref.direction, volume.direction, atol=1e-4))
    if not same:
        raise FMOneShotError(f"The mask {mask_path} is not on the grid of its image (shape {ref.array.shape} vs "
                             f"{volume.array.shape}, or other spacing, origin or direction).",
                             "give the reference mask of this very image.")
    return ref.array


def process_volume(item: Item, template, settings: Settings, output: str, digest: str) -> dict:
    """Task: segment one volume with this worker's engine, write its label file and record atomically, and
    return the record (status ``ok``; ``seconds``: reading, segmenting and writing it, without the worker's
    one-time model build), or the record of its failure (status ``failed``, the error) with nothing
    written."""
    from .image import read_volume, write_volume

    out = Path(output)
    record = {"id": item.id, "image": item.image, "mask": item.mask, "status": "failed", "error": "",
              "seconds": 0.0, "labels_file": f"{item.id}{LABEL_SUFFIX}{settings.format}", "digest": digest}
    try:
        t0 = time.perf_counter()
        volume = read_volume(item.image, settings.modality or template.modality)
        reference = _reference(item.mask, volume) if item.mask else None
        with _LOCK:
            t_build = time.perf_counter()
            engine = _engine(template, settings, digest)
            t0 += time.perf_counter() - t_build  # a volume's seconds leave out the worker's one model build
            result = engine.apply(volume)
        record.update(summarise(result, volume, reference))
        record["status"] = "ok"
        with atomic_paths(out / record["labels_file"], out / f"{item.id}{RECORD_SUFFIX}") as (labels, rec):
            write_volume(result.labels, labels, force=True)
            record["seconds"] = round(time.perf_counter() - t0, 3)
            rec.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    except Exception as exc:  # one volume's failure is recorded; the batch goes on
        logging.getLogger(__name__).debug("volume %s failed", item.id, exc_info=True)
        record["status"] = "failed"
        record["error"] = str(exc) if isinstance(exc, FMOneShotError) else f"{type(exc).__name__}: {exc}"
        for key in ("plane", "labels", "landmarks"):
            record.pop(key, None)
    return record


# ---------------------------------------------------------------------- the client side
def require_dask() -> None:
    """Raise FMOneShotError with the fix when dask.distributed is not installed (an optional dependency:
    the Slicer module does not need it)."""
    import importlib.util

    if importlib.util.find_spec("distributed") is None:
        raise FMOneShotError("Batches run on Dask, and dask.distributed is not installed.",
                             "pip install 'fmoneshot[batch]' (or pip install 'dask[distributed]').")


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_cluster(workers: int | None = None, threads: int | None = None, gpu: bool = False):
    """A ``distributed.LocalCluster`` for this machine and the PyTorch threads of each worker.

    CPU: ``workers`` processes (default: one per core this process may use), one Dask thread each (one
    volume at a time), and ``threads`` PyTorch threads each (default: cores // workers, at least 1), so
    that workers x threads does not exceed the cores. ``gpu``: one worker per GPU (``workers`` must not
    ask for more), each on the GPU of its number. The dashboard is served on a free port (it shows when
    bokeh is installed). Returns (cluster, threads).
    """
    from distributed import LocalCluster

    cores = _cores()
    if gpu:
        import torch

        gpus = torch.cuda.device_count()
        if gpus == 0:
            raise FMOneShotError("A GPU was asked for, but PyTorch sees no CUDA GPU.",
                                 "use --device cpu, or run on a machine with a GPU and a CUDA build of PyTorch.")
        if workers is not None and workers > gpus:
            raise FMOneShotError(f"{workers} workers were asked for on {gpus} GPU(s); with --device cuda each "
                                 "worker has a GPU of its own.", f"ask for at most {gpus} workers.")
        workers = workers or gpus
    workers = workers or cores
    if workers < 1 or (threads is not None and threads < 1):
        raise FMOneShotError("Workers and threads must be at least 1.", "give --workers N and --threads N >= 1.")
    threads = threads or max(1, cores // workers)
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0",
                           silence_logs=logging.ERROR)
    return cluster, threads


def _leave_interrupt_to_client():
    """Make this worker process ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the
    client, not each worker, stops the batch (it closes the cluster and removes temporary files)."""
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def _interrupt_plugin():
    from distributed.diagnostics.plugin import WorkerPlugin

    class LeaveInterruptToClient(WorkerPlugin):
        name = "fmoneshot-leave-interrupt-to-client"

        def setup(self, worker):
            _leave_interrupt_to_client()

    return LeaveInterruptToClient()


def dashboard_link(client) -> str | None:
    """The Dask dashboard's address when the scheduler serves one (it needs bokeh there), else None."""

    def has_bokeh():  # defined here, so that it travels by value to a scheduler without FMOneShot
        import importlib.util

        return importlib.util.find_spec("bokeh") is not None

    try:
        if "dashboard" not in client.scheduler_info().get("services", {}):
            return None
        # without bokeh the scheduler answers the dashboard's address with a page asking to install it
        return client.dashboard_link if client.run_on_scheduler(has_bokeh) else None
    except Exception:  # the link is a convenience; a scheduler that cannot say has none
        return None


@dataclass
class Report:
    """What :func:`run` did: one row per input (the manifest), its files, the dashboard link."""

    rows: list
    output: Path
    manifest: tuple
    dashboard: str | None = None

    def count(self, status: str) -> int:
        return sum(r["status"] == status for r in self.rows)


def _load_record(path: Path, digest: str) -> dict | None:
    """A finished volume's record when it belongs to this batch (same digest) and its label file exists."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if (not isinstance(record, dict) or record.get("digest") != digest or record.get("status") != "ok"
            or not (path.parent / str(record.get("labels_file"))).is_file()):
        return None
    return record


def _prepare_output(out: Path, items: list, settings: Settings, digest: str, force: bool) -> tuple:
    """Check the output folder before any work; return the records of the volumes already done and whether
    the folder already holds this batch (batch.json with its digest)."""
    if out.exists() and not out.is_dir():
        raise FMOneShotError(f"--output {out} is a file.", "give a folder for the batch's outputs.")
    state = out / "batch.json"
    ours = False
    if state.is_file():
        try:
            previous = json.loads(state.read_text(encoding="utf-8"))
        except ValueError:
            previous = {}
        ours = previous.get("format") == FORMAT and previous.get("digest") == digest
        if not ours and not force:
            raise FMOneShotError(f"{out} holds a batch made with another template or other settings; nothing "
                                 "was written.", "choose another --output folder, or pass --force to recompute "
                                 "every volume there.")
    if not ours:
        names = [out / n for n in ("batch.json", "template.json", "results.csv", "results.json")]
        names += [out / f"{it.id}{n}" for it in items for n in (RECORD_SUFFIX, f"{LABEL_SUFFIX}{settings.format}")]
        refuse_existing(names, force, "choose another --output folder, or pass --force to overwrite.")
    done = {}
    if ours:
        for it in items:
            record = _load_record(out / f"{it.id}{RECORD_SUFFIX}", digest)
            if record is not None and record.get("image") == it.image:
                done[it.id] = record
    return done, ours


def _write_manifest(out: Path, rows: list, digest: str) -> tuple:
    """results.csv (flat: one column per label and landmark number) and results.json, written together."""
    label_names = list(dict.fromkeys(n for r in rows for n in r.get("labels", {})))
    landmark_names = list(dict.fromkeys(n for r in rows for n in r.get("landmarks", {})))
    has_dice = any("dice" in v for r in rows for v in r.get("labels", {}).values())
    columns = list(MANIFEST_COLUMNS)
    for n in label_names:
        columns += [f"{n}_slices", f"{n}_ml"] + ([f"{n}_dice"] if has_dice else [])
    for n in landmark_names:
        columns += [f"{n}_slice", f"{n}_x_mm", f"{n}_y_mm", f"{n}_z_mm"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    for r in rows:
        flat = {k: ("" if r.get(k) is None else r.get(k)) for k in MANIFEST_COLUMNS}
        for n, v in r.get("labels", {}).items():
            flat[f"{n}_slices"] = _slice_ranges(v["slices"])
            flat[f"{n}_ml"] = v["volume_ml"]
            if "dice" in v:
                flat[f"{n}_dice"] = v["dice"]
        for n, v in r.get("landmarks", {}).items():
            flat[f"{n}_slice"] = v["slice"]
            flat[f"{n}_x_mm"], flat[f"{n}_y_mm"], flat[f"{n}_z_mm"] = v["mm"]
        writer.writerow(flat)
    doc = {"format": FORMAT, "digest": digest, "coordinates": "landmark x, y: pixels of the slice; mm: LPS",
           "volumes": rows}
    paths = (out / "results.csv", out / "results.json")
    with atomic_paths(*paths) as (csv_tmp, json_tmp):
        csv_tmp.write_text(buf.getvalue(), encoding="utf-8")
        json_tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    return paths


def run(template, inputs, output, client=None, *, backend: str = "offline", adapter: str | None = "auto",
        segmenter: str = "auto", seed: int = 0, backend_options: dict | None = None,
        adapter_options: dict | None = None, segmenter_options: dict | None = None, modality: str | None = None,
        format: str = ".nii.gz", device: str = "auto", workers: int | None = None, threads: int | None = None,
        force: bool = False, progress: bool = True) -> Report:
    """Apply ``template`` (a Template or its .json file) to every volume of ``inputs`` (see
    :func:`collect_inputs`) on Dask, writing into the folder ``output``; return the :class:`Report`.

    ``client``: a ``distributed.Client`` of an existing cluster (every worker must reach the input and
    output paths and have FMOneShot installed); None starts a :func:`local_cluster` (``workers``,
    ``threads``; one worker per GPU when ``device`` is cuda, or auto with a GPU and a model that runs on
    it) for the run and closes it after; ``threads`` sets PyTorch's threads on an existing cluster's
    workers too. The other arguments are
    :class:`~FMOneShotLib.pipeline.OneShot`'s, plus the label file ``format``.

    Raises FMOneShotError before any work for bad inputs or an output folder holding other outputs (see
    the module docstring), and when fitting the template fails. Volumes that fail are recorded, not raised.
    KeyboardInterrupt stops the batch: pending volumes are cancelled and listed as ``not run``, and the
    interrupt is raised again once the manifest is written.
    """
    from .image import LABEL_EXTENSIONS
    from .template import Template

    if not isinstance(template, Template):
        template = Template.load(template)
    template.validate()
    if not template.labels and not template.landmark_names:
        raise FMOneShotError("The template has neither labels nor landmarks.", "use a template with either.")
    if format not in LABEL_EXTENSIONS or format == ".png":
        raise FMOneShotError(f"Unknown label file format {format!r}.",
                             f"use one of {', '.join(e for e in LABEL_EXTENSIONS if e != '.png')}.")
    items = collect_inputs(inputs)
    require_dask()
    out = Path(output)
    settings = Settings(backend, adapter, segmenter, seed, dict(backend_options or {}), dict(adapter_options or {}),
                        dict(segmenter_options or {}), modality, format)
    digest = batch_digest(template, settings)
    done, ours = _prepare_output(out, items, settings, digest, force)
    out.mkdir(parents=True, exist_ok=True)
    remove_partials(out)  # left by a killed earlier run
    if not ours:
        _write_state(out, template, settings, digest)

    cluster = None
    if client is None:
        from distributed import Client

        gpu = _uses_gpu(settings, device)
        cluster, torch_threads = local_cluster(workers, threads, gpu)
        client = Client(cluster)
        client.register_plugin(_interrupt_plugin())
        settings = Settings(**{**asdict(settings), "torch_threads": torch_threads, "gpu_per_worker": gpu})
    elif threads:
        settings = Settings(**{**asdict(settings), "torch_threads": threads})
    link = dashboard_link(client)
    if progress and link:
        print(f"Dask dashboard: {link}", file=sys.stderr)
    rows = {it.id: {**done[it.id], "status": "skipped"} if it.id in done else
            {"id": it.id, "image": it.image, "mask": it.mask, "status": "not run", "error": "", "seconds": None,
             "labels_file": None} for it in items}
    futures = []
    try:
        fitted = _fitted_template(client, out, template, settings, digest, reuse=ours)
        todo = [it for it in items if it.id not in done]
        if todo:
            shared = client.scatter(fitted, broadcast=True)
            run_id = uuid.uuid4().hex[:8]  # fresh keys: a rerun on the same cluster never gets an old result
            futures = [client.submit(process_volume, it, shared, settings, str(out.resolve()), digest,
                                     key=f"fmoneshot-{it.id}-{run_id}") for it in todo]
            by_key = {f.key: it for f, it in zip(futures, todo)}
            _collect(futures, by_key, rows, len(items), len(done), progress)
    except KeyboardInterrupt:
        for f in futures:
            f.cancel()
        _finish(client, cluster, out)
        for it in items:  # volumes written whose result had not reached this client yet
            pending = rows[it.id]["status"] == "not run"
            record = _load_record(out / f"{it.id}{RECORD_SUFFIX}", digest) if pending else None
            if record is not None:
                rows[it.id] = record
        _write_manifest(out, [rows[it.id] for it in items], digest)
        raise
    except BaseException:
        for f in futures:
            f.cancel()
        _finish(client, cluster, out)
        raise
    _finish(client, cluster, out)
    manifest = _write_manifest(out, [rows[it.id] for it in items], digest)
    return Report([rows[it.id] for it in items], out, manifest, link)


def _uses_gpu(settings: Settings, device: str) -> bool:
    """Whether the local cluster's workers go one per GPU: ``device`` cuda, or auto on a computer with a CUDA
    GPU when a model runs on it (a foundation-model backend or SAM; the offline ones run on the CPU)."""
    if str(device).startswith("cuda"):
        return True
    if device not in (None, "", "auto"):
        return False
    from .models import resolve_device
    from .segmenters import resolve_segmenter

    segmenter = resolve_segmenter(settings.segmenter, settings.segmenter_options)[0]
    return (settings.backend != "offline" or segmenter == "sam") and resolve_device("auto").startswith("cuda")


def _write_state(out: Path, template, settings: Settings, digest: str) -> None:
    """batch.json: marks the folder as this batch's (its digest) before anything else is written there, so
    that a rerun after an interrupt, even one during the fit, recognises its own files."""
    doc = {"format": FORMAT, "version": __version__, "digest": digest, "template_digest": template.digest(),
           "settings": settings.result_settings()}
    with atomic_paths(out / "batch.json") as tmp:
        tmp.write_text(json.dumps(doc, indent=1, default=str) + "\n", encoding="utf-8")


def _fitted_template(client, out: Path, template, settings: Settings, digest: str, reuse: bool):
    """The template fitted by this batch: read back from the output folder on a rerun (``reuse``: the
    folder is this batch's), else fitted in one task on a worker and saved there."""
    from .template import Template

    saved = out / "template.json"
    if reuse and saved.is_file():
        try:
            return Template.load(saved)
        except FMOneShotError:  # damaged: fit again
            pass
    fitted = client.submit(fit_template, template, settings, digest, pure=False).result()
    fitted.save(saved, force=True)
    return fitted


def _collect(futures, by_key, rows, total, already, progress) -> None:
    """Gather the volumes as they finish, with a tqdm bar over volumes."""
    from distributed import as_completed
    from tqdm import tqdm

    with tqdm(total=total, initial=already, unit="volume", desc="batch", file=sys.stderr,
              disable=None if progress else True) as bar:
        for future in as_completed(futures):
            item = by_key[future.key]
            try:
                rows[item.id] = future.result()
            except Exception as exc:  # the worker died (out of memory, killed) or the task could not run
                rows[item.id] = {"id": item.id, "image": item.image, "mask": item.mask, "status": "failed",
                                 "error": f"{type(exc).__name__}: {exc}", "seconds": None, "labels_file": None}
            bar.update(1)
            failed = sum(r["status"] == "failed" for r in rows.values())
            if failed:
                bar.set_postfix(failed=failed)


def _finish(client, cluster, out: Path) -> None:
    """Close the cluster this run started (its workers stop), then remove temporary files left behind."""
    if cluster is not None:
        try:
            client.close()
            cluster.close()
        except Exception:  # closing is best effort; the files are what must be clean
            pass
    remove_partials(out)

