"""Foundation-model backends: DINO v1, DINOv2, DINOv3 and CLIP ViTs through timm, and the SAM image encoder.

Registered under paper A's names (d1s8, d1s16, d1b8, d1b16, d2s14, d2b14, d2l14, d2g14), DINOv3 small and base
(d3s16, d3b16: the DINOv3 licence, opt-in), clip (CLIP ViT-B/16) and sam (the SAM image encoder's output).

For a batch of slices the ViT backends
  1. resize each slice so that its longest side is ``input_size`` pixels (both sides a multiple of the
     stride), repeat it to 3 channels and normalise with the model's mean and standard deviation;
  2. embed patches with the model's own patch-embedding weights at ``stride`` (smaller than the patch size:
     overlapping patches, Amir et al.), after padding the image by (patch - stride) / 2 pixels on each side so
     that cell (i, j) is centred on pixel ((j + 0.5) * stride, (i + 0.5) * stride) as the grid convention of
     features.base requires (an odd padding, as at patch 14 / stride 7, is half a pixel on each side: the
     resized image is resampled half a pixel over); the position embeddings are resampled to the denser grid
     (``pos_interpolation``, below), DINOv3's rotary positions computed for it;
  3. run the transformer blocks up to ``block`` (default the last, as in paper A) and return that block's
     patch **token** embeddings (prefix tokens dropped, no final norm) at the patch grid;
  4. optionally log-bin them (features.base.log_bin).
Everything runs under ``torch.inference_mode`` in bf16 autocast where ``precision`` resolves to bf16.

``pos_interpolation``: ``"dino"`` resamples the learned position embeddings as DINO, DINOv2 and
dino-vit-features (Amir et al., ``ViTExtractor._fix_pos_enc``) do, which is what paper A used: bicubic with
a scale factor of (grid + 0.1) / the trained grid, no antialiasing; the default for DINO v1 and v2.
``"timm"`` resamples to the grid size, bicubic with antialiasing (timm's ``resample_abs_pos_embed``); the
default for CLIP. The two differ by a fraction of a cell in where each position is read.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..errors import FMOneShotError
from ..threads import model_forward
from ..weights import TIMM_BACKENDS  # paper names; each is a registry entry (weights.py) naming its timm model
from .base import FeatureExtractor, forward_in_batches, log_bin, register

DEFAULT_INPUT_SIZE = 448
POS_INTERPOLATIONS = ("dino", "timm")


def default_pos_interpolation(name: str) -> str:
    """'dino' for DINO v1 and v2 (paper A's reference code), else 'timm'."""
    return "dino" if name.startswith(("d1", "d2")) else "timm"


def dino_pos_embed(pos_embed: torch.Tensor, grid) -> torch.Tensor:
    """Patch position embeddings (1, N, C) of a trained sqrt(N) x sqrt(N) grid -> (1, h * w, C) for ``grid``
    (h, w), as DINO / DINOv2 / dino-vit-features interpolate them: bicubic, scale factor (h + 0.1) / sqrt(N)
    per axis, ``align_corners=False``, no antialiasing, unchanged when the grid is the trained one."""
    n = int(round(pos_embed.shape[1] ** 0.5))
    h, w = grid
    if (h, w) == (n, n):
        return pos_embed
    grid_embed = pos_embed.reshape(1, n, n, -1).permute(0, 3, 1, 2)
    out = F.interpolate(grid_embed.float(), scale_factor=((h + 0.1) / n, (w + 0.1) / n), mode="bicubic",
                        align_corners=False, recompute_scale_factor=False)
    return out.to(pos_embed.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)


class TimmViTFeatures(FeatureExtractor):
    """Patch token embeddings of a timm ViT (see the module docstring)."""

    def __init__(self, name: str, weights: str = "pretrained", block: int = -1, stride: int | None = None,
                 log_bin_levels: int = 0, input_size: int = DEFAULT_INPUT_SIZE, device: str = "auto",
                 precision: str = "auto", batch_size: int | None = None, overrides: dict | None = None,
                 pos_interpolation: str = "auto"):
        self.name = name
        self.weights = str(weights)
        self.model = models.timm_vit(name, weights, overrides)
        self.overrides = dict(overrides or {})
        self.patch = int(self.model.patch_embed.patch_size[0])
        self.stride = int(stride or self.patch)
        if not 1 <= self.stride <= self.patch:
            raise FMOneShotError(f"Stride {self.stride} for {name} is not between 1 and its patch size {self.patch}.",
                                 f"choose a stride from 1 to {self.patch} (overlapping patches below {self.patch}).")
        n_blocks = len(self.model.blocks)
        if not -n_blocks <= block < n_blocks:
            raise FMOneShotError(f"{name} has {n_blocks} blocks; block {block} does not exist.",
                                 f"choose a block from 0 to {n_blocks - 1} (or -1, the last).")
        self.block = block % n_blocks
        if input_size < self.stride:
            raise FMOneShotError(f"Input size {input_size} is smaller than the stride {self.stride}.",
                                 "choose an input size of at least a few patches (default 448).")
        self.input_size = int(input_size)
        self.log_bin_levels = int(log_bin_levels)
        self.device = models.resolve_device(device)
        self.precision = models.resolve_precision(precision, self.device)
        self.model.to(self.device)
        self.batch_size = batch_size or (32 if self.device.startswith("cuda") else 8)
        cfg = self.model.pretrained_cfg
        self.mean = torch.tensor(cfg.get("mean", (0.485, 0.456, 0.406)), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg.get("std", (0.229, 0.224, 0.225)), dtype=torch.float32).view(1, 3, 1, 1)
        self._rope = hasattr(self.model, "rope")  # Eva (DINOv3) passes rotary positions to its blocks
        if pos_interpolation == "auto":
            pos_interpolation = default_pos_interpolation(name)
        if pos_interpolation not in POS_INTERPOLATIONS or (self._rope and pos_interpolation != "timm"):
            raise FMOneShotError(f"Position-embedding interpolation {pos_interpolation!r} does not apply to {name}.",
                                 "choose 'dino' or 'timm' (DINOv3's rotary positions: 'timm'), or 'auto'.")
        self.pos_interpolation = pos_interpolation

    def grid_shape(self, image_shape) -> tuple:
        """Feature grid (h, w) of a slice of ``image_shape`` (H, W)."""
        H, W = image_shape
        scale = self.input_size / max(H, W)
        return (max(1, round(H * scale / self.stride)), max(1, round(W * scale / self.stride)))

    def preprocess(self, slices: np.ndarray) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> (B, 3, H', W') normalised, resized and padded for the patch embedding."""
        t = torch.as_tensor(np.asarray(slices, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        h, w = self.grid_shape(t.shape[1:])
        t = F.interpolate(t[:, None], size=(h * self.stride, w * self.stride), mode="bilinear",
                          align_corners=False, antialias=True)
        pad = self.patch - self.stride
        if pad % 2:  # half a pixel on each side: pad one more, then the mean of each 2 x 2 neighbourhood
            t = F.avg_pool2d(F.pad(t, (pad // 2 + 1,) * 4), kernel_size=2, stride=1)
        elif pad:
            t = F.pad(t, (pad // 2,) * 4)
        return (t.expand(-1, 3, -1, -1) - self.mean) / self.std

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding at ``self.stride``: (B, 3, H', W') -> (B, h, w, C), the model's weights."""
        pe = self.model.patch_embed
        x = F.conv2d(x, pe.proj.weight, pe.proj.bias, stride=self.stride)
        return pe.norm(x.permute(0, 2, 3, 1))

    def pos_embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, h, w, C) patch tokens -> (B, P + h * w, C) with the P prefix tokens, position embeddings added
        (resampled by ``self.pos_interpolation``)."""
        m = self.model
        if self.pos_interpolation == "timm" or m.pos_embed is None:
            return m._pos_embed(tokens)
        B, h, w, C = tokens.shape
        prefix = [t.expand(B, -1, -1) for t in (m.cls_token, m.reg_token) if t is not None]
        n_pos_prefix = 0 if m.no_embed_class else m.num_prefix_tokens
        patch_pos = dino_pos_embed(m.pos_embed[:, n_pos_prefix:], (h, w))
        x = tokens.reshape(B, h * w, C)
        if m.no_embed_class:
            x = torch.cat(prefix + [x + patch_pos], dim=1)
        else:
            x = torch.cat(prefix + [x], dim=1) + torch.cat([m.pos_embed[:, :n_pos_prefix], patch_pos], dim=1)
        return m.pos_drop(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H', W') preprocessed -> token embeddings of ``self.block`` as (B, C, h, w), float32."""
        m = self.model
        tokens = self.patch_tokens(x)
        B, h, w, C = tokens.shape
        if self._rope:
            tokens, rope = m._pos_embed(tokens)
            tokens = m.norm_pre(tokens)
            for blk in m.blocks[:self.block + 1]:
                tokens = blk(tokens, rope=rope)
        else:
            tokens = m.norm_pre(m.patch_drop(self.pos_embed(tokens)))
            for blk in m.blocks[:self.block + 1]:
                tokens = blk(tokens)
        tokens = tokens[:, m.num_prefix_tokens:]
        return tokens.float().reshape(B, h, w, -1).permute(0, 3, 1, 2)

    def extract(self, slices: np.ndarray, pixel_spacing=(1.0, 1.0)) -> torch.Tensor:
        return forward_in_batches(self, slices)

    def settings(self) -> dict:
        s = {"backend": self.name, "weights": self.weights, "block": self.block, "stride": self.stride,
             "log_bin_levels": self.log_bin_levels, "input_size": self.input_size,
             "pos_interpolation": self.pos_interpolation}
        if self.overrides:
            s["overrides"] = self.overrides
        return s


def _timm_factory(name):
    def make(**options):
        return TimmViTFeatures(name, **options)

    make.__doc__ = f"The {name} backend (TimmViTFeatures)."
    return make


for _name in TIMM_BACKENDS:
    register(_name)(_timm_factory(_name))


@register("sam")
class SamEncoderFeatures(FeatureExtractor):
    """The SAM image encoder's output (256 channels at 1/16 of its 1024-pixel input), as in paper A.

    Each slice is resized so that its longest side is 1024 pixels (both sides a multiple of 16) and padded at
    the bottom and right as SAM does; the grid cells over the padding are dropped, so the grid covers the
    slice exactly. Overlapping patches do not apply (SAM's windowed attention is tied to its 64 x 64 grid).
    """

    name = "sam"

    def __init__(self, model: str = "vit_b", weights: str = "pretrained", log_bin_levels: int = 0,
                 device: str = "auto", precision: str = "auto", batch_size: int | None = None,
                 overrides: dict | None = None):
        self.model_type = model
        self.weights = str(weights)
        self.overrides = dict(overrides or {})
        self.sam = models.sam(model, weights, overrides)
        self.device = models.resolve_device(device)
        self.precision = models.resolve_precision(precision, self.device)
        self.sam.to(self.device)
        self.log_bin_levels = int(log_bin_levels)
        self.size = int(self.sam.image_encoder.img_size)
        self.batch_size = batch_size or (8 if self.device.startswith("cuda") else 1)

    def grid_shape(self, image_shape) -> tuple:
        H, W = image_shape
        scale = self.size / max(H, W)
        return max(1, round(H * scale / 16)), max(1, round(W * scale / 16))

    def preprocess(self, slices: np.ndarray) -> torch.Tensor:
        t = torch.as_tensor(np.asarray(slices, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        h, w = self.grid_shape(t.shape[1:])
        t = F.interpolate(t[:, None], size=(16 * h, 16 * w), mode="bilinear", align_corners=False, antialias=True)
        rgb = t.expand(-1, 3, -1, -1) * 255.0
        mean = self.sam.pixel_mean.cpu().view(1, 3, 1, 1)
        std = self.sam.pixel_std.cpu().view(1, 3, 1, 1)
        x = (rgb - mean) / std
        return F.pad(x, (0, self.size - 16 * w, 0, self.size - 16 * h))

    def extract(self, slices: np.ndarray, pixel_spacing=(1.0, 1.0)) -> torch.Tensor:
        slices = np.asarray(slices, dtype=np.float32)
        if slices.ndim == 2:
            slices = slices[None]
        h, w = self.grid_shape(slices.shape[1:])
        x = self.preprocess(slices)
        out = []
        with torch.inference_mode(), model_forward(), models.autocast(self.device, self.precision):
            for start in range(0, len(x), self.batch_size):
                f = self.sam.image_encoder(x[start:start + self.batch_size].to(self.device))[:, :, :h, :w]
                if self.log_bin_levels:
                    f = log_bin(f, self.log_bin_levels)
                out.append(f.float().cpu())
        return torch.cat(out)

    def settings(self) -> dict:
        s = {"backend": self.name, "model": self.model_type, "weights": self.weights,
             "log_bin_levels": self.log_bin_levels}
        if self.overrides:
            s["overrides"] = self.overrides
        return s
