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


def _cpu_has_bf16_matmul() -> bool:
    """True where the CPU multiplies bfloat16 in hardware (Intel AMX): there bf16 halves the forward time."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read(200_000)
    except OSError:
        return False


def resolve_precision(precision: str, device: str) -> str:
    """``auto`` -> bf16 on CUDA and on CPUs with AMX, else fp32."""
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
    if weights == "pretrained":
        return W.load_state_dict(W.verify(entry_name))
    path = Path(weights)
    entry = W.checkpoint(entry_name)
    if path.name == entry.file:  # the official file under its own name: check it
        W.check_published(entry, path, str(path), "it was not loaded", f"download it again from {entry.url}.")
    return W.load_state_dict(path)


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
