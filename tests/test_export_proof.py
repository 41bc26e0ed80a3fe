"""The particle-export proof in small (``benchmarks/export.py`` is the full one): particles extracted with the fitted
motion and the fitted local CTF reconstruct (RELION, true angles) much closer to the true map than the same particles
summed without motion correction and given one global CTF.

One simulated 640² movie at 3 Å/px: ~100 "blobs" molecules (120 Å) at random orientations, 30 Å of drift + 3 Å RMS
local motion, a tilted plane spanning ±3000 Å of defocus, 40 e/Å² in 8 frames; our motion fit, our local CTF fit on
the aligned average, ``extract_particles``, ``relion_reconstruct --ctf`` (``--skip_gridding``), FSC against the
simulator's own 3D model (masked). Typical: ours 17 Å at FSC 0.5, FSC 0.36 at 12 Å; degraded 22.5 Å, FSC ~0 at 12 Å.
About 20 s on 2 cores.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

_NEEDED = ("relion_reconstruct",)
_MISSING = [b for b in _NEEDED if shutil.which(b) is None]

pytestmark = [
    pytest.mark.interop,
    pytest.mark.slow,
    pytest.mark.skipif(bool(_MISSING), reason=f"RELION 3.1 {', '.join(_MISSING)} not on PATH: the reconstruction "
                                              "needs it (apt-get install -y relion)"),
]


def _benchmark():
    """``benchmarks/export.py`` as a module (it is a script folder, not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "export.py"
    spec = importlib.util.spec_from_file_location("napari_warp_benchmark_export", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_local_ctf_and_motion_reconstruct_closer_to_the_truth(tmp_path):
    bench = _benchmark()
    setup = bench.Setup(specimen="blobs", particle_diameter=120.0, shape=(640, 640), n_movies=1, n_frames=8,
                        pixel_size=3.0, box=64, diameter=150.0, defocus=(10000.0, 10000.0), defocus_range=3000.0,
                        drift=30.0, local_amplitude=3.0, particle_density=0.4, seed=12)
    res = bench.run_accuracy(setup, tmp_path, "cpu", lambda msg: None, rows=("ours", "global_nomotion"),
                             checks=False, gridding=False)  # RELION's gridding iterations change little here
    assert res["particles"] >= 60
    assert np.mean(res["errors"]["motion_rms_px"]) < 0.5  # the fits worked (px of 3 Å)
    assert np.mean(res["errors"]["defocus_rms_A"]) < 500  # local fit on a small, steeply tilted field: ~300 Å
    assert np.mean(res["errors"]["global_defocus_rms_A"]) > 1000  # one defocus for the whole ±3000 Å plane
    ours, degraded = res["rows"]["ours"]["masked"], res["rows"]["global_nomotion"]["masked"]
    freqs = np.asarray(res["frequencies"])  # 1/Å of the FSC shells
    band = (freqs >= 1 / 20) & (freqs <= 1 / 10)
    fsc_ours, fsc_degraded = np.asarray(ours["curve"])[band].mean(), np.asarray(degraded["curve"])[band].mean()
    assert fsc_ours > fsc_degraded + 0.2, (fsc_ours, fsc_degraded)
    assert ours["res_05"] < degraded["res_05"] - 3.0, (ours["res_05"], degraded["res_05"])
    assert ours["at"]["12"] > 0.3 > 0.15 > degraded["at"]["12"], (ours["at"], degraded["at"])
