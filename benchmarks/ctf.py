"""CTF estimation, accuracy and speed: napari-warp (``core.ctf_fit``) beside ASPIRE's ``CtfEstimator``.

Accuracy on simulated micrographs (``core.simulate``: atoms-free "blobs" specimen in ice, K3 MTF, Poisson counts,
2 frames × 20 e/Å² summed) with known CTF:

* flat specimens over 0.5–5 µm defocus, astigmatism 0–1,000 Å at random angles, with and without a 90° phase plate
  (5 × 5 local grid; error = RMS over an 8 × 8 lattice of the field of (fitted − true) defocus, relative to the mean);
* tilted specimens at 20–60° about random axes (a defocus plane; 2 × 2 grid = a plane; tilt angle and axis from
  the fitted plane);
* ASPIRE on the same flat, no-phase-plate images (its own global defocus/astigmatism; it has no local model and no
  phase-shift fit), run in its own venv (see ``benchmarks/_aspire_ctf.py``).

Real data: ``../shared/data/micrographs/epu2.9_example.mrc`` (4096², 0.66655 Å/px): defocus, astigmatism, fit
resolution of the 5 × 5 model; each quadrant fitted alone (1 × 1) against the full model at the quadrant's centre.

Speed: that 4096² micrograph on 2 CPU threads, cold (first fit in a fresh process, including first-use costs)
and warm (median of 3), ours and ASPIRE's; CUDA when present.

    /work/venv/bin/python benchmarks/ctf.py [--quick] [--no-peer] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_and_date

from napari_warp.core.ctf_fit import CTFSettings, fit_ctf
from napari_warp.core.io.movie import open_movie
from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.simulate import MovieSimulation, simulate_movie

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "micrographs" / "epu2.9_example.mrc"
PEER_PY = Path(os.environ.get("ASPIRE_PYTHON", "/work/peer-venv/bin/python"))


def simulate(defocus, astigmatism, angle, phase=0.0, tilt=0.0, axis=0.0, size=2048, px=1.0, seed=0):
    g = math.tan(math.radians(tilt))
    normal = math.radians(axis + 90.0)
    s = MovieSimulation(shape=(size, size), n_frames=2, pixel_size=px, defocus=defocus, astigmatism=astigmatism,
                        astigmatism_angle=angle, phase_shift=phase, drift=0.0, local_amplitude=0.0,
                        dose_per_frame=20.0, defocus_gradient=(g * math.sin(normal), g * math.cos(normal)), seed=seed)
    m = simulate_movie(s)
    return m.frames.sum(0).astype(np.float32), m.truth


def field(shape, n=8):
    yy, xx = np.meshgrid(np.linspace(0, shape[0] - 1, n), np.linspace(0, shape[1] - 1, n), indexing="ij")
    return np.stack([yy.ravel(), xx.ravel()], 1)


def angle_diff(a, b):
    return abs((a - b + 90.0) % 180.0 - 90.0)


def aspire(image: np.ndarray, px: float, tmp: Path, name: str, voltage=300.0) -> dict | None:
    if not PEER_PY.exists():
        return None
    path = tmp / f"{name}.mrc"
    if not path.exists():
        write_mrc(path, image, pixel_size=px)
    out = subprocess.run([str(PEER_PY), str(ROOT / "benchmarks" / "_aspire_ctf.py"), str(path), "--angpix", str(px),
                          "--voltage", str(voltage), "--threads", "2"], capture_output=True, text=True, check=False)
    try:
        return json.loads(out.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        print(f"ASPIRE failed on {name}: {out.stderr[-500:]}", file=sys.stderr)
        return None


def flat_cases(quick: bool):
    rng = np.random.default_rng(7)
    defoci = [5000, 10000, 20000, 35000, 50000] if not quick else [10000, 35000]
    astig = [0, 300, 1000, 300, 1000]
    cases = [dict(defocus=d, astigmatism=a, angle=float(rng.uniform(-90, 90)), phase=0.0)
             for d, a in zip(defoci, astig)]
    cases += [dict(defocus=5000, astigmatism=300, angle=float(rng.uniform(-90, 90)), phase=90.0),
              dict(defocus=10000, astigmatism=0, angle=0.0, phase=60.0)][: 1 if quick else 2]
    return cases


def tilt_cases(quick: bool):
    rng = np.random.default_rng(11)
    tilts = [(20, 10000), (40, 25000), (60, 15000)] if not quick else [(40, 25000)]
    return [dict(defocus=d, astigmatism=300, angle=float(rng.uniform(-90, 90)), tilt=t,
                 axis=float(rng.uniform(0, 180))) for t, d in tilts]


def run_flat(case, i, size, tmp, peer):
    image, truth = simulate(size=size, seed=i, **case)
    t = time.perf_counter()
    fit = fit_ctf(image, CTFSettings(pixel_size=1.0, fit_phase=case["phase"] != 0))
    secs = time.perf_counter() - t
    yx = field(image.shape)
    true = truth.defocus_at(yx)
    rms = 100 * np.sqrt(np.mean((fit.defocus_at(yx) - true) ** 2)) / np.mean(true)
    row = dict(case, rms_percent=rms, defocus_fit=fit.defocus, astig_fit=fit.astigmatism, angle_fit=fit.angle,
               angle_err=angle_diff(fit.angle, case["angle"]), phase_fit=fit.phase_shift, res=fit.fit_resolution,
               seconds=secs)
    if peer and case["phase"] == 0:
        a = aspire(image, 1.0, tmp, f"flat{i}")
        if a:
            d = 0.5 * (a["defocus_u"] + a["defocus_v"])
            row.update(aspire_defocus=d, aspire_err_percent=100 * abs(d - case["defocus"]) / case["defocus"],
                       aspire_astig=a["defocus_u"] - a["defocus_v"], aspire_angle_err=angle_diff(
                           a["defocus_angle"], case["angle"]), aspire_seconds=a["seconds"])
    return row


def run_tilt(case, i, size):
    image, truth = simulate(size=size, px=1.0, seed=100 + i, **case)
    t = time.perf_counter()
    fit = fit_ctf(image, CTFSettings(pixel_size=1.0, grid=(2, 2)))
    secs = time.perf_counter() - t
    yx = field(image.shape)
    true = truth.defocus_at(yx)
    rms = 100 * np.sqrt(np.mean((fit.defocus_at(yx) - true) ** 2)) / np.mean(true)
    gy, gx = fit.plane
    tilt = math.degrees(math.atan(math.hypot(gy, gx)))
    axis = math.degrees(math.atan2(gy, gx)) - 90.0
    return dict(case, rms_percent=rms, tilt_fit=tilt, axis_fit=axis % 180, axis_err=angle_diff(axis, case["axis"]),
                angle_err=angle_diff(fit.angle, case["angle"]), res=fit.fit_resolution, seconds=secs,
                span=float(true.max() - true.min()))


def timed_fit_subprocess(path: Path, device: str) -> dict:
    """Cold and warm times of our fit on the real micrograph in a fresh process (2 threads)."""
    code = f"""
import json, time, numpy as np, torch
torch.set_num_threads(2)
from napari_warp.core.io.movie import open_movie
from napari_warp.core.ctf_fit import CTFSettings, fit_ctf
m = open_movie({str(path)!r}); img = np.asarray(m.frames(), np.float32).sum(0)
s = CTFSettings(pixel_size=m.pixel_size, voltage=m.voltage or 300.0)
t = time.perf_counter(); f = fit_ctf(img, s, device={device!r}); cold = time.perf_counter() - t
warm = []
for _ in range(3):
    t = time.perf_counter(); fit_ctf(img, s, device={device!r}); warm.append(time.perf_counter() - t)
print(json.dumps(dict(cold=cold, warm=float(np.median(warm)))))
"""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_real(peer, tmp):
    movie = open_movie(REAL)
    image = np.asarray(movie.frames(), np.float32).sum(0)
    px, kv = movie.pixel_size, movie.voltage or 300.0
    full = fit_ctf(image, CTFSettings(pixel_size=px, voltage=kv))
    h, w = (s // 2 for s in image.shape)
    quads = []
    for qy in (0, 1):
        for qx in (0, 1):
            alone = fit_ctf(image[qy * h:(qy + 1) * h, qx * w:(qx + 1) * w],
                            CTFSettings(pixel_size=px, voltage=kv, grid=(1, 1)))
            centre = float(full.defocus_at([[qy * h + h / 2, qx * w + w / 2]])[0])
            quads.append(dict(quadrant=("top" if qy == 0 else "bottom") + ("-left" if qx == 0 else "-right"),
                              alone=alone.defocus, model=centre, diff_percent=100 * (alone.defocus - centre) / centre,
                              res=alone.fit_resolution))
    gy, gx = full.plane
    real = dict(defocus=full.defocus, astig=full.astigmatism, angle=full.angle, res=full.fit_resolution,
                tilt=math.degrees(math.atan(math.hypot(gy, gx))), span=float(np.ptp(full.defocus_map((32, 32)))),
                quadrants=quads, times=timed_fit_subprocess(REAL, "cpu"))
    if torch.cuda.is_available():
        real["times_cuda"] = timed_fit_subprocess(REAL, "cuda")
    if peer:
        a = aspire(image, px, tmp, "epu")
        if a:
            real["aspire"] = a
    return real


def report(flat, tilted, real):
    print(f"\nMachine: {cpu_and_date()}; torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| defocus (Å) | astig. (Å) | phase (°) | RMS defocus error | astig. fitted (Å) | angle error | phase fitted"
          " | fit res. (Å) | time (s) | ASPIRE defocus error | ASPIRE astig. (Å) | ASPIRE angle error | ASPIRE time (s) |")
    print("|---" * 13 + "|")
    for r in flat:
        ph = f"{r['phase_fit']:.1f}°" if r["phase"] else "—"
        asp = (f"{r['aspire_err_percent']:.2f} % | {r['aspire_astig']:.0f} | {r['aspire_angle_err']:.1f}° | "
               f"{r['aspire_seconds']:.1f}") if "aspire_defocus" in r else "— | — | — | —"
        print(f"| {r['defocus']:.0f} | {r['astigmatism']:.0f} | {r['phase']:.0f} | {r['rms_percent']:.3f} % | "
              f"{r['astig_fit']:.0f} | {r['angle_err']:.2f}° | {ph} | {r['res']:.2f} | {r['seconds']:.1f} | {asp} |")
    print("\n| tilt (°) | axis (°) | defocus (Å) | defocus span (Å) | RMS defocus error | tilt fitted (°) | axis error |"
          " astig. angle error | fit res. (Å) | time (s) |")
    print("|---" * 10 + "|")
    for r in tilted:
        print(f"| {r['tilt']:.0f} | {r['axis']:.1f} | {r['defocus']:.0f} | {r['span']:.0f} | {r['rms_percent']:.3f} % | "
              f"{r['tilt_fit']:.2f} | {r['axis_err']:.2f}° | {r['angle_err']:.2f}° | {r['res']:.2f} | "
              f"{r['seconds']:.1f} |")
    if real:
        print(f"\nReal micrograph: defocus {real['defocus']:.0f} Å, astigmatism {real['astig']:.0f} Å at "
              f"{real['angle']:.1f}°, fit resolution {real['res']:.2f} Å, local-model tilt {real['tilt']:.1f}°, "
              f"defocus span {real['span']:.0f} Å")
        print("\n| quadrant | fitted alone (Å) | full local model at its centre (Å) | difference | fit res. alone (Å) |")
        print("|---|---|---|---|---|")
        for q in real["quadrants"]:
            print(f"| {q['quadrant']} | {q['alone']:.0f} | {q['model']:.0f} | {q['diff_percent']:+.2f} % | "
                  f"{q['res']:.2f} |")
        t = real["times"]
        print(f"\nSpeed, 4096² on 2 threads: ours cold {t['cold']:.2f} s, warm {t['warm']:.2f} s"
              + (f"; CUDA cold {real['times_cuda']['cold']:.2f} s, warm {real['times_cuda']['warm']:.2f} s"
                 if "times_cuda" in real else "; no CUDA device"))
        if "aspire" in real:
            a = real["aspire"]
            print(f"ASPIRE {a['version']}: defocus {0.5 * (a['defocus_u'] + a['defocus_v']):.0f} Å, astigmatism "
                  f"{a['defocus_u'] - a['defocus_v']:.0f} Å at {a['defocus_angle']:.1f}°, {a['seconds']:.2f} s "
                  f"(estimation), {a['seconds_total']:.2f} s with reading")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    ap.add_argument("--no-peer", action="store_true", help="skip ASPIRE")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    size = 1024 if args.quick else 2048
    peer = not args.no_peer
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        flat = [run_flat(c, i, size, tmp, peer) for i, c in enumerate(flat_cases(args.quick))]
        tilted = [run_tilt(c, i, size) for i, c in enumerate(tilt_cases(args.quick))]
        real = run_real(peer, tmp) if REAL.exists() else None
    report(flat, tilted, real)
    if args.json:
        args.json.write_text(json.dumps(dict(flat=flat, tilted=tilted, real=real), indent=1, default=float))


if __name__ == "__main__":
    main()
