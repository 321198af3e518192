"""The ``fmoneshot`` command: demo, segment, localize, batch, eval, bench, weights.

Every input is checked before anything runs or is written; a bad input ends with one line on stderr that
names the problem and the fix, and exit code 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import FMOneShotError, FMOneShotWarning
from .files import atomic_paths, check_folder, refuse_existing, refuse_inputs
from .align import DEFAULT_KIND as DEFAULT_ALIGN
from .align import KINDS as ALIGN_KINDS
from .align import EXTENT_TOLERANCE, PRIOR_MARGIN, SEARCH_RADIUS
from .image import LABEL_EXTENSIONS
from .models import SAM2_TYPES
from .weights import BACKENDS, resolve_backend

# PyTorch and the modules that use it are imported inside the commands, after the inputs are checked: --help
# and a one-line error do not wait seconds for it.

SEGMENTER_HELP = ("auto (SAM 2, then SAM, when its weights are in the cache, else offline), sam2, sam, offline "
                  "or none")
# Label volumes are 3D: every format the image writer knows except PNG.
LABEL_FORMATS = tuple(e for e in LABEL_EXTENSIONS if e != ".png")
# DICOM SEG (dicomseg.py): for DICOM series targets, one SEG file per series.
DICOM_SEG = "dicom-seg"


@contextlib.contextmanager
def _progress(desc: str):
    """A tqdm bar over the slices of one volume, yielded as a progress(done, total) callback."""
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="slice", leave=False, file=sys.stderr, disable=None)

    def update(done, total):
        bar.total = total
        bar.n = done
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()


def _parse_point(text: str, what: str):
    """'name:x,y' -> (name, (x, y))."""
    try:
        name, coords = text.rsplit(":", 1)
        x, y = (float(c) for c in coords.split(","))
    except ValueError:
        raise FMOneShotError(f"Cannot read the {what} {text!r}.",
                             "write it as NAME:X,Y in pixels of the template slice, e.g. liver:120,85.") from None
    if not name:
        raise FMOneShotError(f"The {what} {text!r} has no name.", "write it as NAME:X,Y, e.g. liver:120,85.")
    return name, (x, y)


def _template_from_args(args, landmarks_only: bool = False):
    from .image import read_volume
    from .template import Template

    if args.template:
        if args.template_image or args.positive or args.negative or args.mask or getattr(args, "landmark", None):
            raise FMOneShotError("Both --template and inline points or masks were given.",
                                 "use a saved template file, or --template-image with points, not both.")
        return Template.load(args.template)
    if not args.template_image:
        raise FMOneShotError("No template was given.",
                             "pass --template FILE.json, or --template-image IMAGE with points on one slice.")
    volume = read_volume(args.template_image, args.modality)
    plane = args.plane
    axis = volume.slice_axis(plane)
    z = args.slice if args.slice is not None else volume.resliced(axis).n_slices // 2
    if landmarks_only:
        pairs = [_parse_point(t, "landmark") for t in (args.landmark or [])]
        names = [n for n, _ in pairs]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:  # one position per landmark: a second one would silently replace the first
            raise FMOneShotError(f"The landmark {', '.join(repeated)} is given more than once.",
                                 "give each landmark once, or name them apart (e.g. sella_1, sella_2).")
        lms = dict(pairs)
        if not lms:
            raise FMOneShotError("No landmark was given.", "add --landmark NAME:X,Y for each landmark.")
        return Template.from_volume(volume, z, landmarks=lms, orientation=plane)
    positive, negative = {}, {}
    for text in args.positive or []:
        name, xy = _parse_point(text, "positive point")
        positive.setdefault(name, []).append(xy)
    for text in args.negative or []:
        name, xy = _parse_point(text, "negative point")
        negative.setdefault(name, []).append(xy)
    masks = dict(_template_mask(text, volume, axis, z) for text in args.mask or [])
    for name in masks:
        if positive and name not in positive:
            raise FMOneShotError(f"Unknown label {name!r} in --mask: no --positive point names it "
                                 f"(labels: {', '.join(positive)}).",
                                 f"write the label's name as in --positive, or add --positive {name}:X,Y.")
    for name in negative:
        if name not in positive and name not in masks:
            raise FMOneShotError(f"Label {name!r} has negative points but no positive point.",
                                 f"add --positive {name}:X,Y inside the structure.")
    return Template.from_volume(volume, z, positive, negative, masks, orientation=plane)


def _template_mask(text: str, volume, axis: int, z: int):
    """'NAME:FILE' or 'NAME:FILE:VALUE' -> (name, the (H, W) bool mask on slice ``z`` of the template plane).

    The file is matched to the template volume by physical position (image.labels_on_grid); a 2D file is
    the template slice itself. A file with several label values needs VALUE, which picks one of them."""
    import numpy as np

    from .image import labels_on_grid, read_volume

    name, _, file = text.partition(":")
    value = None
    head, sep, tail = file.rpartition(":")
    if sep and tail.strip().isdigit():
        file, value = head, int(tail)
    if not name or not file:
        raise FMOneShotError(f"Cannot read --mask {text!r}.", "write it as NAME:FILE, or NAME:FILE:VALUE to take "
                             "one label value of a multi-label file (a mask of the template slice or volume).")
    mask = read_volume(file)
    what = f"The mask {file} of label {name!r}"
    if mask.is_2d and not volume.is_2d:  # a 2D file is the template slice itself
        plane_shape = volume.resliced(axis).slice_shape
        if mask.slice_shape != plane_shape:
            raise FMOneShotError(f"{what} is a 2D image of {mask.slice_shape[::-1]} pixels (width, height); the "
                                 f"template slice has {plane_shape[::-1]}.",
                                 "give a mask of the template slice, or a mask volume with the template's geometry.")
        plane = labels_on_grid(mask, mask, what)[0]  # its own grid: only the check of its values
    else:
        plane = volume.like(labels_on_grid(mask, volume, what)).resliced(axis).array[z]
    found = [int(v) for v in np.unique(mask.array) if v != 0]
    if value is not None:
        if value not in found:
            raise FMOneShotError(f"{what} holds no value {value} (it holds {', '.join(map(str, found)) or 'only 0'}).",
                                 "pick one of the values it holds after the last colon, NAME:FILE:VALUE.")
        plane = plane == value
    elif len(found) > 1:
        shown = ", ".join(map(str, found[:8])) + (", ..." if len(found) > 8 else "")
        raise FMOneShotError(f"{what} holds {len(found)} label values ({shown}), not one mask.",
                             f"pick the value of {name!r} with --mask {name}:{file}:VALUE, or give a binary mask.")
    else:
        plane = plane != 0
    if not plane.any():
        raise FMOneShotError(f"{what} is empty on the template slice {z}.",
                             "give the mask painted on that slice, or choose its --slice (and --plane).")
    return name, plane


def _output_paths(targets, output, suffix: str, fmt: str, force: bool, extensions=LABEL_EXTENSIONS):
    """One output file per target: ``output`` itself when it names a file (one target only), else
    FOLDER/NAME+suffix+fmt, NAME the target's name without its image extension (image.image_stem).

    A path ending with an extension that is not one of ``extensions`` (``result.txt``, ``X.NII.GZ``) is
    refused unless it is an existing folder: a file name is never turned into a folder."""
    from .image import image_stem

    folder = str(output).endswith(("/", "\\"))  # a trailing separator says: a folder
    output = Path(output)
    if any(str(output).endswith(e) for e in extensions) and not output.is_dir() and not folder:
        if len(targets) != 1:
            raise FMOneShotError(f"--output {output} names one file, but there are {len(targets)} targets.",
                                 "give a folder for --output (one file per target is written into it).")
        paths = [output]
    else:
        if output.exists() and not output.is_dir():
            raise FMOneShotError(f"{output} is a file, not a folder for the outputs of {len(targets)} targets.",
                                 f"give a folder, or a file name ending with {', '.join(extensions)} for one target.")
        if output.suffix and not output.exists() and not folder:
            raise FMOneShotError(f"Cannot tell whether --output {output} is a file or a folder: its extension "
                                 f"{output.suffix!r} is not one FMOneShot writes.",
                                 f"end a file name with one of {', '.join(extensions)} (lower case); for a folder, "
                                 "end it with / or create it first.")
        names = [image_stem(t) for t in targets]
        clash = sorted({n for n in names if names.count(n) > 1})
        if clash:
            raise FMOneShotError(f"Several targets are called {', '.join(clash)} (without their image extension), "
                                 "so their outputs would have one name.",
                                 "rename or link one of them under another name, or segment each in a run of its own "
                                 "with its own --output folder.")
        paths = [output / f"{n}{suffix}{fmt}" for n in names]
    for path in paths:
        check_folder(path)
    refuse_existing(paths, force, "choose another --output, or pass --force to overwrite.")
    return paths


def _inputs(args) -> list:
    """Every file the command reads: targets, template image and file (with its side files), masks."""
    from .template import template_files

    inputs = [*getattr(args, "targets", [])]
    inputs += [getattr(args, "template_image", None)]
    if getattr(args, "template", None):
        inputs += template_files(args.template)
    for text in getattr(args, "mask", None) or []:
        inputs.append(text.partition(":")[2])
        head, sep, tail = inputs[-1].rpartition(":")
        if sep and tail.strip().isdigit():
            inputs.append(head)
    return inputs


def _chain_options(args) -> dict:
    """--align, --search-radius, --prior-margin, --extent-tolerance as :class:`pipeline.OneShot` keyword arguments."""
    options = {"align": args.align}
    if args.search_radius is not None:
        options["search_radius"] = args.search_radius
    if args.prior_margin is not None:
        options["prior_margin"] = args.prior_margin
    if getattr(args, "extent_tolerance", None) is not None:
        options["extent_tolerance"] = args.extent_tolerance
    return options


def _parse_extents(texts, template) -> dict:
    """['liver:12:29', ...] -> {"liver": (12, 29)}, checked against the template's labels, its volume's slices and
    the slices each label is marked on (:meth:`Template.validate`), before any work."""
    out = {}
    for text in texts or []:
        try:
            name, first, last = text.rsplit(":", 2)
            out[name] = (int(first), int(last))
        except ValueError:
            raise FMOneShotError(f"Cannot read the extent {text!r}.",
                                 "write it as NAME:FIRST:LAST template slice numbers, e.g. liver:12:29.") from None
    template.extent = {**template.extent, **out}
    template.validate()
    return out


def _check_targets(targets):
    missing = [t for t in targets if not Path(t).exists()]
    if missing:
        raise FMOneShotError(f"Target not found: {', '.join(missing)}.", "check the paths of the target volumes.")


def _adapter_options(args) -> dict:
    options = {}
    if args.augment:
        if args.adapter in (None, "none"):
            raise FMOneShotError("--augment trains an adapter on augmented template slices, and --adapter is none.",
                                 "choose an adapter (auto, classification, contrastive, basic), or drop --augment.")
        options["augment"] = True
    if args.threshold is None:
        return options
    if args.adapter != "basic":
        raise FMOneShotError("--threshold applies to the basic adapter only.", "add --adapter basic, or drop --threshold.")
    return {**options, "threshold": args.threshold}


FOUNDATION_OPTIONS = {"weights": "--weights", "block": "--block", "stride": "--stride",
                      "log_bin_levels": "--log-bin", "input_size": "--input-size"}
SD_OPTIONS = {"timestep": "--timestep", "up_block": "--up-block", "ensemble": "--ensemble"}


def _backend_options(args) -> dict:
    """The feature backend's options from --weights, --block, --stride, --log-bin, --input-size, --device,
    --precision and --sam-model, checked against the backend before anything runs."""
    if getattr(args, "device", None) not in (None, "auto"):
        from .models import resolve_device

        resolve_device(args.device)  # refuses cuda where PyTorch sees no GPU (never a silent CPU run), unknown names
    given = {k: getattr(args, k, None) for k in FOUNDATION_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    sd_given = {k: getattr(args, k, None) for k in SD_OPTIONS}
    sd_given = {k: v for k, v in sd_given.items() if v is not None}
    backend = resolve_backend(args.backend)[0]
    if sd_given and backend != "sd":
        raise FMOneShotError(f"{', '.join(SD_OPTIONS[k] for k in sd_given)} apply to the Stable Diffusion backend "
                             "only.", "add --backend sd, or drop those options.")
    if backend == "offline":
        if given:
            flags = ", ".join(FOUNDATION_OPTIONS[k] for k in given)
            raise FMOneShotError(f"{flags} apply to foundation-model backends, not to the offline backend.",
                                 "choose a backend such as --backend d2s14, or drop those options.")
        return {}
    if backend == "sam":
        wrong = [FOUNDATION_OPTIONS[k] for k in ("block", "stride", "input_size") if k in given]
        if wrong:
            raise FMOneShotError(f"{', '.join(wrong)} do not apply to the SAM encoder backend (fixed 1024 input, "
                                 "its output layer).", "drop them, or choose a ViT backend such as d2s14.")
        given["model"] = args.sam_model
    if backend == "sd":
        wrong = [FOUNDATION_OPTIONS[k] for k in ("block", "stride") if k in given]
        if wrong:
            raise FMOneShotError(f"{', '.join(wrong)} do not apply to the Stable Diffusion backend (DIFT features of "
                                 "one up-block of its UNet).", "drop them, or choose a ViT backend such as d2s14.")
        given.update(sd_given)
    if given.get("weights") == "random":
        print("fmoneshot: warning: randomly initialised weights (--weights random): for tests and benchmarks "
              "only; the results mean nothing.", file=sys.stderr)
    return {**given, "device": args.device, "precision": args.precision}


def _segmenter_options(args) -> dict:
    """SAM's and SAM 2's options (--sam-model or --sam2-model, --sam-weights, --device, --precision) when the
    segmenter can be one of them."""
    if getattr(args, "segmenter", "auto") not in ("auto", "sam", "sam2"):
        if args.sam_weights is not None:
            raise FMOneShotError("--sam-weights applies to the SAM and SAM 2 segmenters only.",
                                 "add --segmenter sam or --segmenter sam2, or drop --sam-weights.")
        return {}
    options = {"device": args.device, "precision": args.precision}
    if args.segmenter == "sam2":
        options["model"] = args.sam2_model
    elif args.segmenter == "sam" or args.sam_weights is not None:
        options["model"] = args.sam_model
    if args.sam_weights is not None:  # SAM weights named: 'auto' resolves to SAM (segmenters.resolve_segmenter)
        options["weights"] = args.sam_weights
        if args.sam_weights == "random":
            print(f"fmoneshot: warning: {'SAM 2' if args.segmenter == 'sam2' else 'SAM'} with randomly initialised "
                  "weights (--sam-weights random): for tests "
                  "and benchmarks only; the masks mean nothing.", file=sys.stderr)
    return options


def cmd_segment(args) -> int:
    from .image import read_volume, write_volume
    from .template import color_table_path, template_files, write_color_table

    # every output is checked before anything is read or computed
    _check_targets(args.targets)
    if args.format == DICOM_SEG:
        from .dicomseg import SEG_EXTENSION, series_files

        sources = [series_files(t) for t in args.targets]  # refuses what is not one DICOM series
        paths = _output_paths(args.targets, args.output, ".seg", SEG_EXTENSION, args.force,
                              extensions=(SEG_EXTENSION,))
    else:
        paths = _output_paths(args.targets, args.output, "-labels", args.format, args.force)
    # which value is which label, beside each label file (DICOM SEG carries it in the file)
    tables = [] if args.format == DICOM_SEG else [color_table_path(p) for p in paths]
    refuse_existing(tables, args.force, "choose another --output, or pass --force to overwrite.")
    outputs = list(paths) + tables
    if args.save_template:
        saved = template_files(args.save_template, adapter=args.adapter not in (None, "none"))
        for f in saved:
            check_folder(f)
        refuse_existing(saved, args.force, "choose another --save-template name, or pass --force.")
        outputs += saved
    refuse_inputs(outputs, _inputs(args))
    template = _template_from_args(args)
    if not template.labels:
        raise FMOneShotError("The template has no label to segment.", "add --positive NAME:X,Y points.")
    _parse_extents(args.extent, template)
    volumes = [read_volume(t, args.modality or template.modality) for t in args.targets]
    for path, volume in zip(paths, volumes):
        if str(path).endswith(".png") and not volume.is_2d:
            raise FMOneShotError(f"--output {path} is a PNG, and {volume.name} is a volume of {volume.n_slices} "
                                 "slices; PNG holds one 2D image.",
                                 f"end --output with one of {', '.join(LABEL_FORMATS)}.")
    from .pipeline import OneShot

    engine = OneShot(template, backend=args.backend, adapter=args.adapter, segmenter=args.segmenter,
                     seed=args.seed, adapter_options=_adapter_options(args), backend_options=_backend_options(args),
                     segmenter_options=_segmenter_options(args), propagate=args.propagate,
                     **_chain_options(args)).fit()
    results = []
    for volume in volumes:
        with _progress(volume.name) as update:
            results.append(engine.apply(volume, progress=update))
    for k, (path, result) in enumerate(zip(paths, results)):
        path.parent.mkdir(parents=True, exist_ok=True)
        if args.format == DICOM_SEG:
            from .dicomseg import algorithm_parameters, write_dicom_seg

            write_dicom_seg(result.labels, template.labels, sources[k], path, algorithm_parameters(engine),
                            force=args.force)
        else:
            write_volume(result.labels, path, force=args.force)
            write_color_table(template.labels, tables[k], force=args.force)
        found = {n: int(result.present[:, i].sum()) for i, n in enumerate(result.label_names)}
        print(f"{path}: " + ", ".join(f"{n} on {k} of {len(result.present)} {result.orientation} slices"
                                      for n, k in found.items()))
    print("label values: " + ", ".join(f"{lb.value} {lb.name}" for lb in template.labels) + " (0 background)"
          + (f"; Slicer colour table beside each label file: {', '.join(str(t) for t in tables)}" if tables else ""))
    if args.save_template:
        template.save(args.save_template, force=args.force)
        print(f"template saved to {args.save_template}")
    return 0


def cmd_localize(args) -> int:
    from .image import read_volume

    _check_targets(args.targets)
    out = Path(args.output)
    if out.suffix not in (".json", ".csv"):
        raise FMOneShotError(f"Cannot tell the format of {out}.", "end --output with .json or .csv.")
    check_folder(out)
    refuse_existing([out], args.force, "choose another --output, or pass --force.")
    refuse_inputs([out], _inputs(args))
    template = _template_from_args(args, landmarks_only=True)
    if not template.landmark_names:
        raise FMOneShotError("The template has no landmark.", "add --landmark NAME:X,Y, or use a landmark template.")
    volumes = [read_volume(t, args.modality or template.modality) for t in args.targets]
    from .pipeline import OneShot

    engine = OneShot(template, backend=args.backend, adapter=args.adapter, seed=args.seed, segmenter="offline",
                     adapter_options=_adapter_options(args), backend_options=_backend_options(args),
                     **_chain_options(args)).fit()
    rows = []
    for target, volume in zip(args.targets, volumes):
        with _progress(volume.name) as update:
            result = engine.apply(volume, progress=update)
        for name, lm in result.best_landmarks().items():
            rows.append({"target": str(target), "landmark": name, "slice": lm.slice, "x": round(lm.xy[0], 3),
                         "y": round(lm.xy[1], 3), "physical_x": round(lm.physical[0], 3),
                         "physical_y": round(lm.physical[1], 3), "physical_z": round(lm.physical[2], 3),
                         "confidence": round(lm.confidence, 4)})
    if out.suffix == ".json":
        text = json.dumps({"coordinates": "pixel x = column, y = row; physical in mm, LPS", "landmarks": rows},
                          indent=1)
    else:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
        text = buf.getvalue()
    with atomic_paths(out) as tmp:
        tmp.write_text(text, encoding="utf-8")
    print(f"{len(rows)} landmarks written to {out}")
    return 0


def cmd_batch(args) -> int:
    """A cohort on Dask: the library's ``batch.run`` on a local cluster or on ``--scheduler ADDRESS``."""
    from .batch import require_dask, run

    options = {"backend": args.backend, "adapter": args.adapter, "segmenter": args.segmenter, "seed": args.seed,
               "backend_options": _backend_options(args), "adapter_options": _adapter_options(args),
               "segmenter_options": _segmenter_options(args), "modality": args.modality, "format": args.format,
               "force": args.force}
    client = None
    if args.scheduler:
        if args.workers is not None:
            raise FMOneShotError("--workers sizes the local cluster; with --scheduler the cluster's own workers run.",
                                 "drop --workers, or drop --scheduler to run on this computer.")
        require_dask()
        from distributed import Client

        try:
            client = Client(args.scheduler, timeout="30s")
        except OSError as exc:
            raise FMOneShotError(f"Cannot reach the Dask scheduler at {args.scheduler} ({exc}).",
                                 "start one with 'dask scheduler' and give its address (tcp://HOST:8786).") from None
    try:
        report = run(args.template, args.inputs, args.output, client=client, device=args.device,
                     workers=args.workers, threads=args.threads, **options)
    except KeyboardInterrupt:
        print(f"fmoneshot: interrupted; the volumes finished are kept in {args.output} and listed in its "
              "results.csv; run the same command again to do the rest.", file=sys.stderr)
        return 130
    finally:
        if client is not None:
            client.close()
    counts = {s: report.count(s) for s in ("ok", "skipped", "failed")}
    n = len(report.rows)
    print(f"fmoneshot batch: {n} volume{'' if n == 1 else 's'}: {counts['ok']} done, {counts['skipped']} already done "
          f"(skipped), {counts['failed']} failed; manifest {report.manifest[0]}")
    for row in report.rows:
        if row["status"] == "failed":
            print(f"  {row['id']}: {row['error']}")
    return 1 if counts["failed"] else 0


def cmd_demo(args) -> int:
    from .demo import SAMPLE, run_demo

    with _progress("demo") as update:
        report = run_demo(args.output, data=args.data or SAMPLE, labels=args.labels, backend=args.backend,
                          segmenter=args.segmenter, seed=args.seed, force=args.force, progress=update,
                          backend_options=_backend_options(args), segmenter_options=_segmenter_options(args))
    weights = "no downloaded weights" if args.backend == "offline" and report.segmenter != "sam" else "SAM weights"
    data = f"case {report.case}" + (f" ({report.modality})" if report.modality else "") + f" of {report.dataset}"
    print(f"FMOneShot demo: {' and '.join(args.labels)} marked on slice {report.template_slice} of {data} "
          f"(backend {args.backend}, segmenter {report.segmenter}, {weights})")
    for name, d in report.dice.items():
        e = report.empty[name]
        empty = "every slice contains it" if math.isnan(e) else f"{100 * e:.0f}% of the slices without it left empty"
        print(f"  {name:8s} Dice {d:.3f} (mean over the slices that contain it); {empty}")
    print(f"  time {report.seconds:.2f} s for {report.n_slices} slices (fit {report.fit_seconds:.2f} s), "
          f"peak memory {report.peak_memory_mb:.0f} MB")
    print("  label values: " + ", ".join(f"{v} {n}" for n, v in report.label_values.items()) + " (0 background)")
    for f in report.files:
        print(f"  wrote {f}")
    print("  montage.png shows each slice as radiologists read it (anterior at the top, the patient's left on the "
          "right); point coordinates (X = column, Y = row) count pixels in the file's storage order, which can be "
          "flipped relative to that")
    return 0


def _json_output(args) -> Path | None:
    """The --json file, checked before anything runs."""
    if not args.json:
        return None
    out = Path(args.json)
    if out.suffix != ".json":
        raise FMOneShotError(f"Cannot write JSON to {out}.", "end --json with .json.")
    check_folder(out)
    refuse_existing([out], args.force, "choose another --json file, or pass --force.")
    return out


def _write_json(out: Path | None, doc: dict) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")
    print(f"  wrote {out}")


def cmd_eval(args) -> int:
    from .datasets import load_dataset
    from .evaluate import dataset_files, evaluate, report_files, write_report

    out = _json_output(args)
    # the report's files are checked before the evaluation, not after it
    dataset = load_dataset(args.dataset)
    names = ["all"] if dataset.task == "landmarks" else (args.labels or list(dataset.labels.values()))
    report = report_files(args.report, names) if args.report else []
    refuse_existing(report, args.force, "choose another --report folder, or pass --force to overwrite it.")
    refuse_inputs([out, *report] if out else report, dataset_files(dataset))
    with _progress("eval") as update:
        summary, targets = evaluate(args.dataset, labels=args.labels, backend=args.backend,
                                    backend_options=_backend_options(args),
                                    segmenter_options=_segmenter_options(args),
                                    adapter=args.adapter, segmenter=args.segmenter, template=args.template,
                                    points=args.points, seed=args.seed, max_targets=args.max_targets,
                                    progress=update, keep_pictures=bool(args.report),
                                    adapter_options=_adapter_options(args), propagate=args.propagate,
                                    chain_options=_chain_options(args), extent=args.extent)
    print(f"{summary['dataset']} ({summary['task']}), backend {summary['backend']}, adapter {summary['adapter']}, "
          f"segmenter {summary['segmenter']}, align {summary['align']['kind']}, {summary['seconds']:.1f} s "
          f"(align {summary['align']['seconds']:.1f} s)")

    def f(v, d=3):
        return "  n/a" if v is None else f"{v:.{d}f}"

    if summary["task"] == "segmentation":
        print(f"  {'label':24s} {'Dice':>6s} {'median':>6s} {'IoU':>6s} {'Acc+':>6s} {'Acc-':>6s} {'targets':>7s} "
              f"{'empty ok':>8s}")
        for name, r in summary["labels"].items():
            print(f"  {name:24s} {f(r['dice']):>6s} {f(r['dice_median']):>6s} {f(r['iou']):>6s} "
                  f"{f(r['acc_pos']):>6s} {f(r['acc_neg']):>6s} {r['targets']:7d} {f(r['empty_slice_accuracy']):>8s}")
        print(f"  mean Dice {f(summary['mean_dice'])}")
    else:
        print(f"  {'landmark':24s} {'NED':>7s} {'px':>7s} {'mm':>7s} {'<=10px':>7s}")
        for name, r in summary["landmarks"].items():
            print(f"  {name:24s} {f(r['ned'], 4):>7s} {f(r['px'], 1):>7s} {f(r['mm'], 1):>7s} "
                  f"{f(r['within_10px'], 2):>7s}")
        print(f"  mean NED {f(summary['mean_ned'], 4)}, within 10 px {f(summary['within_10px'], 2)}")
    _write_json(out, summary)
    if args.report:
        print(f"  wrote {write_report(summary, targets, args.report, force=args.force)}")
    return 0


def cmd_bench(args) -> int:
    from .bench import run_bench

    out = _json_output(args)
    with _progress("bench") as update:
        r = run_bench(args.slices, args.size, backend=args.backend, segmenter=args.segmenter, adapter=args.adapter,
                      backend_options=_backend_options(args), segmenter_options=_segmenter_options(args),
                      naive_slices=args.naive_slices, seed=args.seed, progress=update, threads=args.threads,
                      segmenter_slices=args.segmenter_slices, chain_options=_chain_options(args))
    v, sec = r["volume"], r["seconds"]
    print(f"FMOneShot bench: {v['slices']} slices of {v['size'][0]}x{v['size'][1]}, {v['structure']} on "
          f"{v['slices_with_structure']} slices (found on {v['slices_found']}); backend {r['backend']}, adapter "
          f"{r['adapter']}, segmenter {r['segmenter']}, {r['device']}, precision "
          f"{r['precision']['features']} (features) / {r['precision']['segmenter']} (segmenter)")
    print(f"  threads: {r['threads']['model_forwards']} for model forwards, {r['threads']['small_work']} for "
          "small-tensor work (adapters, offline features, correspondences)")
    ss = r["segmenter_slices"]
    where = "the slices holding it in the reference" if ss["rule"] == "reference" else "where the chain found it"
    print(f"  segmenter on {ss['count']} slices ({ss['rule']}: {where})")
    n = r["naive"]
    slices, segmented = v["slices"], max(ss["count"], 1)
    print(f"  total {sec['total']:.2f} s = {r['seconds_per_slice'] * 1000:.1f} ms per slice "
          f"(CPU time {r['cpu_seconds']:.1f} s)")
    print(f"    {'stage':15s} {'chain (s)':>10s} {'per slice':>10s} {'naive per slice':>16s}")
    for stage in ("io", "fit", "align", "features", "adapter", "correspondence", "segmenter"):
        per = sec.get(stage, 0.0) / (segmented if stage == "segmenter" else slices)
        naive = n["per_stage_per_slice"].get(stage)
        print(f"    {stage:15s} {sec.get(stage, 0.0):10.2f} "
              + (f"{per:10.3f}" if stage not in ("io", "fit") else " " * 10)
              + (f" {naive:16.3f}" if naive is not None else ""))
    print(f"    (segmenter per slice: per slice it ran on; the naive path runs it on all {slices})")
    ratio = "n/a" if r["overhead_ratio"] is None else f"{r['overhead_ratio']:.2f}"
    print(f"  adapter inference {r['adapter_ms_per_slice']:.1f} ms per slice at the feature grid")
    print(f"  model forwards {r['model_forwards_seconds']:.2f} s, overhead ratio (total / forwards) {ratio}")
    print(f"  peak memory {r['peak_memory_mb']:.0f} MB" + (f", GPU {r['peak_gpu_memory_mb']:.0f} MB"
                                                          if "peak_gpu_memory_mb" in r else ""))
    load = r["load_average"]
    print(f"  load average (1 min): {load['start']} at the start, {load['after_chain']} after the chain, "
          f"{load['after_naive']} after the naive path")
    print(f"  naive path ({n['slices_measured']} slices measured): {n['seconds_per_slice']:.3f} s per slice, "
          f"{n['extrapolated_total']:.1f} s for the volume (fit and io included)")
    print(f"  chain {sec['total']:.1f} s against naive {n['extrapolated_total']:.1f} s: "
          f"speed-up {r['speedup_over_naive']:.2f}x")
    _write_json(out, r)
    return 0


def cmd_weights(args) -> int:
    from . import weights as W

    folder = args.cache
    if args.action == "list":
        rows = W.status(folder)
        if args.json:
            print(json.dumps(rows, indent=1))
            return 0
        print(f"cache: {Path(folder) if folder else W.cache_dir()} (set ${W.CACHE_ENV} or --cache to change; "
              "URLs: weights list --json)")
        # each column as wide as its longest entry (sam2_base_plus is longer than the other names)
        name, model, check = (max(len(title), *(len(r[key]) for r in rows))
                              for title, key in (("name", "name"), ("model", "description"), ("checked by", "check")))
        print(f"  {'name':{name}s} {'model':{model}s} {'present':7s} {'checked by':{check}s} licence")
        for r in rows:
            print(f"  {r['name']:{name}s} {r['description']:{model}s} {'yes' if r['present'] else 'no':7s} "
                  f"{r['check']:{check}s} {r['licence']}{' (opt-in)' if r['opt_in'] else ''}")
        return 0
    if args.action == "import":
        if len(args.items) != 1 or not args.name:
            raise FMOneShotError("weights import takes one FILE and --name NAME.",
                                 "e.g. fmoneshot weights import ~/Downloads/sam_vit_b_01ec64.pth --name sam_vit_b")
        path = W.import_file(args.items[0], args.name, folder, force=args.force)
        print(f"{args.name}: imported to {path}")
        return 0
    names = args.items or ([r["name"] for r in W.status(folder) if r["present"]] if args.action == "verify" else [])
    if not names and args.action == "verify":
        print(f"no checkpoint in the cache {Path(folder) if folder else W.cache_dir()}; nothing to verify")
        return 0
    if not names:
        raise FMOneShotError(f"weights {args.action} needs the name of a checkpoint.",
                             "see fmoneshot weights list for the names.")
    failed = 0
    for name in names:
        entry = W.checkpoint(name)
        if args.action == "download":
            print(f"{name}: {entry.description}, licence {entry.licence}; {entry.url}")
            path = W.download(name, folder, url=args.url, timeout=args.timeout, accept_licence=args.accept_licence)
            print(f"{name}: {path} (sha256 {'verified' if entry.verified else 'pinned on first use'})")
        else:
            try:
                print(f"{name}: ok, {W.verify(name, folder)}")
            except FMOneShotError as exc:
                print(f"{name}: {exc}")
                failed += 1
    return 1 if failed else 0


class _Parser(argparse.ArgumentParser):
    """argparse with FMOneShot's one-line errors (the problem, then the fix) instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}. Fix: see '{self.prog} --help'.\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="fmoneshot", description="One-shot segmentation and landmark localisation "
                                "of medical images: mark a structure once, find it on every slice.")
    p.add_argument("--version", action="version", version=f"fmoneshot {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--backend", default="offline", choices=["auto", *BACKENDS],
                        help="feature backend (auto: the first foundation model with downloaded weights, else offline)")
        sp.add_argument("--seed", type=int, default=0, help="random seed (prompt sampling, adapter training)")
        sp.add_argument("--force", action="store_true", help="overwrite existing output files")

    def model_args(sp, segmenter=True):
        g = sp.add_argument_group("foundation models (backends other than offline; SAM)")
        g.add_argument("--weights", help="backend weights: pretrained (default: the verified cache), a checkpoint "
                       "file (for sd: the diffusers-format folder), or random (tests and benchmarks only)")
        g.add_argument("--block", type=int, help="transformer block whose token embeddings are the features "
                       "(default -1, the last)")
        g.add_argument("--stride", type=int, help="patch-embedding stride; below the patch size the patches "
                       "overlap (denser features)")
        g.add_argument("--log-bin", dest="log_bin_levels", type=int, metavar="LEVELS",
                       help="log-binning levels of the neighbourhood (0: off, the default; Amir et al. use 2)")
        g.add_argument("--input-size", type=int, help="longest side of a slice fed to a ViT (default 448) or to "
                       "Stable Diffusion (default 768)")
        g.add_argument("--timestep", type=int, help="sd: diffusion timestep of the added noise (default 261)")
        g.add_argument("--up-block", type=int, help="sd: UNet up-block whose output is the features (default 1)")
        g.add_argument("--ensemble", type=int, help="sd: noise draws averaged (default 8)")
        g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
        g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                       help="auto: bf16 on CUDA and on CPUs with bf16 in hardware (AMX or AVX-512 BF16), "
                            "else fp32")
        g.add_argument("--sam-model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"],
                       help="SAM model of the sam segmenter and backend (default %(default)s)")
        if segmenter:
            sp.add_argument("--segmenter", default="auto", help=SEGMENTER_HELP)
            g.add_argument("--sam-weights", help="SAM or SAM 2 weights: pretrained (default), a checkpoint file, "
                           "or random")
            g.add_argument("--sam2-model", default="tiny", choices=list(SAM2_TYPES),
                           help="SAM 2 model of the sam2 segmenter (default %(default)s)")

    def propagate_arg(sp):
        sp.add_argument("--propagate", action="store_true",
                        help="SAM 2 (--segmenter sam2) carries each label from the slice where it is found with "
                             "the highest confidence through the volume, both ways, until the structure ends; "
                             "the chain's findings outside that extent are dropped (docs/models.md)")

    def adapter_args(sp, default, text):
        sp.add_argument("--adapter", default=default, help=text)
        sp.add_argument("--threshold", type=float, help="the basic adapter's cosine-similarity threshold (default 0.5)")
        sp.add_argument("--augment", action="store_true",
                        help="train the adapter on the template slices and on darker, brighter, lower- and "
                             "higher-contrast, smaller and larger copies of them (better across subjects, more "
                             "false detections beyond the structure's ends: docs/results.md)")

    def align_args(sp):
        g = sp.add_argument_group("anatomical alignment (docs/method.md)")
        g.add_argument("--align", default=DEFAULT_ALIGN, choices=list(ALIGN_KINDS),
                       help="register the template to each target first (default: %(default)s); none: paper A's "
                            "whole-slice search")
        g.add_argument("--search-radius", type=float, metavar="MM",
                       help=f"search each template point within this radius of its aligned position "
                            f"(default {SEARCH_RADIUS:g} mm)")
        g.add_argument("--prior-margin", type=float, metavar="MM",
                       help=f"the adapter looks only within this margin of the aligned template region "
                            f"(default {PRIOR_MARGIN:g} mm)")
        g.add_argument("--extent-tolerance", type=float, metavar="MM",
                       help=f"how far beyond a label's aligned extent its own confident findings may carry it, "
                            f"scaled by the registration's uncertainty (default {EXTENT_TOLERANCE:g} mm; 0: the "
                            f"aligned extent is a hard bound)")

    def template_args(sp):
        sp.add_argument("--template", help="a template saved by FMOneShot (.json)")
        sp.add_argument("--template-image", help="the template volume or image, with points given inline")
        sp.add_argument("--slice", type=int, help="template slice the points lie on (default: the middle)")
        sp.add_argument("--plane", choices=["axial", "coronal", "sagittal"],
                        help="the plane of --slice; targets are processed in slices of this plane, and X,Y are "
                             "pixels of that slice (default: the volume's own slices)")
        sp.add_argument("--modality", choices=["CT", "MR", "US", "XR"], help="intensity normalisation to use")

    d = sub.add_parser("demo", help="segment liver and spleen on the bundled sample CT and report the Dice")
    common(d)
    d.add_argument("--output", default="fmoneshot-demo", help="folder for the results (default: %(default)s)")
    d.add_argument("--data", help="a dataset folder in the case format (default: the bundled sample CT)")
    d.add_argument("--labels", nargs="+", default=["liver", "spleen"], help="labels of the dataset to mark")
    model_args(d)
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("segment", help="segment the template's labels on every slice of target volumes")
    common(s)
    align_args(s)
    template_args(s)
    s.add_argument("targets", nargs="+", help="target volumes (files or DICOM folders)")
    s.add_argument("--positive", action="append", metavar="NAME:X,Y", help="a positive point (repeat); X = column, "
                   "Y = row of the slice in the file's storage order (a viewer may show it flipped)")
    s.add_argument("--negative", action="append", metavar="NAME:X,Y", help="a negative point (repeat)")
    s.add_argument("--mask", action="append", metavar="NAME:FILE", help="a painted mask of the template slice")
    s.add_argument("--output", "-o", required=True, help="a folder (one file per target) or, for one target, a file")
    s.add_argument("--format", "--output-format", dest="format", default=".nii.gz",
                   choices=[*LABEL_FORMATS, DICOM_SEG],
                   help="label file format in a folder, or dicom-seg: one DICOM SEG (NAME.seg.dcm) per target "
                        "DICOM series, with each label's standard codes (targets must be DICOM folders)")
    adapter_args(s, "auto", "auto (classification, trained on the painted masks or on the masks drawn from the "
                 "clicks), basic, classification, contrastive, or none (raw similarity)")
    s.add_argument("--save-template", help="also save the template used (.json) for reuse")
    s.add_argument("--extent", action="append", metavar="NAME:FIRST:LAST",
                   help="the first and last template slice a label lies on, including the slice it is marked on "
                        "(repeat); aligned into each target, "
                        "it bounds the slices searched, and is saved with --save-template")
    model_args(s)
    propagate_arg(s)
    s.set_defaults(func=cmd_segment)

    lo = sub.add_parser("localize", help="find the template's landmarks on target images and volumes")
    common(lo)
    align_args(lo)
    template_args(lo)
    lo.add_argument("targets", nargs="+", help="target images or volumes")
    lo.add_argument("--landmark", action="append", metavar="NAME:X,Y", help="a landmark on the template (repeat)")
    lo.add_argument("--output", "-o", required=True, help="landmarks file (.json or .csv; landmarks are not "
                    "written as DICOM)")
    adapter_args(lo, "none", "none (correspondence of each landmark), or basic, classification, contrastive "
                 "(centre of the adapter's localised region)")
    model_args(lo, segmenter=False)
    lo.set_defaults(func=cmd_localize, positive=None, negative=None, mask=None)

    ba = sub.add_parser("batch", help="apply a saved template to many volumes on Dask (this computer or a cluster), "
                        "resumable, with a manifest results.csv")
    common(ba)
    ba.add_argument("template", help="a template saved by FMOneShot (.json)")
    ba.add_argument("inputs", nargs="+", help="image files, folders (one DICOM series each) or CSV manifests "
                    "with the columns id,image[,mask] (paths relative to the CSV; mask: reference labels for Dice)")
    ba.add_argument("--output", "-o", required=True, help="folder for the label files, per-volume records and "
                    "the manifest; rerunning into it skips the volumes already done")
    ba.add_argument("--format", default=".nii.gz", choices=LABEL_FORMATS, help="label file format")
    ba.add_argument("--modality", choices=["CT", "MR", "US", "XR"], help="intensity normalisation to use")
    ba.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler (tcp://HOST:8786); "
                    "default: a local cluster on this computer")
    ba.add_argument("--workers", type=int, help="local cluster: worker processes (default: one per core; "
                    "with --device cuda one per GPU)")
    ba.add_argument("--threads", type=int, help="PyTorch threads per worker (default: cores / workers)")
    adapter_args(ba, "auto", "auto, basic, classification, contrastive or none (as for segment)")
    model_args(ba)
    ba.set_defaults(func=cmd_batch)

    ev = sub.add_parser("eval", help="score the one-shot protocol on a dataset in the case format")
    common(ev)
    align_args(ev)
    ev.add_argument("dataset", help="dataset folder with a dataset.json (docs/data-format.md)")
    ev.add_argument("--labels", nargs="+", help="labels or landmarks to evaluate (default: all present)")
    adapter_args(ev, "auto", "auto, none, basic, classification or contrastive")
    ev.add_argument("--template", metavar="CASE_ID", help="template case (default: the first case with the label)")
    ev.add_argument("--points", type=int, default=5, help="positive and negative points each (default: %(default)s)")
    ev.add_argument("--max-targets", type=int, help="at most N target slices (or images) per label, spread evenly")
    ev.add_argument("--json", help="write the results to this .json file")
    ev.add_argument("--extent", choices=["reference"],
                    help="reference: each label's template carries its first and last slice in the template "
                         "case's reference mask")
    ev.add_argument("--report", metavar="DIR", help="write report.md with the table and overlays to this folder")
    model_args(ev)
    propagate_arg(ev)
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="time every stage on a large volume made from the sample CT")
    common(b)
    align_args(b)
    b.add_argument("--slices", type=int, default=100, help="slices of the volume (default: %(default)s)")
    b.add_argument("--size", type=int, default=512, help="rows and columns of each slice (default: %(default)s)")
    b.add_argument("--adapter", default="auto", help="auto, none, basic, classification or contrastive")
    b.add_argument("--naive-slices", type=int, default=3, help="slices the naive path is measured on")
    b.add_argument("--segmenter-slices", choices=["found", "reference"], default="found",
                   help="where the segmenter runs: found (where the chain finds the structure, the product's "
                        "rule) or reference (exactly the slices that contain it in the reference: the cost of "
                        "weights that find it, whatever random weights find); recorded in the JSON")
    b.add_argument("--json", help="also write the figures to this .json file")
    b.add_argument("--threads", type=int, help="CPU threads of the model forwards (default: PyTorch's, the cores "
                   "or $OMP_NUM_THREADS); small-tensor work always runs on one (docs/results.md, Threads)")
    model_args(b)
    b.set_defaults(func=cmd_bench)

    w = sub.add_parser("weights", help="list, download, import or verify pretrained checkpoints")
    w.add_argument("action", choices=["list", "download", "import", "verify"])
    w.add_argument("items", nargs="*", help="checkpoint names (download, verify) or the FILE to import")
    w.add_argument("--name", help="the checkpoint a file is imported as (import)")
    w.add_argument("--cache", help="cache folder (default: $FMONESHOT_CACHE, else $XDG_CACHE_HOME/fmoneshot, else "
                   "~/.cache/fmoneshot)")
    w.add_argument("--url", help="download from this mirror instead of the registry's URL")
    w.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a download gives up")
    w.add_argument("--accept-licence", action="store_true", help="accept an opt-in licence (DINOv3)")
    w.add_argument("--json", action="store_true", help="list as JSON")
    w.add_argument("--force", action="store_true", help="replace a different file already in the cache (import)")
    w.set_defaults(func=cmd_weights)
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """FMOneShot's warnings as one line each (``fmoneshot: warning: ...``); others as Python shows them."""
    if issubclass(category, FMOneShotWarning):
        print(f"fmoneshot: warning: {message}", file=sys.stderr)
    else:
        print(warnings.formatwarning(message, category, filename, lineno, line).rstrip(), file=sys.stderr)


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # said by the command, whose --help lists what it takes
        print(f"fmoneshot {args.command}: error: unrecognized arguments: {' '.join(unknown)}. "
              f"Fix: see 'fmoneshot {args.command} --help'.", file=sys.stderr)
        return 2
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except FMOneShotError as exc:
        print(f"fmoneshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmoneshot: interrupted; outputs not yet written were not written.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
