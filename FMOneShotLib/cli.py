"""The ``fmoneshot`` command: demo, segment, localize, eval, bench, weights.

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
from .features import available_backends, resolve_backend
from .files import atomic_paths, refuse_existing
from .align import DEFAULT_KIND as DEFAULT_ALIGN
from .align import KINDS as ALIGN_KINDS
from .align import PRIOR_MARGIN, SEARCH_RADIUS
from .image import LABEL_EXTENSIONS

SEGMENTER_HELP = "auto (SAM when its weights are in the cache, else offline), sam, offline or none"
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
    plane = args.plane
    axis = volume.slice_axis(plane)
    z = args.slice if args.slice is not None else volume.resliced(axis).n_slices // 2
    if landmarks_only:
        lms = dict(_parse_point(t, "landmark") for t in (args.landmark or []))
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
    masks = {}
    for text in args.mask or []:
        name, _, file = text.partition(":")
        if not file:
            raise FMOneShotError(f"Cannot read --mask {text!r}.", "write it as NAME:FILE (a mask of the template slice).")
        m = read_volume(file).array
        # a mask volume on the template's grid gives its slice z of the plane; a 2D mask is that slice itself
        masks[name] = (volume.like(m).resliced(axis).array[z] if m.shape == volume.array.shape and m.shape[0] > 1
                       else m[0]) > 0
    for name in negative:
        if name not in positive and name not in masks:
            raise FMOneShotError(f"Label {name!r} has negative points but no positive point.",
                                 f"add --positive {name}:X,Y inside the structure.")
    return Template.from_volume(volume, z, positive, negative, masks, orientation=plane)


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


def _chain_options(args) -> dict:
    """--align, --search-radius, --prior-margin as :class:`pipeline.OneShot` keyword arguments."""
    options = {"align": args.align}
    if args.search_radius is not None:
        options["search_radius"] = args.search_radius
    if args.prior_margin is not None:
        options["prior_margin"] = args.prior_margin
    return options


def _parse_extents(texts, template) -> dict:
    """['liver:40:75', ...] -> {"liver": (40, 75)}, checked against the template's labels."""
    out = {}
    for text in texts or []:
        try:
            name, first, last = text.rsplit(":", 2)
            out[name] = (int(first), int(last))
        except ValueError:
            raise FMOneShotError(f"Cannot read the extent {text!r}.",
                                 "write it as NAME:FIRST:LAST template slice numbers, e.g. liver:40:75.") from None
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


def _backend_options(args) -> dict:
    """The feature backend's options from --weights, --block, --stride, --log-bin, --input-size, --device,
    --precision and --sam-model, checked against the backend before anything runs."""
    given = {k: getattr(args, k, None) for k in FOUNDATION_OPTIONS}
    given = {k: v for k, v in given.items() if v is not None}
    backend = resolve_backend(args.backend)[0]
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
    if given.get("weights") == "random":
        print("fmoneshot: warning: randomly initialised weights (--weights random): for tests and benchmarks "
              "only; the results mean nothing.", file=sys.stderr)
    return {**given, "device": args.device, "precision": args.precision}


def _segmenter_options(args) -> dict:
    """SAM's options (--sam-model, --sam-weights, --device, --precision) when the segmenter can be SAM."""
    if getattr(args, "segmenter", "auto") not in ("auto", "sam"):
        if args.sam_weights is not None:
            raise FMOneShotError("--sam-weights applies to the SAM segmenter only.",
                                 "add --segmenter sam, or drop --sam-weights.")
        return {}
    options = {"device": args.device, "precision": args.precision}
    if args.segmenter == "sam" or args.sam_weights is not None:
        options["model"] = args.sam_model
    if args.sam_weights is not None:  # SAM weights named: 'auto' resolves to SAM (segmenters.resolve_segmenter)
        options["weights"] = args.sam_weights
        if args.sam_weights == "random":
            print("fmoneshot: warning: SAM with randomly initialised weights (--sam-weights random): for tests "
                  "and benchmarks only; the masks mean nothing.", file=sys.stderr)
    return options


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
    _parse_extents(args.extent, template)
    volumes = [read_volume(t, args.modality or template.modality) for t in args.targets]
    engine = OneShot(template, backend=args.backend, adapter=args.adapter, segmenter=args.segmenter,
                     seed=args.seed, adapter_options=_adapter_options(args), backend_options=_backend_options(args),
                     segmenter_options=_segmenter_options(args), **_chain_options(args)).fit()
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
    engine = OneShot(template, backend=args.backend, adapter=args.adapter, seed=args.seed, segmenter="offline",
                     adapter_options=_adapter_options(args), backend_options=_backend_options(args),
                     **_chain_options(args)).fit()
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
                          segmenter=args.segmenter, seed=args.seed, force=args.force, progress=update,
                          backend_options=_backend_options(args), segmenter_options=_segmenter_options(args))
    weights = "no downloaded weights" if args.backend == "offline" and report.segmenter != "sam" else "SAM weights"
    print(f"FMOneShot demo: {' and '.join(args.labels)} marked on slice {report.template_slice} of the sample CT "
          f"(backend {args.backend}, segmenter {report.segmenter}, {weights})")
    for name, d in report.dice.items():
        e = report.empty[name]
        empty = "every slice contains it" if math.isnan(e) else f"{100 * e:.0f}% of the slices without it left empty"
        print(f"  {name:8s} Dice {d:.3f} (mean over the slices that contain it); {empty}")
    print(f"  time {report.seconds:.2f} s for {report.n_slices} slices (fit {report.fit_seconds:.2f} s), "
          f"peak memory {report.peak_memory_mb:.0f} MB")
    for f in report.files:
        print(f"  wrote {f}")
    return 0


def _json_output(args) -> Path | None:
    """The --json file, checked before anything runs."""
    if not args.json:
        return None
    out = Path(args.json)
    if out.suffix != ".json":
        raise FMOneShotError(f"Cannot write JSON to {out}.", "end --json with .json.")
    refuse_existing([out], args.force, "choose another --json file, or pass --force.")
    return out


def _write_json(out: Path | None, doc: dict) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_paths(out) as tmp:
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"  wrote {out}")


def cmd_eval(args) -> int:
    from .evaluate import evaluate, write_report

    out = _json_output(args)
    with _progress("eval") as update:
        summary, targets = evaluate(args.dataset, labels=args.labels, backend=args.backend,
                                    backend_options=_backend_options(args),
                                    segmenter_options=_segmenter_options(args),
                                    adapter=args.adapter, segmenter=args.segmenter, template=args.template,
                                    points=args.points, seed=args.seed, max_targets=args.max_targets,
                                    progress=update, keep_pictures=bool(args.report),
                                    adapter_options=_adapter_options(args), chain_options=_chain_options(args),
                                    extent=args.extent)
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
                      chain_options=_chain_options(args),
                      naive_slices=args.naive_slices, seed=args.seed, progress=update)
    v, sec = r["volume"], r["seconds"]
    print(f"FMOneShot bench: {v['slices']} slices of {v['size'][0]}x{v['size'][1]}, {v['structure']} on "
          f"{v['slices_with_structure']} slices (found on {v['slices_found']}); backend {r['backend']}, adapter "
          f"{r['adapter']}, segmenter {r['segmenter']}, {r['device']}, {r['threads']} threads, precision "
          f"{r['precision']['features']} (features) / {r['precision']['segmenter']} (segmenter)")
    print(f"  total {sec['total']:.2f} s = {r['seconds_per_slice'] * 1000:.1f} ms per slice")
    for stage in ("io", "fit", "align", "features", "adapter", "correspondence", "segmenter"):
        print(f"    {stage:15s} {sec.get(stage, 0.0):8.2f} s")
    ratio = "n/a" if r["overhead_ratio"] is None else f"{r['overhead_ratio']:.2f}"
    print(f"  adapter inference {r['adapter_ms_per_slice']:.1f} ms per slice at the feature grid")
    print(f"  model forwards {r['model_forwards_seconds']:.2f} s, overhead ratio (total / forwards) {ratio}")
    print(f"  peak memory {r['peak_memory_mb']:.0f} MB" + (f", GPU {r['peak_gpu_memory_mb']:.0f} MB"
                                                          if "peak_gpu_memory_mb" in r else ""))
    n = r["naive"]
    print(f"  naive path ({n['slices_measured']} slices measured): {n['seconds_per_slice']:.3f} s per slice, "
          f"{n['extrapolated_total']:.1f} s for the volume; speed-up {r['speedup_over_naive']:.1f}x")
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
        print(f"cache: {Path(folder) if folder else W.cache_dir()} (set ${W.CACHE_ENV} or --cache to change)")
        print(f"  {'name':10s} {'model':24s} {'present':7s} {'checked by':32s} licence")
        for r in rows:
            print(f"  {r['name']:10s} {r['description']:24s} {'yes' if r['present'] else 'no':7s} {r['check']:32s} "
                  f"{r['licence']}{' (opt-in)' if r['opt_in'] else ''}")
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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fmoneshot", description="One-shot segmentation and landmark localisation "
                                "of medical images: mark a structure once, find it on every slice.")
    p.add_argument("--version", action="version", version=f"fmoneshot {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--backend", default="offline", choices=["auto", *available_backends()],
                        help="feature backend (auto: the first foundation model with downloaded weights, else offline)")
        sp.add_argument("--seed", type=int, default=0, help="random seed (prompt sampling, adapter training)")
        sp.add_argument("--force", action="store_true", help="overwrite existing output files")

    def model_args(sp, segmenter=True):
        g = sp.add_argument_group("foundation models (backends other than offline; SAM)")
        g.add_argument("--weights", help="backend weights: pretrained (default: the verified cache), a checkpoint "
                       "file, or random (tests and benchmarks only)")
        g.add_argument("--block", type=int, help="transformer block whose token embeddings are the features "
                       "(default -1, the last)")
        g.add_argument("--stride", type=int, help="patch-embedding stride; below the patch size the patches "
                       "overlap (denser features)")
        g.add_argument("--log-bin", dest="log_bin_levels", type=int, metavar="LEVELS",
                       help="log-binning levels of the neighbourhood (0: off, the default; Amir et al. use 2)")
        g.add_argument("--input-size", type=int, help="longest side of a slice fed to a ViT (default 448)")
        g.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
        g.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                       help="auto: bf16 on CUDA and on CPUs with AMX, else fp32")
        g.add_argument("--sam-model", default="vit_b", choices=["vit_b", "vit_l", "vit_h"],
                       help="SAM model of the sam segmenter and backend (default %(default)s)")
        if segmenter:
            sp.add_argument("--segmenter", default="auto", help=SEGMENTER_HELP)
            g.add_argument("--sam-weights", help="SAM weights: pretrained (default), a checkpoint file, or random")

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
    s.add_argument("--positive", action="append", metavar="NAME:X,Y", help="a positive point (repeat)")
    s.add_argument("--negative", action="append", metavar="NAME:X,Y", help="a negative point (repeat)")
    s.add_argument("--mask", action="append", metavar="NAME:FILE", help="a painted mask of the template slice")
    s.add_argument("--output", "-o", required=True, help="a folder (one file per target) or, for one target, a file")
    s.add_argument("--format", default=".nii.gz", choices=LABEL_FORMATS, help="label file format in a folder")
    adapter_args(s, "auto", "auto (classification, trained on the painted masks or on the masks drawn from the "
                 "clicks), basic, classification, contrastive, or none (raw similarity)")
    s.add_argument("--save-template", help="also save the template used (.json) for reuse")
    s.add_argument("--extent", action="append", metavar="NAME:FIRST:LAST",
                   help="the first and last template slice a label lies on (repeat); aligned into each target, "
                        "it bounds the slices searched, and is saved with --save-template")
    model_args(s)
    s.set_defaults(func=cmd_segment)

    lo = sub.add_parser("localize", help="find the template's landmarks on target images and volumes")
    common(lo)
    align_args(lo)
    template_args(lo)
    lo.add_argument("targets", nargs="+", help="target images or volumes")
    lo.add_argument("--landmark", action="append", metavar="NAME:X,Y", help="a landmark on the template (repeat)")
    lo.add_argument("--output", "-o", required=True, help="landmarks file (.json or .csv)")
    adapter_args(lo, "none", "none (correspondence of each landmark), or basic, classification, contrastive "
                 "(centre of the adapter's localised region)")
    model_args(lo, segmenter=False)
    lo.set_defaults(func=cmd_localize, positive=None, negative=None, mask=None)

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
    ev.set_defaults(func=cmd_eval)

    b = sub.add_parser("bench", help="time every stage on a large volume made from the sample CT")
    common(b)
    align_args(b)
    b.add_argument("--slices", type=int, default=100, help="slices of the volume (default: %(default)s)")
    b.add_argument("--size", type=int, default=512, help="rows and columns of each slice (default: %(default)s)")
    b.add_argument("--adapter", default="auto", help="auto, none, basic, classification or contrastive")
    b.add_argument("--naive-slices", type=int, default=3, help="slices the naive path is measured on")
    b.add_argument("--json", help="also write the figures to this .json file")
    model_args(b)
    b.set_defaults(func=cmd_bench)

    w = sub.add_parser("weights", help="list, download, import or verify pretrained checkpoints")
    w.add_argument("action", choices=["list", "download", "import", "verify"])
    w.add_argument("items", nargs="*", help="checkpoint names (download, verify) or the FILE to import")
    w.add_argument("--name", help="the checkpoint a file is imported as (import)")
    w.add_argument("--cache", help="cache folder (default: $FMONESHOT_CACHE or ~/.cache/fmoneshot)")
    w.add_argument("--url", help="download from this mirror instead of the registry's URL")
    w.add_argument("--timeout", type=float, default=30.0, help="seconds without data before a download gives up")
    w.add_argument("--accept-licence", action="store_true", help="accept an opt-in licence (DINOv3)")
    w.add_argument("--json", action="store_true", help="list as JSON")
    w.add_argument("--force", action="store_true", help="replace a different file already in the cache (import)")
    w.set_defaults(func=cmd_weights)
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
