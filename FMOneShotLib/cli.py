"""The ``fmoneshot`` command: demo, segment, localize.

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
from pathlib import Path

from . import __version__
from .errors import FMOneShotError
from .features import available_backends
from .files import atomic_paths, refuse_existing
from .image import LABEL_EXTENSIONS

# Label volumes are 3D: every format the image writer knows except PNG.
LABEL_FORMATS = tuple(e for e in LABEL_EXTENSIONS if e != ".png")


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
        if args.template_image or args.positive or args.negative or getattr(args, "landmark", None):
            raise FMOneShotError("Both --template and inline points were given.",
                                 "use a saved template file, or --template-image with points, not both.")
        return Template.load(args.template)
    if not args.template_image:
        raise FMOneShotError("No template was given.",
                             "pass --template FILE.json, or --template-image IMAGE with points on one slice.")
    volume = read_volume(args.template_image, args.modality)
    z = args.slice if args.slice is not None else volume.n_slices // 2
    if landmarks_only:
        lms = dict(_parse_point(t, "landmark") for t in (args.landmark or []))
        if not lms:
            raise FMOneShotError("No landmark was given.", "add --landmark NAME:X,Y for each landmark.")
        return Template.from_volume(volume, z, landmarks=lms)
    positive, negative = {}, {}
    for text in args.positive or []:
        name, xy = _parse_point(text, "positive point")
        positive.setdefault(name, []).append(xy)
    for text in args.negative or []:
        name, xy = _parse_point(text, "negative point")
        negative.setdefault(name, []).append(xy)
    masks = {}
    for text in args.mask or []:
        name, _, file = text.partition(":")
        if not file:
            raise FMOneShotError(f"Cannot read --mask {text!r}.", "write it as NAME:FILE (a mask of the template slice).")
        m = read_volume(file).array
        masks[name] = (m[z] if m.shape[0] == volume.n_slices and m.shape[0] > 1 else m[0]) > 0
    for name in negative:
        if name not in positive and name not in masks:
            raise FMOneShotError(f"Label {name!r} has negative points but no positive point.",
                                 f"add --positive {name}:X,Y inside the structure.")
    return Template.from_volume(volume, z, positive, negative, masks)


def _output_paths(targets, output: Path, suffix: str, fmt: str, force: bool, extensions=LABEL_FORMATS):
    """One output file per target: ``output`` itself for one target with a file name, else DIR/NAME+suffix."""
    if len(targets) == 1 and any(str(output).endswith(e) for e in extensions):
        paths = [output]
    else:
        if output.exists() and not output.is_dir():
            raise FMOneShotError(f"{output} is a file but there are {len(targets)} targets.",
                                 "give a folder for --output.")
        names = [Path(t).name.split(".")[0] or Path(t).resolve().name for t in targets]
        if len(set(names)) != len(names):
            raise FMOneShotError("Two targets have the same name, so their outputs would collide.",
                                 "rename one of them or segment them in separate runs.")
        paths = [output / f"{n}{suffix}{fmt}" for n in names]
    refuse_existing(paths, force, "choose another --output, or pass --force to overwrite.")
    return paths


def _check_targets(targets):
    missing = [t for t in targets if not Path(t).exists()]
    if missing:
        raise FMOneShotError(f"Target not found: {', '.join(missing)}.", "check the paths of the target volumes.")


def cmd_segment(args) -> int:
    from .image import read_volume, write_volume
    from .pipeline import OneShot

    template = _template_from_args(args)
    if not template.labels:
        raise FMOneShotError("The template has no label to segment.", "add --positive NAME:X,Y points.")
    _check_targets(args.targets)
    paths = _output_paths(args.targets, Path(args.output), "-labels", args.format, args.force)
    if args.save_template:
        refuse_existing([args.save_template], args.force, "choose another --save-template name, or pass --force.")
    volumes = [read_volume(t, args.modality or template.modality) for t in args.targets]
    engine = OneShot(template, backend=args.backend, adapter=args.adapter, segmenter=args.segmenter,
                     seed=args.seed).fit()
    results = []
    for volume in volumes:
        with _progress(volume.name) as update:
            results.append(engine.apply(volume, progress=update))
    for path, result in zip(paths, results):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_volume(result.labels, path, force=args.force)
        found = {n: int(result.present[:, i].sum()) for i, n in enumerate(result.label_names)}
        print(f"{path}: " + ", ".join(f"{n} on {k} of {result.labels.n_slices} slices" for n, k in found.items()))
    if args.save_template:
        template.save(args.save_template, force=args.force)
        print(f"template saved to {args.save_template}")
    return 0


def cmd_localize(args) -> int:
    from .image import read_volume
    from .pipeline import OneShot

    template = _template_from_args(args, landmarks_only=True)
    if not template.landmark_names:
        raise FMOneShotError("The template has no landmark.", "add --landmark NAME:X,Y, or use a landmark template.")
    _check_targets(args.targets)
    out = Path(args.output)
    if out.suffix not in (".json", ".csv"):
        raise FMOneShotError(f"Cannot tell the format of {out}.", "end --output with .json or .csv.")
    refuse_existing([out], args.force, "choose another --output, or pass --force.")
    volumes = [read_volume(t, args.modality or template.modality) for t in args.targets]
    engine = OneShot(template, backend=args.backend, adapter=None, seed=args.seed).fit()
    rows = []
    for target, volume in zip(args.targets, volumes):
        with _progress(volume.name) as update:
            result = engine.apply(volume, progress=update)
        for name, lm in result.best_landmarks().items():
            rows.append({"target": str(target), "landmark": name, "slice": lm.slice, "x": round(lm.xy[0], 2),
                         "y": round(lm.xy[1], 2), "physical_x": round(lm.physical[0], 3),
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
        tmp.write_text(text)
    print(f"{len(rows)} landmarks written to {out}")
    return 0


def cmd_demo(args) -> int:
    from .demo import SAMPLE, run_demo

    with _progress("demo") as update:
        report = run_demo(args.output, data=args.data or SAMPLE, labels=args.labels, backend=args.backend,
                          segmenter=args.segmenter, seed=args.seed, force=args.force, progress=update)
    print(f"FMOneShot demo: {' and '.join(args.labels)} marked on slice {report.template_slice} of the sample CT "
          f"(offline backend, no downloaded weights)" if args.backend == "offline" else
          f"FMOneShot demo: template slice {report.template_slice}, backend {args.backend}")
    for name, d in report.dice.items():
        e = report.empty[name]
        empty = "every slice contains it" if math.isnan(e) else f"{100 * e:.0f}% of the slices without it left empty"
        print(f"  {name:8s} Dice {d:.3f} (mean over the slices that contain it); {empty}")
    print(f"  time {report.seconds:.2f} s for {report.n_slices} slices (fit {report.fit_seconds:.2f} s), "
          f"peak memory {report.peak_memory_mb:.0f} MB")
    for f in report.files:
        print(f"  wrote {f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmoneshot", description="One-shot segmentation and landmark localisation "
                                "of medical images: mark a structure once, find it on every slice.")
    p.add_argument("--version", action="version", version=f"fmoneshot {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--backend", default="offline", choices=available_backends(), help="feature backend")
        sp.add_argument("--seed", type=int, default=0, help="random seed (prompt sampling, adapter training)")
        sp.add_argument("--force", action="store_true", help="overwrite existing output files")

    def template_args(sp):
        sp.add_argument("--template", help="a template saved by FMOneShot (.json)")
        sp.add_argument("--template-image", help="the template volume or image, with points given inline")
        sp.add_argument("--slice", type=int, help="template slice (z) the points lie on (default: the middle)")
        sp.add_argument("--modality", choices=["CT", "MR", "US", "XR"], help="intensity normalisation to use")

    d = sub.add_parser("demo", help="segment liver and spleen on the bundled sample CT and report the Dice")
    common(d)
    d.add_argument("--output", default="fmoneshot-demo", help="folder for the results (default: %(default)s)")
    d.add_argument("--data", help="a dataset folder in the case format (default: the bundled sample CT)")
    d.add_argument("--segmenter", default="auto", help="auto, offline or none")
    d.add_argument("--labels", nargs="+", default=["liver", "spleen"], help="labels of the dataset to mark")
    d.set_defaults(func=cmd_demo)

    s = sub.add_parser("segment", help="segment the template's labels on every slice of target volumes")
    common(s)
    template_args(s)
    s.add_argument("targets", nargs="+", help="target volumes (files or DICOM folders)")
    s.add_argument("--positive", action="append", metavar="NAME:X,Y", help="a positive point (repeat)")
    s.add_argument("--negative", action="append", metavar="NAME:X,Y", help="a negative point (repeat)")
    s.add_argument("--mask", action="append", metavar="NAME:FILE", help="a painted mask of the template slice")
    s.add_argument("--output", "-o", required=True, help="a folder (one file per target) or, for one target, a file")
    s.add_argument("--format", default=".nii.gz", choices=LABEL_FORMATS, help="label file format in a folder")
    s.add_argument("--adapter", default="auto", help="auto (classification, trained on the painted masks "
                   "or on the masks drawn from the clicks), classification, or none (raw similarity)")
    s.add_argument("--segmenter", default="auto", help="auto, offline or none")
    s.add_argument("--save-template", help="also save the template used (.json) for reuse")
    s.set_defaults(func=cmd_segment)

    lo = sub.add_parser("localize", help="find the template's landmarks on target images and volumes")
    common(lo)
    template_args(lo)
    lo.add_argument("targets", nargs="+", help="target images or volumes")
    lo.add_argument("--landmark", action="append", metavar="NAME:X,Y", help="a landmark on the template (repeat)")
    lo.add_argument("--output", "-o", required=True, help="landmarks file (.json or .csv)")
    lo.set_defaults(func=cmd_localize, positive=None, negative=None, mask=None)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except FMOneShotError as exc:
        print(f"fmoneshot: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fmoneshot: interrupted; outputs not yet written were not written.", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
