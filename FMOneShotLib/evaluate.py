"""The evaluation harness: paper A's one-shot protocol on any dataset in the case format.

Segmentation, per label: the template is the slice of the template case with the largest area of the label;
``points`` positive points inside it (away from the border) and as many negative points outside (near it and
farther away) are drawn with the seed, and its reference mask is given as a painted mask would be. Targets
are every slice containing the label in every other case (with one case only: the other slices of the same
volume). Reported per label: mean and median Dice, IoU, Acc+ / Acc- (share of the template's positive
points whose correspondence falls inside the reference, and of negative points outside), the number of
targets, and over the slices without the label, the share predicted empty.

Landmarks: the template case with its points; targets every other case; per landmark and overall the NED
(distance / image width), the mean distance in pixels and in mm (where the image format records the pixel
size) and the share within 10 pixels.

:func:`evaluate` returns a JSON-ready dict whose top-level keys are exactly :data:`SEGMENTATION_KEYS` or
:data:`LANDMARK_KEYS`; :func:`write_report` writes a Markdown page with overlays of the best, median and
worst targets.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .align import DEFAULT_KIND
from .datasets import Case, Dataset, load_dataset
from .errors import FMOneShotError
from .files import atomic_paths, check_folder, refuse_existing
from .image import Volume, intensity_window, normalize
from .metrics import dice, distances, iou, prompt_accuracy
from .template import Label, Template, default_color, sample_prompts
from .viz import (COLOR_KEY, FOUND_LANDMARK_COLOR, NEGATIVE_COLOR, POSITIVE_COLOR, REFERENCE_COLOR, mark_points,
                  overlay, radiological, write_png)

SEGMENTATION_KEYS = ("dataset", "task", "backend", "adapter", "segmenter", "align", "template", "labels",
                     "mean_dice", "seconds")
LANDMARK_KEYS = ("dataset", "task", "backend", "adapter", "segmenter", "align", "template", "landmarks", "mean_ned",
                 "within_10px", "seconds")
# Formats that store no pixel size: their spacing of 1 is not millimetres.
NO_SPACING_FORMATS = (".png", ".jpg", ".jpeg", ".bmp")
WITHIN_PX = 10.0


class _AlignStage:
    """The align stage over a run: its kind, summed seconds, and the registrations' quality (NMI)."""

    def __init__(self, kind: str):
        self.kind, self.seconds, self.quality, self.before = kind, 0.0, [], []

    def add(self, result) -> None:
        self.seconds += result.timings.get("align", 0.0)
        if result.alignment is not None and result.alignment.kind != "none":
            self.quality.append(result.alignment.quality)
            self.before.append(result.alignment.quality_before)

    def summary(self) -> dict:
        return {"kind": self.kind, "seconds": round(self.seconds, 2), "registrations": len(self.quality),
                "nmi_before": _round(_mean(self.before)), "nmi_after": _round(_mean(self.quality))}


@dataclass
class Target:
    """One scored target (a slice for segmentation, an image for landmarks), kept for the report's pictures."""

    label: str
    case: str
    slice: int
    score: float  # Dice, or mean distance in pixels for landmarks
    picture: np.ndarray  # RGB overlay


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(values)) if values else None


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def _spread(items: list, n: int | None) -> list:
    """At most ``n`` items spread evenly over the list (all of them when n is None), in order."""
    if n is None or len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


class _Cases:
    """Reads each case's image and reference once."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset
        self._images, self._masks = {}, {}

    def image(self, case: Case) -> Volume:
        if case.id not in self._images:
            self._images[case.id] = case.read_image()
        return self._images[case.id]

    def mask(self, case: Case) -> np.ndarray:
        if case.id not in self._masks:
            self._masks[case.id] = case.read_mask(self.image(case))
        return self._masks[case.id]


def _find_case(dataset: Dataset, case_id: str) -> Case:
    for case in dataset.cases:
        if case.id == case_id:
            return case
    raise FMOneShotError(f"No case {case_id!r} in dataset {dataset.name}.",
                         f"use one of: {', '.join(c.id for c in dataset.cases)}.")


def evaluate(dataset_dir, labels=None, backend: str = "offline", backend_options: dict | None = None,
             adapter: str | None = "auto", segmenter: str = "auto", template: str | None = None,
             points: int = 5, seed: int = 0, max_targets: int | None = None,
             progress: Callable | None = None, keep_pictures: bool = False, adapter_options: dict | None = None,
             segmenter_options: dict | None = None, propagate: bool = False, chain_options: dict | None = None,
             extent: str | None = None):
    """Run the protocol on the dataset at ``dataset_dir``; returns ``(summary dict, [Target])``.

    ``chain_options`` go to :class:`pipeline.OneShot` (``align``, ``search_radius``, ``prior_margin``, ...).
    ``extent="reference"`` gives each label's template the first and last slice of the label in the template
    case's reference mask (``Template.extent``), so that what a marked extent does is measured.

    ``backend_options`` go to the feature backend (weights, block, stride, ...), ``segmenter_options`` to the
    segmenter (SAM's model and weights). ``propagate``: SAM 2 propagation through each target volume
    (pipeline.OneShot, propagate.py), recorded in the summary's ``template`` settings.

    ``max_targets`` limits the target slices per label (and, separately, the empty slices) or the target
    images, spread evenly; ``progress(done, total)`` is called after each target case and label. Landmarks use
    the correspondences unless an adapter is named explicitly (then the centre of its localised region).
    """
    if points < 1:
        raise FMOneShotError(f"--points must be at least 1, not {points}.", "give the number of points per kind.")
    if max_targets is not None and max_targets < 1:
        raise FMOneShotError(f"--max-targets must be at least 1, not {max_targets}.", "give a positive number.")
    dataset = load_dataset(dataset_dir)
    if not dataset.cases:
        raise FMOneShotError(f"Dataset {dataset.name} has no cases.", "add cases to its dataset.json.")
    options = dict(backend_options or {})
    chain = dict(chain_options or {})
    if extent not in (None, "reference"):
        raise FMOneShotError(f"Unknown --extent {extent!r} for eval.", "use --extent reference, or leave it out.")
    if extent and dataset.task != "segmentation":
        raise FMOneShotError("--extent applies to segmentation datasets.", "leave --extent out for landmarks.")
    t0 = time.perf_counter()
    if dataset.task == "segmentation":
        summary, targets = _evaluate_segmentation(dataset, labels, backend, options, adapter, segmenter, template,
                                                  points, seed, max_targets, progress, keep_pictures,
                                                  adapter_options or {}, dict(segmenter_options or {}), chain,
                                                  extent, propagate)
    else:
        adapter = None if adapter in (None, "none", "auto") else adapter
        summary, targets = _evaluate_landmarks(dataset, labels, backend, options, adapter, template, seed,
                                               max_targets, progress, keep_pictures, adapter_options or {}, chain)
    summary["seconds"] = round(time.perf_counter() - t0, 2)
    return summary, targets


def _evaluate_segmentation(dataset, labels, backend, options, adapter, segmenter, template_id, points, seed,
                           max_targets, progress, keep_pictures, adapter_options, segmenter_options, chain, extent,
                           propagate=False):
    cases = _Cases(dataset)
    present = {c.id: set(np.unique(cases.mask(c)).tolist()) for c in dataset.cases}
    if labels:
        values = [dataset.label_value(n) for n in labels]
    else:
        values = [v for v in dataset.labels if any(v in p for p in present.values())]
        if not values:
            raise FMOneShotError(f"No case of dataset {dataset.name} contains any of its labels.",
                                 "check the masks and the 'labels' of dataset.json.")
    per_label, tpl_info, pictures = {}, {}, []
    stage = _AlignStage(chain.get("align", DEFAULT_KIND))
    total, done = len(values) * max(1, len(dataset.cases) - 1), 0
    for value in values:
        name = dataset.labels[value]
        if template_id:
            tcase = _find_case(dataset, template_id)
            if value not in present[tcase.id]:
                raise FMOneShotError(f"Template case {template_id} does not contain {name!r}.",
                                     "choose a --template case whose mask contains every label evaluated.")
        else:
            tcase = next((c for c in dataset.cases if value in present[c.id]), None)
            if tcase is None:
                raise FMOneShotError(f"No case of dataset {dataset.name} contains {name!r}.",
                                     "evaluate labels that some mask contains (leave out --labels for all).")
        vol, ref = cases.image(tcase), cases.mask(tcase)
        z = int(np.argmax((ref == value).sum(axis=(1, 2))))
        mask = ref[z] == value
        pos, neg = sample_prompts(mask, points, points, seed)
        tpl = Template.from_volume(vol, z, {name: pos}, {name: neg}, {name: mask}, labels=[Label(name, value)])
        if extent == "reference":
            on_slices = np.flatnonzero((ref == value).any(axis=(1, 2)))
            tpl.extent = {name: (int(on_slices[0]), int(on_slices[-1]))}
        from .pipeline import OneShot  # PyTorch: only once the dataset and labels are checked

        engine = OneShot(tpl, backend=backend, adapter=adapter, segmenter=segmenter, backend_options=options,
                         seed=seed, adapter_options=adapter_options, segmenter_options=segmenter_options,
                         propagate=propagate, **chain).fit()
        tpl_info[name] = {"case": tcase.id, "slice": z}
        # Targets: (case, slice) with the label, and without it, over the other cases.
        others = [c for c in dataset.cases if c.id != tcase.id] or [tcase]
        on, off = [], []
        for case in others:
            r = cases.mask(case)
            has = (r == value).any(axis=(1, 2))
            for k in range(r.shape[0]):
                if case.id == tcase.id and k == z:
                    continue
                (on if has[k] else off).append((case, k))
        on, off = _spread(on, max_targets), _spread(off, max_targets)
        scores = {"dice": [], "iou": [], "acc_pos": [], "acc_neg": [], "empty": []}
        for case in others:
            want_on = [k for c, k in on if c.id == case.id]
            want_off = [k for c, k in off if c.id == case.id]
            if want_on or want_off:
                tvol, tref = cases.image(case), cases.mask(case)
                result = engine.apply(tvol, slices=sorted(want_on + want_off))
                stage.add(result)
                pred = result.mask(name)
                window = intensity_window(tvol)
                for k in want_on:
                    r = tref[k] == value
                    d = dice(pred[k], r)
                    scores["dice"].append(d)
                    scores["iou"].append(iou(pred[k], r))
                    p_xy, n_xy = result.matches[(k, name)]
                    scores["acc_pos"].append(prompt_accuracy(p_xy, r, inside=True))
                    scores["acc_neg"].append(prompt_accuracy(n_xy, r, inside=False))
                    if keep_pictures:
                        pic = overlay(normalize(tvol.array[k], window), pred[k].astype(np.uint8),
                                      {1: default_color(value)}, reference=r)
                        mark_points(pic, p_xy, POSITIVE_COLOR, 3)
                        mark_points(pic, n_xy, NEGATIVE_COLOR, 3)
                        pictures.append(Target(name, case.id, k, d, radiological(pic, tvol.direction)))
                scores["empty"] += [not pred[k].any() for k in want_off]
            done += 1
            if progress is not None:
                progress(done, total)
        per_label[name] = {
            "dice": _round(_mean(scores["dice"])),
            "dice_median": _round(np.median(scores["dice"]) if scores["dice"] else None),
            "iou": _round(_mean(scores["iou"])),
            "acc_pos": _round(_mean(scores["acc_pos"])),
            "acc_neg": _round(_mean(scores["acc_neg"])),
            "targets": len(scores["dice"]),
            "empty_slice_accuracy": _round(_mean(scores["empty"])),
        }
    summary = {
        # what ran, not what was asked for ("auto")
        "dataset": dataset.name, "task": "segmentation", "backend": engine.extractor.settings()["backend"],
        "adapter": engine.adapter.name if engine.adapter is not None else "none", "segmenter": engine.segmenter.name, "align": stage.summary(),
        "template": {"points": points, "seed": seed, "max_targets": max_targets, "labels": tpl_info,
                     "features": engine.extractor.settings(), "propagate": propagate},
        "labels": per_label,
        "mean_dice": _round(_mean([v["dice"] for v in per_label.values()])),
    }
    return summary, pictures


def _evaluate_landmarks(dataset, names, backend, options, adapter, template_id, seed, max_targets, progress,
                        keep_pictures, adapter_options, chain):
    cases = _Cases(dataset)
    with_points = [c for c in dataset.cases if c.points is not None]
    if len(with_points) < 2:
        raise FMOneShotError(f"Dataset {dataset.name} needs at least two cases with points.",
                             "add 'points' to the cases in dataset.json.")
    tcase = _find_case(dataset, template_id) if template_id else with_points[0]
    tpoints = tcase.read_points()
    names = list(names) if names else [n for n in (dataset.landmarks or list(tpoints)) if n in tpoints]
    missing = [n for n in names if n not in tpoints]
    if missing:
        raise FMOneShotError(f"Template case {tcase.id} has no point for {', '.join(missing)}.",
                             f"choose landmarks it has: {', '.join(tpoints)}.")
    vol = cases.image(tcase)
    tpl = Template.from_volume(vol, 0, landmarks={n: tpoints[n] for n in names})
    from .pipeline import OneShot  # PyTorch: only once the dataset and landmarks are checked

    engine = OneShot(tpl, backend=backend, adapter=adapter, backend_options=options, seed=seed,
                     adapter_options=adapter_options, **chain).fit()
    targets = _spread([c for c in with_points if c.id != tcase.id], max_targets)
    rows = {n: {"ned": [], "px": [], "mm": []} for n in names}
    stage = _AlignStage(chain.get("align", DEFAULT_KIND))
    pictures = []
    for done, case in enumerate(targets, 1):
        tvol = cases.image(case)
        ref = case.read_points()
        result = engine.apply(tvol)
        stage.add(result)
        found = result.best_landmarks()
        width = tvol.slice_shape[1]
        known = not str(case.image).lower().endswith(NO_SPACING_FORMATS)
        common = [n for n in names if n in ref]
        pred = np.array([found[n].xy for n in common]).reshape(-1, 2)
        truth = np.array([ref[n] for n in common]).reshape(-1, 2)
        px = distances(pred, truth)
        mm = distances(pred, truth, tvol.spacing[:2]) if known else [None] * len(common)
        for n, d, d_mm in zip(common, px, mm):
            rows[n]["px"].append(float(d))
            rows[n]["ned"].append(float(d) / width)
            rows[n]["mm"].append(d_mm)
        if keep_pictures and len(common):
            pic = overlay(normalize(tvol.array[0], intensity_window(tvol)), np.zeros(tvol.slice_shape, np.uint8), {})
            mark_points(pic, truth, REFERENCE_COLOR, 6)
            mark_points(pic, pred, FOUND_LANDMARK_COLOR, 6)
            pictures.append(Target("all", case.id, 0, float(np.mean(px)), pic))
        if progress is not None:
            progress(done, len(targets))
    per = {}
    for n, r in rows.items():
        per[n] = {"ned": _round(_mean(r["ned"]), 5), "px": _round(_mean(r["px"]), 2),
                  "mm": _round(_mean([v for v in r["mm"] if v is not None]), 2),
                  "within_10px": _round(_mean([d <= WITHIN_PX for d in r["px"]]))}
    all_px = [d for r in rows.values() for d in r["px"]]
    summary = {
        "dataset": dataset.name, "task": "landmarks", "backend": engine.extractor.settings()["backend"],
        "adapter": engine.landmark_adapter.name if engine.landmark_adapter is not None else "none",
        "segmenter": "none", "align": stage.summary(),
        "template": {"case": tcase.id, "seed": seed, "max_targets": max_targets, "targets": len(targets),
                     "features": engine.extractor.settings()},
        "landmarks": per,
        "mean_ned": _round(_mean([d for r in rows.values() for d in r["ned"]]), 5),
        "within_10px": _round(_mean([d <= WITHIN_PX for d in all_px])),
    }
    return summary, pictures


# ---------------------------------------------------------------------- report
def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


REPORT_PICKS = ("worst", "median", "best")


def report_files(folder, names) -> list:
    """The files :func:`write_report` may write into ``folder`` for the labels ``names`` (landmark reports:
    the one name "all"): report.md and NAME-worst/-median/-best.png. Raises FMOneShotError when ``folder`` is
    a file. Callers check these before evaluating, so that a refused report costs no evaluation."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FMOneShotError(f"{folder} is a file.", "give a folder for --report.")
    check_folder(folder / "report.md")
    return [folder / "report.md"] + [folder / f"{n}-{kind}.png" for n in names for kind in REPORT_PICKS]


def dataset_files(dataset: Dataset) -> list:
    """Every file a dataset's evaluation reads (dataset.json, images, masks, points): never an output."""
    return [dataset.root / "dataset.json"] + [p for c in dataset.cases for p in (c.image, c.mask, c.points) if p]


def write_report(summary: dict, targets: list, folder, force: bool = False) -> Path:
    """``folder``/report.md with the table and PNG overlays of the best, median and worst targets."""
    folder = Path(folder)
    report_files(folder, [])
    page = folder / "report.md"
    picks = {}
    for label in dict.fromkeys(t.label for t in targets):
        mine = sorted((t for t in targets if t.label == label), key=lambda t: t.score)
        if summary["task"] == "landmarks":
            mine = mine[::-1]  # a larger distance is worse
        picks[label] = dict(zip(REPORT_PICKS, (mine[0], mine[len(mine) // 2], mine[-1])))
    pngs = {(label, kind): folder / f"{label}-{kind}.png" for label, p in picks.items() for kind in p}
    refuse_existing([page, *pngs.values()], force, "choose another --report folder, or pass --force to overwrite it.")
    folder.mkdir(parents=True, exist_ok=True)
    lines = [f"# {summary['dataset']}: one-shot {summary['task']}", "",
             f"Backend `{summary['backend']}`, adapter `{summary['adapter']}`, segmenter `{summary['segmenter']}`; "
             f"{summary['seconds']:.1f} s.", ""]
    if summary["task"] == "segmentation":
        t = summary["template"]
        lines += [f"Template: {t['points']} positive and {t['points']} negative points (seed {t['seed']}) and the "
                  "reference mask on each label's largest slice.", "",
                  "| label | template | Dice | median Dice | IoU | Acc+ | Acc- | targets | empty slices left empty |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for name, r in summary["labels"].items():
            tl = t["labels"][name]
            lines.append(f"| {name} | {tl['case']} slice {tl['slice']} | {_fmt(r['dice'])} | {_fmt(r['dice_median'])} "
                         f"| {_fmt(r['iou'])} | {_fmt(r['acc_pos'])} | {_fmt(r['acc_neg'])} | {r['targets']} "
                         f"| {_fmt(r['empty_slice_accuracy'])} |")
        lines += ["", f"Mean Dice over the labels: **{_fmt(summary['mean_dice'])}**.", "",
                  f"Pictures: {COLOR_KEY['segmentation']}."]
    else:
        lines += [f"Template: case {summary['template']['case']}; {summary['template']['targets']} targets.", "",
                  "| landmark | NED | mean px | mean mm | within 10 px |", "|---|---|---|---|---|"]
        for name, r in summary["landmarks"].items():
            lines.append(f"| {name} | {_fmt(r['ned'], 4)} | {_fmt(r['px'], 1)} | {_fmt(r['mm'], 1)} "
                         f"| {_fmt(r['within_10px'], 2)} |")
        lines += ["", f"Overall: NED **{_fmt(summary['mean_ned'], 4)}**, within 10 px "
                  f"**{_fmt(summary['within_10px'], 2)}**.", "",
                  f"Pictures: {COLOR_KEY['landmarks']}."]
    unit = "Dice" if summary["task"] == "segmentation" else "mean distance (px)"
    for label, chosen in picks.items():
        lines += ["", f"## {label}", ""]
        for kind, t in chosen.items():
            png = pngs[(label, kind)]
            with atomic_paths(png) as tmp:
                write_png(t.picture, tmp)
            lines += [f"{kind.capitalize()}: case {t.case}, slice {t.slice}, {unit} {t.score:.3f}  ",
                      f"![{label} {kind}]({png.name})", ""]
    with atomic_paths(page) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return page
