"""End to end on real images: the demo's quality, and one template applied across subjects."""

import numpy as np
import SimpleITK as sitk

from FMOneShotLib.datasets import load_dataset
from FMOneShotLib.demo import run_demo
from FMOneShotLib.evaluate import evaluate
from FMOneShotLib.image import read_volume
from FMOneShotLib.metrics import dice
from FMOneShotLib.pipeline import OneShot
from FMOneShotLib.template import Template, sample_prompts

# Figures of the offline chain differ between CPUs (their floating-point kernels round differently, and 200
# training steps carry the difference on). Measured on two 2-core machines, an Intel Xeon with AMX (the
# figures of docs/results.md before issue 20) and an AMD EPYC with AVX-512 (issue 20): CHAOS mean Dice
# moved by up to 0.033, one organ's Dice by up to 0.13 (spleen 0.408 / 0.536). A quality bound below is the
# lower of the measured figures less one of these tolerances, so it holds on any CPU that moves the figures
# no more than these two did.
MEAN_DICE_TOLERANCE = 0.04
ORGAN_TOLERANCE = 0.15


def test_demo_quality_and_files(tmp_path, sample):
    report = run_demo(tmp_path, data=sample)
    assert report.dice["liver"] >= 0.80
    assert report.dice["spleen"] >= 0.70
    # the label volume read back: on the CT's grid, liver (5) and spleen (1) only
    ct = read_volume(sample / "images" / "ct-small.nii.gz")
    labels = read_volume(tmp_path / "ct-small-labels.nii.gz")
    assert labels.array.shape == ct.array.shape
    assert np.allclose(labels.spacing, ct.spacing) and np.allclose(labels.origin, ct.origin, atol=1e-4)
    assert np.allclose(labels.direction, ct.direction)
    assert set(np.unique(labels.array)) == {0, 1, 5}
    ref = sitk.GetArrayFromImage(sitk.ReadImage(str(sample / "masks" / "ct-small.nii.gz")))
    assert dice(labels.array == 5, ref == 5) >= 0.80  # the file holds what was scored
    png = sitk.ReadImage(str(tmp_path / "montage.png"))
    assert png.GetNumberOfComponentsPerPixel() == 3 and png.GetSize()[0] >= 6 * ct.array.shape[2]
    tpl = Template.load(tmp_path / "template.json")
    assert tpl.label_names == ["liver", "spleen"] and tpl.slices[0].index == report.template_slice


def test_multilabel_in_one_pass_matches_single_label_runs(sample):
    ds = load_dataset(sample)
    ct, ref = ds.cases[0].read_image(), ds.cases[0].read_mask()
    z = 20
    names = {"liver": 5, "spleen": 1}
    parts = {n: sample_prompts(ref[z] == v, 5, 5, 0) for n, v in names.items()}
    both = Template.from_volume(ct, z, {n: p for n, (p, _) in parts.items()}, {n: q for n, (_, q) in parts.items()},
                                {n: ref[z] == v for n, v in names.items()})
    result = OneShot(both).fit().apply(ct)
    for n, v in names.items():
        d = np.mean([dice(result.mask(n)[k], ref[k] == v) for k in range(ct.n_slices)])
        assert d >= 0.70, (n, d)
    assert not (result.mask("liver") & result.mask("spleen")).any()


def test_adapters_across_subjects_chaos(chaos):
    """Issue 5's protocol, as ``fmoneshot eval`` runs it: per organ, the template is chaos-1's largest slice of
    it (points and painted mask); targets: every slice of the other three subjects. Measured mean Dice over
    the organs' slices (Xeon / EPYC): basic 0.190 / 0.190, classification 0.615 / 0.648, contrastive 0.599 /
    0.609; classification trained with template augmentation 0.642 / 0.646, i.e. +0.027 on one CPU and
    -0.002 on the other: augmentation is asserted not to hurt, not to help. (Issue 5 asks 0.65 of the
    contrastive adapter: not reached, docs/results.md.)"""
    runs = {"basic": ("basic", {}), "classification": ("classification", {}), "contrastive": ("contrastive", {}),
            "classification+augment": ("classification", {"augment": True})}
    summaries = {k: evaluate(chaos, adapter=a, adapter_options=o)[0] for k, (a, o) in runs.items()}
    dice_of = {k: s["mean_dice"] for k, s in summaries.items()}
    print("CHAOS across subjects, mean Dice:", dice_of, "; right kidney's empty slices left empty:",
          summaries["classification"]["labels"]["kidney_right"]["empty_slice_accuracy"])
    assert all(set(s["labels"]) == {"liver", "kidney_right", "kidney_left", "spleen"} for s in summaries.values())
    assert dice_of["classification"] >= 0.615 - MEAN_DICE_TOLERANCE
    assert dice_of["contrastive"] >= 0.599 - MEAN_DICE_TOLERANCE
    # the trained adapters are far above the thresholded similarity (by 0.41-0.46 measured)
    assert min(dice_of["classification"], dice_of["contrastive"]) >= dice_of["basic"] + 0.3
    assert dice_of["classification+augment"] >= dice_of["classification"] - MEAN_DICE_TOLERANCE
    # slices without the organ: the right kidney's are mostly left empty (0.76 / 0.758 measured)
    assert summaries["classification"]["labels"]["kidney_right"]["empty_slice_accuracy"] >= 0.76 - ORGAN_TOLERANCE


def test_stray_detections_away_from_the_organ_are_dropped(chaos):
    """Across subjects, slices without the organ: the 3D clean-up leaves more of them empty and loses next to no
    Dice on the organ's slices. Measured with the default adapter on chaos-2, -3, -5, spleen from chaos-1, on
    the EPYC: no clean-up: empty 19%, Dice 0.53655; components under a quarter of the largest dropped (size
    alone): 70%, 0.53647 (a sliver of the organ dropped with a stray component; on the Xeon 33% -> 57%, Dice
    0.408 both); and components less confident than 0.9 of the most confident one dropped too (the default):
    95.5%, 0.53647 (chaos-5's "spleen" on slices 0-12, larger than the organ at confidence 0.73 against 0.86,
    was kept by size alone)."""
    ds = load_dataset(chaos)
    vol, ref = ds.cases[0].read_image(), ds.cases[0].read_mask() == 4  # spleen
    z = int(np.argmax(ref.sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z], 5, 5, seed=0)
    tpl = Template.from_volume(vol, z, {"spleen": pos}, {"spleen": neg}, {"spleen": ref[z]})
    figures = {}
    for rule, options in (("none", {"minor_components": 0.0}),
                          ("size", {"minor_components": 0.25, "component_confidence": 0.0}),
                          ("default", {})):
        engine = OneShot(tpl, **options).fit()
        dices, empty = [], []
        for case in ds.cases[1:]:
            tvol, tref = case.read_image(), case.read_mask() == 4
            result = engine.apply(tvol)
            pred = result.mask("spleen")
            assert np.array_equal(result.present[:, 0], pred.any(axis=(1, 2)))  # decisions follow the clean-up
            dices += [dice(pred[k], tref[k]) for k in range(tvol.n_slices) if tref[k].any()]
            empty += [not pred[k].any() for k in range(tvol.n_slices) if not tref[k].any()]
        figures[rule] = (np.mean(dices), np.mean(empty))
    print("spleen (Dice, empty slices left empty) without clean-up / by size / by size and confidence:", figures)
    for rule in ("size", "default"):  # what is dropped is stray, not the organ
        assert figures[rule][0] >= figures["none"][0] - 0.005
    assert figures["size"][1] >= figures["none"][1] + 0.15  # +0.24 / +0.51 measured
    assert figures["size"][1] >= 0.57 - ORGAN_TOLERANCE
    assert figures["default"][1] >= figures["size"][1] + 0.1  # +0.25 measured
    assert figures["default"][1] >= 0.955 - ORGAN_TOLERANCE


def test_progress_and_cancel_within_one_slice(sample):
    ds = load_dataset(sample)
    ct, ref = ds.cases[0].read_image(), ds.cases[0].read_mask()
    pos, neg = sample_prompts(ref[20] == 5, 3, 3, 0)
    engine = OneShot(Template.from_volume(ct, 20, {"liver": pos}, {"liver": neg}, {"liver": ref[20] == 5})).fit()
    seen = []
    result = engine.apply(ct, progress=lambda done, total: seen.append((done, total)), slices=[3, 4, 5])
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert not result.labels.array[[0, 1, 2, 6]].any()  # slices not asked for stay empty
    from FMOneShotLib.pipeline import Cancelled
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    import pytest
    with pytest.raises(Cancelled):
        engine.apply(ct, progress=lambda d, t: seen.append(d), cancel=cancel)
    assert len(calls) == 3  # stopped at the third slice, before working on it


def test_cephalometric_landmarks_across_subjects(ceph):
    """Issue 15's acceptance, as ``fmoneshot eval`` runs it: the first case's 19 landmarks found on the 7 other
    cephalograms, offline backend, default alignment. Measured on the EPYC: mean NED 0.0187, 28% within 10 px
    (docs/results.md). The bounds are the issue's own; a regression that drops a target's windows (as one did,
    NED 0.081) fails them."""
    summary = evaluate(ceph)[0]
    assert summary["align"]["registrations"] == 7
    assert summary["mean_ned"] <= 0.035, summary["mean_ned"]
    assert summary["within_10px"] >= 0.15, summary["within_10px"]
