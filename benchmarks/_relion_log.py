"""Peer particle picker for the benchmarks: RELION's Laplacian-of-Gaussian (LoG) autopicker, run as a subprocess.

``relion_autopick`` (RELION 3.1, ``/usr/bin``; Debian package ``relion``) with the options RELION's GUI "Auto-picking"
job passes for LoG picking::

    relion_autopick --i micrographs.star --odir AutoPick/ --pickname autopick --angpix PIX \\
        --LoG --LoG_diam_min DMIN --LoG_diam_max DMAX --shrink 0 --lowpass 20 \\
        --LoG_adjust_threshold T --LoG_upper_threshold U

``micrographs.star`` (RELION 3.1 format: an optics table and ``rlnMicrographName``; RELION 3.1 refuses a bare
old-style table) lists symlinks ``Micrographs/NNNN_<stem>.mrc`` in ``workdir``; RELION writes
``AutoPick/Micrographs/NNNN_<stem>_autopick.star`` (the relative path it was given). ``--shrink 0`` makes RELION
downscale each micrograph to the Nyquist of ``--lowpass`` (20 Å) for the search; LoG needs no reference and no CTF.
``--LoG_adjust_threshold`` is RELION's knob (positive = fewer picks, negative = more); with a large
``--LoG_upper_threshold`` and a negative adjustment the list is long enough for precision–recall curves.

Coordinates: RELION's ``rlnCoordinateX`` / ``rlnCoordinateY`` are the column / row (pixels) of the MRC data array
as stored (``mrcfile``'s ``data[y, x]``), so picks are returned as ``(y, x) = (CoordinateY, CoordinateX)``
(checked on a simulated 1024² micrograph: F1 0.92 against the truth centres vs 0.27 for the transposed or y-flipped
picks; mean offset of matched picks −0.6 px, under RELION's ~5 px search grid at 20 Å lowpass).
Scores are ``rlnAutopickFigureOfMerit`` (higher = more particle-like).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from napari_warp.core.io.star import read_star

__all__ = ["relion_log_pick", "relion_version"]


def relion_version(exe: str = "relion_autopick") -> str:
    """RELION's version string, e.g. ``"3.1.3"``."""
    out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
    return next((ln.split()[-1] for ln in out.splitlines() if "RELION version" in ln), "unknown")


def relion_log_pick(mrc_paths: Sequence[str | os.PathLike], pixel_size: float, diameter_min_A: float,
                    diameter_max_A: float, workdir: str | os.PathLike, *, threshold: float = 0.0,
                    upper_threshold: float = 99999.0, lowpass_A: float = 20.0, voltage: float = 300.0,
                    cs: float = 2.7, extra_args: Sequence[str] = (), exe: str = "relion_autopick",
                    timing: dict | None = None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Pick with RELION LoG; returns ``{str(path): (yx (N, 2) float px, figure_of_merit (N,))}`` in input order.

    ``threshold``: ``--LoG_adjust_threshold``; ``upper_threshold``: ``--LoG_upper_threshold``; ``lowpass_A``:
    ``--lowpass`` (Å). ``voltage`` (kV), ``cs`` (mm): the optics table RELION 3.1 requires (LoG ignores them).
    ``workdir`` is emptied of earlier RELION output first. ``timing``, if given, receives
    ``seconds`` (wall time of the ``relion_autopick`` process, all micrographs) and the exact ``command``.
    Raises ``RuntimeError`` with RELION's output when it fails.
    """
    work = Path(workdir)
    for sub in ("Micrographs", "AutoPick"):
        shutil.rmtree(work / sub, ignore_errors=True)
    (work / "Micrographs").mkdir(parents=True)
    names = []
    for i, p in enumerate(mrc_paths):
        name = f"Micrographs/{i:04d}_{Path(p).stem}.mrc"
        os.symlink(Path(p).resolve(), work / name)
        names.append(name)
    optics = ("data_optics\n\nloop_\n_rlnOpticsGroupName #1\n_rlnOpticsGroup #2\n_rlnMicrographPixelSize #3\n"
              f"_rlnVoltage #4\n_rlnSphericalAberration #5\n_rlnAmplitudeContrast #6\n"
              f"opticsGroup1 1 {pixel_size:g} {voltage:g} {cs:g} 0.1\n\n")
    mics = "data_micrographs\n\nloop_\n_rlnMicrographName #1\n_rlnOpticsGroup #2\n" + "".join(f"{n} 1\n" for n in names)
    (work / "micrographs.star").write_text(f"\n# version 30001\n\n{optics}\n# version 30001\n\n{mics}")
    cmd = [exe, "--i", "micrographs.star", "--odir", "AutoPick/", "--pickname", "autopick",
           "--angpix", f"{pixel_size:g}", "--LoG", "--LoG_diam_min", f"{diameter_min_A:g}",
           "--LoG_diam_max", f"{diameter_max_A:g}", "--shrink", "0", "--lowpass", f"{lowpass_A:g}",
           "--LoG_adjust_threshold", f"{threshold:g}", "--LoG_upper_threshold", f"{upper_threshold:g}", *extra_args]
    t0 = time.perf_counter()
    run = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if run.returncode != 0:
        raise RuntimeError(f"relion_autopick failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    if timing is not None:
        timing.update(seconds=seconds, command=" ".join(cmd))
    out = {}
    for p, name in zip(mrc_paths, names):
        star = work / "AutoPick" / (name[:-4] + "_autopick.star")
        yx, fom = np.zeros((0, 2)), np.zeros(0)
        if star.exists():  # RELION writes no file for a micrograph without picks
            blocks = read_star(star)
            df = next((b for b in blocks.values() if "rlnCoordinateX" in b.columns), None)
            if df is not None and len(df):
                yx = df[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(dtype=np.float64)
                fom = (df["rlnAutopickFigureOfMerit"].to_numpy(dtype=np.float64)
                       if "rlnAutopickFigureOfMerit" in df.columns else np.zeros(len(df)))
        out[str(p)] = (yx, fom)
    return out
