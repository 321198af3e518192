"""Pretrained checkpoints: the registry, the cache folder, verified download and offline import, safe loading.

Facts (URLs, published sha256, licences) come from the project's WEIGHTS.md and nowhere else; no digest is
invented. An entry with a published digest is *verified*: a file that does not match it is refused and
deleted. An entry without one (timm's files on the Hugging Face hub) is *pinned on first use*: the digest of
the first complete download or import is written beside the file and every later use is checked against it.

The cache folder is ``$FMONESHOT_CACHE`` when set (the Slicer module sets it to the folder chosen in its panel), else
``$XDG_CACHE_HOME/fmoneshot`` or ``~/.cache/fmoneshot``. Each checkpoint lives at ``CACHE/NAME/FILE``.
Files are only ever loaded with safetensors or ``torch.load(..., weights_only=True)``, never plain pickle.
A file without a published digest is pinned only after it was checked against its architecture (every
tensor, every shape: :func:`check_architecture`), so a truncated or wrong file never becomes the pinned one;
a cached file that fails its checks is reported with the commands that replace it, and an import replaces a
broken cached file without ``--force``.
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
SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/{}"  # SAM 2's 2024-07-28 release
APACHE, DINOV3, MIT = "Apache-2.0", "DINOv3 License (Meta's terms, accepted on the model page)", "MIT"


@dataclass(frozen=True)
class Checkpoint:
    """One downloadable checkpoint."""

    name: str  # the registry key: a backend name, sam_vit_b / _l / _h or sam2_tiny / _small / _base_plus / _large
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


def _sam(name, file, sha256, description, url=SAM_URL):
    return Checkpoint(name, file, url.format(file), APACHE, sha256=sha256, description=description)


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
    _sam("sam2_tiny", "sam2_hiera_tiny.pt", "65b50056e05bcb13694174f51bb6da89c894b57b75ccdf0ba6352c597c5d1125",
         "SAM 2 Hiera-T", SAM2_URL),
    _sam("sam2_small", "sam2_hiera_small.pt", "95949964d4e548409021d47b22712d5f1abf2564cc0c3c765ba599a24ac7dce3",
         "SAM 2 Hiera-S", SAM2_URL),
    _sam("sam2_base_plus", "sam2_hiera_base_plus.pt",
         "d0bb7f236400a49669ffdd1be617959a8b1d1065081789d7bbff88eded3a8071", "SAM 2 Hiera-B+", SAM2_URL),
    _sam("sam2_large", "sam2_hiera_large.pt", "7442e4e9b732a508f80e141e7c2913437a3610ee0c77381a66658c3a445df87b",
         "SAM 2 Hiera-L", SAM2_URL),
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
        _pin_path(path).write_text(f"{digest}  {entry.file}\n", encoding="utf-8")
    st = path.stat()
    _VERIFIED[(str(path), st.st_size, st.st_mtime_ns)] = digest


def expected_digest(entry: Checkpoint, path: Path) -> str | None:
    """The published digest, else the one pinned beside the file at its first download or import."""
    if entry.sha256:
        return entry.sha256
    pin = _pin_path(path)
    return pin.read_text(encoding="utf-8").split()[0] if pin.exists() else None


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
            f"{expected[:12]}...); it was not loaded.", how_to_replace(entry, folder))
    # a file without a published digest is checked against its architecture before it is pinned (a file
    # put there by hand), and again each time (one pinned by an older FMOneShot that did not check)
    check_architecture(entry, path, f"The cached checkpoint {path}", "it was not loaded",
                       how_to_replace(entry, folder))
    _accept(entry, path, digest)  # a file put there by hand without a pin is pinned now, as an import would
    return path


def how_to_replace(entry: Checkpoint, folder=None) -> str:
    """The commands that replace a broken cached checkpoint (import replaces a broken one without --force)."""
    return (f"replace it: run 'fmoneshot weights import FILE --name {entry.name}' with a good copy of "
            f"{entry.url}, or delete {local_path(entry, folder).parent} and run 'fmoneshot weights download "
            f"{entry.name}'.")


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
    is deleted and refused. A download that fails keeps a partial file only where it holds bytes to resume
    from, and leaves no folder it created empty.
    """
    entry = checkpoint(name)
    if entry.opt_in and not accept_licence:
        raise FMOneShotError(f"{entry.description} is under the {entry.licence}, which must be accepted first.",
                             "read the licence on the model page and pass --accept-licence (accept_licence=True).")
    path = local_path(entry, folder)
    if path.is_file():
        return verify(entry, folder)
    new_folders = [d for d in (path.parent, *path.parent.parents) if not d.exists()]  # deepest first
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
            kept = _after_failure(part, new_folders)
            raise FMOneShotError(f"The server refused {url}: HTTP {exc.code} {exc.reason}. {kept}",
                                 f"try again later, or {how_to_get(entry, folder)}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        kept = _after_failure(part, new_folders)
        raise FMOneShotError(f"Cannot download {url}: {reason}. {kept}",
                             f"check the connection and run the download again"
                             f"{' (it resumes)' if part.exists() else ''}, or {how_to_get(entry, folder)}") from None
    try:
        digest = check_published(entry, part, f"The downloaded {url}", "it was deleted and not loaded",
                                 f"download again; if it keeps failing, {how_to_get(entry, folder)}")
        check_architecture(entry, part, f"The downloaded {url}", "it was deleted and not pinned",
                           f"download again from the registry's URL; if it keeps failing, {how_to_get(entry, folder)}")
    except FMOneShotError:
        part.unlink()
        _after_failure(part, new_folders)
        raise
    os.replace(part, path)
    _accept(entry, path, digest)
    return path


def _after_failure(part: Path, new_folders: list) -> str:
    """After a failed download: an empty partial file and the empty folders the download created are removed.
    Returns the sentence that says what was kept."""
    if part.exists() and part.stat().st_size == 0:
        part.unlink()
    for folder in new_folders:  # deepest first; a folder with anything in it stays
        try:
            folder.rmdir()
        except OSError:
            break
    if part.exists():
        return f"The partial file {part} ({part.stat().st_size} bytes) is kept."
    return "Nothing was written."


def import_file(source, name, folder=None, force: bool = False) -> Path:
    """Copy a checkpoint downloaded elsewhere into the cache after checking it (the offline route)."""
    entry = checkpoint(name)
    source = Path(source)
    if not source.is_file():
        raise FMOneShotError(f"{source} is not a file.", f"give the path of the downloaded {entry.file}.")
    fix = f"download it again from {entry.url}: the file is damaged, truncated or another one."
    digest = check_published(entry, source, str(source), "nothing was imported", fix)
    check_architecture(entry, source, str(source), "nothing was imported", fix)
    path = local_path(entry, folder)
    if path.exists() and not force:
        if sha256_of(path) == digest:
            _accept(entry, path, digest)
            return path
        try:
            verify(entry, folder)
        except FMOneShotError:
            pass  # the cached file is broken: the good one replaces it, nothing of value is lost
        else:
            raise FMOneShotError(f"{path} already exists, works and differs from {source}; nothing was imported.",
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
    for key in ("state_dict", "model"):  # segment-anything's files hold the tensors; SAM 2's hold {"model": ...}
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict):
        raise FMOneShotError(f"{path} holds no tensors by name.", "give a checkpoint file (state dict).")
    return state


def tensor_shapes(path) -> dict:
    """{tensor name: shape} of a checkpoint file: from the header alone for .safetensors (which also refuses
    a truncated file), else by loading it safely (:func:`load_state_dict`). Raises FMOneShotError for a
    damaged file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except (SafetensorError, OSError) as exc:
            raise FMOneShotError(f"Cannot read the checkpoint {path}: {str(exc)[:200]}.",
                                 "it is damaged, truncated or not a checkpoint.") from None
    return {k: tuple(v.shape) for k, v in load_state_dict(path).items() if hasattr(v, "shape")}


def is_classifier(entry: Checkpoint, name: str) -> bool:
    """Whether tensor ``name`` belongs to the classifier head of the entry's timm model (its pretrained
    config's ``classifier``, e.g. CLIP's 512-d projection ``head``), which the feature extractor, built
    without a head, neither needs nor loads."""
    if not entry.timm_name:
        return False
    import timm

    cfg = timm.models.get_pretrained_cfg(entry.timm_name)
    heads = (cfg.classifier if cfg is not None and cfg.classifier else None) or "head"
    heads = heads if isinstance(heads, (list, tuple)) else [heads]
    return any(name == h or name.startswith(h + ".") for h in heads)


def architecture_shapes(entry: Checkpoint) -> dict:
    """{tensor name: shape} the entry's timm architecture loads (as ``models.timm_vit`` builds it: dynamic
    image size, no classifier head), built on PyTorch's meta device, so no memory is spent on weights."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(entry.timm_name, pretrained=False, dynamic_img_size=True, num_classes=0)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_architecture(entry: Checkpoint, path, what: str, consequence: str, fix: str) -> None:
    """For an entry without a published digest (timm's files), check before its digest is pinned that the
    file loads and holds every tensor of the architecture with the right shape and nothing else (what the
    strict load in ``models`` needs). Entries with a published digest are checked by it instead.
    Raises FMOneShotError: ``what`` names the file, ``consequence`` what happened to it, ``fix`` the remedy."""
    if entry.sha256 or not entry.timm_name:
        return
    try:
        found = tensor_shapes(path)
    except FMOneShotError as exc:
        raise FMOneShotError(f"{what} is not a checkpoint of {entry.description}: {exc.problem} {consequence}.",
                             fix) from None
    expected = architecture_shapes(entry)
    missing = [k for k in expected if k not in found]
    extra = [k for k in found if k not in expected and not is_classifier(entry, k)]
    wrong = [f"{k} {list(found[k])} (expected {list(expected[k])})" for k in expected
             if k in found and found[k] != expected[k]]
    if missing or extra or wrong:
        parts = ([f"{len(missing)} tensors missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})"]
                 if missing else []) + ([f"{len(extra)} unknown ({', '.join(extra[:3])})"] if extra else []) + \
                ([f"wrong shapes: {', '.join(wrong[:3])}"] if wrong else [])
        raise FMOneShotError(f"{what} does not fit {entry.description} ({entry.timm_name}): {'; '.join(parts)}; "
                             f"{consequence}.", fix)


#: The foundation-model backends built with timm: every registry entry that names a timm model.
TIMM_BACKENDS = tuple(c.name for c in REGISTRY.values() if c.timm_name)
#: Every feature backend's name, known without importing PyTorch (the command line's choices);
#: ``features`` registers exactly these (a test holds it).
BACKENDS = ("offline", *TIMM_BACKENDS, "sam", "sd")

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
