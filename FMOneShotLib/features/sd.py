"""Stable Diffusion 2.1 DIFT features (paper A's ``SD`` backend): Tang et al. 2023, "Emergent Correspondence
from Image Diffusion", with their defaults for SD 2.1 (timestep 261, up-block 1, 8 noise draws, 768 px).

Shapes: B slices, E noise draws, C channels of the chosen up-block, (h, w) its grid. For a batch of slices
  1. each slice is resized so that its longest side is ``input_size`` pixels, both sides a multiple of 64
     (the VAE halves three times and the UNet three more), repeated to 3 channels and scaled to [-1, 1];
  2. the VAE encodes it: a latent drawn from its posterior, times the VAE's scaling factor;
  3. for each of ``ensemble`` draws, noise is added to the latent at ``timestep`` with the model's DDPM
     schedule (``scheduler.add_noise``), and the UNet, conditioned on the empty prompt's text embedding, runs
     until up-block ``up_block`` (counted from the lowest resolution), whose output is kept: (C, h, w) at
     1/16 of the input for up-block 1 of SD 2.1;
  4. the draws are averaged. Every random draw comes from a generator seeded with ``seed``, so the features
     of a slice are the same in every run and batch.
The grid covers the image as ``features.base`` requires (cell j centred on pixel (j + 0.5) * W / w - 0.5, as
for any strided convolutional map). Everything runs under ``torch.inference_mode`` in bf16 autocast where
``precision`` resolves to bf16 (CUDA, CPUs with AMX or AVX-512 BF16).

The weights are the user's diffusers-format folder of SD 2.1 (``models.stable_diffusion``): its licence,
CreativeML Open RAIL++-M, is named in every message that tells where to get it. Needs the ``sd`` extra.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .. import models
from ..errors import FMOneShotError
from .base import FeatureExtractor, forward_in_batches, register

DEFAULT_TIMESTEP = 261
DEFAULT_UP_BLOCK = 1
DEFAULT_ENSEMBLE = 8
DEFAULT_INPUT_SIZE = 768
SIZE_MULTIPLE = 64


class _Reached(Exception):
    """Raised by the hook on the chosen up-block: the rest of the UNet is not run."""

    def __init__(self, output):
        super().__init__()
        self.output = output


@register("sd")
class StableDiffusionFeatures(FeatureExtractor):
    """DIFT features of Stable Diffusion 2.1 (see the module docstring)."""

    name = "sd"

    def __init__(self, weights: str = "pretrained", timestep: int = DEFAULT_TIMESTEP, up_block: int = DEFAULT_UP_BLOCK,
                 ensemble: int = DEFAULT_ENSEMBLE, input_size: int = DEFAULT_INPUT_SIZE, seed: int = 0,
                 log_bin_levels: int = 0, device: str = "auto", precision: str = "auto",
                 batch_size: int | None = None, overrides: dict | None = None):
        self.weights = str(weights)
        self.overrides = dict(overrides or {})
        parts = models.stable_diffusion(weights, overrides)
        self.unet, self.vae, self.scheduler = parts["unet"], parts["vae"], parts["scheduler"]
        n_steps = int(self.scheduler.config.num_train_timesteps)
        if not 0 <= int(timestep) < n_steps:
            raise FMOneShotError(f"Timestep {timestep} is outside the model's 0..{n_steps - 1}.",
                                 f"choose a timestep from 0 to {n_steps - 1} (DIFT: {DEFAULT_TIMESTEP}).")
        n_up = len(self.unet.up_blocks)
        if not 0 <= int(up_block) < n_up:
            raise FMOneShotError(f"The UNet has {n_up} up-blocks; up-block {up_block} does not exist.",
                                 f"choose an up-block from 0 to {n_up - 1} (DIFT: {DEFAULT_UP_BLOCK}).")
        if int(ensemble) < 1:
            raise FMOneShotError(f"{ensemble} noise draws cannot be averaged.", "choose at least 1 (DIFT: 8).")
        if int(input_size) < SIZE_MULTIPLE:
            raise FMOneShotError(f"Input size {input_size} is below {SIZE_MULTIPLE} pixels.",
                                 f"choose a multiple of {SIZE_MULTIPLE} (DIFT: {DEFAULT_INPUT_SIZE}).")
        self.timestep, self.up_block, self.ensemble = int(timestep), int(up_block), int(ensemble)
        self.input_size, self.seed, self.log_bin_levels = int(input_size), int(seed), int(log_bin_levels)
        self.device = models.resolve_device(device)
        self.precision = models.resolve_precision(precision, self.device)
        for part in (self.unet, self.vae, parts["text_encoder"]):
            part.to(self.device)
        self.batch_size = batch_size or (4 if self.device.startswith("cuda") else 1)  # slices (x ensemble) a forward
        self.prompt = self._empty_prompt(parts["text_encoder"], parts["tokenizer"])  # (1, 77, D)

    def _empty_prompt(self, text_encoder, tokenizer) -> torch.Tensor:
        """The text embedding of the empty prompt (DIFT's default), computed once: (1, L, D)."""
        if tokenizer is not None:
            ids = tokenizer("", padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
        else:  # random weights: start, end, then end tokens as padding
            cfg = text_encoder.config
            ids = torch.tensor([[cfg.bos_token_id] + [cfg.eos_token_id] * (cfg.max_position_embeddings - 1)])
            ids = ids.clamp(0, cfg.vocab_size - 1)
        with torch.inference_mode():
            return text_encoder(ids.to(self.device))[0].float()

    def grid_shape(self, image_shape) -> tuple:
        """The resized slice (H', W'), multiples of 64, for a slice of ``image_shape`` (H, W)."""
        H, W = image_shape
        scale = self.input_size / max(H, W)
        return (max(1, round(H * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE,
                max(1, round(W * scale / SIZE_MULTIPLE)) * SIZE_MULTIPLE)

    def preprocess(self, slices: np.ndarray) -> torch.Tensor:
        """(B, H, W) in [0, 1] -> (B, 3, H', W') in [-1, 1], resized as :meth:`grid_shape` says."""
        t = torch.as_tensor(np.asarray(slices, dtype=np.float32))
        if t.ndim == 2:
            t = t[None]
        size = self.grid_shape(t.shape[1:])
        t = F.interpolate(t[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)
        return (t.clamp(0, 1) * 2 - 1).expand(-1, 3, -1, -1)

    def _noise(self, shape) -> tuple:
        """The draws for one slice of latent ``shape`` (4, h', w'), from a generator seeded with ``seed``
        alone, so that a slice's features depend neither on its batch nor on its place in it:
        (posterior draw (4, h', w'), noise draws (E, 4, h', w'))."""
        g = torch.Generator().manual_seed(self.seed)
        return torch.randn(shape, generator=g), torch.randn((self.ensemble,) + tuple(shape), generator=g)

    def _up_block_output(self, latents: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
        """Run the UNet on (N, 4, h', w') noisy latents until the chosen up-block; its output (N, C, h, w)."""

        def hook(module, inputs, output):
            raise _Reached(output)

        handle = self.unet.up_blocks[self.up_block].register_forward_hook(hook)
        t = torch.full((len(latents),), self.timestep, dtype=torch.long, device=latents.device)
        try:
            self.unet(latents, t, encoder_hidden_states=prompt)
        except _Reached as reached:
            return reached.output
        finally:
            handle.remove()
        raise RuntimeError("The UNet did not reach the chosen up-block.")  # pragma: no cover

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H', W') preprocessed -> (B, C, h, w) DIFT features, float32. The B x E noisy latents go
        through the UNet in one batch."""
        B, E = len(x), self.ensemble
        posterior = self.vae.encode(x.to(self.device)).latent_dist
        eps, noise = self._noise(posterior.mean.shape[1:])
        latents = (posterior.mean + posterior.std * eps.to(self.device)).float() * self.vae.config.scaling_factor
        latents = latents.cpu()[:, None].expand(-1, E, -1, -1, -1).reshape(B * E, *latents.shape[1:])
        t = torch.full((B * E,), self.timestep, dtype=torch.long)
        noisy = self.scheduler.add_noise(latents, noise.repeat(B, 1, 1, 1), t)
        features = self._up_block_output(noisy.to(self.device), self.prompt.expand(B * E, -1, -1)).float()
        return features.reshape(B, E, *features.shape[1:]).mean(dim=1)

    def extract(self, slices: np.ndarray, pixel_spacing=(1.0, 1.0)) -> torch.Tensor:
        return forward_in_batches(self, slices)

    def settings(self) -> dict:
        s = {"backend": self.name, "weights": self.weights, "timestep": self.timestep, "up_block": self.up_block,
             "ensemble": self.ensemble, "input_size": self.input_size, "seed": self.seed,
             "log_bin_levels": self.log_bin_levels}
        if self.overrides:
            s["overrides"] = self.overrides
        return s
