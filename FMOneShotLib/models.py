"""Where foundation models are built and their weights loaded: one place for timm ViTs and SAM.

``weights`` is one of
  * ``"pretrained"`` (the default): the registry's checkpoint from the cache, verified (weights.py); a missing
    file raises one clear message saying which file, where to get it and where to put it;
  * a path to a checkpoint file (a mirror's copy, a fine-tuned model), loaded safely;
  * ``"random"``: the real architecture randomly initialised, for tests and benchmarks only. It must be asked
    for by name; nothing falls back to it.
``overrides`` shrink an architecture (depth, width) for the tests; they need ``weights="random"``.
Built models are kept per process, so a backend and a segmenter that use the same SAM share it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from . import weights as W
from .errors import FMOneShotError

_MODELS: dict = {}
SAM_TYPES = ("vit_b", "vit_l", "vit_h")


def resolve_device(device: str = "auto") -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise FMOneShotError(f"The device {device!r} was asked for, but PyTorch sees no CUDA GPU.",
                             "use --device cpu, or install a CUDA build of PyTorch on a machine with a GPU.")
    if device != "cpu" and not device.startswith("cuda"):
        raise FMOneShotError(f"Unknown device {device!r}.", "use cpu, cuda, cuda:N or auto.")
    return device


# CPU flags (Linux /proc/cpuinfo names) of bfloat16 matrix multiplication in hardware, which oneDNN uses under
# PyTorch's bf16 autocast: Intel AMX tiles, and AVX-512 BF16 dot products (AMD Zen 4 and later, Intel Cooper
# Lake, Sapphire Rapids). Measured on the 2-core AMD EPYC (AVX-512 BF16, no AMX), docs/results.md "bf16 on a
# CPU without AMX": d2s14, SAM 2 Hiera-T and SAM ViT-B forwards take 1.5-1.9x less CPU time in bf16 than in
# fp32, features agreeing (cosine similarity >= 0.9999 per cell, the same correspondences).
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


CPUINFO = "/proc/cpuinfo"


def _cpu_flags() -> set:
    """The CPU's feature flags (the first ``flags`` line of :data:`CPUINFO`); empty where there is none
    (not Linux)."""
    try:
        with open(CPUINFO) as f:
            text = f.read(200_000)
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def _cpu_has_bf16_matmul() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (:data:`BF16_CPU_FLAGS`)."""
    return bool(_cpu_flags() & set(BF16_CPU_FLAGS))


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA and on CPUs that multiply bf16 in hardware (AMX or AVX-512 BF16:
    :data:`BF16_CPU_FLAGS`), else fp32. Raises FMOneShotError for anything but auto, bf16, fp32."""
    if precision not in ("auto", "bf16", "fp32"):
        raise FMOneShotError(f"Unknown precision {precision!r}.", "use auto, bf16 or fp32.")
    if precision == "auto":
        return "bf16" if device.startswith("cuda") or _cpu_has_bf16_matmul() else "fp32"
    return precision


def autocast(device: str, precision: str):
    """The context a forward pass runs in: bf16 autocast, or nothing for fp32."""
    import torch

    if precision == "bf16":
        return torch.autocast(device_type="cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_weights(weights, overrides, what):
    if overrides and weights != "random":
        raise FMOneShotError(f"Architecture overrides {sorted(overrides)} for {what} need weights='random'.",
                             "drop the overrides to load pretrained weights.")
    if weights not in ("pretrained", "random") and not Path(str(weights)).is_file():
        raise FMOneShotError(f"The weights {weights!r} for {what} are neither 'pretrained', 'random' nor a file.",
                             "give 'pretrained' (the verified cache), 'random' (tests only) or a checkpoint path.")


def _state(weights, entry_name):
    """The state dict for ``weights`` ('pretrained' or a file), verified where the registry knows the file."""
    entry = W.checkpoint(entry_name)
    if weights == "pretrained":
        state = W.load_state_dict(W.verify(entry_name))
    else:
        path = Path(weights)
        if path.name == entry.file:  # the official file under its own name: check it
            W.check_published(entry, path, str(path), "it was not loaded", f"download it again from {entry.url}.")
        state = W.load_state_dict(path)
    # the classifier head of a timm checkpoint (CLIP's projection) is not part of the feature extractor
    return {k: v for k, v in state.items() if not W.is_classifier(entry, k)}


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Random initialisation that is the same in every run, without touching the caller's random state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _load(model, state, what):
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FMOneShotError(f"The checkpoint does not fit {what}: {str(exc).splitlines()[0][:200]}",
                             "give the checkpoint of this model (fmoneshot weights list).") from None


def timm_vit(entry_name: str, weights: str = "pretrained", overrides: dict | None = None):
    """The timm ViT of a registry entry (d1s8 ... clip), in eval mode on the CPU, dynamic image size.

    The model is built with the head of its published checkpoint (CLIP's 512-d projection ``head.weight`` /
    ``head.bias``; none for DINO), so that the checkpoint loads strictly, key for key; a checkpoint saved
    without the head (a fine-tuned backbone) loads into the headless model. The head is then removed: the
    backends use patch tokens only.
    """
    overrides = dict(overrides or {})
    _check_weights(weights, overrides, entry_name)
    key = ("timm", entry_name, str(weights), tuple(sorted(overrides.items())))
    if key not in _MODELS:
        import timm

        entry = W.checkpoint(entry_name)
        with _seeded():
            model = timm.create_model(entry.timm_name, pretrained=False, dynamic_img_size=True, **overrides)
        if weights != "random":
            state = _state(weights, entry_name)
            if not any(k.startswith("head.") for k in state):
                model.reset_classifier(0)
            _load(model, state, entry.description)
        model.reset_classifier(0)
        _MODELS[key] = model.eval()
    return _MODELS[key]


def sam(model_type: str = "vit_b", weights: str = "pretrained", overrides: dict | None = None):
    """segment-anything's Sam (image encoder, prompt encoder, mask decoder), eval mode, on the CPU.

    ``overrides`` (random weights only): ``embed_dim``, ``depth``, ``num_heads``, ``global_attn_indexes``.
    """
    if model_type not in SAM_TYPES:
        raise FMOneShotError(f"Unknown SAM model {model_type!r}.", f"choose one of: {', '.join(SAM_TYPES)}.")
    overrides = dict(overrides or {})
    entry_name = f"sam_{model_type}"
    _check_weights(weights, overrides, entry_name)
    key = ("sam", model_type, str(weights), tuple((k, tuple(v) if isinstance(v, list) else v)
                                                  for k, v in sorted(overrides.items())))
    if key not in _MODELS:
        from segment_anything.build_sam import _build_sam, sam_model_registry

        with _seeded():
            if overrides:
                model = _build_sam(encoder_embed_dim=overrides["embed_dim"], encoder_depth=overrides["depth"],
                                   encoder_num_heads=overrides["num_heads"],
                                   encoder_global_attn_indexes=list(overrides["global_attn_indexes"]), checkpoint=None)
            else:
                # checkpoint=None: segment-anything's own loader uses torch.load without weights_only.
                model = sam_model_registry[model_type](checkpoint=None)
        if weights != "random":
            _load(model, _state(weights, entry_name), W.checkpoint(entry_name).description)
        _MODELS[key] = model.eval()
    return _MODELS[key]


# SAM 2 model -> its configuration in the sam2 package (the 2024-07-28 checkpoints of WEIGHTS.md; the
# package's own table is sam2.build_sam.HF_MODEL_ID_TO_FILENAMES).
SAM2_CONFIGS = {"tiny": "configs/sam2/sam2_hiera_t.yaml", "small": "configs/sam2/sam2_hiera_s.yaml",
                "base_plus": "configs/sam2/sam2_hiera_b+.yaml", "large": "configs/sam2/sam2_hiera_l.yaml"}
SAM2_TYPES = tuple(SAM2_CONFIGS)


def require_sam2():
    """Import the ``sam2`` package, or say how to install it (``requirements.pip_command("sam2")``: the
    ``fmoneshot[sam2]`` extra, built against the PyTorch installed)."""
    from .requirements import pip_command

    try:
        import sam2  # noqa: F401  (initialises its hydra configuration)
    except ImportError:
        raise FMOneShotError("SAM 2 needs the 'sam2' package, which is not installed.",
                             f"{pip_command('sam2')} (Python >= 3.10; docs/models.md), or choose --segmenter sam."
                             ) from None


def _hydra_value(value) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_hydra_value(v) for v in value) + "]"
    return str(value).lower() if isinstance(value, bool) else str(value)


def sam2(model_type: str = "tiny", weights: str = "pretrained", overrides: dict | None = None, video: bool = False):
    """SAM 2 (Ravi et al. 2024, the ``sam2`` package) in eval mode on the CPU: the image model
    (``SAM2Base``, for ``SAM2ImagePredictor``) or, with ``video=True``, the ``SAM2VideoPredictor``, built as
    ``sam2.build_sam.build_sam2`` / ``build_sam2_video_predictor`` build them (their post-processing settings
    included) and loaded here, strictly and safely. Both read the same checkpoint; with random weights both
    get the same initial tensors.

    ``overrides`` (random weights only): configuration keys under ``model`` and their values, e.g.
    ``{"image_encoder.trunk.stages": [1, 1, 1, 1]}`` (hydra ``++model.KEY=VALUE`` overrides).
    """
    if model_type not in SAM2_CONFIGS:
        raise FMOneShotError(f"Unknown SAM 2 model {model_type!r}.", f"choose one of: {', '.join(SAM2_TYPES)}.")
    overrides = dict(overrides or {})
    entry_name = f"sam2_{model_type}"
    _check_weights(weights, overrides, entry_name)
    key = ("sam2", model_type, str(weights), bool(video),
           tuple((k, _hydra_value(v)) for k, v in sorted(overrides.items())))
    if key not in _MODELS:
        require_sam2()
        from sam2.build_sam import build_sam2, build_sam2_video_predictor

        build = build_sam2_video_predictor if video else build_sam2
        extra = [f"++model.{k}={_hydra_value(v)}" for k, v in sorted(overrides.items())]
        with _seeded():
            # ckpt_path=None: the package's loader would read the file unverified; it is loaded below.
            model = build(SAM2_CONFIGS[model_type], ckpt_path=None, device="cpu", hydra_overrides_extra=extra)
        if weights != "random":
            _load(model, _state(weights, entry_name), W.checkpoint(entry_name).description)
        _MODELS[key] = model.eval()
    return _MODELS[key]


# Stable Diffusion 2.1's architecture (diffusers' UNet2DConditionModel and AutoencoderKL, transformers'
# CLIPTextModel: OpenCLIP ViT-H/14's text tower without its last layer), for weights="random".
SD21_UNET = dict(sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20),
                 cross_attention_dim=1024, use_linear_projection=True, upcast_attention=True,
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                 up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
SD21_VAE = dict(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=768,
                block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4)
SD21_TEXT = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                 num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", projection_dim=512)
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def _sd_folder(weights):
    """The diffusers-format folder of Stable Diffusion 2.1 for ``weights`` ('pretrained': CACHE/sd)."""
    folder = W.cache_dir() / "sd" if weights == "pretrained" else Path(str(weights))
    how = (f"its weights are under the {W.SD_LICENCE} licence: read and accept it on the model's page, download "
           f"{W.SD_DESCRIPTION} in the diffusers format (folders {', '.join(SD_PARTS)}) and put that folder "
           f"at {W.cache_dir() / 'sd'}, or give it with --weights FOLDER.")
    if not folder.is_dir():
        raise FMOneShotError(f"{W.SD_DESCRIPTION} is not at {folder}.", how)
    missing = [part for part in SD_PARTS if not (folder / part).is_dir()]
    if missing:
        raise FMOneShotError(f"{folder} is not a diffusers-format {W.SD_DESCRIPTION}: it lacks {', '.join(missing)}.",
                             how)
    return folder


def stable_diffusion(weights: str = "pretrained", overrides: dict | None = None) -> dict:
    """Stable Diffusion 2.1's parts for DIFT features, eval mode, on the CPU: a dict of ``unet``
    (UNet2DConditionModel), ``vae`` (AutoencoderKL), ``text_encoder`` (CLIPTextModel), ``tokenizer``
    (CLIPTokenizer, or None for random weights: the empty prompt is then BOS, EOS, padding), ``scheduler``
    (DDPMScheduler: the noise schedule).

    ``weights``: 'pretrained' (the diffusers-format folder at CACHE/sd), a folder, or 'random' (SD 2.1's
    architecture randomly initialised). Folders are read with safetensors only. ``overrides`` (random weights
    only) replace parts of the configs: ``{"unet": {...}, "vae": {...}, "text_encoder": {...}}`` (tests).
    Needs the ``sd`` extra (``pip install fmoneshot[sd]``: diffusers, transformers).
    """
    overrides = {k: dict(v) for k, v in (overrides or {}).items()}
    if overrides and weights != "random":
        raise FMOneShotError(f"Architecture overrides {sorted(overrides)} for sd need weights='random'.",
                             "drop the overrides to load the pretrained weights.")
    unknown = set(overrides) - {"unet", "vae", "text_encoder"}
    if unknown:
        raise FMOneShotError(f"Unknown sd overrides {sorted(unknown)}.", "override unet, vae or text_encoder.")
    folder = None if weights == "random" else _sd_folder(weights)
    key = ("sd", str(folder or weights), repr(sorted((k, sorted(v.items())) for k, v in overrides.items())))
    if key in _MODELS:
        return _MODELS[key]
    try:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer
    except ImportError:
        raise FMOneShotError("The sd backend needs diffusers and transformers, which are not installed.",
                             "pip install 'fmoneshot[sd]' (or: pip install diffusers transformers).") from None
    if folder is None:
        with _seeded():
            parts = {"unet": UNet2DConditionModel(**{**SD21_UNET, **overrides.get("unet", {})}),
                     "vae": AutoencoderKL(**{**SD21_VAE, **overrides.get("vae", {})}),
                     "text_encoder": CLIPTextModel(CLIPTextConfig(**{**SD21_TEXT,
                                                                     **overrides.get("text_encoder", {})})),
                     "tokenizer": None,
                     "scheduler": DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear")}
    else:
        try:
            parts = {"unet": UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True),
                     "vae": AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True),
                     "text_encoder": CLIPTextModel.from_pretrained(folder, subfolder="text_encoder",
                                                                   use_safetensors=True),
                     "tokenizer": CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
                     "scheduler": DDPMScheduler.from_pretrained(folder, subfolder="scheduler")}
        except (OSError, ValueError, RuntimeError) as exc:
            raise FMOneShotError(f"Cannot load {W.SD_DESCRIPTION} from {folder}: {str(exc).splitlines()[0][:200]}",
                                 "give the diffusers-format folder with .safetensors weights (fmoneshot never "
                                 "loads pickled .bin files).") from None
    for name in ("unet", "vae", "text_encoder"):
        parts[name].eval().requires_grad_(False)
    _MODELS[key] = parts
    return parts
