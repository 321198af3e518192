"""Paper B's adapters: each one where the answer is known, the separable contrastive inference against the
per-pair network, multi-label in one pass against per-label runs, and a trained adapter saved in the template."""

import numpy as np
import pytest
import torch

from FMOneShotLib.adapters import ADAPTERS, BasicAdapter, ContrastiveAdapter, adapter_from_state, create_adapter
from FMOneShotLib.cli import main
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.image import Volume
from FMOneShotLib.metrics import dice
from FMOneShotLib.pipeline import OneShot
from FMOneShotLib.template import Template, sample_prompts


def _grid_features(rois, shape=(16, 16), seed=0, noise=0.3):
    """(1, C, h, w) features: background cells near pattern 0, cells of ROI k near pattern k + 1."""
    rng = np.random.default_rng(seed)
    patterns = np.eye(6, dtype=np.float32) * 3 - 0.5
    f = patterns[0][:, None, None] + noise * rng.standard_normal((6,) + shape).astype(np.float32)
    for k, roi in enumerate(rois):
        f[:, roi] = patterns[k + 1][:, None] + noise * rng.standard_normal((6, roi.sum())).astype(np.float32)
    return torch.from_numpy(f)[None]


def _box(y0, y1, x0, x1, shape=(16, 16)):
    m = np.zeros(shape, bool)
    m[y0:y1, x0:x1] = True
    return m


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_each_adapter_finds_the_structure_where_it_moved(name):
    a, b = _box(2, 7, 2, 8), _box(9, 14, 10, 15)  # two labels on the template
    template = _grid_features([a, b], seed=1)
    adapter = create_adapter(name, seed=0).fit([template[0]], [np.stack([a, b])])
    a2, b2 = _box(8, 13, 1, 7), _box(1, 6, 9, 14)  # swapped places on the target
    probs = adapter.predict(_grid_features([a2, b2], seed=2))
    assert probs.shape == (1, 3, 16, 16)
    win = probs[0].argmax(0).numpy()
    assert dice(win == 1, a2) >= 0.95 and dice(win == 2, b2) >= 0.95
    assert (probs[0, 1:].amax(0).numpy()[~(a2 | b2)] < 0.5).mean() > 0.97  # background stays below 0.5


def test_basic_threshold_decides_and_is_checked():
    roi = _box(4, 10, 4, 10)
    feats = _grid_features([roi])
    loose = BasicAdapter(threshold=-1.0).fit([feats[0]], [roi[None]]).predict(feats)
    strict = BasicAdapter(threshold=0.5).fit([feats[0]], [roi[None]]).predict(feats)
    assert (loose[0, 1] > 0.5).all()  # every cell is at least -1 similar
    assert dice((strict[0, 1] > 0.5).numpy(), roi) >= 0.95
    with pytest.raises(FMOneShotError, match="between -1 and 1"):
        BasicAdapter(threshold=2.0)


@pytest.mark.parametrize("top_k", [1, 4, 100])
def test_batched_contrastive_equals_the_per_pair_network(top_k):
    a, b = _box(2, 5, 2, 6, (8, 8)), _box(5, 8, 5, 8, (8, 8))
    feats = _grid_features([a, b], shape=(8, 8))
    adapter = ContrastiveAdapter(seed=3, epochs=30, top_k=top_k).fit([feats[0]], [np.stack([a, b])])
    target = _grid_features([b, a], shape=(8, 8), seed=5)
    fast, slow = adapter.predict(target, chunk=7), adapter.predict_pairs(target)  # chunks across images too
    assert fast.shape == slow.shape == (1, 3, 8, 8)
    assert torch.allclose(fast, slow, atol=1e-5)
    assert fast[0, 1:].amax().item() > 0.9 and fast[0, 1:].amin().item() < 0.1  # not a constant map


def test_contrastive_answer_depends_on_the_template_bank():
    """Same trained weights, other template features: the localisation follows the bank, which a per-pixel
    classifier cannot do. Swapping the two labels' banks swaps where the labels are found."""
    a, b = _box(2, 7, 2, 8), _box(9, 14, 10, 15)
    template = _grid_features([a, b], seed=1)
    adapter = ContrastiveAdapter(seed=0).fit([template[0]], [np.stack([a, b])])
    a2, b2 = _box(8, 13, 1, 7), _box(1, 6, 9, 14)
    target = _grid_features([a2, b2], seed=2)
    win = adapter.predict(target)[0].argmax(0).numpy()
    assert dice(win == 1, a2) >= 0.95 and dice(win == 2, b2) >= 0.95
    weights = adapter.branch.net[0].weight.clone()
    bank_a, bank_b = adapter.roi
    swapped = adapter.set_bank([bank_b, bank_a]).predict(target)[0].argmax(0).numpy()
    assert dice(swapped == 1, b2) >= 0.95 and dice(swapped == 2, a2) >= 0.95
    assert torch.equal(adapter.branch.net[0].weight, weights)
    # a bank taken from the target itself (its b region) for label 1: label 1 is found there
    cells = target[0].permute(1, 2, 0)[torch.as_tensor(b2)]
    found = adapter.set_bank([cells, bank_b]).predict(target)[0, 1].numpy() > 0.5
    assert dice(found, b2) >= 0.95
    with pytest.raises(FMOneShotError, match="2 labels"):
        adapter.set_bank([bank_a])


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_trained_adapter_state_round_trip(name):
    roi = _box(3, 9, 3, 9)
    feats = _grid_features([roi])
    adapter = create_adapter(name, seed=4).fit([feats[0]], [roi[None]])
    description, tensors = adapter.state()
    again = adapter_from_state(description, tensors)
    target = _grid_features([_box(6, 12, 5, 11)], seed=9)
    assert torch.equal(adapter.predict(target), again.predict(target))


def _two_discs(n_slices=4):
    """A body with two bright discs that move between slices (they never overlap)."""
    yy, xx = np.mgrid[:64, :64]
    img = np.full((n_slices, 64, 64), 10.0, np.float32)
    ref = np.zeros(img.shape, np.uint8)
    for z in range(n_slices):
        img[z][(yy - 32) ** 2 + (xx - 32) ** 2 <= 29 ** 2] = 80
        d1 = (yy - 22 - z) ** 2 + (xx - 20) ** 2 <= 7 ** 2
        d2 = (yy - 42) ** 2 + (xx - 42 + z) ** 2 <= 5 ** 2
        img[z][d1], img[z][d2] = 200, 140
        ref[z][d1], ref[z][d2] = 1, 2
    return Volume(img, (1.0, 1.0, 2.0), modality="MR"), ref


@pytest.mark.parametrize("name", ["classification", "contrastive"])
def test_multilabel_in_one_pass_matches_per_label_runs(name):
    """One model over both labels finds each as well as a model per label does, and nearly the same pixels
    (the models are trained on different pairs or classes, so their edges may differ by a cell)."""
    vol, ref = _two_discs()
    prompts = {n: sample_prompts(ref[0] == v, 4, 4, 0) for n, v in (("a", 1), ("b", 2))}
    masks = {n: ref[0] == v for n, v in (("a", 1), ("b", 2))}

    def run(names):
        tpl = Template.from_volume(vol, 0, {n: prompts[n][0] for n in names}, {n: prompts[n][1] for n in names},
                                   {n: masks[n] for n in names})
        return OneShot(tpl, adapter=name).fit().apply(vol)

    both = run(["a", "b"])
    for n, v in (("a", 1), ("b", 2)):
        alone = run([n]).mask(n)
        assert dice(both.mask(n), alone) >= 0.85, n
        for mask in (alone, both.mask(n)):
            assert np.mean([dice(mask[z], ref[z] == v) for z in range(vol.n_slices)]) >= 0.85, n


def test_adapter_saved_in_the_template_is_reused(tmp_path):
    vol, ref = _two_discs()
    pos, neg = sample_prompts(ref[0] == 1, 4, 4, 0)
    tpl = Template.from_volume(vol, 0, {"a": pos}, {"a": neg}, {"a": ref[0] == 1})
    first = OneShot(tpl, adapter="contrastive").fit()
    assert not first.adapter_reused and tpl.adapter["description"]["adapter"] == "contrastive"
    expected = first.apply(vol).labels.array
    tpl.save(tmp_path / "t.json")
    assert (tmp_path / "t.adapter.safetensors").is_file()
    loaded = Template.load(tmp_path / "t.json")
    again = OneShot(loaded, adapter="contrastive").fit()
    assert again.adapter_reused
    assert np.array_equal(again.apply(vol).labels.array, expected)
    # another adapter, or another seed, trains anew rather than reusing a mismatched one
    assert not OneShot(loaded, adapter="classification").fit().adapter_reused
    assert not OneShot(Template.load(tmp_path / "t.json"), adapter="contrastive", seed=1).fit().adapter_reused
    # a damaged adapter file is refused with a clear message, never half-loaded
    (tmp_path / "t.adapter.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FMOneShotError, match="damaged"):
        Template.load(tmp_path / "t.json")


def test_threshold_option_needs_the_basic_adapter(tmp_path, sample, capsys):
    args = ["segment", str(sample / "images" / "ct-small.nii.gz"), "--template-image",
            str(sample / "images" / "ct-small.nii.gz"), "--slice", "20", "--positive", "liver:100,40",
            "--output", str(tmp_path / "x.nii.gz"), "--threshold", "0.4"]
    assert main(args) == 2
    assert "--threshold applies to the basic adapter only" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_minor_components_are_dropped_in_3d_but_pairs_stay():
    from FMOneShotLib.postprocess import drop_minor_components

    mask = np.zeros((10, 20, 20), bool)
    mask[2:8, 2:8, 2:8] = True  # the organ over six slices: 216 voxels
    mask[9, 15:18, 15:18] = True  # a stray detection on another slice: 9 voxels
    kept = drop_minor_components(mask, 0.25)
    assert kept[2:8, 2:8, 2:8].all() and not kept[9].any()
    assert np.array_equal(drop_minor_components(mask, 0.0), mask)
    pair = np.zeros((10, 20, 20), bool)
    pair[2:8, 2:6, 2:6] = pair[2:8, 2:6, 12:17] = True  # two kidneys under one label, 96 and 120 voxels
    assert np.array_equal(drop_minor_components(pair, 0.25), pair)
    diagonal = np.zeros((3, 3, 3), bool)
    diagonal[0, 0, 0] = diagonal[1, 1, 1] = diagonal[2, 2, 2] = True  # touching corners: one component
    assert np.array_equal(drop_minor_components(diagonal, 0.5), diagonal)


def test_less_confident_components_are_dropped_even_when_larger():
    """Judged by confidence too: a neighbour found beyond the organ's end, larger than the organ but less
    confident (as across CHAOS subjects: 0.73 against 0.86), is dropped; a second part as confident as the organ
    stays; a small speck, however confident, does not decide which component is the organ."""
    from FMOneShotLib.postprocess import drop_minor_components

    mask = np.zeros((12, 30, 30), bool)
    mask[0:5, 2:14, 2:14] = True  # the neighbour: 720 voxels on slices 0-4
    mask[7:11, 2:12, 2:12] = True  # the organ: 400 voxels on slices 7-10
    mask[7:11, 2:10, 20:28] = True  # its second part (a pair under one label): 256 voxels
    mask[11, 25:27, 25:27] = True  # a speck on slice 11, touching nothing: 4 voxels
    confidence = np.array([0.73] * 5 + [0.0] * 2 + [0.86] * 4 + [0.99])
    kept = drop_minor_components(mask, 0.25, confidence, 0.9)
    assert not kept[0:5].any() and not kept[11].any()
    assert np.array_equal(kept[7:11], mask[7:11])
    # size alone (ratio 0, or no confidence) keeps the larger neighbour and drops only the speck
    for alone in (drop_minor_components(mask, 0.25, confidence, 0.0), drop_minor_components(mask, 0.25)):
        assert np.array_equal(alone[:11], mask[:11]) and not alone[11].any()
    # a neighbour within 0.9 of the organ's confidence is not told apart from it, and stays
    close = confidence.copy()
    close[0:5] = 0.80
    assert np.array_equal(drop_minor_components(mask, 0.25, close, 0.9)[:11], mask[:11])


def test_clean_up_joins_neighbouring_processed_slices_only():
    from FMOneShotLib.image import Volume
    from FMOneShotLib.pipeline import OneShot
    from FMOneShotLib.template import Template

    blank_free = np.random.default_rng(0).random((3, 8, 8)).astype(np.float32)  # a blank template is refused
    engine = OneShot(Template.from_volume(Volume(blank_free), 1, {"organ": [[2, 2]]}))

    def run(done):
        labels = np.zeros((20, 10, 10), np.uint16)
        labels[2:5, 2:8, 2:8] = 1  # the organ on slices 2-4 ...
        labels[6:9, 2:8, 2:8] = 1  # ... and 6-8: slice 5 (the template's own) was not processed
        labels[15, 0:2, 0:2] = 1  # a stray detection
        present = labels.any(axis=(1, 2))[:, None].copy()
        confidence = present.astype(float)
        engine.clean_up(labels, present, confidence, done)
        return labels, present, confidence

    labels, present, confidence = run([k for k in range(20) if k != 5])
    assert labels[2:9].sum() == 6 * 36 and not labels[15].any()  # both halves kept, the stray dropped
    assert not present[15, 0] and confidence[15, 0] == 0 and present[2, 0]
    labels, present, _ = run([3, 15])  # sampled slices far apart: each judged on its own
    assert labels[3].any() and labels[15].any() and present[15, 0]


def test_template_views_move_the_masks_with_the_structure():
    from FMOneShotLib.adapters import AUGMENT_ZOOMS, template_views

    yy, xx = np.mgrid[:80, :80]
    disc = (yy - 25) ** 2 + (xx - 50) ** 2 <= 10 ** 2  # off centre: a zoom moves it as well as resizing it
    image = np.where(disc, 0.8, 0.2).astype(np.float32)
    views = template_views(image, disc[None])
    zooms = views[-len(AUGMENT_ZOOMS):]
    for view, masks in views[:-len(AUGMENT_ZOOMS)]:  # intensity views: the masks as they were
        assert np.array_equal(masks[0], disc) and not np.allclose(view, image)
        assert view.min() >= 0 and view.max() <= 1
    for zoom, (view, masks) in zip(AUGMENT_ZOOMS, zooms):
        bright = view > 0.5
        assert dice(masks[0], bright) > 0.95, zoom  # the mask follows the zoomed structure
        assert masks[0].sum() == pytest.approx(disc.sum() * zoom ** 2, rel=0.1)
        cy, cx = np.argwhere(masks[0]).mean(axis=0)
        assert (cy, cx) == pytest.approx((39.5 + (25 - 39.5) * zoom, 39.5 + (50 - 39.5) * zoom), abs=0.6)


def test_augmented_training_is_reproducible_and_saved_with_the_adapter(tmp_path):
    vol, ref = _two_discs()
    pos, neg = sample_prompts(ref[0] == 1, 4, 4, 0)

    def template():
        return Template.from_volume(vol, 0, {"a": pos}, {"a": neg}, {"a": ref[0] == 1})

    runs = [OneShot(template(), adapter="contrastive", adapter_options={"augment": True}).fit() for _ in range(2)]
    assert not runs[1].adapter_reused
    assert torch.equal(runs[0].adapter.branch.net[0].weight, runs[1].adapter.branch.net[0].weight)
    # the views are in the training set: more template features than the slice alone has ROI cells (a bank
    # large enough to hold them all)
    plain = OneShot(template(), adapter="contrastive", adapter_options={"bank_size": 5000}).fit()
    big = OneShot(template(), adapter="contrastive", adapter_options={"augment": True, "bank_size": 5000}).fit()
    assert len(big.adapter.roi[0]) > len(plain.adapter.roi[0])
    tpl = runs[1].template
    result = runs[1].apply(vol)
    assert np.mean([dice(result.mask("a")[z], ref[z] == 1) for z in range(vol.n_slices)]) >= 0.9
    assert tpl.adapter["description"]["options"]["augment"] is True
    tpl.save(tmp_path / "t.json")
    loaded = Template.load(tmp_path / "t.json")
    assert OneShot(loaded, adapter="contrastive", adapter_options={"augment": True}).fit().adapter_reused
    assert not OneShot(loaded, adapter="contrastive", adapter_options={"augment": False}).fit().adapter_reused


def test_augment_option_needs_an_adapter(tmp_path, sample, capsys):
    args = ["segment", str(sample / "images" / "ct-small.nii.gz"), "--template-image",
            str(sample / "images" / "ct-small.nii.gz"), "--slice", "20", "--positive", "liver:100,40",
            "--output", str(tmp_path / "x.nii.gz"), "--adapter", "none", "--augment"]
    assert main(args) == 2
    assert "--augment trains an adapter" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()
