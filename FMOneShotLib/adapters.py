"""Adapters of paper B: learned (or thresholded) similarity to the template's ROI that replaces raw similarity.

One interface for all: :meth:`Adapter.fit` on template feature grids with one mask per label, then
:meth:`Adapter.predict` gives per-cell probabilities of background and every label at the feature grid (the
chain upsamples the probabilities, never the features). Training is seeded and takes seconds on a CPU.

- ``basic``: cosine similarity of every cell with its nearest template ROI feature, thresholded (no training);
- ``classification``: a 3-layer feed-forward network, pixel feature -> background or label (cross-entropy);
- ``contrastive``: paper B's Siamese network; two branches with shared weights embed a target cell and a
  template ROI feature, a cosine with a learned temperature says whether they are the same structure; trained
  on ROI/ROI (same) and outside/ROI (other) pairs, applied against a bank of template ROI features per label.

Every adapter saves its trained state as named tensors plus a small JSON-able description
(:meth:`Adapter.state`, :func:`adapter_from_state`), stored inside the template.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from .errors import FMOneShotError

MAX_SAMPLES_PER_LABEL = 3000
BACKGROUND_RATIO = 3
# Template augmentation (``augment=True``): each template slice is also seen darker/brighter (gamma), with
# less/more contrast, and 15% / 10% smaller and larger, as the same structure appears in other subjects.
AUGMENT_GAMMAS = (0.7, 1.4)
AUGMENT_CONTRASTS = (0.8, 1.2)
AUGMENT_ZOOMS = (0.85, 0.9, 1.1, 1.15)


def mask_to_grid(mask: np.ndarray, grid_shape) -> np.ndarray:
    """A pixel mask (H, W) -> grid cells whose area is mostly inside it; a tiny mask keeps its best cell."""
    t = torch.as_tensor(np.asarray(mask, dtype=np.float32))[None, None]
    frac = F.adaptive_avg_pool2d(t, tuple(grid_shape))[0, 0].numpy()
    out = frac >= 0.5
    if not out.any() and frac.max() > 0:
        out = frac == frac.max()
    return out


def template_views(image: np.ndarray, masks: np.ndarray) -> list:
    """Augmented copies of a template slice for training: ``image`` (H, W) in [0, 1] and its ``masks``
    (L, H, W) -> [(image, masks)], intensity views first (same masks), then zooms about the centre."""
    views = [(image ** g, masks) for g in AUGMENT_GAMMAS]
    views += [(np.clip(0.5 + (image - 0.5) * c, 0.0, 1.0), masks) for c in AUGMENT_CONTRASTS]
    centre = (np.asarray(image.shape, float) - 1) / 2
    for zoom in AUGMENT_ZOOMS:
        # output pixel p shows input pixel centre + (p - centre) / zoom
        args = {"matrix": np.full(2, 1.0 / zoom), "offset": centre - centre / zoom}
        zoomed = ndi.affine_transform(image.astype(np.float32), order=1, mode="nearest", **args)
        zmasks = np.stack([ndi.affine_transform(m.astype(np.float32), order=1, **args) >= 0.5 for m in masks])
        views.append((zoomed, zmasks))
    return [(np.asarray(v, np.float32), m) for v, m in views]


class Adapter(ABC):
    """Learns, from template features and masks, the probability of each label at every feature cell.

    ``augment``: train on :func:`template_views` of every template slice as well (the chain builds them)."""

    name = ""

    def __init__(self, seed: int = 0, augment: bool = False):
        self.seed = seed
        self.augment = bool(augment)
        self.n_labels = 0

    @abstractmethod
    def fit(self, features: list, masks: list) -> "Adapter":
        """``features``: standardised (C, h, w) grids; ``masks``: matching (L, h, w) bool arrays."""

    @abstractmethod
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) standardised features -> (B, L + 1, h, w) probabilities, channel 0 = background."""

    def options(self) -> dict:
        """The constructor arguments that rebuild this adapter (saved with its tensors)."""
        return {"seed": self.seed, "augment": self.augment}

    def tensors(self) -> dict:
        """The trained state as named tensors (safetensors-compatible)."""
        return {}

    def load_tensors(self, tensors: dict, n_labels: int) -> "Adapter":
        self.n_labels = n_labels
        return self

    def state(self):
        """``(description, tensors)``: what :func:`adapter_from_state` needs to rebuild the trained adapter."""
        if not self.n_labels:
            raise RuntimeError("fit() the adapter before saving it.")
        return {"adapter": self.name, "options": self.options(), "n_labels": self.n_labels}, \
            {k: v.detach().contiguous().clone() for k, v in self.tensors().items()}

    def _roi_features(self, features: list, masks: list, limit: int) -> list:
        """Per label, up to ``limit`` ROI cell features (seeded sample), (N_l, C)."""
        rng = np.random.default_rng(self.seed)
        out = []
        for label in range(masks[0].shape[0]):
            rows = [f.reshape(f.shape[0], -1).T[np.nonzero(m[label].reshape(-1))[0]] for f, m in zip(features, masks)]
            roi = torch.cat(rows).float()
            if len(roi) == 0:
                raise FMOneShotError(f"Label #{label + 1} has no ROI on the template.",
                                     "paint its mask or place positive points inside it.")
            if len(roi) > limit:
                roi = roi[torch.as_tensor(np.sort(rng.choice(len(roi), limit, replace=False)))]
            out.append(roi)
        return out

    def _training_pixels(self, features: list, masks: list):
        """Per label up to MAX_SAMPLES_PER_LABEL ROI cells; BACKGROUND_RATIO times as many outside every ROI."""
        rng = np.random.default_rng(self.seed)
        xs, ys = [], []
        for feat, mask in zip(features, masks):
            C = feat.shape[0]
            flat = feat.reshape(C, -1).T
            m = mask.reshape(mask.shape[0], -1)
            for label in range(m.shape[0]):
                idx = np.nonzero(m[label])[0]
                if len(idx) > MAX_SAMPLES_PER_LABEL:
                    idx = rng.choice(idx, MAX_SAMPLES_PER_LABEL, replace=False)
                xs.append(flat[idx])
                ys.append(np.full(len(idx), label + 1))
        n_fg = sum(len(y) for y in ys)
        # Background: paper B draws as many as all labels together; three times as many (at least 2000)
        # measured better on the sample CT (liver Dice 0.79 -> 0.86), the background being far more varied.
        outside = [np.nonzero(~m.reshape(m.shape[0], -1).any(0))[0] for m in masks]
        total_out = sum(len(o) for o in outside)
        if n_fg == 0 or total_out == 0:
            raise FMOneShotError("The template masks are empty or cover the whole slice.",
                                 "paint each structure on the template slice, leaving background around it.")
        for feat, idx in zip(features, outside):
            k = min(len(idx), int(round(max(BACKGROUND_RATIO * n_fg, 2000) * len(idx) / total_out)))
            pick = rng.choice(idx, k, replace=False)
            xs.append(feat.reshape(feat.shape[0], -1).T[pick])
            ys.append(np.zeros(k, dtype=int))
        return torch.cat(xs).float(), torch.as_tensor(np.concatenate(ys), dtype=torch.long)


def train_adam(params, loss_fn, steps: int, lr: float, weight_decay: float = 1e-4,
               betas=(0.9, 0.999), eps: float = 1e-8) -> float:
    """Full-batch Adam (L2 weight decay) for ``steps`` steps; returns the last loss.

    Written out because importing torch.optim pulls in torch._dynamo, which costs ~2 s per process: more
    than the training itself on these small networks.
    """
    params = list(params)
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    loss = torch.tensor(float("nan"))
    for step in range(1, steps + 1):
        for p in params:
            p.grad = None
        loss = loss_fn()
        loss.backward()
        with torch.no_grad():
            c1, c2 = 1 - betas[0] ** step, 1 - betas[1] ** step
            for p, mi, vi in zip(params, m, v):
                g = p.grad + weight_decay * p
                mi.mul_(betas[0]).add_(g, alpha=1 - betas[0])
                vi.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
                p.addcdiv_(mi / c1, (vi / c2).sqrt_().add_(eps), value=-lr)
    return float(loss.detach())


def _with_background(label_probs: torch.Tensor) -> torch.Tensor:
    """(N, L) per-label probabilities -> (N, L + 1) with background = 1 - the most probable label."""
    return torch.cat([1.0 - label_probs.amax(dim=1, keepdim=True), label_probs], dim=1)


def _cells(features: torch.Tensor) -> torch.Tensor:
    B, C, h, w = features.shape
    return features.permute(0, 2, 3, 1).reshape(-1, C)


def _grid(values: torch.Tensor, shape) -> torch.Tensor:
    B, _, h, w = shape
    return values.reshape(B, h, w, -1).permute(0, 3, 1, 2)


class BasicAdapter(Adapter):
    """No training: the cosine similarity of each cell with its nearest template ROI feature, thresholded.

    The similarity ``s`` is reported as the probability ``clip(0.5 + s - threshold, 0, 1)``, so the chain's
    0.5 decision is exactly ``s > threshold``. The ROI is subsampled to ``max_roi`` features (seeded).
    """

    name = "basic"

    def __init__(self, seed: int = 0, threshold: float = 0.5, max_roi: int = 512, augment: bool = False):
        super().__init__(seed, augment)
        if not -1.0 <= threshold <= 1.0:
            raise FMOneShotError(f"The basic adapter's threshold {threshold} is not a cosine similarity.",
                                 "choose a threshold between -1 and 1 (default 0.5).")
        self.threshold, self.max_roi = float(threshold), int(max_roi)
        self.roi: list = []

    def options(self) -> dict:
        return {**super().options(), "threshold": self.threshold, "max_roi": self.max_roi}

    def fit(self, features: list, masks: list) -> "BasicAdapter":
        self.n_labels = masks[0].shape[0]
        self.roi = [F.normalize(r, dim=1) for r in self._roi_features(features, masks, self.max_roi)]
        return self

    @torch.inference_mode()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        if not self.roi:
            raise RuntimeError("fit() the adapter before predict().")
        x = F.normalize(_cells(features).float(), dim=1)
        sims = torch.stack([(x @ r.T).amax(dim=1) for r in self.roi], dim=1)
        return _grid(_with_background((0.5 + sims - self.threshold).clamp(0.0, 1.0)), features.shape)

    def tensors(self) -> dict:
        return {f"roi.{i}": r for i, r in enumerate(self.roi)}

    def load_tensors(self, tensors: dict, n_labels: int) -> "BasicAdapter":
        self.n_labels = n_labels
        self.roi = [tensors[f"roi.{i}"].float() for i in range(n_labels)]
        return self


class MLP(torch.nn.Module):
    """The 3-layer feed-forward network of paper B."""

    def __init__(self, n_in: int, n_out: int, hidden: int = 64):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                                       torch.nn.Linear(hidden, n_out))

    def forward(self, x):
        return self.net(x)


class ClassificationAdapter(Adapter):
    """Paper B's classification adapter: pixel feature -> background or one of the labels (cross-entropy)."""

    name = "classification"

    def __init__(self, seed: int = 0, hidden: int = 64, epochs: int = 200, lr: float = 1e-2,
                 augment: bool = False):
        super().__init__(seed, augment)
        self.hidden, self.epochs, self.lr = hidden, epochs, lr
        self.net: MLP | None = None

    def fit(self, features: list, masks: list) -> "ClassificationAdapter":
        self.n_labels = masks[0].shape[0]
        x, y = self._training_pixels(features, masks)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self.net = MLP(x.shape[1], self.n_labels + 1, self.hidden)
            # Label smoothing bounds the logits: saturated softmax tails become denormal floats, which made
            # training 2-4x slower (flush-to-zero covers only the calling thread, not torch's workers).
            train_adam(self.net.parameters(), lambda: F.cross_entropy(self.net(x), y, label_smoothing=0.05),
                       self.epochs, self.lr)
        self.net.eval()
        return self

    @torch.inference_mode()
    def predict(self, features: torch.Tensor) -> torch.Tensor:
        if self.net is None:
            raise RuntimeError("fit() the adapter before predict().")
        B, C, h, w = features.shape
        logits = self.net(features.permute(0, 2, 3, 1).reshape(-1, C))
        return logits.softmax(dim=1).reshape(B, h, w, -1).permute(0, 3, 1, 2)

    def options(self) -> dict:
        return {**super().options(), "hidden": self.hidden, "epochs": self.epochs, "lr": self.lr}

    def tensors(self) -> dict:
        return dict(self.net.state_dict())

    def load_tensors(self, tensors: dict, n_labels: int) -> "ClassificationAdapter":
        self.n_labels = n_labels
        self.net = MLP(tensors["net.0.weight"].shape[1], n_labels + 1, self.hidden)
        self.net.load_state_dict(tensors)
        self.net.eval()
        return self


class ContrastiveAdapter(Adapter):
    """Paper B's Siamese adapter: a learned similarity between a target cell and the template's ROI features.

    Shapes: C feature channels, E embedding size, N target cells, M template features in a label's bank,
    L labels. A shared branch ``f`` (paper B's 3-layer feed-forward network, C -> E) embeds both cells of a
    pair, and the head compares the two embeddings: the pair logit is

        ``logit(x, t) = s * cos(f(x), f(t)) + b``,   ``P(same ROI | x, t) = sigmoid(logit)``

    with a learned scale ``s = 1 / temperature`` and bias ``b`` (a two-way softmax [other, same], as paper B's
    softmax layer; a cosine with temperature as in SimCLR, Chen et al. 2020, eq. 1). The answer depends on
    the pair: a target cell is the label where it resembles the template's ROI in the learned embedding.

    Training (paper B, Fig. 3), per label: random (ROI, ROI) pairs are "same"; (outside the label's ROI,
    ROI) pairs are "other", BACKGROUND_RATIO times as many; binary cross-entropy.

    Inference (paper B, Fig. 5): each target cell is paired with the label's **bank** of template ROI
    features (up to ``bank_size``, seeded), and the pair logits are aggregated by the mean of the ``top_k``
    largest (``top_k=1``: the maximum) before the sigmoid; background = 1 - the most probable label. Because
    the head is a cosine, all pairs cost one branch pass per cell and per bank feature (the bank's once, at
    fit) plus an (N, E) x (E, M) product per label; :meth:`predict_pairs` is the literal per-pair
    computation, for tests. :meth:`set_bank` replaces the banks without retraining.
    """

    name = "contrastive"

    def __init__(self, seed: int = 0, hidden: int = 64, embedding: int = 32, epochs: int = 200, lr: float = 1e-2,
                 augment: bool = False, top_k: int = 1, bank_size: int = 64):
        super().__init__(seed, augment)
        if int(top_k) < 1 or int(bank_size) < 1:
            raise FMOneShotError(f"The contrastive adapter's top_k {top_k} and bank_size {bank_size} must be >= 1.",
                                 "choose top_k >= 1 (1: the best-matching template feature) and bank_size >= 1.")
        self.hidden, self.embedding, self.epochs, self.lr = hidden, embedding, epochs, lr
        self.top_k, self.bank_size = int(top_k), int(bank_size)
        self.branch: MLP | None = None
        self.scale_bias: torch.nn.Parameter | None = None  # (2,): log s, b
        self.roi: list = []  # per label the bank, (M_l, C) template ROI features
        self._bank: list = []  # per label the bank's unit embeddings, (E, M_l)

    def options(self) -> dict:
        return {**super().options(), "hidden": self.hidden, "embedding": self.embedding, "epochs": self.epochs,
                "lr": self.lr, "top_k": self.top_k, "bank_size": self.bank_size}

    def _build(self, n_in: int):
        self.branch = MLP(n_in, self.embedding, self.hidden)
        self.scale_bias = torch.nn.Parameter(torch.tensor([float(np.log(10.0)), 0.0]))

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C) features -> (N, E) unit embeddings."""
        return F.normalize(self.branch(x), dim=1)

    def _logit(self, cosine: torch.Tensor) -> torch.Tensor:
        return self.scale_bias[0].exp() * cosine + self.scale_bias[1]

    def fit(self, features: list, masks: list) -> "ContrastiveAdapter":
        self.n_labels = masks[0].shape[0]
        rng = np.random.default_rng(self.seed)
        rois = self._roi_features(features, masks, MAX_SAMPLES_PER_LABEL)
        flat = [(f.reshape(f.shape[0], -1).T.float(), m.reshape(m.shape[0], -1)) for f, m in zip(features, masks)]
        xs, ts, ys = [], [], []
        for label, roi in enumerate(rois):
            n = len(roi)
            outside = torch.cat([f[np.nonzero(~m[label])[0]] for f, m in flat])
            if len(outside) == 0:
                raise FMOneShotError("The template mask covers the whole slice.",
                                     "paint each structure on the template slice, leaving background around it.")
            k = max(BACKGROUND_RATIO * n, 2000)  # negative pairs, as the classification adapter's background
            p = max(n, k // BACKGROUND_RATIO)  # positive pairs: random (ROI, ROI), so a small ROI is not swamped
            xs.append(roi[torch.as_tensor(rng.choice(n, p))])
            ts.append(roi[torch.as_tensor(rng.choice(n, p))])
            ys.append(torch.ones(p))
            xs.append(outside[torch.as_tensor(rng.choice(len(outside), k, replace=len(outside) < k))])
            ts.append(roi[torch.as_tensor(rng.choice(n, k))])
            ys.append(torch.zeros(k))
        x, t, y = torch.cat(xs), torch.cat(ts), torch.cat(ys)
        y = y * 0.95 + 0.025  # label smoothing: bounded logits (see ClassificationAdapter)
        with torch.random.fork_rng():
            torch.manual_seed(self.seed)
            self._build(x.shape[1])
            params = list(self.branch.parameters()) + [self.scale_bias]

            def loss():
                cosine = (self._embed(x) * self._embed(t)).sum(dim=1)
                return F.binary_cross_entropy_with_logits(self._logit(cosine), y)

            train_adam(params, loss, self.epochs, self.lr)
        self.branch.eval()
        self.set_bank([r[torch.as_tensor(np.sort(rng.choice(len(r), self.bank_size, replace=False)))]
                       if len(r) > self.bank_size else r for r in rois])
        return self

    @torch.inference_mode()
    def set_bank(self, roi: list) -> "ContrastiveAdapter":
        """Use ``roi`` (per label, (M_l, C) standardised template ROI features) as the template banks,
        with the trained weights unchanged; their embeddings are computed here, once."""
        if self.branch is None:
            raise RuntimeError("fit() the adapter (or load its state) before setting its template banks.")
        if len(roi) != self.n_labels or any(len(r) == 0 for r in roi):
            raise FMOneShotError(f"{len(roi)} template banks were given for {self.n_labels} labels, or one is empty.",
                                 "give one non-empty (M, C) bank of ROI features per label.")
        self.roi = [torch.as_tensor(r).float() for r in roi]
        self._bank = [self._embed(r).T.contiguous() for r in self.roi]
        return self

    def _aggregate(self, pair_logits: torch.Tensor) -> torch.Tensor:
        """(N, M) pair logits -> (N,): the mean of the top_k largest (all of them where M < top_k)."""
        k = min(self.top_k, pair_logits.shape[1])
        return pair_logits.amax(dim=1) if k == 1 else pair_logits.topk(k, dim=1).values.mean(dim=1)

    @torch.inference_mode()
    def predict(self, features: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        if self.branch is None:
            raise RuntimeError("fit() the adapter before predict().")
        x = _cells(features).float()
        probs = torch.empty(len(x), self.n_labels)
        for start in range(0, len(x), chunk):
            z = self._embed(x[start:start + chunk])  # (n, E)
            for i, bank in enumerate(self._bank):
                # s > 0, so the top-k of the logits are those of the cosines
                probs[start:start + chunk, i] = self._logit(self._aggregate(z @ bank)).sigmoid()
        return _grid(_with_background(probs), features.shape)

    @torch.inference_mode()
    def predict_pairs(self, features: torch.Tensor) -> torch.Tensor:
        """The same probabilities computed pair by pair through the whole network (slow; for tests)."""
        x = _cells(features).float()
        probs = []
        for roi in self.roi:
            logits = torch.stack([self._logit((self._embed(x) * self._embed(t[None]).expand(len(x), -1)).sum(dim=1))
                                  for t in roi], dim=1)  # (N, M): one network pass per pair
            probs.append(self._aggregate(logits).sigmoid())
        return _grid(_with_background(torch.stack(probs, dim=1)), features.shape)

    def tensors(self) -> dict:
        out = {f"branch.{k}": v for k, v in self.branch.state_dict().items()}
        out["head.scale_bias"] = self.scale_bias.detach()
        out.update({f"roi.{i}": r for i, r in enumerate(self.roi)})
        return out

    def load_tensors(self, tensors: dict, n_labels: int) -> "ContrastiveAdapter":
        if "head.scale_bias" not in tensors:
            raise FMOneShotError("The saved contrastive adapter has the linear head of FMOneShot before issue 17.",
                                 "fit the template again (it is retrained when the adapter options differ).")
        self.n_labels = n_labels
        roi = [tensors[f"roi.{i}"].float() for i in range(n_labels)]
        self._build(roi[0].shape[1])
        self.branch.load_state_dict({k[7:]: v for k, v in tensors.items() if k.startswith("branch.")})
        with torch.no_grad():
            self.scale_bias.copy_(tensors["head.scale_bias"])
        self.branch.eval()
        return self.set_bank(roi)


ADAPTERS = {"basic": BasicAdapter, "classification": ClassificationAdapter, "contrastive": ContrastiveAdapter}


def create_adapter(name: str, **options) -> Adapter:
    if name not in ADAPTERS:
        raise FMOneShotError(f"Unknown adapter {name!r}.",
                             f"choose one of: auto, none, {', '.join(sorted(ADAPTERS))}.")
    return ADAPTERS[name](**options)


def adapter_from_state(description: dict, tensors: dict) -> Adapter:
    """Rebuild a trained adapter from :meth:`Adapter.state`."""
    adapter = create_adapter(description["adapter"], **description.get("options", {}))
    return adapter.load_tensors(tensors, int(description["n_labels"]))
