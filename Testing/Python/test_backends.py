"""Every foundation-model backend with its real architecture, randomly initialised and made small; the SAM
segmenter; overlapping patches and log-binning against straightforward reference implementations."""

import json

import numpy as np
import pytest

from conftest import require_package
import torch
import torch.nn.functional as F

from FMOneShotLib import models
from FMOneShotLib.cli import main
from FMOneShotLib.datasets import load_dataset
from FMOneShotLib.demo import SAMPLE
from FMOneShotLib.errors import FMOneShotError
from FMOneShotLib.features import create_extractor, log_bin
from FMOneShotLib.features.vit import TIMM_BACKENDS
from FMOneShotLib.image import read_volume
from FMOneShotLib.pipeline import OneShot
from FMOneShotLib.segmenters import SamSegmenter, create_segmenter
from FMOneShotLib.template import Template, sample_prompts

SMALL_VIT = {"depth": 2, "embed_dim": 48, "num_heads": 2}
SMALL_SAM = {"embed_dim": 32, "depth": 2, "num_heads": 2, "global_attn_indexes": [1]}
PATCH = {"d1s8": 8, "d1b8": 8, "d1s16": 16, "d1b16": 16, "d3s16": 16, "d3b16": 16, "clip": 16}


def vit(name, **kw):
    return create_extractor(name, weights="random", overrides=SMALL_VIT, precision="fp32", device="cpu", **kw)


@pytest.fixture(scope="module")
def slices():
    rng = np.random.default_rng(0)
    return rng.random((3, 90, 120)).astype(np.float32)


@pytest.mark.parametrize("name", TIMM_BACKENDS)
def test_vit_backend_shapes_strides_and_determinism(name, slices):
    p = PATCH.get(name, 14)
    e = vit(name, input_size=8 * p)
    f = e.extract(slices)
    assert e.patch == p
    # longest side 120 -> 8 patches; 90 -> 6
    assert f.shape == (3, 48, 6, 8) and f.dtype == torch.float32
    assert torch.equal(f, vit(name, input_size=8 * p).extract(slices))  # deterministic
    assert torch.allclose(f[1], e.extract(slices[1:2])[0], atol=1e-5)  # batch-independent
    dense = vit(name, input_size=8 * p, stride=p // 2).extract(slices)
    assert dense.shape == (3, 48, 12, 16)  # overlapping patches: twice the grid
    binned = vit(name, input_size=8 * p, log_bin_levels=2).extract(slices)
    assert binned.shape == (3, 48 * 17, 6, 8) and torch.allclose(binned[:, 4 * 48:5 * 48], f, atol=1e-5)


def test_block_choice_and_bad_options(slices):
    last = vit("d2s14", input_size=112).extract(slices)
    first = vit("d2s14", input_size=112, block=0).extract(slices)
    assert first.shape == last.shape and not torch.allclose(first, last)
    assert torch.equal(vit("d2s14", input_size=112, block=1).extract(slices), last)
    with pytest.raises(FMOneShotError, match="block 5 does not exist"):
        vit("d2s14", block=5)
    with pytest.raises(FMOneShotError, match="Stride 20"):
        vit("d2s14", stride=20)
    with pytest.raises(FMOneShotError, match="need weights='random'"):
        create_extractor("d2s14", overrides=SMALL_VIT)


def test_pretrained_weights_missing_gives_one_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    with pytest.raises(FMOneShotError, match=r"model.safetensors \(DINOv2 ViT-S/14\) is not in the cache"):
        create_extractor("d2s14")


def test_pretrained_weights_load_from_the_verified_cache(tmp_path, monkeypatch):
    """A checkpoint in the cache is verified and loaded: the features are those of the saved model."""
    from safetensors.torch import save_file

    import timm

    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    model = timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=False, num_classes=0,
                              dynamic_img_size=True)
    (tmp_path / "d2s14").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "d2s14" / "model.safetensors"))
    e = create_extractor("d2s14", precision="fp32", input_size=112, pos_interpolation="timm")  # timm's way
    assert (tmp_path / "d2s14" / "model.safetensors.sha256").exists()  # pinned at first use
    x = e.preprocess(np.random.default_rng(1).random((1, 112, 112)).astype(np.float32))
    with torch.inference_mode():
        ref = model.forward_features(x)[:, model.num_prefix_tokens:]
        ref = model.blocks[-1](model.blocks[:-1](model.norm_pre(model._pos_embed(model.patch_embed(x)))))
        ref = ref[:, model.num_prefix_tokens:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
        assert torch.allclose(e.forward(x), ref, atol=1e-4)


def test_clip_loads_its_published_checkpoint_layout_with_quickgelu(tmp_path, monkeypatch):
    """timm's file for OpenAI CLIP carries the 512-d projection (head.weight, head.bias): it loads strictly,
    into the QuickGELU network CLIP was trained with; the features are those of timm's QuickGELU model."""
    from safetensors.torch import save_file

    import timm

    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    published = timm.create_model("vit_base_patch16_clip_224.openai", pretrained=False)  # the file's layout
    state = {k: v.contiguous() for k, v in published.state_dict().items()}
    assert {"head.weight", "head.bias"} <= set(state) and state["head.weight"].shape == (512, 768)
    (tmp_path / "clip").mkdir()
    save_file(state, str(tmp_path / "clip" / "model.safetensors"))
    e = create_extractor("clip", precision="fp32", device="cpu", input_size=64)
    assert type(e.model.blocks[0].mlp.act).__name__ == "QuickGELU"
    x = e.preprocess(np.random.default_rng(4).random((1, 64, 64)).astype(np.float32))

    def reference(timm_name):
        model = timm.create_model(timm_name, pretrained=False, dynamic_img_size=True)
        model.load_state_dict(state, strict=True)
        with torch.inference_mode():
            t = model.blocks(model.norm_pre(model._pos_embed(model.patch_embed(x))))
        return t[:, model.num_prefix_tokens:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)

    with torch.inference_mode():
        f = e.forward(x)
    assert torch.allclose(f, reference("vit_base_patch16_clip_quickgelu_224.openai"), atol=1e-4)
    assert not torch.allclose(f, reference("vit_base_patch16_clip_224.openai"), atol=1e-2)  # GELU: other features
    # a backbone saved without the head (fine-tuned, say) loads as well; a foreign file is refused clearly
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(tmp_path / "backbone.safetensors"))
    assert torch.equal(models.timm_vit("clip", str(tmp_path / "backbone.safetensors")).pos_embed, state["pos_embed"])
    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(FMOneShotError, match="does not fit OpenAI CLIP"):
        models.timm_vit("clip", str(tmp_path / "other.safetensors"))


def test_overlapping_patches_match_a_reference_implementation():
    """Stride s < patch p: each token is the patch embedding of the p x p window starting at (s*i, s*j) of the
    padded image, plus the position embedding resampled (bicubic) to the denser grid."""
    e = vit("d1s16", input_size=64, stride=8)
    m = e.model
    img = np.random.default_rng(2).random((1, 64, 64)).astype(np.float32)
    x = e.preprocess(img)
    assert x.shape[-1] == 64 + 8  # padded by patch - stride
    tokens = e.patch_tokens(x)  # (1, h, w, C)
    h, w = tokens.shape[1:3]
    assert (h, w) == (8, 8) == e.grid_shape(img.shape[1:])
    weight = m.patch_embed.proj.weight.reshape(m.embed_dim, -1)
    for i, j in [(0, 0), (3, 5), (7, 7)]:
        window = x[0, :, 8 * i:8 * i + 16, 8 * j:8 * j + 16].reshape(-1)
        ref = weight @ window + m.patch_embed.proj.bias
        assert torch.allclose(tokens[0, i, j], ref, atol=1e-4)
    with torch.inference_mode():
        embedded = e.pos_embed(tokens)
    # DINO v1 (and v2) by default: dino-vit-features' interpolation, written out (scale factor, +0.1 offset)
    assert e.pos_interpolation == "dino"
    grid = m.pos_embed[:, 1:].reshape(1, 14, 14, -1).permute(0, 3, 1, 2)
    ref_pos = F.interpolate(grid, scale_factor=(8.1 / 14, 8.1 / 14), mode="bicubic", align_corners=False,
                            recompute_scale_factor=False).permute(0, 2, 3, 1).reshape(1, 64, -1)
    assert torch.allclose(embedded[:, 1:], tokens.reshape(1, 64, -1) + ref_pos, atol=1e-4)
    assert torch.allclose(embedded[:, 0], m.cls_token[:, 0] + m.pos_embed[:, 0], atol=1e-6)
    # timm's size-based, antialiased resampling on request (the default for CLIP): another, measurable choice
    timm_pos = F.interpolate(grid, size=(8, 8), mode="bicubic", align_corners=False, antialias=True)
    timm_pos = timm_pos.permute(0, 2, 3, 1).reshape(1, 64, -1)
    assert not torch.allclose(ref_pos, timm_pos, atol=1e-3)
    t = vit("d1s16", input_size=64, stride=8, pos_interpolation="timm")
    with torch.inference_mode():
        assert torch.allclose(t.pos_embed(tokens)[:, 1:], tokens.reshape(1, 64, -1) + timm_pos, atol=1e-4)
    assert vit("clip", input_size=64).pos_interpolation == "timm"
    assert t.settings()["pos_interpolation"] == "timm" and e.settings()["pos_interpolation"] == "dino"
    with pytest.raises(FMOneShotError, match="does not apply to d3s16"):
        vit("d3s16", pos_interpolation="dino")
    # at the trained grid (224 px at stride 16) the embeddings are used as trained, as in DINO
    full = vit("d1s16", input_size=224)
    x = full.patch_tokens(full.preprocess(img))
    with torch.inference_mode():
        assert torch.equal(full.pos_embed(x), full.model._pos_embed(x))


@pytest.mark.parametrize("name, stride", [("d2s14", 7), ("d2s14", 14), ("d1s16", 8), ("d1s8", 3)])
def test_cell_centres_are_exact_with_odd_padding(name, stride):
    """Each cell's window is centred on (j + 0.5) * stride - 0.5 in pixel indices, also where patch - stride
    is odd (patch 14, stride 7: the padding is 3.5 pixels a side). On a ramp image (pixel value = column),
    the mean over a cell's window is its centre."""
    e = vit(name, stride=stride, input_size=10 * stride)
    H = W = 10 * stride  # no resizing
    ramp = np.tile(np.arange(W, dtype=np.float32), (H, 1)) / W
    x = e.preprocess(ramp[None])[:, :1] * e.std[:, :1] + e.mean[:, :1]  # back to [0, 1] values
    means = F.avg_pool2d(x, e.patch, stride=e.stride)[0, 0] * W  # (h, w): each window's mean column
    assert means.shape == (10, 10)
    inside = range((e.patch - e.stride + 1) // e.stride + 1, 10 - (e.patch - e.stride + 1) // e.stride - 1)
    for j in inside:  # windows not reaching the zero padding
        assert means[5, j].item() == pytest.approx((j + 0.5) * stride - 0.5, abs=1e-3), j


def test_overlapping_patch_cells_are_centred_where_the_grid_convention_says():
    """A bright dot in the image lights up the cell whose centre is nearest, with overlapping patches too."""
    e = vit("d1s16", input_size=64, stride=8)
    img = np.zeros((1, 64, 64), np.float32)
    img[0, 44, 20] = 1.0
    x = e.preprocess(img)
    resp = e.patch_tokens(x)[0].abs().sum(-1) - e.patch_tokens(e.preprocess(np.zeros_like(img)))[0].abs().sum(-1)
    rows, cols = np.nonzero(resp.abs().detach().numpy() > 1e-6)
    # cells covering pixel 44 (rows) and 20 (columns): centres (k + 0.5) * 8 within half a patch (8 px)
    assert set(rows.tolist()) == {k for k in range(8) if abs((k + 0.5) * 8 - 44.5) < 8}
    assert set(cols.tolist()) == {k for k in range(8) if abs((k + 0.5) * 8 - 20.5) < 8}


def reference_log_bin(x, levels):
    """Amir et al.'s loop, cell by cell."""
    B, C, h, w = x.shape
    pools = [F.avg_pool2d(x, 3 ** k, stride=1, padding=3 ** k // 2, count_include_pad=False) for k in range(levels)]
    out = torch.zeros(B, C * (1 + 8 * levels), h, w)
    for y in range(h):
        for xx in range(w):
            part = 0
            for k in range(levels):
                size = 3 ** k
                for i in range(y - size, y + size + 1, size):
                    for j in range(xx - size, xx + size + 1, size):
                        if i == y and j == xx and k != 0:
                            continue
                        ii, jj = min(max(i, 0), h - 1), min(max(j, 0), w - 1)
                        out[:, part * C:(part + 1) * C, y, xx] = pools[k][:, :, ii, jj]
                        part += 1
    return out


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_log_binning_matches_the_reference_loop(levels):
    x = torch.randn(2, 5, 7, 11)
    assert torch.allclose(log_bin(x, levels), reference_log_bin(x, levels), atol=1e-6)


def test_sam_encoder_backend_grid_covers_the_slice(slices):
    e = create_extractor("sam", weights="random", overrides=SMALL_SAM, precision="fp32", device="cpu")
    f = e.extract(slices)
    assert f.shape == (3, 256, 48, 64)  # 1024 / 16 = 64 columns; 90 / 120 of that = 48 rows (padding dropped)
    assert torch.equal(f, e.extract(slices))
    assert create_extractor("sam", weights="random", overrides=SMALL_SAM, precision="fp32",
                            log_bin_levels=1).extract(slices[:1]).shape == (1, 256 * 9, 48, 64)


def test_sam_segmenter_equals_segment_anything_and_encodes_each_slice_once():
    from segment_anything import SamPredictor

    seg = SamSegmenter(weights="random", overrides=SMALL_SAM, precision="fp32", device="cpu")
    rng = np.random.default_rng(3)
    image = rng.random((90, 120)).astype(np.float32)
    pos, neg = np.array([[60.0, 40.0], [70.0, 45.0]]), np.array([[5.0, 5.0]])
    mask = seg.segment(image, None, pos, neg)
    seg.segment(image, None, pos[:1], neg)  # a second label on the same slice
    assert seg.encodings == 1 and mask.shape == image.shape and mask.dtype == bool
    ref = SamPredictor(models.sam("vit_b", "random", SMALL_SAM))
    ref.set_image(np.repeat((image * 255).round().astype(np.uint8)[..., None], 3, axis=2))
    assert not seg.segment(image, None, np.zeros((0, 2)), neg).any()
    # Several points are not ambiguous: SAM's single-mask output (segment-anything's advice), not the best of
    # its three multimask outputs, which differs here.
    single, _, _ = ref.predict(np.concatenate([pos, neg]), np.array([1, 1, 0]), multimask_output=False)
    three, scores, _ = ref.predict(np.concatenate([pos, neg]), np.array([1, 1, 0]), multimask_output=True)
    assert np.array_equal(mask, single[0]) and not np.array_equal(mask, three[np.argmax(scores)])
    # One point alone is ambiguous: the best-scoring of the three masks, which differs from the single mask.
    one = seg.segment(image, None, pos[:1], np.zeros((0, 2)))
    single, _, _ = ref.predict(pos[:1], np.array([1]), multimask_output=False)
    three, scores, _ = ref.predict(pos[:1], np.array([1]), multimask_output=True)
    assert np.array_equal(one, three[np.argmax(scores)]) and not np.array_equal(one, single[0])
    assert seg.encodings == 1
    seg.segment(image[::-1].copy(), None, pos, neg)
    assert seg.encodings == 2


def test_auto_segmenter_is_sam_only_when_its_weights_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    assert create_segmenter("auto").name == "offline"
    (tmp_path / "sam_vit_b").mkdir()
    (tmp_path / "sam_vit_b" / "sam_vit_b_01ec64.pth").write_bytes(b"not the real file")
    with pytest.raises(FMOneShotError, match="damaged or not the published file"):  # verified before use
        create_segmenter("auto")


def test_auto_backend_is_the_first_with_downloaded_weights_else_offline(tmp_path, monkeypatch):
    from FMOneShotLib import weights as W
    from FMOneShotLib.features import resolve_backend

    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    name, why = resolve_backend("auto")
    assert name == "offline" and "no foundation-model weights" in why
    assert create_extractor("auto", device="cpu", precision="fp32").name == "offline"  # model options dropped
    for later in ("d1s8", "d2b14"):
        path = W.local_path(W.checkpoint(later))
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    assert resolve_backend("auto") == ("d2b14", "backend d2b14: its weights are downloaded")
    assert resolve_backend("d1s16")[0] == "d1s16"


@pytest.fixture(scope="module")
def ct():
    case = load_dataset(SAMPLE).cases[0]
    return case.read_image(), case.read_mask()


def test_d2s14_and_sam_in_the_whole_chain(ct):
    vol, ref = ct
    z = int(np.argmax((ref == 1).sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z] == 1, 5, 5, 0)
    tpl = Template.from_volume(vol, z, {"liver": pos}, {"liver": neg}, {"liver": ref[z] == 1},
                               landmarks={"tip": (60.0, 50.0)})
    for backend, options in [("d2s14", {"overrides": SMALL_VIT}), ("sam", {"overrides": SMALL_SAM})]:
        engine = OneShot(tpl, backend=backend, backend_options={"weights": "random", "precision": "fp32", **options},
                         segmenter="sam", segmenter_options={"weights": "random", "overrides": SMALL_SAM,
                                                             "precision": "fp32"}).fit()
        result = engine.apply(vol, slices=[z - 1, z, z + 1])
        assert result.labels.array.shape == vol.array.shape
        assert not result.labels.array[:z - 1].any() and not result.labels.array[z + 2:].any()
        assert engine.segmenter.encodings >= 1 and engine.segmenter.name == "sam"
        assert result.timings["segmenter"] > 0
        lm = result.best_landmarks()["tip"]
        assert lm.slice in (z - 1, z, z + 1) and 0 <= lm.xy[0] < 122 and 0 <= lm.xy[1] < 101
        # on the template slice itself the template's own features are there: the best match is close to 1
        # (below it only by interpolation between cells). Random features are alike over uniform tissue, so
        # where the match lies is not asserted.
        on_template = [m for m in result.landmarks["tip"] if m.slice == z][0]
        assert on_template.confidence > 0.85


def test_cli_segment_and_localize_with_d2s14(tmp_path, capsys):
    ct_path = SAMPLE / "images" / "ct-small.nii.gz"
    out = tmp_path / "liver.nii.gz"
    argv = ["segment", str(ct_path), "--template-image", str(ct_path), "--slice", "22",
            "--positive", "liver:45,60", "--negative", "liver:100,30", "--backend", "d2s14", "--weights", "random",
            "--input-size", "112", "--precision", "fp32", "--device", "cpu", "--segmenter", "offline", "-o", str(out)]
    assert main(argv) == 0
    assert "randomly initialised" in capsys.readouterr().err
    labels, image = read_volume(out), read_volume(ct_path)
    assert labels.array.shape == image.array.shape and np.allclose(labels.spacing, image.spacing)
    lms = tmp_path / "lm.json"
    assert main(["localize", str(ct_path), "--template-image", str(ct_path), "--slice", "22", "--landmark",
                 "tip:60,50", "--backend", "d2s14", "--weights", "random", "--input-size", "112", "-o",
                 str(lms)]) == 0
    (row,) = json.loads(lms.read_text(encoding="utf-8"))["landmarks"]
    assert row["landmark"] == "tip" and 0 <= row["slice"] < 30
    physical = image.index_to_physical([row["x"], row["y"], row["slice"]])
    assert np.allclose(physical, [row["physical_x"], row["physical_y"], row["physical_z"]], atol=0.01)


def test_cli_refuses_foundation_options_for_the_offline_backend(tmp_path, capsys):
    ct_path = SAMPLE / "images" / "ct-small.nii.gz"
    assert main(["segment", str(ct_path), "--template-image", str(ct_path), "--positive", "liver:45,60",
                 "--stride", "7", "-o", str(tmp_path / "x.nii.gz")]) == 2
    assert "--stride apply to foundation-model backends" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


def test_sam_weights_named_make_auto_choose_sam(tmp_path, monkeypatch):
    """--sam-weights with the default --segmenter auto runs SAM, even with an empty cache."""
    from FMOneShotLib.cli import _segmenter_options, build_parser

    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    assert create_segmenter("auto").name == "offline"
    seg = create_segmenter("auto", weights="random", overrides=SMALL_SAM, precision="fp32", device="cpu")
    assert seg.name == "sam"
    args = build_parser().parse_args(["segment", "t.nii.gz", "--template", "t.json", "-o", "out",
                                      "--sam-weights", "random"])
    assert args.segmenter == "auto"
    assert create_segmenter(args.segmenter, **_segmenter_options(args)).name == "sam"


def test_offline_body_is_found_on_a_dark_slice():
    """The ends of an MR volume can be dark (the coil's fall-off): the body there is found all the same, so the
    position features do not put it, and the organs, in a corner (CHAOS chaos-3's last slices: 5% -> 64%)."""
    from FMOneShotLib.features.offline import body_mask

    yy, xx = np.mgrid[:96, :96]
    body = (yy - 48) ** 2 / 40 ** 2 + (xx - 48) ** 2 / 30 ** 2 <= 1
    rng = np.random.default_rng(0)
    for level in (0.6, 0.04):  # a normal slice, and one whose body is barely above the air
        image = np.where(body, level, 0.002) * (1 + 0.1 * rng.standard_normal(body.shape))
        found = body_mask(image.astype(np.float32))
        assert (found & body).sum() / (found | body).sum() > 0.9, level
    assert body_mask(np.zeros((32, 32), np.float32)).all()  # a blank slice: no body to find, nothing refused


def test_what_auto_picks_is_known_without_importing_torch():
    """The Slicer panel shows what `auto` picks as soon as it opens: that must not load PyTorch (seconds)."""
    import subprocess
    import sys

    code = ("import sys; from FMOneShotLib.weights import resolve_backend; "
            "name, why = resolve_backend('auto'); print(name); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "FMONESHOT_CACHE": "/nonexistent-fmoneshot-cache"})
    assert out.stdout.split() == ["offline", "False"]


# Stable Diffusion (DIFT): diffusers' UNet2DConditionModel and AutoencoderKL and transformers' CLIPTextModel,
# the classes of SD 2.1, made tiny and randomly initialised.
TINY_SD = {"unet": dict(block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=(2, 4),
                        cross_attention_dim=32, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8, norm_num_groups=8),
           "vae": dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, norm_num_groups=8),
           "text_encoder": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=100, projection_dim=16, bos_token_id=98, eos_token_id=99)}


def sd(**kw):
    require_package("diffusers", "pip install 'fmoneshot[sd]'")
    options = {"weights": "random", "overrides": TINY_SD, "precision": "fp32", "device": "cpu", "input_size": 64,
               "ensemble": 2, **kw}
    return create_extractor("sd", **options)


def test_sd_dift_shapes_determinism_and_options():
    x = np.random.default_rng(5).random((2, 40, 64)).astype(np.float32)
    e = sd()
    f = e.extract(x)
    # 64 px wide -> 64 x 64 input (40 rounds up to one multiple of 64); the tiny VAE halves once -> a 32 x 32
    # latent; up-block 1 (the last of two) keeps it: 32 x 32 cells of 32 channels
    assert f.shape == (2, 32, 32, 32) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert torch.equal(f, sd().extract(x))  # fixed seed: the same noise draws in every run
    assert torch.allclose(f[1], e.extract(x[1:2])[0], atol=1e-5)  # independent of the batch
    assert torch.allclose(f, sd(batch_size=2).extract(x), atol=1e-4)  # slices batched with their draws
    assert not torch.allclose(f, sd(timestep=900).extract(x), atol=1e-3)  # more noise, other features
    assert not torch.allclose(f, sd(seed=1).extract(x), atol=1e-3)  # other draws
    one = sd(ensemble=1).extract(x)
    assert not torch.allclose(f, one, atol=1e-3)  # an average over two draws, not one
    assert sd(up_block=0).extract(x).shape == (2, 64, 32, 32)  # the lower up-block: 64 channels, upsampled
    assert sd(log_bin_levels=1).extract(x[:1]).shape == (1, 32 * 9, 32, 32)
    assert e.settings()["timestep"] == 261 and e.settings()["up_block"] == 1
    with pytest.raises(FMOneShotError, match="up-block 2 does not exist"):
        sd(up_block=2)
    with pytest.raises(FMOneShotError, match="Timestep 1000"):
        sd(timestep=1000)


def test_sd_weights_are_a_folder_and_its_licence_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("FMONESHOT_CACHE", str(tmp_path))
    with pytest.raises(FMOneShotError, match=r"Stable Diffusion 2.1 is not at .*sd.*CreativeML Open RAIL\+\+-M"):
        models.stable_diffusion("pretrained")
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(FMOneShotError, match="lacks vae, text_encoder, tokenizer, scheduler"):
        models.stable_diffusion("pretrained")
    with pytest.raises(FMOneShotError, match="need weights='random'"):
        models.stable_diffusion(str(tmp_path / "sd"), overrides=TINY_SD)


def test_sd_without_its_extra_says_how_to_install_it(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import fails as if not installed
    with pytest.raises(FMOneShotError, match=r"fmoneshot\[sd\]"):
        models.stable_diffusion("random", {"unet": {"sample_size": 7}})


def test_sd_in_the_whole_chain_segments_and_localizes(ct):
    vol, ref = ct
    z = int(np.argmax((ref == 1).sum(axis=(1, 2))))
    pos, neg = sample_prompts(ref[z] == 1, 5, 5, 0)
    # the landmark on a cell centre of the 32 x 32 grid over the 122 x 101 slice: (j + 0.5) * W / w - 0.5
    tip = (15.5 * 122 / 32 - 0.5, 15.5 * 101 / 32 - 0.5)
    tpl = Template.from_volume(vol, z, {"liver": pos}, {"liver": neg}, {"liver": ref[z] == 1},
                               landmarks={"tip": tip})
    sd()  # skips without the extra
    engine = OneShot(tpl, backend="sd", segmenter="offline",
                     backend_options={"weights": "random", "overrides": TINY_SD, "precision": "fp32",
                                      "device": "cpu", "input_size": 64, "ensemble": 2}).fit()
    result = engine.apply(vol, slices=[z - 1, z, z + 1])
    assert result.labels.array.shape == vol.array.shape
    assert not result.labels.array[:z - 1].any() and not result.labels.array[z + 2:].any()
    assert result.labels.array[z].any()  # on the template slice itself the structure is found
    on_template = [m for m in result.landmarks["tip"] if m.slice == z][0]
    assert on_template.confidence > 0.7  # its own features (below 1 only by upsampling between cells)
    assert np.hypot(*(np.asarray(on_template.xy) - tip)) <= 1.5


def test_cli_keeps_sd_options_to_the_sd_backend(tmp_path, capsys):
    ct_path = SAMPLE / "images" / "ct-small.nii.gz"
    base = ["segment", str(ct_path), "--template-image", str(ct_path), "--positive", "liver:45,60",
            "-o", str(tmp_path / "x.nii.gz")]
    assert main(base + ["--backend", "d2s14", "--weights", "random", "--timestep", "100"]) == 2
    assert "--timestep apply to the Stable Diffusion backend only" in capsys.readouterr().err
    assert main(base + ["--backend", "sd", "--weights", "random", "--stride", "7"]) == 2
    assert "--stride do not apply to the Stable Diffusion backend" in capsys.readouterr().err
    assert not (tmp_path / "x.nii.gz").exists()


CPUINFO = """processor\t: 0
vendor_id\t: {vendor}
model name\t: {model}
flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}
bugs\t\t: sysret_ss_attrs

processor\t: 1
flags\t\t: fpu sse2 avx2 avx512f avx512bw {extra}
"""


@pytest.mark.parametrize("vendor,model,extra,expected", [
    ("AuthenticAMD", "AMD EPYC 9B14", "avx512_vnni avx512_bf16 vaes", "bf16"),  # Zen 4: AVX-512 BF16, no AMX
    ("GenuineIntel", "Intel Xeon Platinum 8480C", "avx512_bf16 amx_bf16 amx_tile amx_int8", "bf16"),
    ("GenuineIntel", "Intel Xeon Gold 6248", "avx512_vnni", "fp32"),  # AVX-512 without bf16 arithmetic
    ("AuthenticAMD", "AMD EPYC 7B12", "avx2 sha_ni", "fp32"),
])
def test_auto_precision_is_bf16_where_the_cpu_multiplies_bf16(tmp_path, monkeypatch, vendor, model, extra,
                                                              expected):
    info = tmp_path / "cpuinfo"
    info.write_text(CPUINFO.format(vendor=vendor, model=model, extra=extra), encoding="utf-8")
    monkeypatch.setattr(models, "CPUINFO", str(info))
    assert models.resolve_precision("auto", "cpu") == expected
    assert models.resolve_precision("fp32", "cpu") == "fp32" and models.resolve_precision("bf16", "cpu") == "bf16"
    monkeypatch.setattr(models, "CPUINFO", str(tmp_path / "none"))  # no /proc/cpuinfo (not Linux): fp32
    assert models.resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(FMOneShotError, match="Unknown precision"):
        models.resolve_precision("fp16", "cpu")
    # the extractor and the segmenters take what auto resolves to
    monkeypatch.setattr(models, "CPUINFO", str(info))
    e = create_extractor("d2s14", weights="random", overrides={"depth": 1, "embed_dim": 24, "num_heads": 2},
                         device="cpu", input_size=28)
    assert e.precision == expected
