"""Online session throughput and latency: items/hour and the time from "file ready" to "item processed".

Movies: one simulated movie (``core.simulate``: blobby particles in ice, CTF, drift + local motion, K3 MTF,
Poisson counts stored as int8 MRC) copied under N names, so every item costs the same.

1. Throughput: all N movies present, ``Session.run(once=True)`` (motion + CTF from the aligned average, with the
   next movie decoded while the current one is computed) -> items/hour.
2. Latency: a writer drops one movie every ``interval`` seconds (written under a hidden name, then renamed, as a
   microscope's file appears) while ``Session.run(once=False)`` watches; latency = the item's last step completion
   (from its XML) minus the moment its file appeared, which includes the 1 s the file must stay unchanged.

    /work/venv/bin/python benchmarks/session.py [--size 4096] [--frames 40] [--n 6] [--interval S]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _machine import cpu_and_date

from napari_warp.core.io.mrc_write import write_mrc
from napari_warp.core.session import MovieOptions, Session, SessionSettings, item_record
from napari_warp.core.simulate import MovieSimulation, simulate_movie


def make_movie(path: Path, size: int, frames: int) -> None:
    s = MovieSimulation(shape=(size, size), n_frames=frames, pixel_size=0.8, dose_per_frame=1.0, defocus=15000.0,
                        astigmatism=300.0, drift=15.0, local_amplitude=2.0, seed=1)
    m = simulate_movie(s)
    write_mrc(path, m.frames.astype(np.int8), pixel_size=0.8, dtype=np.int8, voltage=300.0)


def completed_at(folder: Path, movie: Path, settings: SessionSettings) -> float | None:
    rec = item_record(folder, movie, settings)
    stamp = rec["steps"].get("ctf", {}).get("completed") if rec["status"] == "processed" else None
    if not stamp:
        return None
    day, frac = stamp.split(".")
    return datetime.strptime(day, "%Y-%m-%dT%H:%M:%S").timestamp() + int(frac) * 1e-9


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--frames", type=int, default=40)
    ap.add_argument("--n", type=int, default=6, help="movies per measurement")
    ap.add_argument("--interval", type=float, help="seconds between arrivals (default: 1.25 × the per-item time)")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "source.mrc"
        t0 = time.perf_counter()
        make_movie(src, args.size, args.frames)
        print(f"simulated {args.size}²×{args.frames} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        base = replace(SessionSettings(), movie=MovieOptions(exposure=1.0))

        # 1. throughput
        batch = tmp / "batch"
        batch.mkdir()
        for i in range(args.n):
            shutil.copy(src, batch / f"movie_{i:03d}.mrc")
        settings = replace(base, input=str(batch))
        t0 = time.perf_counter()
        stats = Session(settings, batch, settle=1.0).run(once=True)
        wall = time.perf_counter() - t0 - 1.0  # minus the one settle interval --once waits
        per_item = wall / max(1, stats.done)

        # 2. latency while watching
        live = tmp / "live"
        live.mkdir()
        settings = replace(base, input=str(live))
        interval = args.interval or 1.25 * per_item
        session = Session(settings, live, settle=1.0, poll=0.2)
        arrived: dict[Path, float] = {}

        def writer():
            for i in range(args.n):
                hidden, final = live / f".movie_{i:03d}.mrc.part", live / f"movie_{i:03d}.mrc"
                shutil.copy(src, hidden)
                hidden.rename(final)
                arrived[final] = time.time()
                time.sleep(interval)

        watcher = threading.Thread(target=session.run, kwargs={"once": False}, daemon=True)
        watcher.start()
        w = threading.Thread(target=writer)
        w.start()
        w.join()
        deadline = time.time() + 20 * per_item + 60
        latencies = []
        while time.time() < deadline:
            done = {p: completed_at(live, p, settings) for p in arrived}
            if all(v is not None for v in done.values()):
                latencies = [done[p] - arrived[p] for p in arrived]
                break
            time.sleep(0.5)
        session.stop()
        watcher.join(timeout=60)

    print(f"\nMachine: {cpu_and_date()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"\n| movie | items | wall (s) | per item (s) | items/hour |\n|---|---:|---:|---:|---:|\n"
          f"| {args.size}²×{args.frames}, int8 MRC | {stats.done} | {wall:.1f} | {per_item:.1f} | "
          f"{3600 / per_item:.0f} |")
    if latencies:
        print(f"\nLatency (file appeared → motion + CTF written), {args.n} movies arriving every {interval:.1f} s: "
              f"median {np.median(latencies):.1f} s, p95 {np.percentile(latencies, 95):.1f} s "
              f"(includes the 1 s settle time)")
    else:
        print("\nLatency: not all items finished before the deadline")


if __name__ == "__main__":
    main()
