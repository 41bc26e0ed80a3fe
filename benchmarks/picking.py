"""Particle picking, accuracy and speed: napari-warp BoxNet (generic and retrained) beside Topaz and RELION LoG.

What is measured (issue 6's proof)
----------------------------------
Precision, recall and F1 of the picks against truth centres: a pick matches a truth centre within 0.5 × the particle
diameter, one-to-one (``core.picking.metrics.score_picks``); picks and truth within 0.5 × diameter of an image edge
are left out. TP / FP / FN are summed over a case's test micrographs. AP (area under the precision–recall curve of
scored picks, ``average_precision``) is threshold-free and the mean over the test micrographs; "best F1" is the F1
of the case's pooled ranked picks at the single score threshold that maximises it (an oracle threshold: it tells
ranking quality apart from the calibration of the default threshold).

Cases
  * ``sim-8osk``, ``sim-blobs``: two simulated "samples" (``core.simulate``, one 40 e/Å² frame, K3 MTF, Poisson
    counts, 1–2.5 µm defocus): PDB 8OSK in 500 Å of ice at 2.5 Å/px, and 220 Å "blobs" in 300 Å of ice at 3.5 Å/px,
    1024². Per sample 5 retraining and 4 test micrographs, simulator seeds ≥ 10000 (the generic model was trained on
    seeds 0–59).
  * ``10028``: CryoPPP EMPIAR-10028 (80S ribosome), which the generic model never saw: retrain on its 4 ``train``
    images, test on ``valid`` (1 image). ``10028-all``: all 5 images, generic model and peers only (no retraining).
  * ``10059``, ``10947``: CryoPPP sets whose ``train`` split the generic model was trained on: test on ``test`` +
    ``valid`` (6 images each), retrain on ``train``. Their labels are weaker (dense, overlapping disks; soft edges).

Methods, on the same images in the same run
  * napari-warp generic: ``pick`` with the shipped model (or ``--model``), the default threshold
    (``BoxNetSettings().threshold``), diameter = the case's truth diameter. Ranked picks for AP / best F1: the same
    probabilities thresholded at ``AP_THRESHOLD``.
  * napari-warp retrained: ``train.train`` from the generic model with the case's ≤ 5 retraining micrographs as new
    examples (``make_example`` from the truth centres), ``TrainingSettings(epochs, patience, holdout)`` (20 % of each
    micrograph held out for early stopping by default); no dilution with the generic training data unless
    ``--dilute NPZ`` (e.g. the training command's cache). Wall time and epochs recorded.
  * ``--seeds N``: each case is retrained N times (``TrainingSettings.seed`` 0 … N−1: which windows, which
    augmentation), because one retraining run varies by more than some of the margins to the peers; the main table
    shows seed 0, a second table F1 mean ± sd over the seeds and how many seeds reach both peers.
  * napari-warp retrained, threshold from its training picks: the same model at the threshold the training dock
    suggests, the best F1 against the retraining micrographs' own centres (``calibrate_threshold``; no test data).
  * Topaz (``topaz-em`` in ``/work/peer-venv``, its pretrained ``resnet16`` detector; ``benchmarks/_topaz_pick.py``)
    on MRC copies: downscaled by an integer factor to Topaz's recommended sampling (its quick-start guide: pretrained
    models assume 4–8 Å/px, ~4 Å/px for small and medium particles, ~8 Å/px for particles ≥ 300 Å; further if the
    particle would not fit resnet16's 91 px receptive field), NMS radius = 0.5 × diameter in downscaled px,
    extraction down to its default −6; F1 at score ≥ 0 (log-likelihood ratio 0,
    p = 0.5, the cut-off its guide gives for ``topaz convert -t 0``), AP / best F1 from the whole list.
  * RELION 3.1 LoG (``relion_autopick --LoG``, ``benchmarks/_relion_log.py``): diameters 0.8–1.2 × d, lowpass 20 Å,
    ``--LoG_adjust_threshold 0`` (its default) for F1; a second run at ``RELION_AP_THRESHOLD`` gives the longer list
    ranked by its figure of merit for AP / best F1.

Speed: a simulated 4096² micrograph at 1 Å/px (150 Å blobs) picked on 2 CPU threads (target ≤ 3 s) in a fresh
process: model load, cold (first pick) and warm (median of the next 3); on CUDA when available. Topaz on the same
MRC (its own pick time from memory: downsample + normalise + CNN + NMS; first and second image = cold and warm) and
RELION LoG (wall time of the whole single-micrograph ``relion_autopick`` process, one core).

Run (the full run takes roughly 1–1.5 h on 2 idle cores: most of it is retraining, ~30 epochs × 5 cases, and
Topaz, whose CNN takes about a minute per 1024² image on 2 CPU cores; each further seed adds about 16 min of
retraining, so ``--seeds 5`` took 1 h 50 min; ``--quick`` takes a few minutes)::

    /work/venv/bin/python benchmarks/picking.py [--quick] [--model PATH] [--epochs 30] [--patience 10]
        [--cases sim-8osk,sim-blobs,10028,10028-all,10059,10947,speed] [--skip-topaz] [--skip-relion]
        [--seeds 1] [--dilute NPZ] [--out results.json]

It prints markdown tables for ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_and_date

from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.picking import BoxNetSettings, apply_threshold, load_model, pick
from napari_warp.core.picking.data import CRYOPPP_PIXEL_SIZE, cryoppp_items, cryoppp_truth, load_examples, read_png
from napari_warp.core.picking.infer import threshold_on_picks
from napari_warp.core.picking.metrics import average_precision, inside_border, precision_recall, score_picks
from napari_warp.core.picking.train import TrainingSettings, make_example, train
from napari_warp.core.simulate import MovieSimulation, simulate_movie

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CRYOPPP = DATA / "picking" / "cryoppp"
PEER_PY = Path(os.environ.get("TOPAZ_PYTHON", "/work/peer-venv/bin/python"))
ENV = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2", OPENBLAS_NUM_THREADS="2")

THRESHOLD = BoxNetSettings().threshold  # our default picking threshold
MIN_DISTANCE = BoxNetSettings(diameter=1.0).min_distance_angstrom  # our default closest picks, × diameter
AP_THRESHOLD = 0.05  # our ranked candidates for AP / best F1: components of p(particle) ≥ this, scored by their peak
TOPAZ_EXTRACT = -6.0  # topaz extract's default: the ranked list
TOPAZ_THRESHOLD = 0.0  # Topaz picks kept for F1 (log-likelihood ratio ≥ 0)
TOPAZ_FIELD = 91  # px, receptive field of Topaz's resnet16 (its model's ``width``)
RELION_AP_THRESHOLD = -1.0  # --LoG_adjust_threshold of the longer RELION list for AP
ALL_CASES = ("sim-8osk", "sim-blobs", "10028", "10028-all", "10059", "10947", "speed")
QUICK_CASES = ("sim-8osk", "10028", "speed")

SAMPLES = {  # simulated samples: MovieSimulation fields shared by a sample's micrographs
    "sim-8osk": dict(specimen=str(DATA / "models-pdb" / "8OSK.pdb"), pixel_size=2.5, ice_thickness=500.0,
                     particle_density=0.3, title="simulated PDB 8OSK, 2.5 Å/px, 500 Å ice"),
    "sim-blobs": dict(specimen="blobs", particle_diameter=220.0, pixel_size=3.5, ice_thickness=300.0,
                      particle_density=0.3, title="simulated 220 Å blobs, 3.5 Å/px, 300 Å ice"),
}
SEED_BASE = {"sim-8osk": 10000, "sim-blobs": 20000, "speed": 30000}
METHODS = {"generic": "napari-warp generic", "retrained": "napari-warp retrained", "topaz": "Topaz resnet16",
           "relion": "RELION LoG"}


# ---------------------------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Micrograph:
    """One image with truth: centres ``(N, 2)`` px (y, x); ``diameter`` Å (the case's); ``mrc`` once written."""

    name: str
    image: np.ndarray
    pixel_size: float
    truth: np.ndarray
    diameter: float
    mrc: Path | None = None

    @property
    def radius_px(self) -> float:
        """Match radius and border exclusion: 0.5 × diameter in px."""
        return 0.5 * self.diameter / self.pixel_size


@dataclass
class Case:
    name: str
    title: str
    test: list[Micrograph]
    retrain: list[Micrograph] = field(default_factory=list)
    note: str = ""

    @property
    def pixel_size(self) -> float:
        return self.test[0].pixel_size

    @property
    def diameter(self) -> float:
        return self.test[0].diameter


def simulate_micrograph(seed: int, shape, specimen: str, pixel_size: float, particle_diameter: float = 150.0,
                        ice_thickness: float = 300.0, particle_density: float = 0.3, **_) -> Micrograph:
    """One 40 e/Å² frame (K3 MTF, no motion) with 1–2.5 µm defocus and ≤ 300 Å astigmatism drawn from ``seed``."""
    rng = np.random.default_rng(seed)
    s = MovieSimulation(shape=tuple(shape), n_frames=1, pixel_size=pixel_size, dose_per_frame=40.0,
                        defocus=float(rng.uniform(10000, 25000)), astigmatism=float(rng.uniform(0, 300)),
                        astigmatism_angle=float(rng.uniform(0, 180)), specimen=specimen,
                        particle_diameter=particle_diameter, particle_density=particle_density,
                        ice_thickness=ice_thickness, drift=0.0, local_amplitude=0.0, mtf="k3", seed=seed)
    movie = simulate_movie(s)
    return Micrograph(f"seed{seed}", movie.frames[0].astype(np.float32), pixel_size, movie.truth.particles,
                      movie.truth.particle_diameter)


def simulated_case(name: str, n_retrain: int, n_test: int, shape) -> Case:
    sample = SAMPLES[name]
    base = SEED_BASE[name]
    retrain = [simulate_micrograph(base + i, shape, **sample) for i in range(n_retrain)]
    test = [simulate_micrograph(base + 100 + i, shape, **sample) for i in range(n_test)]
    return Case(name, f"{sample['title']}, {shape[0]}²", test, retrain)


def cryoppp_micrographs(dataset: str, splits) -> list[Micrograph]:
    out = []
    for item in cryoppp_items(CRYOPPP, sets=(dataset,), splits=splits):
        image = read_png(item["image"])
        centres, diameter_px = cryoppp_truth(item["labels"], image.shape)
        out.append(Micrograph(f"{dataset}/{item['split']}/{item['image'].stem}", image, item["pixel_size"], centres,
                              diameter_px * item["pixel_size"]))
    return out


def cryoppp_case(name: str) -> Case:
    """The CryoPPP cases; one diameter per case (median of its images' label disks) for picking and scoring."""
    dataset = name.split("-")[0]
    if name == "10028":
        test, retrain = cryoppp_micrographs("10028", ("valid",)), cryoppp_micrographs("10028", ("train",))
        note = "never seen by the generic model; 1 test image"
    elif name == "10028-all":
        test, retrain = cryoppp_micrographs("10028", ("train", "valid")), []
        note = "never seen by the generic model; no retraining"
    else:
        test, retrain = cryoppp_micrographs(dataset, ("test", "valid")), cryoppp_micrographs(dataset, ("train",))
        note = "generic model trained on its train split; weaker labels (dense overlapping disks)"
    diameter = float(np.median([m.diameter for m in test + retrain]))
    for m in test + retrain:
        m.diameter = diameter
    return Case(name, f"CryoPPP EMPIAR-{dataset}, {CRYOPPP_PIXEL_SIZE[dataset]} Å/px, 1024²", test, retrain, note)


def write_mrcs(micrographs: list[Micrograph], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(micrographs):
        if m.mrc is None:
            m.mrc = folder / f"{i:03d}_{m.name.replace('/', '_')}.mrc"
            write_mrc(m.mrc, m.image, pixel_size=m.pixel_size)


# ---------------------------------------------------------------------------------------------------------------
# pickers: each returns, per micrograph, the picks kept for F1 and a ranked list (positions, scores) for AP
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class Result:
    yx: np.ndarray
    ranked_yx: np.ndarray
    ranked_score: np.ndarray
    seconds: float = float("nan")


def run_ours(model, micrographs: list[Micrograph], threshold: float = THRESHOLD) -> list[Result]:
    out = []
    for m in micrographs:
        t = time.perf_counter()
        picks = pick(m.image, BoxNetSettings(pixel_size=m.pixel_size, diameter=m.diameter, threshold=threshold),
                     model)
        secs = time.perf_counter() - t
        ranked = apply_threshold(picks, AP_THRESHOLD)
        out.append(Result(picks.yx, ranked.yx, ranked.score, secs))
    return out


def calibrated_threshold(model, micrographs: list[Micrograph]) -> tuple[float, float]:
    """What the training dock does after retraining: the threshold whose picks best match the retraining
    micrographs' own centres (``calibrate_threshold``), and that F1."""
    return threshold_on_picks(model, [(m.image, m.pixel_size, m.truth, m.diameter, None, None) for m in micrographs])


def retrain(generic, case: Case, args, old, seed: int = 0) -> tuple[object, dict]:
    """The generic model retrained on the case's retraining micrographs (their truth centres as labels)."""
    new = [make_example(m.image, m.pixel_size, m.truth, m.diameter, source=m.name) for m in case.retrain]
    settings = TrainingSettings(epochs=args.epochs, patience=args.patience, dilute=old is not None,
                                holdout=args.holdout, seed=seed)
    model, history = train(generic, new, old, settings)
    info = dict(seed=seed, micrographs=len(new), particles=int(sum(len(m.truth) for m in case.retrain)),
                epochs_run=len(history.epoch), best_epoch=history.best_epoch, seconds=history.seconds,
                diluted=old is not None, pixel_f1_before=history.old_on_new[0] if history.epoch else None,
                pixel_f1_after=max(history.new_on_new) if history.epoch else None)
    return model, info


def topaz_sampling(pixel_size: float, diameter: float) -> tuple[int, int]:
    """Topaz's integer downscaling and NMS radius (downscaled px): ~4 Å/px, ~8 Å/px for particles ≥ 300 Å, and
    more if needed for the particle to fit the detector's receptive field (``TOPAZ_FIELD``)."""
    target = 8.0 if diameter >= 300 else 4.0
    scale = max(1, round(target / pixel_size))
    while diameter / (pixel_size * scale) > TOPAZ_FIELD:
        scale += 1
    return scale, max(1, round(0.5 * diameter / (pixel_size * scale)))


def run_topaz(micrographs: list[Micrograph], folder: Path, scale: int, radius: int) -> tuple[list[Result], dict]:
    out_json = folder / "topaz.json"
    paths = [str(m.mrc) for m in micrographs]
    cmd = [str(PEER_PY), str(ROOT / "benchmarks" / "_topaz_pick.py"), "--out", str(out_json), "--radius",
           str(radius), "--scale", str(scale), "--threshold", str(TOPAZ_EXTRACT), "--threads", "2", *paths]
    run = subprocess.run(cmd, capture_output=True, text=True, env=ENV)
    if run.returncode != 0:
        raise RuntimeError(f"Topaz failed:\n{run.stderr[-2000:]}")
    data = json.loads(out_json.read_text())
    results = []
    for p in paths:
        r = data["micrographs"][p]
        yx, score = np.asarray(r["yx"], float).reshape(-1, 2), np.asarray(r["score"], float)
        results.append(Result(yx[score >= TOPAZ_THRESHOLD], yx, score, r["seconds"]))
    parts = {k: float(np.mean([data["micrographs"][p][k] for p in paths]))
             for k in ("seconds_preprocess", "seconds_score", "seconds_extract")}
    info = dict(version=data["version"], model=data["model"], scale=scale, radius=radius,
                pixel_size=micrographs[0].pixel_size * scale, seconds_model_load=data["seconds_model_load"], **parts)
    return results, info


def run_relion(micrographs: list[Micrograph], folder: Path) -> tuple[list[Result], dict]:
    from _relion_log import relion_log_pick, relion_version

    d, px = micrographs[0].diameter, micrographs[0].pixel_size
    paths = [m.mrc for m in micrographs]
    timing: dict = {}
    default = relion_log_pick(paths, px, 0.8 * d, 1.2 * d, folder / "relion", threshold=0.0, timing=timing)
    longer = relion_log_pick(paths, px, 0.8 * d, 1.2 * d, folder / "relion", threshold=RELION_AP_THRESHOLD)
    n = len(paths)
    results = [Result(default[str(p)][0], *longer[str(p)], timing["seconds"] / n) for p in paths]
    return results, dict(version=relion_version(), diameter_min=0.8 * d, diameter_max=1.2 * d,
                         command=timing["command"], seconds_process=timing["seconds"])


# ---------------------------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------------------------
def hits_of(precision: np.ndarray) -> np.ndarray:
    """Per ranked pick, 1 when it is a true positive (from precision after k picks: tp_k = precision_k · k)."""
    tp = np.rint(precision * np.arange(1, len(precision) + 1))
    return np.diff(tp, prepend=0.0)


def score_method(results: list[Result], micrographs: list[Micrograph]) -> dict:
    tp = fp = fn = n_truth = 0
    aps, scores, hits, per_image = [], [], [], []
    for r, m in zip(results, micrographs):
        kw = dict(exclude_border=m.radius_px, shape=m.image.shape)
        s = score_picks(r.yx, m.truth, m.radius_px, **kw)
        tp, fp, fn = tp + s.true_positives, fp + s.false_positives, fn + s.false_negatives
        precision, _, ranked_scores = precision_recall(r.ranked_yx, r.ranked_score, m.truth, m.radius_px, **kw)
        ap = average_precision(r.ranked_yx, r.ranked_score, m.truth, m.radius_px, **kw)
        aps.append(ap)
        scores.append(ranked_scores)
        hits.append(hits_of(precision))
        n_truth += int(inside_border(m.truth, m.image.shape, m.radius_px).sum())
        per_image.append(dict(name=m.name, picks=len(r.yx), truth=len(m.truth), precision=s.precision,
                              recall=s.recall, f1=s.f1, ap=ap, seconds=r.seconds))
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    best_f1, best_threshold = pooled_best_f1(np.concatenate(scores), np.concatenate(hits), n_truth)
    return dict(precision=precision, recall=recall, f1=f1, tp=tp, fp=fp, fn=fn, ap=float(np.nanmean(aps)),
                best_f1=best_f1, best_threshold=best_threshold,
                picks_per_image=float(np.mean([len(r.yx) for r in results])),
                seconds_per_image=float(np.mean([r.seconds for r in results])), per_image=per_image)


def pooled_best_f1(scores: np.ndarray, hits: np.ndarray, n_truth: int) -> tuple[float, float]:
    """Max F1 over one score threshold applied to all of a case's ranked picks, and that threshold."""
    if len(scores) == 0 or n_truth == 0:
        return 0.0, float("nan")
    order = np.argsort(-scores, kind="stable")
    tp = np.cumsum(hits[order])
    f1 = 2 * tp / (np.arange(1, len(order) + 1) + n_truth)
    k = int(np.argmax(f1))
    return float(f1[k]), float(scores[order][k])


# ---------------------------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------------------------
def run_case(case: Case, generic, args, old, tmp: Path) -> dict:
    print(f"[{case.name}] {len(case.test)} test / {len(case.retrain)} retraining micrographs", file=sys.stderr)
    out = dict(name=case.name, title=case.title, note=case.note, pixel_size=case.pixel_size, diameter=case.diameter,
               test=[m.name for m in case.test], truth=[len(m.truth) for m in case.test],
               retrain=[m.name for m in case.retrain], methods={})
    out["methods"]["generic"] = score_method(run_ours(generic, case.test), case.test)
    if case.retrain:
        # Retraining is random (windows, augmentation): every seed is a run a user might have got.
        out["seeds"] = [retrained_run(generic, case, args, old, seed) for seed in range(args.seeds)]
        first = out["seeds"][0]
        out["retraining"] = first["retraining"]
        out["methods"]["retrained"], out["methods"]["calibrated"] = first["retrained"], first["calibrated"]
    folder = tmp / case.name
    write_mrcs(case.test, folder)
    if not args.skip_topaz:
        scale, radius = topaz_sampling(case.pixel_size, case.diameter)
        try:
            res, out["topaz"] = run_topaz(case.test, folder, scale, radius)
            out["methods"]["topaz"] = score_method(res, case.test)
        except (RuntimeError, OSError, KeyError) as exc:
            print(f"[{case.name}] Topaz skipped: {exc}", file=sys.stderr)
    if not args.skip_relion:
        try:
            res, out["relion"] = run_relion(case.test, folder)
            out["methods"]["relion"] = score_method(res, case.test)
        except (RuntimeError, OSError) as exc:
            print(f"[{case.name}] RELION skipped: {exc}", file=sys.stderr)
    return out


def retrained_run(generic, case: Case, args, old, seed: int) -> dict:
    """One retraining of the generic model (``seed``), scored at the default and at the calibrated threshold."""
    print(f"[{case.name}] retraining, seed {seed}", file=sys.stderr)
    model, info = retrain(generic, case, args, old, seed)
    threshold, train_f1 = calibrated_threshold(model, case.retrain)
    info.update(calibrated_threshold=threshold, calibration_f1=train_f1)
    return dict(retraining=info, retrained=score_method(run_ours(model, case.test), case.test),
                calibrated=score_method(run_ours(model, case.test, threshold), case.test))


def build_case(name: str, quick: bool) -> Case:
    if name in SAMPLES:
        return simulated_case(name, n_retrain=2 if quick else 5, n_test=2 if quick else 4,
                              shape=(512, 512) if quick else (1024, 1024))
    return cryoppp_case(name)


# ---------------------------------------------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------------------------------------------
SPEED_CODE = """
import json, sys, time, numpy as np, torch
torch.set_num_threads(2)
from napari_warp.core.picking import BoxNetSettings, load_model, pick
path, model_path, device, px, d = sys.argv[1], sys.argv[2] or None, sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
img = np.load(path)
t = time.perf_counter(); model = load_model(model_path, device=device); load = time.perf_counter() - t
s = BoxNetSettings(pixel_size=px, diameter=d)
t = time.perf_counter(); p = pick(img, s, model, device=device); cold = time.perf_counter() - t
warm = []
for _ in range(3):
    t = time.perf_counter(); pick(img, s, model, device=device); warm.append(time.perf_counter() - t)
print(json.dumps(dict(load=load, cold=cold, warm=float(np.median(warm)), picks=len(p), yx=p.yx.tolist())))
"""


def timed_pick_subprocess(npy: Path, model_path: str, device: str, px: float, d: float) -> dict:
    """Model load, cold and warm pick times of ours in a fresh process (2 threads)."""
    out = subprocess.run([sys.executable, "-c", SPEED_CODE, str(npy), model_path or "", device, str(px), str(d)],
                         capture_output=True, text=True, env=ENV, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_speed(size: int, args, tmp: Path) -> dict:
    print(f"[speed] simulating {size}² at 1 Å/px", file=sys.stderr)
    t = time.perf_counter()
    m = simulate_micrograph(SEED_BASE["speed"], (size, size), specimen="blobs", pixel_size=1.0,
                            particle_diameter=150.0)
    m.name = f"speed{size}"
    out = dict(size=size, pixel_size=1.0, diameter=m.diameter, particles=len(m.truth),
               simulate_seconds=time.perf_counter() - t)
    folder = tmp / "speed"
    folder.mkdir(parents=True, exist_ok=True)
    npy = folder / "speed.npy"
    np.save(npy, m.image)

    def f1(yx):
        return score_picks(yx, m.truth, m.radius_px, exclude_border=m.radius_px, shape=m.image.shape).f1

    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        r = timed_pick_subprocess(npy, args.model, device, m.pixel_size, m.diameter)
        out[f"ours_{device}"] = dict(load=r["load"], cold=r["cold"], warm=r["warm"], picks=r["picks"],
                                     f1=f1(np.asarray(r["yx"]).reshape(-1, 2)))
    write_mrcs([m], folder)
    if not args.skip_topaz:
        twin = folder / "speed_again.mrc"  # the same file twice: Topaz's first (cold) and second (warm) pick
        twin.symlink_to(m.mrc)
        scale, radius = topaz_sampling(m.pixel_size, m.diameter)
        try:
            res, info = run_topaz([m, Micrograph(m.name, m.image, m.pixel_size, m.truth, m.diameter, twin)], folder,
                                  scale, radius)
            out["topaz"] = dict(info, cold=res[0].seconds, warm=res[1].seconds, picks=len(res[0].yx),
                                f1=f1(res[0].yx))
        except (RuntimeError, OSError, KeyError) as exc:
            print(f"[speed] Topaz skipped: {exc}", file=sys.stderr)
    if not args.skip_relion:
        try:
            res, info = run_relion([m], folder)
            out["relion"] = dict(info, picks=len(res[0].yx), f1=f1(res[0].yx))
        except (RuntimeError, OSError) as exc:
            print(f"[speed] RELION skipped: {exc}", file=sys.stderr)
    return out


# ---------------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------------
def machine(topaz_version: str | None, relion_version: str | None) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=ROOT).stdout.strip()
    except OSError:
        commit = "?"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return dict(machine=f"{cpu_and_date()}, {ram:.0f} GiB RAM", torch=torch.__version__,
                threads=torch.get_num_threads(), numpy=np.__version__, napari_warp=commit,
                cuda=torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                topaz=topaz_version, relion=relion_version)


def fmt(x, spec=".3f"):
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def report(res: dict) -> None:
    v = res["versions"]
    print(f"\nMachine: {v['machine']}; torch {v['torch']} ({v['threads']} threads), "
          f"numpy {v['numpy']}; napari-warp {v['napari_warp']}; Topaz {v['topaz'] or '—'}; RELION {v['relion'] or '—'}"
          + (f"; CUDA: {v['cuda']}" if v["cuda"] else ""))
    print(f"Model: {res['model']['label']} ({res['model']['path']}); retraining: ≤ {res['settings']['epochs']} epochs, "
          f"patience {res['settings']['patience']}, {res['settings'].get('holdout', 0):.0%} held out for early "
          f"stopping, dilution {'on' if res['settings']['dilute'] else 'off'}, "
          f"on {res['settings']['device']}\n")
    print("| case | test micrographs (particles) | method | precision | recall | F1 | best F1 (threshold) | AP |"
          " picks / micrograph |")
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for c in res["cases"]:
        head = f"{c['name']}: {c['title']}; d = {c['diameter']:.0f} Å"
        mics = f"{len(c['test'])} ({sum(c['truth'])})"
        for key, m in c["methods"].items():
            print(f"| {head} | {mics} | {method_label(key, c)} | {m['precision']:.3f} | {m['recall']:.3f} | "
                  f"**{m['f1']:.3f}** | {m['best_f1']:.3f} ({fmt(m['best_threshold'], '.2f')}) | {fmt(m['ap'])} | "
                  f"{m['picks_per_image']:.0f} |")
            head, mics = "", ""
    notes = [f"{c['name']}: {c['note']}" for c in res["cases"] if c["note"]]
    if notes:
        print("\nNotes: " + "; ".join(notes) + ".")
    retrained = [c for c in res["cases"] if "retraining" in c]
    if retrained:
        print("\n| case | retraining micrographs (particles) | epochs run (best) | retraining time (s) |"
              " F1 generic → retrained | AP generic → retrained | threshold from training picks (their F1) |"
              " F1 at that threshold |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for c in retrained:
            r, g, t = c["retraining"], c["methods"]["generic"], c["methods"]["retrained"]
            cal = c["methods"].get("calibrated")
            print(f"| {c['name']} | {r['micrographs']} ({r['particles']}) | {r['epochs_run']} ({r['best_epoch']}) | "
                  f"{r['seconds']:.0f} | {g['f1']:.3f} → {t['f1']:.3f} | {fmt(g['ap'])} → {fmt(t['ap'])} | "
                  f"{fmt(r.get('calibrated_threshold'), '.2f')} ({fmt(r.get('calibration_f1'))}) | "
                  f"{fmt(cal['f1'] if cal else None)} |")
    seeded = [c for c in retrained if len(c.get("seeds", ())) > 1]
    if seeded:
        report_seeds(seeded)
    if res.get("speed"):
        report_speed(res["speed"])


def spread(values) -> str:
    """``mean ± sd (min–max)`` of one figure over retraining seeds."""
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f} ({v.min():.3f}–{v.max():.3f})"


def report_seeds(cases: list[dict]) -> None:
    """F1 of the retrained model over retraining seeds, beside the peers' (deterministic) F1 on the same images."""
    n = len(cases[0]["seeds"])
    print(f"\nRetraining repeated with {n} seeds (0–{n - 1}); F1 as mean ± sd (min–max) over seeds:\n")
    print(f"| case | retrained (≥ {THRESHOLD}) | retrained, threshold from its training picks | thresholds chosen |"
          " Topaz | RELION LoG | seeds at or above both peers |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for c in cases:
        runs = c["seeds"]
        cal = [r["calibrated"]["f1"] for r in runs]
        thresholds = [r["retraining"]["calibrated_threshold"] for r in runs]
        peers = [c["methods"][k]["f1"] for k in ("topaz", "relion") if k in c["methods"]]
        wins = sum(f >= max(peers) for f in cal) if peers else None
        print(f"| {c['name']} | {spread([r['retrained']['f1'] for r in runs])} | **{spread(cal)}** | "
              f"{min(thresholds):.2f}–{max(thresholds):.2f} | {fmt(c['methods'].get('topaz', {}).get('f1'))} | "
              f"{fmt(c['methods'].get('relion', {}).get('f1'))} | "
              f"{'—' if wins is None else f'{wins} of {len(runs)}'} |")


def method_label(key: str, case: dict) -> str:
    if key == "topaz" and "topaz" in case:
        t = case["topaz"]
        return f"Topaz {t['model']} (÷{t['scale']}, r {t['radius']}, score ≥ {TOPAZ_THRESHOLD:g})"
    if key == "relion" and "relion" in case:
        r = case["relion"]
        return f"RELION LoG ({r['diameter_min']:.0f}–{r['diameter_max']:.0f} Å, adj. 0)"
    if key == "generic":
        return f"napari-warp generic (≥ {THRESHOLD}, {MIN_DISTANCE:g} d apart)"
    if key == "calibrated" and "retraining" in case:
        threshold = case["retraining"]["calibrated_threshold"]
        return f"napari-warp retrained, threshold from its training picks (≥ {threshold:.2f})"
    if key == "retrained":
        return f"napari-warp retrained (≥ {THRESHOLD})"
    return METHODS[key]


def report_speed(s: dict) -> None:
    print(f"\nSpeed: simulated {s['size']}² micrograph at {s['pixel_size']} Å/px ({s['particles']} particles of "
          f"{s['diameter']:.0f} Å), 2 CPU threads\n")
    print("| tool | model load (s) | cold (s) | warm (s) | picks | F1 |")
    print("|---|---:|---:|---:|---:|---:|")
    for dev in ("cpu", "cuda"):
        if f"ours_{dev}" in s:
            o = s[f"ours_{dev}"]
            print(f"| napari-warp BoxNet, {dev.upper()} | {o['load']:.2f} | {o['cold']:.2f} | **{o['warm']:.2f}** | "
                  f"{o['picks']} | {o['f1']:.3f} |")
    if "topaz" in s:
        t = s["topaz"]
        print(f"| Topaz {t['version']} {t['model']} (÷{t['scale']}, CPU; downsample + normalise + CNN + NMS) | "
              f"{t['seconds_model_load']:.2f} | {t['cold']:.2f} | {t['warm']:.2f} | {t['picks']} | {t['f1']:.3f} |")
    if "relion" in s:
        r = s["relion"]
        print(f"| RELION {r['version']} LoG (whole process, 1 core) | — | {r['seconds_process']:.2f} | — | "
              f"{r['picks']} | {r['f1']:.3f} |")
    if "ours_cuda" not in s:
        print("\nNo CUDA device in this run.")


# ---------------------------------------------------------------------------------------------------------------
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke test: 1 simulated sample at 512², 2 test images, "
                                                         "2 epochs, no 10059/10947, 1024² speed image")
    ap.add_argument("--model", default=None, help="generic model file (default: the shipped one)")
    ap.add_argument("--epochs", type=int, default=None, help="retraining epochs (default 30; --quick 2)")
    ap.add_argument("--patience", type=int, default=10, help="retraining early-stop patience (epochs)")
    ap.add_argument("--holdout", type=float, default=TrainingSettings().holdout,
                    help="fraction of each retraining micrograph held out for early stopping")
    ap.add_argument("--seeds", type=int, default=1,
                    help="retrain each case this many times (seeds 0, 1, …) and report F1 mean ± sd")
    ap.add_argument("--dilute", type=Path, default=None, help="examples .npz (save_examples) to dilute retraining")
    ap.add_argument("--cases", default=None, help=f"comma-separated subset of {','.join(ALL_CASES)}")
    ap.add_argument("--speed-size", type=int, default=None, help="speed micrograph size (default 4096; --quick 1024)")
    ap.add_argument("--skip-topaz", action="store_true")
    ap.add_argument("--skip-relion", action="store_true")
    ap.add_argument("--out", type=Path, help="results JSON")
    args = ap.parse_args(argv)
    args.epochs = args.epochs or (2 if args.quick else 30)
    names = args.cases.split(",") if args.cases else list(QUICK_CASES if args.quick else ALL_CASES)
    unknown = set(names) - set(ALL_CASES)
    if unknown:
        ap.error(f"unknown cases {sorted(unknown)}; choose from {ALL_CASES}")
    if args.seeds < 1:
        ap.error(f"--seeds must be at least 1, got {args.seeds}")
    if not PEER_PY.exists():
        args.skip_topaz = True
    if shutil.which("relion_autopick") is None:
        args.skip_relion = True
    torch.set_num_threads(2)

    generic = load_model(args.model)
    old = load_examples(args.dilute) if args.dilute else None
    result = dict(model=dict(path=str(generic.path), label=generic.label, trained_on=generic.trained_on),
                  settings=dict(quick=args.quick, epochs=args.epochs, patience=args.patience, holdout=args.holdout,
                                seeds=args.seeds,
                                dilute=bool(old),
                                threshold=THRESHOLD, min_distance=MIN_DISTANCE, ap_threshold=AP_THRESHOLD,
                                topaz_threshold=TOPAZ_THRESHOLD,
                                topaz_extract=TOPAZ_EXTRACT, relion_ap_threshold=RELION_AP_THRESHOLD,
                                device=str(torch.device("cuda" if torch.cuda.is_available() else "cpu"))),
                  cases=[])
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name in names:
            if name != "speed":
                result["cases"].append(run_case(build_case(name, args.quick), generic, args, old, tmp))
        if "speed" in names:
            result["speed"] = run_speed(args.speed_size or (1024 if args.quick else 4096), args, tmp)
    runs = result["cases"] + ([result["speed"]] if "speed" in result else [])
    topaz = next((c["topaz"]["version"] for c in runs if "topaz" in c), None)
    relion = next((c["relion"]["version"] for c in runs if "relion" in c), None)
    result["versions"] = machine(topaz, relion)
    report(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1, default=float))


if __name__ == "__main__":
    main()
