"""Training data for BoxNet: simulated micrographs with artifacts, and the CryoPPP expert-labelled sets.

Simulated micrographs come from ``core.simulate`` (physical units: protein blobs of random shape and size, or atomic
models, in ice, with CTF, detector MTF and Poisson noise), plus high-contrast artifacts painted over them with their
own label: ethane drops (large dark disks), carbon edges (a darker, textured region behind a wavy boundary) and ice
crystals / contamination (irregular dark patches). Particles under an artifact are occluded and not labelled.

CryoPPP images are 8-bit 1024² renderings with filled-disk labels; centres come from the disks. Their pixel sizes
are not documented: 10028 is the raw 1.34 Å/px binned 4×; 10059 and 10947 are estimates from their raw pixel sizes
and sizes (recorded in ``CRYOPPP_PIXEL_SIZE``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..device import ndimage
from .metrics import centres_from_disk_mask
from .train import TrainingExample, make_example

CRYOPPP_PIXEL_SIZE = {"10028": 5.36, "10059": 4.56, "10947": 3.3}  # Å/px of the 1024² renderings (see docstring)


# ---------------------------------------------------------------------------------------------------------------
# artifacts
# ---------------------------------------------------------------------------------------------------------------
def _smooth_noise(shape, length_px: float, rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit std and correlation length ``length_px``."""
    field = ndimage().gaussian_filter(rng.standard_normal(shape), max(length_px, 0.5), mode="wrap")
    return field / max(field.std(), 1e-12)


def _soft(signed_distance: np.ndarray, edge_px: float) -> np.ndarray:
    """0..1 ramp from outside (negative distance) to inside over ``edge_px``."""
    return np.clip(0.5 + signed_distance / max(edge_px, 1e-3), 0.0, 1.0)


def ethane_drops(shape, pixel_size: float, rng: np.random.Generator, count: int) -> np.ndarray:
    """Soft mask of ``count`` disks of 200–2000 Å radius (centres may lie outside the image)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(count):  # a few objects per image
        r = rng.uniform(200, 2000) / pixel_size
        cy, cx = rng.uniform(-0.3, 1.3, 2) * np.asarray(shape)
        d = r - np.hypot(yy - cy, xx - cx)
        out = np.maximum(out, _soft(d, rng.uniform(1, 4)))
    return out


def carbon_edge(shape, pixel_size: float, rng: np.random.Generator) -> np.ndarray:
    """Soft mask of the region behind a wavy line through the image (carbon support next to a hole)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    a = rng.uniform(0, 2 * np.pi)
    c = np.asarray(shape) * rng.uniform(0.2, 0.8, 2)
    along = (yy - c[0]) * np.sin(a) + (xx - c[1]) * np.cos(a)
    across = -(yy - c[0]) * np.cos(a) + (xx - c[1]) * np.sin(a)
    wave = rng.uniform(0, 300 / pixel_size) * np.sin(2 * np.pi * along / rng.uniform(2000, 20000) * pixel_size
                                                     + rng.uniform(0, 2 * np.pi))
    return _soft(across - wave, rng.uniform(1, 3))


def ice_crystals(shape, pixel_size: float, rng: np.random.Generator, count: int) -> np.ndarray:
    """Soft mask of ``count`` irregular patches 100–600 Å across (thresholded smooth noise inside a disk)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    blotch = _smooth_noise(shape, 60 / pixel_size, rng)
    out = np.zeros(shape, dtype=np.float32)
    for _ in range(count):
        r = rng.uniform(50, 300) / pixel_size
        cy, cx = rng.uniform(0, 1, 2) * np.asarray(shape)
        d = (1 - np.hypot(yy - cy, xx - cx) / r) * 4 + 0.7 * blotch
        out = np.maximum(out, _soft(d * r / 4, 1.5))
    return out


def add_artifacts(image: np.ndarray, pixel_size: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Paint random artifacts onto a micrograph (any scale); returns the new image and the bool artifact mask."""
    img = (image - image.mean()) / max(image.std(), 1e-12)
    total = np.zeros(image.shape, dtype=np.float32)
    if rng.random() < 0.3:
        m = ethane_drops(image.shape, pixel_size, rng, int(rng.integers(1, 4)))
        img = img * (1 - rng.uniform(0.3, 0.9) * m) - rng.uniform(3, 10) * m
        total = np.maximum(total, m)
    if rng.random() < 0.25:
        m = carbon_edge(image.shape, pixel_size, rng)
        texture = _smooth_noise(image.shape, rng.uniform(2, 20) * 8 / pixel_size, rng)
        img = img - m * (rng.uniform(0.7, 3) + rng.uniform(0.2, 1.0) * texture)
        total = np.maximum(total, m)
    if rng.random() < 0.25:
        m = ice_crystals(image.shape, pixel_size, rng, int(rng.integers(1, 6)))
        img = img - rng.uniform(2, 6) * m
        total = np.maximum(total, m)
    return img.astype(np.float32), total >= 0.5


# ---------------------------------------------------------------------------------------------------------------
# simulated examples
# ---------------------------------------------------------------------------------------------------------------
def _specimens(data_dir: Path | None) -> list[str]:
    found = []
    if data_dir is not None:
        for name in ("models-pdb/8OSK.pdb", "models-pdb/8zpm.cif"):
            if (data_dir / name).is_file():
                found.append(str(data_dir / name))
    return found


def simulated_example(seed: int, data_dir: Path | None = None, shape=(1024, 1024)) -> TrainingExample:
    """One simulated micrograph (random specimen, size, density, optics, dose, artifacts) as a training example."""
    from ..simulate import MovieSimulation, simulate_movie

    rng = np.random.default_rng(seed)
    atomic = _specimens(data_dir)
    specimen = "blobs" if (not atomic or rng.random() < 0.75) else str(rng.choice(atomic))
    diameter = float(np.exp(rng.uniform(math.log(60), math.log(400))))
    pixel_size = float(rng.uniform(3.0, 6.0))
    sim = MovieSimulation(
        shape=tuple(shape), n_frames=1, pixel_size=pixel_size, specimen=specimen, particle_diameter=diameter,
        particle_density=float(rng.uniform(0.05, 0.45)), defocus=float(rng.uniform(5000, 35000)),
        astigmatism=float(rng.uniform(0, 600)), astigmatism_angle=float(rng.uniform(0, 180)),
        ice_thickness=float(rng.uniform(150, 700)), dose_per_frame=float(rng.uniform(15, 70)),
        bfactor=float(rng.uniform(-200, -30)), drift=0.0, local_amplitude=0.0,
        mtf=None if data_dir is None else str(rng.choice(["k2", "k3", "falcon4"])), seed=int(seed),
    )
    movie = simulate_movie(sim, device="cpu")
    image, artifact = add_artifacts(movie.frames[0], pixel_size, rng)
    centres = movie.truth.particles
    if len(centres):
        iy, ix = np.clip(np.round(centres).astype(int), 0, np.asarray(shape) - 1).T
        centres = centres[~artifact[iy, ix]]
    return make_example(image, pixel_size, centres, movie.truth.particle_diameter, artifact=artifact,
                        source=f"simulated seed={seed} specimen={Path(specimen).name} "
                               f"diameter={movie.truth.particle_diameter:.0f}A px={pixel_size:.2f}A")


# ---------------------------------------------------------------------------------------------------------------
# CryoPPP
# ---------------------------------------------------------------------------------------------------------------
def read_png(path: Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("L"), dtype=np.float32)


def cryoppp_truth(label_path: Path, image_shape) -> tuple[np.ndarray, float]:
    """Particle centres ``(N, 2)`` px of the image and the disk diameter (px of the image) from a label PNG."""
    labels = read_png(label_path)
    scale = image_shape[0] / labels.shape[0]
    fg = labels >= 0.5 * labels.max()
    edt = ndimage().distance_transform_edt(fg)
    # the disks' typical radius: the 90th percentile of the distance-transform maxima of the components
    lab, n = ndimage().label(fg)
    peaks = np.asarray(ndimage().maximum(edt, lab, np.arange(1, n + 1))) if n else np.array([5.0])
    diameter = 2 * float(np.percentile(peaks, 90))
    return centres_from_disk_mask(labels, diameter) * scale, diameter * scale


def cryoppp_items(root: Path, sets=("10028", "10059", "10947"), splits=("train",)) -> list[dict]:
    """Image/label pairs of the CryoPPP layout ``<set>/<split>/{images,labels}/*.png`` as dicts with ``image``,
    ``labels``, ``set``, ``split`` and ``pixel_size``."""
    items = []
    for s in sets:
        for split in splits:
            folder = Path(root) / s / split
            for img in sorted((folder / "images").glob("*.png")):
                lab = folder / "labels" / img.name
                if lab.is_file():
                    items.append({"image": img, "labels": lab, "set": s, "split": split,
                                  "pixel_size": CRYOPPP_PIXEL_SIZE[s]})
    return items


def cryoppp_example(item: dict) -> TrainingExample:
    """A training example from one CryoPPP image/label pair."""
    image = read_png(item["image"])
    centres, diameter_px = cryoppp_truth(item["labels"], image.shape)
    ps = item["pixel_size"]
    return make_example(image, ps, centres, diameter_px * ps,
                        source=f"cryoppp {item['set']}/{item['split']}/{item['image'].name}")


# ---------------------------------------------------------------------------------------------------------------
# a whole training set, cached
# ---------------------------------------------------------------------------------------------------------------
def save_examples(examples: list[TrainingExample], path: Path) -> None:
    """All examples in one compressed ``.npz`` (written atomically)."""
    from ..io.atomic import atomic_path

    arrays = {}
    for i, e in enumerate(examples):
        arrays[f"image{i}"], arrays[f"labels{i}"] = e.image, e.labels
    arrays["sources"] = np.array([e.source for e in examples])
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)


def load_examples(path: Path) -> list[TrainingExample]:
    with np.load(path) as z:
        return [TrainingExample(z[f"image{i}"], z[f"labels{i}"], str(s)) for i, s in enumerate(z["sources"])]


def simulated_examples(n: int, data_dir: Path | None = None, seed: int = 0, cache: Path | None = None,
                       progress=None) -> list[TrainingExample]:
    """``n`` simulated examples (seeds ``seed .. seed+n-1``); reused from ``cache`` (an .npz) when it holds them."""
    if cache is not None and Path(cache).is_file():
        cached = load_examples(Path(cache))
        if len(cached) >= n:
            return cached[:n]
    out = []
    for i in range(n):  # each simulation is itself batched in torch
        out.append(simulated_example(seed + i, data_dir, shape=(768, 768)))
        if progress:
            progress(i + 1, n)
    if cache is not None:
        save_examples(out, Path(cache))
    return out
