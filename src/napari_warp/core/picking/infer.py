"""Tiled BoxNet inference and the paper's post-processing into picks and an artifact mask.

A micrograph is Fourier-rescaled to the model's 8 Å/px, cut into 256² tiles overlapping by 64 px, each tile is
normalised (mean 0, std 1) and segmented; the tiles' softmax outputs are blended with a smooth weight. Picks are the
centroids of connected components of "particle" pixels whose softmax reaches the threshold; of two picks closer
than ``min_distance``, the one with the bigger component is kept. The artifact mask is softmax ≥ 0.1 with
components under 20 px (at 8 Å/px) removed; picks closer than ``mask_distance`` to it are dropped.

One step beyond the paper: a component holding several maxima of the softmax at least ``min_distance`` apart is
split between them (a watershed), so particles that touch in a crowded micrograph stay separate picks. The paper
resolves overlaps at one diameter; the default here is 0.4 diameter, because expert picks of crowded samples
(CryoPPP EMPIAR-10059/10947) are often closer than a diameter: 5 % of their nearest neighbours lie within 0.55–0.66
diameters (docs/benchmarks.md).

The probabilities are kept with the picks, so a new threshold is applied instantly (``apply_threshold``) without
running the network again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import torch
from torch.nn import functional as F

from ..device import get_device, ndimage, to_numpy
from ..fourier import fourier_rescale
from .model import PickingModel, load_model

Progress = Callable[[int, int], None]
MIN_DISTANCE = 0.4  # default closest picks, × diameter: best F1 on crowded and sparse benchmark sets alike


@dataclass(frozen=True)
class BoxNetSettings:
    """Picking settings.

    pixel_size: Å/px of the input micrograph. diameter: particle diameter in Å.
    threshold: minimum "particle" softmax. The paper's 0.95 suits Warp's wider network; the shipped model's
    softmax is less confident, and 0.2 gives it the best F1 on held-out simulated micrographs (docs/benchmarks.md).
    mask_threshold: "artifact" softmax that masks (0.1);
    min_mask_area: px at 8 Å/px, smaller mask components are dropped (20). mask_distance: Å, picks closer than this
    to the mask are dropped (None: half the diameter). min_distance: Å, the closest two picks may be; a component
    is split at maxima this far apart and of closer picks the bigger component stays (None: 0.4 diameter; the
    paper: one diameter). tile: px at 8 Å/px (256); overlap: px (64).
    batch_size: tiles per network call. model: model file ('' = the shipped generic model).
    """

    pixel_size: float = 1.0
    diameter: float = 150.0
    threshold: float = 0.2
    mask_threshold: float = 0.1
    min_mask_area: int = 20
    mask_distance: float | None = None
    min_distance: float | None = None
    tile: int = 256
    overlap: int = 64
    batch_size: int = 4
    model: str = ""

    @property
    def mask_distance_angstrom(self) -> float:
        return 0.5 * self.diameter if self.mask_distance is None else float(self.mask_distance)

    @property
    def min_distance_angstrom(self) -> float:
        return MIN_DISTANCE * self.diameter if self.min_distance is None else float(self.min_distance)


@dataclass
class Picks:
    """Result of ``pick``: positions in pixels of the input image, scores, and the artifact mask.

    yx: ``(N, 2)`` px ``(y, x)``. score: ``(N,)`` peak "particle" softmax of each pick's component.
    mask: ``(Y, X)`` bool artifact mask at the input sampling. probabilities: ``(3, Ym, Xm)`` float32 softmax at the
    model sampling (``model_pixel_size`` Å/px). input_shape: ``(Y, X)``. model: the model's label (name v (digest)).
    area: ``(N,)`` px at the model sampling, size of each pick's component. model_mask: the artifact mask at the
    model sampling (reused when only the threshold changes).
    """

    yx: np.ndarray
    score: np.ndarray
    mask: np.ndarray
    probabilities: np.ndarray
    input_shape: tuple[int, int]
    model_pixel_size: float
    settings: BoxNetSettings
    model: str = ""
    area: np.ndarray | None = None
    model_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.yx)


# ---------------------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------------------
def to_model_sampling(image, pixel_size: float, model_pixel_size: float = 8.0, device=None) -> torch.Tensor:
    """``(Y, X)`` image at ``pixel_size`` Å/px → ``(Ym, Xm)`` float32 at ~``model_pixel_size`` (Fourier crop/pad)."""
    x = torch.as_tensor(np.asarray(image, dtype=np.float32) if not isinstance(image, torch.Tensor) else image,
                        dtype=torch.float32, device=get_device(device))
    out, _ = fourier_rescale(x, float(pixel_size), float(model_pixel_size))
    return out


def model_to_input(yx: np.ndarray, model_shape, input_shape) -> np.ndarray:
    """Map ``(N, 2)`` positions at the model sampling to the input image (Fourier resampling keeps pixel N//2)."""
    m, n = np.asarray(model_shape, dtype=float), np.asarray(input_shape, dtype=float)
    return (np.asarray(yx, dtype=float) - m // 2) * (n / m) + n // 2


def input_to_model(yx: np.ndarray, input_shape, model_shape) -> np.ndarray:
    """Inverse of ``model_to_input``."""
    m, n = np.asarray(model_shape, dtype=float), np.asarray(input_shape, dtype=float)
    return (np.asarray(yx, dtype=float) - n // 2) * (m / n) + m // 2


def normalize(tiles: torch.Tensor) -> torch.Tensor:
    """Each ``(..., H, W)`` tile to mean 0, std 1 (the network's input convention)."""
    mean = tiles.mean(dim=(-2, -1), keepdim=True)
    std = tiles.std(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
    return (tiles - mean) / std


# ---------------------------------------------------------------------------------------------------------------
# segmentation
# ---------------------------------------------------------------------------------------------------------------
def tile_origins(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering ``[0, size)`` with tiles of ``tile`` px overlapping by at least ``overlap`` px."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def _blend_weight(tile: int, overlap: int, device) -> torch.Tensor:
    """``(tile, tile)`` weight: 1 in the middle, a raised-cosine ramp over ``overlap/2`` px at the borders."""
    ramp = max(overlap // 2, 1)
    t = torch.arange(tile, dtype=torch.float32, device=device)
    edge = torch.minimum(t, tile - 1 - t)
    w = torch.where(edge < ramp, 0.5 - 0.5 * torch.cos(math.pi * (edge + 1) / (ramp + 1)), torch.ones_like(t))
    return w[:, None] * w[None, :]


def segment(image: torch.Tensor, model: PickingModel, tile: int = 256, overlap: int = 64, batch_size: int = 4,
            progress: Progress | None = None) -> torch.Tensor:
    """Softmax ``(3, Y, X)`` of an image ``(Y, X)`` already at the model sampling, from overlapping tiles.

    Images smaller than a tile are segmented as one smaller tile (reflection-padded to a multiple of 16); all tiles
    go through the network in batches.
    """
    net = model.net
    device = next(net.parameters()).device
    img = image.to(device=device, dtype=torch.float32)
    Y, X = img.shape
    # the network is fully convolutional: a micrograph smaller than a tile is one tile of its own size (rounded up
    # to a multiple of 16), so padding does not dilute it
    step = getattr(net, "factor", 16)
    tile = min(tile, step * math.ceil(max(Y, X) / step))
    pad_y, pad_x = max(0, tile - Y), max(0, tile - X)
    if pad_y or pad_x:  # reflect needs pad < size: fall back to replicate for tiny images
        mode = "reflect" if pad_y < Y and pad_x < X else "replicate"
        img = F.pad(img[None, None], (0, pad_x, 0, pad_y), mode=mode)[0, 0]
    H, W = img.shape
    origins = [(y, x) for y in tile_origins(H, tile, overlap) for x in tile_origins(W, tile, overlap)]
    weight = _blend_weight(tile, overlap, device)
    acc = torch.zeros((3, H, W), device=device)
    norm = torch.zeros((H, W), device=device)
    net.eval()
    with torch.inference_mode():
        for start in range(0, len(origins), batch_size):
            chunk = origins[start:start + batch_size]
            tiles = torch.stack([img[y:y + tile, x:x + tile] for y, x in chunk])[:, None]
            prob = torch.softmax(net(normalize(tiles)), dim=1)
            for (y, x), p in zip(chunk, prob):
                acc[:, y:y + tile, x:x + tile] += p * weight
                norm[y:y + tile, x:x + tile] += weight
            if progress:
                progress(min(start + batch_size, len(origins)), len(origins))
    return (acc / norm.clamp_min(1e-6))[:, :Y, :X]


# ---------------------------------------------------------------------------------------------------------------
# post-processing
# ---------------------------------------------------------------------------------------------------------------
def artifact_mask(p_artifact: np.ndarray, threshold: float = 0.1, min_area: int = 20) -> np.ndarray:
    """Bool mask of ``p_artifact ≥ threshold`` without connected components smaller than ``min_area`` px."""
    nd = ndimage()
    mask = p_artifact >= threshold
    labels, n = nd.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_area
    keep[0] = False
    return keep[labels]


def _separated_maxima(p: np.ndarray, inside: np.ndarray, min_distance: float) -> np.ndarray:
    """Bool ``(Y, X)``: pixels of ``inside`` that are the highest of ``p`` within ``min_distance`` px. The
    neighbourhood is the square of the disk's area (a separable maximum filter: fast at any distance)."""
    side = 2 * int(round(0.886 * min_distance)) + 1  # (2a)² = π r²
    return inside & (p == ndimage().maximum_filter(p, size=max(side, 3)))


def particle_regions(p_particle: np.ndarray, threshold: float, min_distance: float) -> np.ndarray:
    """Labels ``(Y, X)`` int: components of ``p_particle ≥ threshold``, each split among its local maxima that are
    at least ``min_distance`` px from a higher one (watershed on the softmax). A component whose maximum lies that
    close to a higher maximum elsewhere gets no label (the higher one wins)."""
    nd = ndimage()
    inside = p_particle >= threshold
    peaks = _separated_maxima(p_particle, inside, min_distance)
    markers, n = nd.label(peaks, structure=np.ones((3, 3)))  # a flat top counts once
    markers = markers.astype(np.int32)
    markers[~inside] = n + 1  # one background marker floods everything below the threshold
    height = np.round((1.0 - np.clip(p_particle, 0.0, 1.0)) * 65535).astype(np.uint16)
    regions = nd.watershed_ift(height, markers)
    regions[(regions > n) | ~inside] = 0
    return regions


def particle_components(p_particle: np.ndarray, threshold: float, min_distance: float = 0.0):
    """Centroids ``(N, 2)``, peak scores ``(N,)`` and areas ``(N,)`` of the particle regions of ``p_particle ≥
    threshold`` (``particle_regions``; ``min_distance`` ≤ 1 px: plain connected components)."""
    nd = ndimage()
    if min_distance > 1.0:
        labels = particle_regions(p_particle, threshold, min_distance)
        n = int(labels.max())
    else:
        labels, n = nd.label(p_particle >= threshold)
    if n == 0:
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=int)
    index = np.arange(1, n + 1)
    area = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    index, area = index[area > 0], area[area > 0]
    centres = np.asarray(nd.center_of_mass(np.ones_like(p_particle), labels, index), dtype=float).reshape(-1, 2)
    score = np.asarray(nd.maximum(p_particle, labels, index), dtype=float)
    return centres, score, area


def resolve_overlaps(yx: np.ndarray, area: np.ndarray, distance: float) -> np.ndarray:
    """Indices of picks kept when any two closer than ``distance`` keep only the one with the bigger component."""
    from scipy.spatial import cKDTree

    order = np.argsort(-area, kind="stable")
    kept: list[int] = []
    taken = np.zeros(len(yx), dtype=bool)
    tree = cKDTree(yx) if len(yx) else None
    for i in order:  # loop over picks (hundreds), not pixels
        if taken[i]:
            continue
        kept.append(i)
        taken[tree.query_ball_point(yx[i], r=distance - 1e-9)] = True
    return np.sort(np.asarray(kept, dtype=int))


def _nearest_model_index(n: int, m: int) -> np.ndarray:
    """For each of ``n`` pixels along an axis, the nearest of ``m`` pixels of the other sampling (``input_to_model``
    in 1D for input → model; swap the sizes for model → input)."""
    return np.clip(np.rint((np.arange(n) - n // 2) * (m / n) + m // 2).astype(int), 0, m - 1)


def apply_threshold(picks: Picks, threshold: float | None = None, *, artifact_mask: np.ndarray | None = None,
                    **changes) -> Picks:
    """Picks from the stored probabilities with a new threshold (or other post-processing settings); no network.

    artifact_mask: bool ``(Y, X)`` at the input sampling that replaces the network's artifact mask, e.g. as the user
    painted and erased it; picks closer than ``mask_distance`` to it are dropped.
    """
    settings = replace(picks.settings, **({"threshold": threshold} if threshold is not None else {}), **changes)
    if artifact_mask is not None:
        mask = np.asarray(artifact_mask, dtype=bool)
        if mask.shape != tuple(picks.input_shape):
            raise ValueError(f"artifact mask of shape {mask.shape} does not match the micrograph's "
                             f"{tuple(picks.input_shape)}")
        model_shape = picks.probabilities.shape[1:]
        rows, cols = (_nearest_model_index(m, n) for m, n in zip(model_shape, mask.shape))  # model px → input px
        masks = (mask[rows[:, None], cols[None, :]], mask)
    else:
        same = all(getattr(settings, k) == getattr(picks.settings, k) for k in ("mask_threshold", "min_mask_area"))
        masks = (picks.model_mask, picks.mask) if same and picks.model_mask is not None else None
    return _postprocess(picks.probabilities, picks.input_shape, picks.model_pixel_size, settings, picks.model, masks)


THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))  # 0.05 … 0.95: the docks' slider range


def calibrate_threshold(picks: list[Picks], truths: list[np.ndarray], thresholds=THRESHOLDS,
                        valid: list[np.ndarray | None] | None = None) -> tuple[float, float]:
    """The threshold whose picks best match the user's own: ``(threshold, F1)``.

    picks: ``Picks`` of micrographs the user picked (re-derived from their stored probabilities at each threshold;
    no network). truths: the user's particle centres ``(N_i, 2)`` px of each. A pick matches within ½ diameter, one
    to one; picks and centres within ½ diameter of an edge are ignored; counts are pooled over the micrographs.
    Thresholds within 0.005 F1 of the best form a plateau and its middle is returned, so a flat optimum does not
    land on its edge. The user's picks must be complete: unpicked particles count as false positives.
    valid: optional bool ``(Y, X)`` per micrograph (or None), False where picks and centres are left out (areas the
    user marked as uncertain).
    """
    from .metrics import score_picks

    if len(picks) != len(truths) or not picks:
        raise ValueError(f"need one set of centres per micrograph, got {len(truths)} for {len(picks)}")
    valid = valid if valid is not None else [None] * len(picks)
    f1 = np.zeros(len(thresholds))
    for k, threshold in enumerate(thresholds):
        counts = np.zeros(3)
        for p, truth, ok in zip(picks, truths, valid):
            radius = 0.5 * p.settings.diameter / p.settings.pixel_size
            s = score_picks(apply_threshold(p, float(threshold)).yx, truth, radius, exclude_border=radius,
                            shape=p.input_shape, valid=ok)
            counts += (s.true_positives, s.false_positives, s.false_negatives)
        tp, fp, fn = counts
        f1[k] = 2 * tp / max(2 * tp + fp + fn, 1)
    near = np.flatnonzero(f1 >= f1.max() - 0.005)
    best = int(near[len(near) // 2])
    return float(thresholds[best]), float(f1[best])


def threshold_on_picks(model: PickingModel, micrographs, progress: Progress | None = None) -> tuple[float, float]:
    """Pick micrographs the user picked with ``model`` and return ``calibrate_threshold``'s ``(threshold, F1)``.

    micrographs: ``[(image (Y, X), Å/px, centres (N, 2) px, diameter Å, artifact, ignore)]``; artifact / ignore are
    bool ``(Y, X)`` masks or None: a painted artifact mask replaces the network's, "ignore" areas leave out picks
    and centres in them.
    """
    picks, centres, valid = [], [], []
    for k, (image, pixel_size, yx, diameter, artifact, ignore) in enumerate(micrographs):
        p = pick(image, BoxNetSettings(pixel_size=pixel_size, diameter=diameter), model)
        picks.append(apply_threshold(p, artifact_mask=artifact) if artifact is not None else p)
        centres.append(yx)
        valid.append(None if ignore is None else ~np.asarray(ignore, dtype=bool))
        if progress:
            progress(k + 1, len(micrographs))
    return calibrate_threshold(picks, centres, valid=valid)


def _postprocess(prob: np.ndarray, input_shape, model_pixel_size: float, s: BoxNetSettings, label: str,
                 masks: tuple[np.ndarray, np.ndarray] | None = None) -> Picks:
    """Picks from probabilities; ``masks`` (model, input sampling) reuses an artifact mask already derived."""
    scale = model_pixel_size
    mask_m = artifact_mask(prob[2], s.mask_threshold, s.min_mask_area) if masks is None else masks[0]
    min_distance = s.min_distance_angstrom / scale
    yx, score, area = particle_components(prob[1], s.threshold, min_distance)
    if len(yx):
        keep = resolve_overlaps(yx, area.astype(float), min_distance)
        yx, score, area = yx[keep], score[keep], area[keep]
    if len(yx) and mask_m.any():
        dist = ndimage().distance_transform_edt(~mask_m)
        iy = np.clip(np.round(yx[:, 0]).astype(int), 0, mask_m.shape[0] - 1)
        ix = np.clip(np.round(yx[:, 1]).astype(int), 0, mask_m.shape[1] - 1)
        ok = dist[iy, ix] * scale >= s.mask_distance_angstrom
        yx, score, area = yx[ok], score[ok], area[ok]
    model_shape = prob.shape[1:]
    if masks is None:
        rows, cols = (_nearest_model_index(n, m) for n, m in zip(input_shape, model_shape))
        mask = mask_m[rows[:, None], cols[None, :]]
    else:
        mask = masks[1]
    return Picks(yx=model_to_input(yx, model_shape, input_shape).reshape(-1, 2), score=score, mask=mask,
                 probabilities=prob, input_shape=tuple(input_shape), model_pixel_size=scale, settings=s,
                 model=label, area=area, model_mask=mask_m)


def pick(image, settings: BoxNetSettings, model: PickingModel | str | None = None, device=None,
         progress: Progress | None = None) -> Picks:
    """Pick particles in a micrograph ``(Y, X)`` (numpy or torch) at ``settings.pixel_size`` Å/px.

    model: a ``PickingModel``, a model file path, or None for ``settings.model`` (empty: the shipped generic
    model). Returns ``Picks`` with positions in pixels of ``image``.
    """
    dev = get_device(device)
    if not isinstance(model, PickingModel):
        model = load_model(model or settings.model or None, device=dev)
    else:
        model.net.to(dev)
    arr = image if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim != 2:
        raise ValueError(f"pick expects a 2D micrograph (Y, X), got shape {tuple(arr.shape)}")
    scaled = to_model_sampling(arr, settings.pixel_size, model.pixel_size, device=dev)
    prob = segment(scaled, model, settings.tile, settings.overlap, settings.batch_size, progress)
    actual = settings.pixel_size * arr.shape[-1] / scaled.shape[-1]  # rescaled sizes are rounded to even
    return _postprocess(to_numpy(prob).astype(np.float32), tuple(arr.shape), actual, settings, model.label)
