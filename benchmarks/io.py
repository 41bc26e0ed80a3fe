"""Movie reading speed: napari-warp's ``open_movie(...).frames()`` against tifffile / mrcfile raw reads.

Writes a simulated counting movie (Poisson, ~1 e/px, uint8 or uint16) as an LZW TIFF and as an MRC stack to a
temporary folder, reads each back several ways in the same run, and prints a markdown table: MB/s of stored
(uncompressed) bytes, and each reader's time relative to the library's own read. Our read also converts to
float32 (4× the bytes of uint8) and would apply gain/defects; the library reads return the stored integers.

    /work/venv/bin/python benchmarks/io.py                 # 4096² × 40, uint8
    /work/venv/bin/python benchmarks/io.py --frames 8 --size 1024 --dtype uint16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import mrcfile
import numpy as np
import tifffile
from _machine import cpu_and_date

from napari_warp.core.io.movie import open_movie


def poisson_frames(n: int, size: int, mean: float, dtype, seed: int = 0):
    """Yield n Poisson(mean) frames fast: 16-bit uniform draws mapped through the inverse CDF."""
    k = np.arange(64)
    log_pmf = k * np.log(mean) - mean - np.cumsum(np.log(np.maximum(k, 1)))
    cdf = np.cumsum(np.exp(log_pmf))
    table = np.searchsorted(cdf, (np.arange(65536) + 0.5) / 65536).astype(dtype)
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield table[rng.integers(0, 65536, (size, size), dtype=np.uint16)]


def machine() -> str:
    import imagecodecs

    return (
        f"{cpu_and_date()}, numpy {np.__version__}, tifffile {tifffile.__version__}, imagecodecs {imagecodecs.__version__}, "
        f"mrcfile {mrcfile.__version__}"
    )


def best_time(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return min(times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--dtype", choices=["uint8", "uint16"], default="uint8")
    p.add_argument("--repeat", type=int, default=3, help="runs per reader; the best is reported")
    args = p.parse_args(argv)
    dtype = np.dtype(args.dtype)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    nbytes = args.frames * args.size * args.size * dtype.itemsize

    with tempfile.TemporaryDirectory(prefix="nw-io-bench-") as tmp:
        tif, mrc = Path(tmp) / "movie.tif", Path(tmp) / "movie.mrcs"
        t = time.perf_counter()
        shape = (args.frames, args.size, args.size)
        frames = poisson_frames(args.frames, args.size, 1.0, dtype)  # one series of pages, like SerialEM's
        tifffile.imwrite(tif, frames, shape=shape, dtype=dtype, compression="lzw", maxworkers=cores)
        stack = np.stack(list(poisson_frames(args.frames, args.size, 1.0, dtype)))
        with mrcfile.new(mrc) as m:  # uint8 counts (< 128) as mode 0, uint16 as mode 6
            m.set_data(stack.astype(np.int8) if dtype == np.uint8 else stack)
        del stack
        setup = time.perf_counter() - t

        assert tifffile.imread(tif).shape == shape and open_movie(tif).shape == shape  # every page, both ways
        last = args.frames - 1
        assert np.array_equal(open_movie(tif).frames(last)[0], tifffile.imread(tif, key=last)[::-1])  # Warp y flip
        rows = []  # (file, reader, seconds, reference seconds)
        ref = best_time(lambda: tifffile.imread(tif), args.repeat)
        rows.append(("TIFF LZW", "tifffile.imread (default threads)", ref, ref))
        rows.append(("TIFF LZW", f"tifffile.imread(maxworkers={cores})",
                     best_time(lambda: tifffile.imread(tif, maxworkers=cores), args.repeat), ref))  # fmt: skip
        for w in sorted({1, cores}):
            rows.append(("TIFF LZW", f"open_movie().frames(workers={w}) → float32",
                         best_time(lambda w=w: open_movie(tif).frames(workers=w), args.repeat), ref))  # fmt: skip
        ref = best_time(lambda: mrcfile.read(mrc), args.repeat)
        rows.append(("MRC", "mrcfile.read", ref, ref))
        for w in sorted({1, cores}):
            rows.append(("MRC", f"open_movie().frames(workers={w}) → float32",
                         best_time(lambda w=w: open_movie(mrc).frames(workers=w), args.repeat), ref))  # fmt: skip
        tif_mb, mrc_mb = tif.stat().st_size / 1e6, mrc.stat().st_size / 1e6

    mb = nbytes / 1e6
    print(f"## Movie reading: {args.frames} × {args.size}² {dtype.name} counts (Poisson, 1 e/px)\n")
    print(f"Machine: {machine()}  ")
    print(f"Uncompressed {mb:.0f} MB; TIFF (LZW) {tif_mb:.0f} MB, MRC {mrc_mb:.0f} MB; files written in {setup:.1f} s; "
          f"best of {args.repeat} runs, files in the page cache.\n")  # fmt: skip
    print("| file | reader | time (s) | MB/s (uncompressed) | speed vs library |")
    print("|---|---|---:|---:|---:|")
    for file, reader, sec, ref in rows:
        print(f"| {file} | {reader} | {sec:.2f} | {mb / sec:.0f} | {ref / sec:.2f}× |")


if __name__ == "__main__":
    main()
