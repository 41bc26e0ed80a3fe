"""Peer CTF estimate for the benchmarks: ASPIRE-Python's ``CtfEstimator`` on one micrograph, timed, as one JSON line.

Run with the separate ASPIRE environment (not the project's venv; ASPIRE pins its own numpy/scipy stack)::

    python3 -m venv /work/peer-venv && /work/peer-venv/bin/pip install aspire==0.14.3
    /work/peer-venv/bin/python benchmarks/_aspire_ctf.py MIC.mrc --angpix 0.66655 [--voltage 300] [--cs 2.7]
        [--amplitude 0.07] [--defocus-min 3000] [--defocus-max 50000] [--window 512] [--json OUT.json]

A 3D MRC (a movie or stack) is summed over its first axis first. Prints one JSON object::

    {"tool": "aspire", "version": "0.14.3", "defocus_u": Å, "defocus_v": Å, "defocus_angle": deg,
     "seconds": s, "seconds_total": s, ...details}

What runs
---------
ASPIRE's own driver, ``aspire.ctf.estimate_ctf``, only takes a *folder* of ``.mrc`` files, writes STAR files, and
hard-codes the 1D defocus scan to 500–10000 nm (5000–100000 Å), ignoring any range. ``estimate`` below is that driver's
body, step for step with the same ``CtfEstimator`` methods and constants (multi-taper PSD on half-overlapping
``--window`` blocks with 2 tapers, radial average, 1D linear-program background, 1D defocus scan ``opt1d``, 2D
background, PCA astigmatism ratio, elliptical average, 6 gradient-ascent starts 30° apart, resolution band
``g_min`` 30 Å … ``g_max`` 5 Å), except that the micrograph comes from memory and ``opt1d`` scans
``--defocus-min``…``--defocus-max`` (rounded to ASPIRE's 1 nm steps). ``--stock`` instead calls
``aspire.ctf.estimate_ctf`` itself on a temporary folder holding the micrograph (fixed 5000–100000 Å scan; its time
then includes reading the file); with ``--defocus-min 5000 --defocus-max 100000`` both modes give identical numbers
(checked on the simulated micrograph below).

Timing: ``seconds`` = wall time of the estimation from the micrograph already in memory (float32) to the result,
including building ASPIRE's estimator and its Fourier–Bessel basis (it depends only on ``--window``) — excludes the
interpreter start-up and imports. ``seconds_total`` adds reading the MRC (and summing a stack). Threads are limited
to ``--threads`` (default 2, the CI machine) through OMP/OpenBLAS/MKL/… variables set before numpy is imported, and on
Linux through the CPU affinity (ASPIRE's scipy FFTs ask for ``workers=-1`` = all CPUs).

Conventions of the output (napari-warp's / Warp's)
---------------------------------------------------
* ``defocus_u`` ≥ ``defocus_v``, both Å, positive = under-focus. ``defocus_u`` is the *larger* defocus.
* ``defocus_angle``: degrees, in [0, 180), the direction of ``defocus_u`` in Fourier space measured from the +x axis
  (array column index, increasing) toward the +y axis (array row index, increasing) of the image as stored,
  i.e. ``data[y, x]`` as mrcfile returns it. This is ``CTFParams.astigmatism_angle`` of ``napari_warp.core.ctf`` with
  ``defocus = (u + v)/2`` and ``astigmatism = u − v``.

Conversion from ASPIRE (0.14.3)
-------------------------------
* Units: ASPIRE fits in nm (wavelength in nm, frequencies in 1/nm); ``df1``/``df2`` × 10 → Å (as ``estimate_ctf``).
  Its CTF is ``−sin(π λ Δf k² − π/2 Cs λ³ k⁴ + w)`` with Δf > 0 = under-focus, the same sign as ours. It fits
  ``|CTF|`` against the square root of the background-subtracted PSD, so the overall sign does not matter.
* Order: ``df1 = (x + |y + iz|)/2 ≥ df2 = (x − |y + iz|)/2`` by construction, so u = df1, v = df2.
* Angle: ``CtfEstimator.gd`` builds θ = atan2(row − c, col − c) on a (y, x)-indexed grid but *transposes* the PSD
  (``signal.asnumpy()[0].T``: ASPIRE's MATLAB-derived "(x, y)"/F-order layout) before pairing it with θ, so
  its returned ``angle_ast`` is measured from the +y (row) axis toward +x (column) axis of our image — the mirror of
  ours across the diagonal. Hence ``defocus_angle = (90° − degrees(angle_ast)) mod 180``. (The estimate's STAR
  file, ``_rlnDefocusAngle = degrees(angle_ast)``, is therefore *not* RELION's convention either for this layout.)
* Verified on napari-warp simulations (``core.simulate.simulate_movie``, whose truth uses exactly the convention
  above; 1024², 1 Å/px, 300 kV, drift 0, 4 frames × 10 e/Å² summed, window 512):
    truth u/v/angle 15300/14700 Å @ 30°  → raw angle_ast 59.3°  → 15273/14744 Å @ 30.7°
    truth u/v/angle 23000/21000 Å @ 110° → raw angle_ast −23.1° → 22854/21135 Å @ 113.1°
  Together these exclude the identity (30°, 157°), a sign flip (150°, 23°) and a 90° rotation (120°, 67°); only the
  diagonal mirror fits both. ``--stock`` (ASPIRE's own ``estimate_ctf``) and this driver with a 5000–100000 Å scan
  return bit-identical numbers.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("micrograph", help="MRC file: 2D micrograph, or 3D stack/movie (summed over the first axis)")
    p.add_argument("--angpix", type=float, required=True, help="pixel size, Å")
    p.add_argument("--voltage", type=float, default=300.0, help="kV (300)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration, mm (2.7)")
    p.add_argument("--amplitude", type=float, default=0.07, help="amplitude-contrast fraction (0.07)")
    p.add_argument("--defocus-min", type=float, default=3000.0, help="Å, start of the 1D defocus scan (3000)")
    p.add_argument("--defocus-max", type=float, default=50000.0, help="Å, end of the 1D defocus scan (50000)")
    p.add_argument("--window", type=int, default=512, help="PSD block size, px, even (512)")
    p.add_argument("--res-min", type=float, default=30.0, help="Å, low-resolution end of the fit (ASPIRE g_min, 30)")
    p.add_argument("--res-max", type=float, default=5.0, help="Å, high-resolution end of the fit (ASPIRE g_max, 5)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (2, the CI machine)")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32", help="ASPIRE dtype (float32)")
    p.add_argument("--stock", action="store_true",
                   help="call aspire.ctf.estimate_ctf itself (fixed 5000–100000 Å scan; time includes reading)")
    p.add_argument("--json", help="also write the JSON object to this path")
    args = p.parse_args(argv)
    if args.window % 2:
        p.error("--window must be even")
    if not 0 < args.defocus_min < args.defocus_max:
        p.error("need 0 < --defocus-min < --defocus-max")
    return args


def limit_threads(n: int) -> None:
    """Before numpy/scipy/finufft load: cap every thread pool at n, and on Linux pin the process to n CPUs."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS",
                "NUMEXPR_NUM_THREADS", "BLIS_NUM_THREADS"):
        os.environ[var] = str(n)
    if hasattr(os, "sched_getaffinity"):
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) > n:
            os.sched_setaffinity(0, cpus[:n])


def quiet_aspire_config() -> str:
    """ASPIRE writes a log folder into the working directory at import: point its config at a temporary one."""
    cfg = tempfile.mkdtemp(prefix="aspire_cfg_")
    atexit.register(shutil.rmtree, cfg, True)
    with open(os.path.join(cfg, "config.yaml"), "w") as f:
        f.write(
            "logging:\n"
            f"    log_dir: {os.path.join(cfg, 'logs')}\n"
            "    log_exceptions: 0\n"
            "    tqdm_disable: True\n"
            "    console_level: WARNING\n"
            "    log_file_level: WARNING\n"
        )
    os.environ["ASPIREDIR"] = cfg
    return cfg


def read_micrograph(path, dtype):
    import mrcfile
    import numpy as np

    with mrcfile.open(path, mode="r", permissive=True) as mrc:
        data = np.asarray(mrc.data)
    if data.ndim == 3:
        data = data.sum(axis=0, dtype=np.float64) if data.shape[0] > 1 else data[0]
    if data.ndim != 2:
        raise SystemExit(f"{path}: expected a 2D micrograph or a 3D stack, got shape {data.shape}")
    return np.ascontiguousarray(data, dtype=dtype)


def estimate(micrograph, args):
    """``aspire.ctf.estimate_ctf``'s per-micrograph body (ASPIRE 0.14.3), with the defocus scan range passed in.

    Returns (df1 Å, df2 Å, angle_ast rad in ASPIRE's convention, correlation p).
    """
    import numpy as np
    from aspire.basis import FFBBasis2D
    from aspire.ctf import CtfEstimator
    from aspire.utils import grid_2d, voltage_to_wavelength

    dtype = micrograph.dtype
    pixel_size, cs, voltage, psd_size, num_tapers = args.angpix, args.cs, args.voltage, args.window, 2
    g_min, g_max = args.res_min, args.res_max
    amplitude_contrast = np.arctan(args.amplitude / np.sqrt(1 - args.amplitude**2))  # phase, rad
    lmbd = voltage_to_wavelength(voltage) / 10  # nm

    ctf_object = CtfEstimator(pixel_size, cs, amplitude_contrast, voltage, psd_size, num_tapers, dtype=dtype)
    ffbbasis = FFBBasis2D((psd_size, psd_size), 2, dtype=dtype)

    micrograph_blocks = ctf_object.preprocess_micrograph(micrograph, psd_size)
    tapers_1d = ctf_object.tapers(psd_size, num_tapers / 2, num_tapers)
    signal_observed = ctf_object.estimate_psd(micrograph_blocks, tapers_1d)
    amplitude_spectrum, _ = ctf_object.elliptical_average(ffbbasis, signal_observed, True)
    signal_1d, background_1d = ctf_object.background_subtract_1d(amplitude_spectrum, linprog_method="highs")
    avg_defocus, low_freq_skip = ctf_object.opt1d(
        signal_1d, pixel_size, cs, lmbd, amplitude_contrast, signal_observed.shape[-1],
        min_defocus=round(args.defocus_min / 10), max_defocus=round(args.defocus_max / 10),  # nm
    )
    low_freq_skip = 12  # as estimate_ctf: opt1d's cutoff is overridden
    signal, _background_2d = ctf_object.background_subtract_2d(signal_observed, background_1d, low_freq_skip)
    ratio = ctf_object.pca(signal_observed, pixel_size, g_min, g_max)
    signal, _additional_background = ctf_object.elliptical_average(ffbbasis, signal.sqrt(), False)

    initial_df1 = (avg_defocus * 2) / (1 + ratio)
    initial_df2 = (avg_defocus * 2) - initial_df1
    grid = grid_2d(psd_size, normalized=True, indexing="yx", dtype=dtype)
    r_ctf = grid["r"] / 2 * (10 / pixel_size)
    theta = grid["phi"]

    angle = -5 / 12 * np.pi
    cc_array = np.zeros((6, 4))
    for a in range(6):
        cc_array[a] = ctf_object.gd(signal, initial_df1, initial_df2, angle + a * np.pi / 6.0, r_ctf, theta,
                                    pixel_size, g_min, g_max, amplitude_contrast, lmbd, cs)
    ml = int(np.argmax(cc_array[:, 3]))
    df1, df2, ang, p = cc_array[ml]
    return df1 * 10, df2 * 10, ang, p, avg_defocus * 10


def estimate_stock(micrograph, src_path, args):
    """``aspire.ctf.estimate_ctf`` itself on a temporary folder with the micrograph (symlinked when 2D float)."""
    import mrcfile
    import numpy as np
    from aspire.ctf import estimate_ctf

    tmp = tempfile.mkdtemp(prefix="aspire_stock_")
    try:
        name = os.path.join(tmp, "micrograph.mrc")
        with mrcfile.open(src_path, mode="r", permissive=True, header_only=True) as mrc:
            is_2d = int(mrc.header.nz) == 1
        if is_2d:
            os.symlink(os.path.abspath(src_path), name)
        else:  # estimate_ctf reads 2D (or 1-image stacks) only: hand it the sum
            with mrcfile.new(name) as mrc:
                mrc.set_data(micrograph.astype(np.float32))
        t0 = time.perf_counter()
        res = estimate_ctf(tmp, pixel_size=args.angpix, cs=args.cs, amplitude_contrast=args.amplitude,
                           voltage=args.voltage, num_tapers=2, psd_size=args.window, g_min=args.res_min,
                           g_max=args.res_max, output_dir=os.path.join(tmp, "results"), dtype=micrograph.dtype)
        seconds = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, True)
    r = res["micrograph.mrc"]
    return r["defocus_u"], r["defocus_v"], r["defocus_ang"], None, None, seconds


def to_napari_warp(df1, df2, angle_ast_rad):
    """ASPIRE (df1 ≥ df2, angle from +y toward +x) → (u ≥ v Å, angle of u from +x toward +y in [0, 180) degrees)."""
    import math

    u, v, ang = float(df1), float(df2), 90.0 - math.degrees(float(angle_ast_rad))
    if u < v:  # cannot happen with ASPIRE's construction; kept for safety
        u, v, ang = v, u, ang + 90.0
    return u, v, ang % 180.0


def main(argv=None) -> dict:
    args = parse_args(argv)
    limit_threads(args.threads)
    quiet_aspire_config()

    # ASPIRE imports its submodules lazily: load everything used before the clock starts.
    import aspire
    import aspire.basis
    import aspire.ctf
    import aspire.utils
    import mrcfile  # noqa: F401
    import numpy as np

    dtype = np.dtype(args.dtype)
    t0 = time.perf_counter()
    micrograph = read_micrograph(args.micrograph, dtype)
    t1 = time.perf_counter()
    if args.stock:
        df1, df2, ang, p, avg, seconds = estimate_stock(micrograph, args.micrograph, args)
        t2 = time.perf_counter()
        seconds_total = (t1 - t0) + seconds  # reading + estimate_ctf (which reads the file again itself)
        scan = [5000.0, 100000.0]
    else:
        df1, df2, ang, p, avg = estimate(micrograph, args)
        t2 = time.perf_counter()
        seconds, seconds_total = t2 - t1, t2 - t0
        scan = [10.0 * round(args.defocus_min / 10), 10.0 * round(args.defocus_max / 10)]
    u, v, angle = to_napari_warp(df1, df2, ang)
    out = {
        "tool": "aspire",
        "version": aspire.__version__,
        "defocus_u": round(u, 2),
        "defocus_v": round(v, 2),
        "defocus_angle": round(angle, 3),
        "seconds": round(seconds, 3),
        "seconds_total": round(seconds_total, 3),
        "defocus": round(0.5 * (u + v), 2),
        "astigmatism": round(u - v, 2),
        "mode": "stock estimate_ctf" if args.stock else "estimate_ctf body, scan range passed",
        "defocus_scan": scan,
        "initial_defocus_1d": None if avg is None else float(avg),
        "correlation": None if p is None else float(p),
        "aspire_raw": {"df1_A": float(df1), "df2_A": float(df2), "angle_ast_deg": float(np.degrees(ang))},
        "shape": list(micrograph.shape),
        "angpix": args.angpix,
        "voltage": args.voltage,
        "cs": args.cs,
        "amplitude": args.amplitude,
        "window": args.window,
        "threads": args.threads,
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
    }
    line = json.dumps(out)
    print(line)
    if args.json:
        with open(args.json, "w") as f:
            f.write(line + "\n")
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
