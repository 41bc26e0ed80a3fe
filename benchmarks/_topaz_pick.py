"""Peer particle picker for the benchmarks: Topaz's pretrained detector, its standard pipeline, timed; writes JSON.

Run with the separate peer environment (never imported by napari-warp; Topaz needs its own torch)::

    /work/peer-venv/bin/pip install torch==2.13.0          # resolves to the CPU build here
    /work/peer-venv/bin/pip install --no-deps topaz-em     # 0.3.20; then its import-time needs:
    /work/peer-venv/bin/pip install pandas future h5py     # (+ numpy, scipy, scikit-learn, pillow, tqdm, psutil)
    /work/peer-venv/bin/python benchmarks/_topaz_pick.py --out OUT.json --radius R --scale S [--threshold T]
        [--model resnet16] [--threads 2] [--seed 0] IMAGE.mrc ...

``--radius``: the NMS radius in *downscaled* pixels (Topaz's ``extract -r``; pick it for the downscaled pixel size,
e.g. ≈ particle radius at ~8 Å/px); ``--scale``: the integer downscaling factor (Topaz's ``preprocess -s``).

What runs (Topaz 0.3.x, the same functions its CLI calls; the ``topaz`` CLI entry point itself is not used because
it imports the training commands, which need torchvision, a CUDA-sized download)
---------------------------------------------------------------------------------------------------------------------
``topaz preprocess -s S`` then ``topaz extract -m MODEL -r R -t T -x S``, in memory:

1. ``topaz.utils.data.loader.load_image`` (Topaz's own MRC reader), float32.
2. ``topaz.utils.image.downsample(x, S)``: Fourier cropping to ``(int(Y/S), int(X/S))``.
3. ``topaz.stats.normalize(x, alpha=900, beta=1, num_iters=100, sample=10, method="gmm")``: the 2-component GMM
   normalisation with ``preprocess``'s defaults (numpy's global RNG picks the pixel sample: seeded by ``--seed``).
4. ``topaz.model.factory.load_model(MODEL)`` (pretrained weights shipped in the package: ``resnet16`` =
   ``resnet16_u64.sav``, default of ``topaz extract``; also ``resnet8``, ``*_u32``), ``eval()``, ``fill()``; scores =
   ``model(x[None, None])[0, 0]`` on the CPU (log-likelihood ratio map, same shape as the downscaled image).
5. ``topaz.algorithms.non_maximum_suppression(scores, R, threshold=T)`` (``extract``'s default threshold −6).

Coordinates: Topaz's NMS returns (x = column, y = row) of the downscaled array; they are written as ``(y, x)`` in
ORIGINAL pixels, ``y = row · Y / int(Y/S)`` (the exact sample spacing of Topaz's Fourier crop; Topaz's own ``-x S``
multiplies by ``S`` and rounds, which differs by < S px only when ``Y`` is not a multiple of ``S``).

Output JSON::

    {"tool": "topaz", "version": "0.3.20", "torch": "2.13.0+cpu", "model": "resnet16", "scale": S, "radius": R,
     "threshold": T, "threads": n, "seconds_model_load": s,
     "micrographs": {"IMAGE.mrc": {"shape": [Y, X], "yx": [[y, x], ...], "score": [...], "seconds": s,
                                   "seconds_preprocess": s, "seconds_score": s, "seconds_extract": s,
                                   "seconds_read": s}, ...}}

Timing: ``seconds`` = wall time of the pick step per micrograph from the image in memory: downsample + normalise +
CNN scoring + NMS (= the three ``seconds_*`` parts); ``seconds_read`` (reading the MRC) and ``seconds_model_load``
(once) are excluded from it. Threads are limited to ``--threads`` through OMP/MKL/OpenBLAS variables set before numpy
and torch are imported, and ``torch.set_num_threads``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("images", nargs="+")
    ap.add_argument("--out", required=True, help="output JSON path")
    ap.add_argument("--radius", type=int, required=True, help="NMS radius in downscaled pixels (topaz extract -r)")
    ap.add_argument("--scale", type=int, default=1, help="integer downscaling factor (topaz preprocess -s)")
    ap.add_argument("--threshold", type=float, default=-6.0, help="score threshold (topaz extract -t, default -6)")
    ap.add_argument("--model", default="resnet16", help="pretrained model name or a .sav path (default resnet16)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the GMM pixel sample")
    a = ap.parse_args(argv)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(a.threads)

    import numpy as np
    import topaz
    import torch
    from topaz.algorithms import non_maximum_suppression
    from topaz.model.factory import load_model
    from topaz.stats import normalize
    from topaz.utils.data.loader import load_image
    from topaz.utils.image import downsample

    torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    model = load_model(a.model)
    model.eval()
    model.fill()
    result = {"tool": "topaz", "version": getattr(topaz, "__version__", "unknown"), "torch": torch.__version__,
              "model": a.model, "scale": a.scale, "radius": a.radius, "threshold": a.threshold, "threads": a.threads,
              "seconds_model_load": time.perf_counter() - t0, "micrographs": {}}
    for path in a.images:
        t0 = time.perf_counter()
        image = np.asarray(load_image(path, make_image=False, return_header=False), dtype=np.float32)
        image = image.reshape(image.shape[-2:]) if image.ndim == 3 and image.shape[0] == 1 else image
        if image.ndim != 2:
            raise SystemExit(f"{path}: expected a 2D micrograph, got shape {image.shape}")
        t1 = time.perf_counter()
        np.random.seed(a.seed)
        x = downsample(image, a.scale) if a.scale > 1 else image
        x, _ = normalize(x, alpha=900, beta=1, num_iters=100, sample=10, method="gmm", use_cuda=False)
        t2 = time.perf_counter()
        with torch.no_grad():
            scores = model(torch.from_numpy(np.ascontiguousarray(x)).float()[None, None]).numpy()[0, 0]
        t3 = time.perf_counter()
        score, coords = non_maximum_suppression(scores, a.radius, threshold=a.threshold)
        t4 = time.perf_counter()
        ratio = np.array(image.shape, dtype=np.float64) / np.array(x.shape, dtype=np.float64)
        yx = coords[:, ::-1].astype(np.float64) * ratio  # (x, y) downscaled -> (y, x) original pixels
        result["micrographs"][path] = {
            "shape": list(image.shape), "yx": yx.round(3).tolist(), "score": score.astype(float).tolist(),
            "seconds": t4 - t1, "seconds_preprocess": t2 - t1, "seconds_score": t3 - t2, "seconds_extract": t4 - t3,
            "seconds_read": t1 - t0}
        print(f"{path}: {len(score)} picks in {t4 - t1:.2f} s", file=sys.stderr)
    with open(a.out, "w") as f:
        json.dump(result, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
