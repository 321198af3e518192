"""Pretrained checkpoints: the registry, the cache folder, verified download and offline import, safe loading.

Facts (URLs, published sha256, licences) come from the project's WEIGHTS.md and nowhere else; no digest is
invented. An entry with a published digest is *verified*: a file that does not match it is refused and
deleted. An entry without one (timm's files on the Hugging Face hub) is *pinned on first use*: the digest of
the first complete download or import is written beside the file and every later use is checked against it.

The cache folder is ``$FMONESHOT_CACHE`` when set (the Slicer module sets it to Slicer's cache), else
``$XDG_CACHE_HOME/fmoneshot`` or ``~/.cache/fmoneshot``. Each checkpoint lives at ``CACHE/NAME/FILE``.
Files are only ever loaded with safetensors or ``torch.load(..., weights_only=True)``, never plain pickle.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import FMOneShotError

CACHE_ENV = "FMONESHOT_CACHE"
HF = "https://huggingface.co/timm/{}/resolve/main/model.safetensors"
SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/{}"
APACHE, DINOV3, MIT = "Apache-2.0", "DINOv3 License (Meta's terms, accepted on the model page)", "MIT"


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable checkpoint."""

    name: str  # the registry key (the backend's name, or sam_vit_b / sam_vit_l / sam_vit_h)
    file: str  # file name in the cache
    url: str
    licence: str
    sha256: str | None = None  # published digest; None: pinned on first use
    size: int | None = None  # bytes, where published
    timm_name: str | None = None  # the timm model it initialises
    opt_in: bool = False  # the licence must be accepted explicitly before a download (DINOv3)
    description: str = ""

    @property
    def verified(self) -> bool:
        return self.sha256 is not None


def _timm(name, timm_name, licence=APACHE, opt_in=False, description="", hub_name=None):
    """A timm checkpoint on the Hugging Face hub; ``hub_name`` where timm reads another model's file."""
    return Checkpoint(name, "model.safetensors", HF.format(hub_name or timm_name), licence, timm_name=timm_name,
                      opt_in=opt_in, description=description)


def _sam(name, file, sha256, description):
    return Checkpoint(name, file, SAM_URL.format(file), APACHE, sha256=sha256, description=description)


REGISTRY: dict[str, Checkpoint] = {c.name: c for c in [
    _timm("d1s8", "vit_small_patch8_224.dino", description="DINO ViT-S/8"),
    _timm("d1s16", "vit_small_patch16_224.dino", description="DINO ViT-S/16"),
    _timm("d1b8", "vit_base_patch8_224.dino", description="DINO ViT-B/8"),
    _timm("d1b16", "vit_base_patch16_224.dino", description="DINO ViT-B/16"),
    _timm("d2s14", "vit_small_patch14_dinov2.lvd142m", description="DINOv2 ViT-S/14"),
    _timm("d2b14", "vit_base_patch14_dinov2.lvd142m", description="DINOv2 ViT-B/14"),
    _timm("d2l14", "vit_large_patch14_dinov2.lvd142m", description="DINOv2 ViT-L/14"),
    _timm("d2g14", "vit_giant_patch14_dinov2.lvd142m", description="DINOv2 ViT-g/14"),
    _timm("d3s16", "vit_small_patch16_dinov3.lvd1689m", DINOV3, True, "DINOv3 ViT-S/16"),
    _timm("d3b16", "vit_base_patch16_dinov3.lvd1689m", DINOV3, True, "DINOv3 ViT-B/16"),
    # OpenAI CLIP was trained with QuickGELU: timm's quickgelu variant reads the same published file.
    _timm("clip", "vit_base_patch16_clip_quickgelu_224.openai", MIT, description="OpenAI CLIP ViT-B/16",
          hub_name="vit_base_patch16_clip_224.openai"),
    _sam("sam_vit_b", "sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
         "Segment Anything ViT-B"),
    _sam("sam_vit_l", "sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
         "Segment Anything ViT-L"),
    _sam("sam_vit_h", "sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
         "Segment Anything ViT-H"),
]}


# Stable Diffusion 2.1 (the `sd` backend): WEIGHTS.md states its licence only, no repository, file or digest,
# so it has no download entry; the user brings its diffusers-format folder (models.stable_diffusion).
SD_LICENCE = "CreativeML Open RAIL++-M"
SD_DESCRIPTION = "Stable Diffusion 2.1"


def checkpoint(name) -> Checkpoint:
    """The registry entry called ``name`` (a Checkpoint passes through: the tests use their own)."""
    if isinstance(name, Checkpoint):
        return name
    if name not in REGISTRY:
        raise FMOneShotError(f"No checkpoint is called {name!r}.",
                             f"choose one of: {', '.join(REGISTRY)} (fmoneshot weights list).")
    return REGISTRY[name]


def cache_dir() -> Path:
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "fmoneshot"


def local_path(entry: Checkpoint, folder=None) -> Path:
    return Path(folder or cache_dir()) / entry.name / entry.file


def _pin_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def sha256_of(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_published(entry: Checkpoint, path, what: str, consequence: str, fix: str) -> str:
    """The file's sha256, after checking it against the entry's published digest where there is one."""
    digest = sha256_of(path)
    if entry.sha256 and digest != entry.sha256:
        raise FMOneShotError(f"{what} is not {entry.file} as published (sha256 {digest[:12]}..., expected "
                             f"{entry.sha256[:12]}...); {consequence}.", fix)
    return digest


def _accept(entry: Checkpoint, path: Path, digest: str) -> None:
    """A checked file now in the cache: pin its digest where none is published, and remember it as verified."""
    if not entry.sha256 and expected_digest(entry, path) != digest:  # a read-only cache stays unwritten
        _pin_path(path).write_text(f"{digest}  {entry.file}\n")
    st = path.stat()
    _VERIFIED[(str(path), st.st_size, st.st_mtime_ns)] = digest


def expected_digest(entry: Checkpoint, path: Path) -> str | None:
    """The published digest, else the one pinned beside the file at its first download or import."""
    if entry.sha256:
        return entry.sha256
    pin = _pin_path(path)
    return pin.read_text().split()[0] if pin.exists() else None


def is_present(name, folder=None) -> bool:
    """Whether the checkpoint's file is in the cache (not yet verified)."""
    return local_path(checkpoint(name), folder).is_file()


def how_to_get(entry: Checkpoint, folder=None) -> str:
    return (f"run 'fmoneshot weights download {entry.name}' (needs internet), or download {entry.url} on another "
            f"machine and run 'fmoneshot weights import FILE --name {entry.name}', which puts it at "
            f"{local_path(entry, folder)}.")


_VERIFIED: dict = {}  # (path, size, mtime) -> digest, so a file is hashed once per process


def verify(name, folder=None) -> Path:
    """The checkpoint's cached file after checking its sha256; a missing or damaged file raises."""
    entry = checkpoint(name)
    path = local_path(entry, folder)
    if not path.is_file():
        raise FMOneShotError(f"The checkpoint {entry.file} ({entry.description}) is not in the cache {path.parent}.",
                             how_to_get(entry, folder))
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key in _VERIFIED:
        return path
    expected = expected_digest(entry, path)
    digest = sha256_of(path)
    if expected is not None and digest != expected:
        raise FMOneShotError(
            f"The checkpoint {path} is damaged or not the published file (sha256 {digest[:12]}..., expected "
            f"{expected[:12]}...); it was not loaded.", f"delete it and {how_to_get(entry, folder)}")
    _accept(entry, path, digest)  # a file put there by hand without a pin is pinned now, as an import would
    return path


def _console_progress(entry: Checkpoint):
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, desc=entry.file, file=sys.stderr,
               disable=None)

    def update(done, total):
        bar.total = total or None
        bar.n = done
        bar.refresh()
        if total and done >= total:
            bar.close()

    return update


def download(name, folder=None, url: str | None = None, progress: Callable | bool = True, timeout: float = 30.0,
             accept_licence: bool = False, chunk: int = 1 << 20) -> Path:
    """Download a checkpoint into the cache once, resuming a partial download, and verify it.

    ``progress``: True for a console bar, a callable ``progress(done_bytes, total_bytes)`` (the Slicer dialog),
    or False. ``url`` replaces the registry's (a mirror). A file whose sha256 does not match the published one
    is deleted and refused.
    """
    entry = checkpoint(name)
    if entry.opt_in and not accept_licence:
        raise FMOneShotError(f"{entry.description} is under the {entry.licence}, which must be accepted first.",
                             "read the licence on the model page and pass --accept-licence (accept_licence=True).")
    path = local_path(entry, folder)
    if path.is_file():
        return verify(entry, folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    url = url or entry.url
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"User-Agent": "fmoneshot"})
    if have:
        request.add_header("Range", f"bytes={have}-")
    report = _console_progress(entry) if progress is True else (progress or None)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status = getattr(response, "status", 200)
            length = response.headers.get("Content-Length")
            if have and status != 206:  # the server ignored the range: start again
                have = 0
            total = (int(length) + have) if length is not None else entry.size
            with open(part, "ab" if have else "wb") as out:
                done = have
                if report:
                    report(done, total)
                while block := response.read(chunk):
                    out.write(block)
                    done += len(block)
                    if report:
                        report(done, total)
            if total is not None and done < total:
                raise FMOneShotError(f"The download of {entry.file} stopped at {done} of {total} bytes.",
                                     "run the same download again: it resumes where it stopped.")
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and have:  # the partial file is already complete
            pass
        else:
            raise FMOneShotError(f"The server refused {url}: HTTP {exc.code} {exc.reason}.",
                                 f"try again later, or {how_to_get(entry, folder)}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise FMOneShotError(f"Cannot download {url}: {reason}. The partial file {part} is kept.",
                             f"check the connection and run the download again (it resumes), or "
                             f"{how_to_get(entry, folder)}") from None
    try:
        digest = check_published(entry, part, f"The downloaded {url}", "it was deleted and not loaded",
                                 f"download again; if it keeps failing, {how_to_get(entry, folder)}")
    except FMOneShotError:
        part.unlink()
        raise
    os.replace(part, path)
    _accept(entry, path, digest)
    return path


def import_file(source, name, folder=None, force: bool = False) -> Path:
    """Copy a checkpoint downloaded elsewhere into the cache after checking it (the offline route)."""
    entry = checkpoint(name)
    source = Path(source)
    if not source.is_file():
        raise FMOneShotError(f"{source} is not a file.", f"give the path of the downloaded {entry.file}.")
    digest = check_published(entry, source, str(source), "nothing was imported",
                             f"download it again from {entry.url}: the file is damaged, truncated or another one.")
    path = local_path(entry, folder)
    if path.exists() and not force:
        if sha256_of(path) == digest:
            return path
        raise FMOneShotError(f"{path} already exists and differs from {source}; nothing was imported.",
                             "pass --force (force=True) to replace it.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".import")
    shutil.copyfile(source, tmp)
    os.replace(tmp, path)
    _accept(entry, path, digest)
    return path


def status(folder=None) -> list[dict]:
    """One row per registry entry: whether it is present, and how its digest is checked."""
    rows = []
    for e in REGISTRY.values():
        path = local_path(e, folder)
        pinned = _pin_path(path).exists()
        rows.append({"name": e.name, "file": e.file, "description": e.description, "licence": e.licence,
                     "present": path.is_file(), "path": str(path),
                     "check": "published sha256" if e.verified else ("sha256 pinned at first use" if pinned
                                                                      else "sha256 to pin at first use"),
                     "opt_in": e.opt_in, "url": e.url})
    return rows


def load_state_dict(path) -> dict:
    """Tensors of a checkpoint file, with safetensors or ``torch.load(weights_only=True)``; never plain pickle."""
    import torch

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, damaged, or a pickle that is not plain tensors
        raise FMOneShotError(f"Cannot read the checkpoint {path}: {type(exc).__name__}: {str(exc)[:200]}.",
                             "it is damaged or not a checkpoint; delete it and download or import it again.") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise FMOneShotError(f"{path} holds no tensors by name.", "give a checkpoint file (state dict).")
    return state


# What "auto" picks: the first of these whose checkpoint is in the weights cache, else the offline backend.
# DINOv2 ViT-S/14 first: paper A's family, and 0.16-0.39 s a slice on a 2-core CPU (docs/results.md).
AUTO_ORDER = ("d2s14", "d2b14", "d2l14", "d2g14", "d1s8", "d1b8", "d1s16", "d1b16", "d3s16", "d3b16")


def resolve_backend(name: str = "auto", folder=None) -> tuple:
    """``(backend, why)``: ``auto`` -> the first backend of AUTO_ORDER with downloaded weights, else
    ``offline``; any other name -> itself. ``why`` is one sentence to show the user."""
    if name != "auto":
        return name, f"backend {name} (chosen)"
    for candidate in AUTO_ORDER:
        if is_present(candidate, folder):
            return candidate, f"backend {candidate}: its weights are downloaded"
    return "offline", ("offline backend: no foundation-model weights are downloaded "
                       "(fmoneshot weights download d2s14, or the module's Weights section)")
