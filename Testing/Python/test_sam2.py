"""SAM 2 as a segmenter and as a propagator through a volume, with the real sam2 architectures made small and
randomly initialised, against the sam2 package's own predictors used directly."""

import json

import numpy as np
import pytest
import torch

from FMOneShotLib import models
from FMOneShotLib import weights as W
from FMOneShotLib.errors import FMOneShotError
from conftest import require_package
from FMOneShotLib.propagate import Propagator, reconcile, seeds_of, structure_ended



@pytest.fixture(autouse=True)
def sam2_installed():
    from FMOneShotLib.requirements import pip_command

    require_package("sam2", f"{pip_command('sam2')}, docs/models.md")

# Hiera-T with one block per stage but two in the third (a global-attention block may not pool), 16 channels,
# one memory-attention layer: the real modules, a few seconds per slice on a CPU.
SMALL_SAM2 = {"image_encoder.trunk.stages": [1, 1, 2, 1], "image_encoder.trunk.global_att_blocks": [3],
              "image_encoder.trunk.embed_dim": 16, "image_encoder.neck.backbone_channel_list": [128, 64, 32, 16],
              "memory_attention.num_layers": 1}
RANDOM = {"weights": "random", "overrides": SMALL_SAM2, "precision": "fp32", "device": "cpu"}


def _direct_model(video: bool):
    """The same network built by the sam2 package itself, with the product's random tensors loaded."""
    from sam2.build_sam import build_sam2, build_sam2_video_predictor

    extra = [f"++model.{k}={models._hydra_value(v)}" for k, v in sorted(SMALL_SAM2.items())]
    build = build_sam2_video_predictor if video else build_sam2
    model = build(models.SAM2_CONFIGS["tiny"], ckpt_path=None, device="cpu", hydra_overrides_extra=extra)
    model.load_state_dict(models.sam2("tiny", "random", SMALL_SAM2, video=video).state_dict(), strict=True)
    return model.eval()


def test_sam2_segmenter_equals_sam2_image_predictor_on_a_non_square_slice():
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    from FMOneShotLib.segmenters import create_segmenter

    seg = create_segmenter("sam2", model="tiny", multimask=True, **RANDOM)  # multimask: SAM's option, dropped
    rng = np.random.default_rng(3)
    image = rng.random((70, 130)).astype(np.float32)
    # points near the four corners: a wrong aspect-ratio mapping would move them far
    pos, neg = np.array([[2.0, 3.0], [127.0, 66.0]]), np.array([[126.0, 2.0], [3.0, 67.0]])
    mask = seg.segment(image, None, pos, neg)
    single = seg.segment(image, None, pos[:1], np.zeros((0, 2)))  # a second label on the same slice
    assert seg.encodings == 1 and mask.shape == image.shape and mask.dtype == bool

    ref = SAM2ImagePredictor(_direct_model(video=False))
    ref.set_image(np.repeat((image * 255).round().astype(np.uint8)[..., None], 3, axis=2))
    masks, _, _ = ref.predict(np.concatenate([pos, neg]), np.array([1, 1, 0, 0]), multimask_output=False)
    assert masks.shape == (1, 70, 130) and np.array_equal(mask, masks[0].astype(bool))
    masks, scores, _ = ref.predict(pos[:1], np.array([1]), multimask_output=True)  # one point: three masks
    assert masks.shape[0] == 3 and np.array_equal(single, masks[np.argmax(scores)].astype(bool))
    assert mask.any() or single.any()  # the comparison is not between two empty masks

    assert not seg.segment(image, None, np.zeros((0, 2)), neg).any()
    seg.segment(image[:, ::-1].copy(), None, pos, neg)
    assert seg.encodings == 2


def _disc_volume(n=7, h=40, w=56, present=range(7)):
    """(n, h, w) uint8 slices: a bright disc drifting to the right on the slices ``present``, noise elsewhere."""
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:h, :w]
    vol = (rng.random((n, h, w)) * 60).astype(np.uint8)
    for z in present:
        vol[z][(xx - 20 - 2 * z) ** 2 + (yy - 20) ** 2 <= 81] = 220
    return vol


def test_propagation_equals_the_sam2_video_predictor_used_directly(tmp_path):
    from PIL import Image

    # SAM 2's own route: the slices as a folder of JPEG frames. The volume the product sees is what those
    # JPEG files decode to, so both see the same pixels.
    for z, sl in enumerate(_disc_volume()):
        Image.fromarray(sl, mode="L").save(tmp_path / f"{z}.jpg", quality=95)
    vol = np.stack([np.array(Image.open(tmp_path / f"{z}.jpg").convert("L")) for z in range(7)])
    seed_z = 3
    seed = vol[seed_z] > 150

    direct = _direct_model(video=True)
    with torch.inference_mode():
        state = direct.init_state(str(tmp_path))
        direct.add_new_mask(state, seed_z, 0, seed)
        expected = {}
        for reverse in (False, True):
            for z, _, logits in direct.propagate_in_video(state, start_frame_idx=seed_z, reverse=reverse):
                expected[z] = (logits[0, 0] > 0).numpy()

    prop = Propagator("tiny", "random", "cpu", "fp32", SMALL_SAM2, stop_fraction=0.0)
    got = prop.run(lambda z: vol[z] / 255.0, 7, {0: (seed_z, seed)})
    assert np.array_equal(got[(seed_z, 0)][0], seed)  # a mask prompt is kept as it is on its own slice
    # the product stops where the structure ends; up to there, slice by slice, the same masks
    for step in (1, -1):
        z = seed_z
        while 0 <= z + step < 7 and expected[z + step].any():
            z += step
            assert np.array_equal(got[(z, 0)][0], expected[z]), z
        assert 0 <= z + step < 7 or (z + step, 0) not in got
    assert len(got) >= 2  # the untrained model kept the disc on a neighbouring slice: something was compared


def _with_object_score(prop: Propagator, logit: float) -> None:
    """Make SAM 2's object-presence head answer ``logit`` on every slice (absent below 0)."""
    head = prop.predictor.sam_mask_decoder.pred_obj_score_head
    last = head.layers[-1] if hasattr(head, "layers") else head
    with torch.no_grad():
        last.weight.zero_()
        last.bias.fill_(logit)


def test_the_stopping_rule():
    assert structure_ended(0, 100.0) and structure_ended(2, 100.0) and not structure_ended(3, 100.0)
    assert structure_ended(0, 100.0, 0.0) and not structure_ended(1, 100.0, 0.0)
    # A volume whose structure lies on slices 2-4 of 9. An untrained network cannot see where it ends, so its
    # object-presence head is set to say "absent" beyond the seed: the propagation stops on the first slice
    # each way and encodes nothing farther.
    vol = _disc_volume(9, present=range(2, 5))
    prop = Propagator("tiny", "random", "cpu", "fp32", {**SMALL_SAM2, "memory_attention.num_layers": 2})
    _with_object_score(prop, -20.0)
    got = prop.run(lambda z: vol[z] / 255.0, 9, {0: (3, vol[3] > 150)})
    assert sorted(got) == [(3, 0)]
    assert set(prop.encoded) <= {0, 2, 3, 4}  # frame 0: init_state's warm-up
    # "present" everywhere: it runs on until a mask is empty or the volume ends, never stopping inside it early
    _with_object_score(prop, 20.0)
    got = prop.run(lambda z: vol[z] / 255.0, 9, {0: (3, vol[3] > 150)})
    zs = sorted(z for z, _ in got)
    assert zs == list(range(zs[0], zs[-1] + 1)) and 3 in zs
    assert all(got[(z, 0)][0].any() for z in zs)


def test_reconcile_keeps_the_chain_inside_the_extent_and_fills_its_gaps():
    labels = np.zeros((6, 4, 4), np.uint16)
    present = np.zeros((6, 1), bool)
    confidence = np.zeros((6, 1))
    for z, c in [(1, 0.7), (2, 0.9), (5, 0.8)]:  # slice 5: a false detection beyond the structure's end
        labels[z, :2, :2] = 7
        present[z, 0], confidence[z, 0] = True, c
    seeds = seeds_of(labels, [7], present, confidence)
    assert list(seeds) == [0] and seeds[0][0] == 2 and seeds[0][1].sum() == 4
    full = np.ones((4, 4), bool)
    propagated = {(z, 0): (full, 0.6) for z in (0, 1, 2, 3)}  # SAM 2 saw it end after slice 3
    reconcile(labels, present, confidence, [7], propagated, seeds)
    assert (labels[1] == 7).sum() == 4 and (labels[2] == 7).sum() == 4  # the chain's masks kept
    assert (labels[0] == 7).all() and (labels[3] == 7).all()  # gaps filled with the propagation
    assert not labels[4].any() and not labels[5].any() and not present[5, 0]  # outside: dropped
    assert confidence[0, 0] == 0.6 and confidence[2, 0] == 0.9
    assert present[:, 0].tolist() == [True, True, True, True, False, False]


def test_sam2_checkpoints_come_from_the_verified_registry(tmp_path, monkeypatch):
    from FMOneShotLib.segmenters import create_segmenter, resolve_segmenter

    entry = W.REGISTRY["sam2_tiny"]
    assert entry.sha256.startswith("65b50056") and entry.url.endswith("/072824/sam2_hiera_tiny.pt")
    assert W.REGISTRY["sam2_large"].sha256.startswith("7442e4e9")
    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    assert resolve_segmenter("auto") == ("offline", {})
    for name in ("sam_vit_b", "sam2_small"):
        path = W.local_path(W.checkpoint(name))
        path.parent.mkdir(parents=True)
        path.write_bytes(b"not the real file")
    assert resolve_segmenter("auto") == ("sam2", {"model": "small"})  # SAM 2 first (segmenters.AUTO_SEGMENTERS)
    with pytest.raises(FMOneShotError, match="damaged or not the published file"):  # verified before use
        create_segmenter("auto", device="cpu", precision="fp32")
    with pytest.raises(FMOneShotError, match="Unknown SAM 2 model"):
        create_segmenter("sam2", model="huge", weights="random")
    # a checkpoint file in SAM 2's own format ({"model": state dict}) loads strictly
    state = models.sam2("tiny", "random", SMALL_SAM2).state_dict()
    torch.save({"model": state}, tmp_path / "mine.pt")
    assert list(W.load_state_dict(tmp_path / "mine.pt")) == list(state)
    with pytest.raises(FMOneShotError, match="does not fit"):
        models.sam2("small", str(tmp_path / "mine.pt"))


@pytest.fixture(scope="module")
def spleen_cases():
    """Two 6-slice pieces of the bundled sample CT through the spleen, and their references."""
    from FMOneShotLib.datasets import load_dataset
    from FMOneShotLib.demo import SAMPLE

    case = load_dataset(SAMPLE).cases[0]
    ct, ref = case.read_image(), case.read_mask()
    on = np.flatnonzero((ref == 1).any(axis=(1, 2)))
    start = int(on[len(on) // 2]) - 6
    pieces = []
    for a in (start, start + 6):
        origin = tuple(ct.index_to_physical([0, 0, a]).tolist())
        vol = type(ct)(ct.array[a:a + 6].copy(), ct.spacing, origin, ct.direction, name=f"piece{a}", modality="CT")
        pieces.append((vol, (ref[a:a + 6] == 1).astype(np.uint8)))
    return pieces


def test_segment_with_sam2_and_propagation_end_to_end(spleen_cases, tmp_path):
    from FMOneShotLib.image import read_volume, write_volume
    from FMOneShotLib.pipeline import OneShot
    from FMOneShotLib.template import Template, sample_prompts

    (tvol, tref), (vol, ref) = spleen_cases
    z = int(np.argmax(tref.sum(axis=(1, 2))))
    pos, neg = sample_prompts(tref[z] == 1, 5, 5, 0)
    tpl = Template.from_volume(tvol, z, {"spleen": pos}, {"spleen": neg}, {"spleen": tref[z] == 1})
    with pytest.raises(FMOneShotError, match="Propagation needs the SAM 2 segmenter"):  # before any model
        OneShot(tpl, segmenter="offline", propagate=True)
    engine = OneShot(tpl, segmenter="sam2", segmenter_options={"model": "tiny", **RANDOM}, propagate=True).fit()
    result = engine.apply(vol)
    assert engine.segmenter.name == "sam2" and result.timings["propagation"] > 0
    found = np.flatnonzero(result.present[:, 0])
    # after reconciliation the label lies on one run of slices around its seed, the propagated extent
    assert len(found) and found.tolist() == list(range(found[0], found[-1] + 1))
    assert set(engine.propagator.encoded) <= set(range(6))
    for k in range(6):
        assert result.labels.array[k].any() == (k in found)
    path = write_volume(result.labels, tmp_path / "out.nii.gz")
    back = read_volume(path)
    assert np.array_equal(back.array, result.labels.array) and back.spacing == pytest.approx(vol.spacing)
    assert set(np.unique(back.array).tolist()) <= {0, 1}


def test_eval_with_sam2_and_propagation_records_it(spleen_cases, tmp_path):
    from FMOneShotLib.evaluate import SEGMENTATION_KEYS, evaluate
    from FMOneShotLib.image import label_volume, write_volume
    from FMOneShotLib.metrics import dice

    cases = []
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for k, (vol, ref) in enumerate(spleen_cases):
        write_volume(vol, tmp_path / "images" / f"c{k}.nii.gz")
        write_volume(label_volume(vol, ref), tmp_path / "masks" / f"c{k}.nii.gz")
        cases.append({"id": f"c{k}", "image": f"images/c{k}.nii.gz", "mask": f"masks/c{k}.nii.gz"})
    (tmp_path / "dataset.json").write_text(json.dumps({"name": "pieces", "modality": "CT", "task": "segmentation",
                                                        "labels": {"1": "spleen"}, "cases": cases}), encoding="utf-8")
    summary, _ = evaluate(tmp_path, segmenter="sam2", segmenter_options={"model": "tiny", **RANDOM}, propagate=True)
    assert tuple(summary) == SEGMENTATION_KEYS and summary["segmenter"] == "sam2"
    assert summary["template"]["propagate"] is True
    r = summary["labels"]["spleen"]
    assert r["targets"] == int(spleen_cases[1][1].any(axis=(1, 2)).sum())
    assert 0.0 <= r["dice"] <= 1.0 and summary["mean_dice"] == r["dice"]


def test_bench_runs_the_segmenter_on_the_reference_slices():
    from FMOneShotLib.bench import bench_volume, run_bench

    _, labels = bench_volume(8, 64)
    reference = np.flatnonzero((labels == 4).any(axis=(1, 2))).tolist()
    r = run_bench(8, 64, segmenter="sam2", segmenter_options={"model": "tiny", **RANDOM}, naive_slices=1,
                  segmenter_slices="reference")
    ss = r["segmenter_slices"]
    assert ss["rule"] == "reference" and ss["slices"] == reference == ss["reference_slices"]
    assert r["segmenter"] == "sam2" and r["seconds"]["segmenter"] > 0
    # one encoding per reference slice, its encoder and decoder seconds within the segmenter's
    parts = r["segmenter_seconds"]
    assert parts["encodings"] == len(reference)
    assert 0 < parts["encode"] and 0 < parts["decode"]
    # each figure is rounded to the millisecond (bench.run_bench): the two parts may exceed their rounded total
    # by up to 1.5 ms (three roundings of 0.5 ms), and their float sum by a rounding error (1.237 + 0.294)
    assert parts["encode"] + parts["decode"] <= r["seconds"]["segmenter"] + 1.5e-3 + 1e-9
    with pytest.raises(FMOneShotError, match="Unknown segmenter slices"):
        run_bench(8, 64, segmenter_slices="all")
