"""The ``napari-warp`` command: WarpTools-like verbs over napari_warp.core; napari only where a window is asked for."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def _progress(label: str):
    """A one-line progress printer usable as a core progress callback ``(done, total)``."""

    def report(done: int, total: int) -> None:
        width = 30
        frac = done / total if total else 1.0
        bar = "#" * int(width * frac) + "-" * (width - int(width * frac))
        end = "\n" if done >= total else ""
        print(f"\r{label:<24} [{bar}] {done}/{total}", end=end, file=sys.stderr, flush=True)

    return report


def run_demo(out: Path, size: int = 1024, frames: int = 16, seed: int = 0, n_movies: int = 3) -> dict:
    """Simulate a small collection session and process it online; returns a summary.

    ``n_movies`` simulated movies (known motion and CTF; different defocus each) arrive one by one into
    ``out/session/`` while a ``core.session.Session`` watches that folder and processes each (motion, then CTF of
    the aligned average) into Warp's layout beside them. The last movie is the showcase: its truth is written to
    ``out/`` as ``truth_particles.star`` and ``tracks.npz`` (true and fitted shifts at a 5×5 grid), its plain
    average and Warp-style spectrum as ``average.mrc`` and ``spectrum.mrc``. Also ``gain.mrc`` and
    ``summary.json`` (fitted-vs-true errors, per-item results).
    """
    import shutil
    import threading
    from dataclasses import replace

    import numpy as np

    from ._layers import track_positions
    from .core.demo import demo_simulation, inspect_movie
    from .core.io.movie import open_movie, write_mrc
    from .core.io.star import read_star, write_coordinates
    from .core.io.warp_xml import read_warp_xml
    from .core.item import item_paths, load_ctf
    from .core.motion import motion_from_xml
    from .core.particles import ExportSettings
    from .core.picking.io import read_picks_star
    from .core.picking.metrics import score_picks
    from .core.session import PARTICLE_LISTS, MovieOptions, Session, SessionSettings, save_settings, session_records
    from .core.simulate import simulate_movie

    out.mkdir(parents=True, exist_ok=True)
    folder = out / "session"
    if (folder / "napari-warp.settings.toml").is_file():  # a previous demo's session: its items would look done
        shutil.rmtree(folder)
    folder.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    base = demo_simulation(size=size, frames=frames, seed=seed)
    defoci = [base.defocus + 3000.0 * (i - (n_movies - 1)) for i in range(n_movies)]  # the showcase keeps 1.5 µm
    gain_path = out / "gain.mrc"
    settings = replace(SessionSettings(input=str(folder), pick=True),
                       movie=MovieOptions(exposure=base.dose_per_frame, gain=str(gain_path.resolve())))
    # particles out while "collecting" (the paper's Fig. 1 loop): 256 Å boxes at 2 Å/px from each movie
    settings = replace(settings, picking=replace(settings.picking, diameter=base.particle_diameter), extract=True,
                       export=ExportSettings(box_size=128, pixel_size=2.0, diameter=1.2 * base.particle_diameter))
    save_settings(folder, settings)
    session = Session(settings, folder, settle=0.5, poll=0.2)
    watcher = threading.Thread(target=session.run, kwargs={"once": False}, daemon=True)
    truths, t_sim = [], 0.0
    show = _progress("simulated movies")
    gain = base.gain  # one camera, one gain reference: the first movie's is used for all of them
    for i, defocus in enumerate(defoci):
        s = replace(base, defocus=defocus, seed=seed + n_movies - 1 - i, gain=gain)  # the last one uses `seed`
        ts = time.perf_counter()
        sim = simulate_movie(s)
        t_sim += time.perf_counter() - ts
        if i == 0:
            gain = sim.gain
            write_mrc(gain_path, sim.gain.astype(np.float32), pixel_size=s.pixel_size)
            watcher.start()
        # each movie appears in one rename, as a microscope's finished file does; the session picks it up
        write_mrc(folder / f"movie_{i:03d}.mrcs", sim.frames.astype(np.float32), pixel_size=s.pixel_size,
                  voltage=s.voltage)
        truths.append(sim)
        show(i + 1, n_movies)
    movies = [folder / f"movie_{i:03d}.mrcs" for i in range(n_movies)]
    wait = _progress("processing online")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        records = session_records(settings, folder, movies)
        final = sum(r["status"] in ("processed", "failed") for r in records)
        wait(final, n_movies)
        if final == n_movies:
            break
        time.sleep(0.3)
    session.stop()
    watcher.join(timeout=60)
    t_total = time.perf_counter() - t0

    # the showcase: the last movie, with its truth
    sim, movie_path = truths[-1], movies[-1]
    movie = open_movie(movie_path, gain=gain_path, exposure=base.dose_per_frame * frames)
    inspect_movie(movie, sim.truth.ctf, out, progress=_progress("averaging frames"))
    write_coordinates(out / "truth_particles.star", sim.truth.particles, micrograph_name=movie_path.name)
    paths = item_paths(folder, movie_path)
    meta = read_warp_xml(paths.xml, kinds=("Movie",))
    model = motion_from_xml(meta, movie.shape[1:], movie.pixel_size, n_frames=frames)
    # True and fitted motion at a 5×5 grid of positions, for drawing tracks as Warp does. Both relative to each
    # position's mean over frames: that is where the aligned average puts a feature.
    positions = track_positions(movie.shape[1:])
    shifts = sim.truth.shifts(positions, relative_to_mean=True)
    fitted = model.shifts(positions)
    fitted = fitted - fitted.mean(0)
    np.savez(out / "tracks.npz", positions=positions, truth=shifts, fitted=fitted)
    total_drift_px = float(np.linalg.norm(shifts[-1] - shifts[0], axis=-1).mean())
    error = fitted - shifts
    fit = load_ctf(folder, movie_path)
    lattice = track_positions(movie.shape[1:], 8)
    defocus_error = float(np.sqrt(np.mean((fit.defocus_at(lattice) - sim.truth.defocus_at(lattice)) ** 2)))

    picks = read_picks_star(paths.picks) if paths.picks.exists() else None
    radius = 0.5 * sim.truth.particle_diameter / movie.pixel_size
    pick_score = (score_picks(picks.yx, sim.truth.particles, radius, exclude_border=radius, shape=movie.shape[1:])
                  if picks is not None else None)

    all_star = folder / PARTICLE_LISTS["all"]
    n_particles = len(read_star(all_star)["particles"]) if all_star.exists() else 0

    items = []
    for rec, truth in zip(session_records(settings, folder, movies), truths):
        m = rec["metrics"]
        items.append({"name": rec["name"], "status": rec["status"], "error": rec["error"],
                      "true_defocus_A": float(truth.truth.ctf.defocus),
                      "ctf_defocus_A": round(m["defocus"] * 1e4, 1) if m.get("defocus") is not None else None})
    summary = {
        "movie": str(movie_path),
        "session_folder": str(folder),
        "items": items,
        "shape": list(movie.shape),
        "pixel_size_A": movie.pixel_size,
        "voltage_kV": movie.voltage,
        "exposure_e_per_A2": movie.exposure,
        "true_defocus_A": float(sim.truth.ctf.defocus),
        "true_particles": len(sim.truth.particles),
        "particle_diameter_A": float(sim.truth.particle_diameter),
        "true_mean_drift_A": round(total_drift_px * movie.pixel_size, 2),
        "motion_rms_error_px": round(float(np.sqrt((error**2).sum(-1).mean())), 3),
        "ctf_defocus_A": round(fit.defocus, 1),
        "ctf_local_defocus_rms_error_A": round(defocus_error, 1),
        "true_astigmatism_A": float(sim.truth.ctf.astigmatism),
        "ctf_astigmatism_A": round(fit.astigmatism, 1),
        "true_astigmatism_angle_deg": float(sim.truth.ctf.astigmatism_angle),
        "ctf_astigmatism_angle_deg": round(fit.astigmatism_angle, 2),
        "ctf_fit_resolution_A": round(fit.fit_resolution, 2),
        "boxnet_picks": len(picks.yx) if picks is not None else None,
        "boxnet_precision": round(pick_score.precision, 3) if pick_score is not None else None,
        "boxnet_recall": round(pick_score.recall, 3) if pick_score is not None else None,
        "particles_exported": n_particles,
        "particles_star": str(folder / PARTICLE_LISTS["all"]) if n_particles else None,
        "aligned_average": str(paths.average),
        "item_xml": str(paths.xml),
        "simulation_s": round(t_sim, 2),
        "session_s": round(t_total, 2),
        "outputs": sorted(p.name for p in out.iterdir() if p.is_file()),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def demo_viewer(out: Path, viewer=None, display_pixel_size: float = 4.0):
    """A napari viewer (new unless given) showing the demo written by :func:`run_demo` into ``out``: the session
    and overview docks attached to the session folder, the latest item's layers (aligned average, local defocus,
    motion tracks), and that movie's truth (particles, true tracks) and Warp-style spectrum."""
    import napari
    import numpy as np
    from qtpy.QtCore import Qt, QTimer

    from ._layers import image_layer, points_layer, tracks_layer
    from ._reader import read_image
    from ._widgets.overview import OverviewWidget
    from ._widgets.session import SessionWidget, item_layers, show_item_layers
    from .core.demo import binned_for_display
    from .core.io.movie import read_volume
    from .core.io.star import read_coordinates

    viewer = viewer or napari.Viewer(title="napari-warp demo")
    summary = json.loads((out / "summary.json").read_text())
    ps = summary["pixel_size_A"]
    for data, meta, _ in read_image(Path(summary["movie"])):
        meta.update(name="latest movie (raw counts)", visible=False)
        viewer.add_image(data, **meta)
    avg, avg_ps = binned_for_display(read_volume(out / "average.mrc")[0][0], ps, display_pixel_size)
    viewer.add_image(**_kw(image_layer(avg, avg_ps, f"uncorrected average, {avg_ps:.3g} Å/px", visible=False)))
    layers = show_item_layers(viewer, item_layers(Path(summary["session_folder"]), Path(summary["movie"])))
    for layer in layers:  # the fitted tracks are drawn below with the true ones
        if layer.name.endswith("×20") and hasattr(layer, "edge_color"):
            viewer.layers.remove(layer)
    picks = read_coordinates(out / "truth_particles.star")
    viewer.add_points(**_kw(points_layer(picks.yx, ps, "true particles", diameter=summary["particle_diameter_A"])))
    tracks = np.load(out / "tracks.npz")
    viewer.add_shapes(**_kw(tracks_layer(tracks["positions"], tracks["truth"], ps, "true motion ×20", 20.0,
                                         edge_color="magenta")))
    viewer.add_shapes(**_kw(tracks_layer(tracks["positions"], tracks["fitted"], ps, "fitted motion ×20", 20.0)))
    spec, _ = read_volume(out / "spectrum.mrc")
    # Placed beside the micrograph at the same displayed size; its axes are spatial frequency, not Å.
    extent = avg.shape[-1] * avg_ps
    data, meta, _ = image_layer(spec[0], extent / spec.shape[-1], "spectrum | true CTF²")
    meta["translate"] = (0.0, extent * 1.05)
    viewer.add_image(data, **meta)

    session = SessionWidget(viewer)
    viewer.window.add_dock_widget(session, name="Session (online processing)", area="right")
    session.input_folder.value = summary["session_folder"]
    overview = OverviewWidget(viewer)
    # the plots run along the acquisition order: wide at the bottom, so the session dock keeps its height
    dock = viewer.window.add_dock_widget(overview, name="Session overview", area="bottom")
    viewer.window._qt_window.resizeDocks([dock], [330], Qt.Orientation.Vertical)  # one full row of plots
    overview.folder_edit.value = summary["session_folder"]
    from qtpy.QtWidgets import QScrollArea

    for area in session.native.findChildren(QScrollArea):  # show the item list, below the settings form
        QTimer.singleShot(300, lambda a=area: a.verticalScrollBar().setValue(a.verticalScrollBar().maximum()))
    if layers:
        viewer.layers.selection.active = layers[0]
    viewer.reset_view()
    QTimer.singleShot(0, viewer.reset_view)  # again once the docks have taken their width from the canvas
    return viewer


def _kw(layer_data) -> dict:
    data, meta, _ = layer_data
    return {"data": data, **meta}


def _add_movie_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("movie reading")
    g.add_argument("--angpix", type=float, help="pixel size in Å (default: from the header)")
    g.add_argument("--gain", type=Path, help="gain reference (MRC/TIFF)")
    g.add_argument("--gain-flip-x", action="store_true")
    g.add_argument("--gain-flip-y", action="store_true")
    g.add_argument("--gain-transpose", action="store_true")
    g.add_argument("--defects", type=Path, help="defect map (image, or text lines 'x y w h')")
    g.add_argument("--eer-group", type=int, help="EER: raw frames per fraction")
    g.add_argument("--eer-upsampling", type=int, default=1, choices=[1, 2, 4])
    g.add_argument("--binning", type=float, default=1.0, help="Fourier-crop binning on load")


def _open(path: Path, args):
    from .core.io.movie import open_movie

    return open_movie(
        path,
        gain=args.gain,
        defects=args.defects,
        gain_flip_x=args.gain_flip_x,
        gain_flip_y=args.gain_flip_y,
        gain_transpose=args.gain_transpose,
        binning=args.binning,
        eer_group=args.eer_group,
        eer_upsampling=args.eer_upsampling,
        pixel_size=args.angpix,
    )


def run_motion(args) -> int:
    """``napari-warp motion``: per movie, fit motion and write averages, halves, XML and RELION STAR files."""
    from .core.errors import NapariWarpError
    from .core.export import CorrectedMicrograph, write_corrected_micrographs_star
    from .core.item import item_paths, run_motion_step
    from .core.motion import MotionSettings

    rows, failed = [], 0
    for i, path in enumerate(args.movies, 1):
        try:
            movie = _open(path, args)
            if movie.pixel_size is None:
                raise NapariWarpError(f"{path}: no pixel size in the header; give --angpix")
            overrides = {k: v for k, v in {"patch_size": args.patch, "bfactor": args.bfactor,
                                           "local_grid": args.local_grid, "skip_first": args.skip_first,
                                           "skip_last": args.skip_last}.items() if v is not None}
            settings = MotionSettings(pixel_size=movie.pixel_size, exposure_per_frame=args.exposure, **overrides)
            result = run_motion_step(movie, settings, args.out, gain_path=args.gain, device=args.device,
                                     progress=_progress(f"[{i}/{len(args.movies)}] {path.name}"[:24]))
        except NapariWarpError as exc:
            failed += 1
            print(f"napari-warp: {exc}", file=sys.stderr)
            continue
        print(f"{path.name}: mean movement in the first third {result['mean_frame_movement']:.2f} Å, "
              f"max local deviation {result['max_local_deviation']:.2f} Å, {result['seconds']:.1f} s "
              f"-> {result['average']}")
        paths = item_paths(args.out, path)
        rows.append(CorrectedMicrograph(
            micrograph=paths.average.resolve(), metadata=paths.motion_star.resolve(), pixel_size=movie.pixel_size,
            original_pixel_size=movie.pixel_size / movie.binning, voltage=movie.voltage or 300.0,
        ))
    if rows:
        write_corrected_micrographs_star(args.out / "corrected_micrographs.star", rows, project_dir=args.out)
    return 1 if failed else 0


def _range(text: str) -> tuple[float, float]:
    try:
        a, b = (float(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW:HIGH, e.g. 20:3.3") from None
    return a, b


def run_ctf(args) -> int:
    """``napari-warp ctf``: per movie (fitted from its frames) or micrograph, fit the local CTF into the item XML."""
    from .core.ctf_fit import CTFSettings
    from .core.errors import NapariWarpError
    from .core.io.movie import read_volume
    from .core.item import item_paths, run_ctf_step

    failed = 0
    for i, path in enumerate(args.inputs, 1):
        try:
            average = item_paths(args.out, path).average
            if args.from_average:
                if not average.exists():
                    raise NapariWarpError(f"{path}: no aligned average at {average}; run 'napari-warp motion' first")
                data, voxel = read_volume(average)
                frames, ps = data, (args.angpix or (voxel[-1] if voxel else None))
            else:
                movie = _open(path, args)
                frames, ps = movie.to_dask(), movie.pixel_size
            if ps is None:
                raise NapariWarpError(f"{path}: no pixel size in the header; give --angpix")
            settings = CTFSettings.from_user_units(
                ps, fit_range=args.range, defocus_range=args.defocus, voltage=args.voltage, cs=args.cs,
                amplitude=args.amplitude, window=args.window, fit_phase=args.phase, grid=args.grid,
            )
            result = run_ctf_step(frames, settings, args.out, path, device=args.device,
                                  progress=_progress(f"[{i}/{len(args.inputs)}] {path.name}"[:24]))
        except (NapariWarpError, ValueError) as exc:
            failed += 1
            print(f"napari-warp: {path}: {exc}" if not str(exc).startswith(str(path)) else f"napari-warp: {exc}",
                  file=sys.stderr)
            continue
        fit = result["fit"]
        phase = f", phase shift {fit.phase_shift:.1f}°" if args.phase else ""
        local = fit.defocus_map((16, 16)) / 1e4
        print(f"{path.name}: defocus {fit.defocus / 1e4:.4f} µm (local {local.min():.4f}–{local.max():.4f}), "
              f"astigmatism {fit.astigmatism:.0f} Å at "
              f"{fit.angle:.1f}°{phase}, fit resolution {fit.fit_resolution:.2f} Å, {result['seconds']:.1f} s "
              f"-> {result['xml']}")
    return 1 if failed else 0


def _session_settings(args):
    """The folder's settings (or defaults), with the command line's options and ``--set`` applied and saved."""
    from dataclasses import replace

    from .core.session import (
        SessionSettings,
        apply_overrides,
        load_settings,
        save_settings,
    )

    out = args.out or args.folder
    settings = load_settings(out) or SessionSettings(input=str(args.folder))
    settings = replace(settings, input=str(args.folder))
    sets = list(args.set or [])
    for flag, key in (("angpix", "movie.pixel_size"), ("exposure", "movie.exposure"), ("gain", "movie.gain")):
        value = getattr(args, flag, None)
        if value is not None:
            sets.insert(0, f"{key}={Path(value).resolve() if flag == 'gain' else value}")
    if getattr(args, "pattern", None):
        sets.insert(0, f"session.pattern={args.pattern}")
    if getattr(args, "recursive", False):
        sets.insert(0, "session.recursive=true")
    settings = apply_overrides(settings, sets)
    if sets or not (Path(out) / "napari-warp.settings.toml").exists():
        Path(out).mkdir(parents=True, exist_ok=True)
        save_settings(out, settings)
    return settings, Path(out)


def _client(address: str | None):
    if not address:
        return None
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise SystemExit("napari-warp: --dask needs dask.distributed (pip install 'napari-warp[dask]')") from None
    if address == "local":
        return Client(LocalCluster(n_workers=1, threads_per_worker=1, processes=True))
    return Client(address)


def run_process(args) -> int:
    """``napari-warp process``: the online session over a folder (``--once`` or ``--watch``)."""
    from .core.errors import NapariWarpError
    from .core.session import Session

    try:
        settings, out = _session_settings(args)
    except (ValueError, NapariWarpError) as exc:
        print(f"napari-warp: {exc}", file=sys.stderr)
        return 2
    if not Path(args.folder).is_dir():
        print(f"napari-warp: {args.folder} is not a folder", file=sys.stderr)
        return 2

    def item(rec):
        if rec["status"] == "failed":
            print(f"\r{rec['name']}: FAILED: {rec['error']}", file=sys.stderr, flush=True)
        else:
            m = rec["metrics"]
            bits = [f"motion {m['motion']:.2f} Å" if m.get("motion") is not None else None,
                    f"defocus {m['defocus']:.3f} µm" if m.get("defocus") is not None else None,
                    f"fit to {m['fit_resolution']:.2f} Å" if m.get("fit_resolution") else None,
                    f"{m['particles']:.0f} particles" if m.get("particles") is not None else None,
                    _exported(rec) if "export" in rec["steps"] else None]
            print(f"\r{rec['name']}: {', '.join(b for b in bits if b)}", flush=True)

    def progress(stats, done, total):
        lat = stats.latency()
        line = (f"{done}/{total} items · {stats.done} done, {stats.failed} failed this run · "
                f"{stats.rate_per_hour():.0f}/h" + (f" · latency {lat:.1f} s" if lat is not None else ""))
        print(f"\r{line:<90}", end="" if args.watch else "\n", file=sys.stderr, flush=True)

    client = _client(args.dask)
    session = Session(settings, out, client=client, settle=args.settle, device=args.device, on_item=item,
                      on_progress=progress)
    try:
        stats = session.run(once=not args.watch)
    except KeyboardInterrupt:
        stats = session.stats
        print("\nstopped", file=sys.stderr)
    finally:
        if client is not None:
            client.close()
    print(f"\n{stats.done} item(s) processed, {stats.failed} failed in this run; settings in "
          f"{out / 'napari-warp.settings.toml'}", file=sys.stderr)
    if session.settings.extract:
        print(_lists_line(out), file=sys.stderr)
    return 0


def _exported(rec: dict) -> str:
    """What an item's export step did, for the per-item lines."""
    if not rec["steps"].get("export", {}).get("completed"):
        return "not exported yet"
    n = int(rec["metrics"].get("exported") or 0)
    return f"{n} particles exported" if n else "no picks: nothing exported"


def _lists_line(folder: Path) -> str:
    """The session-wide particle STAR files that exist now, with their particle counts."""
    from .core.io.star import read_star
    from .core.session import PARTICLE_LISTS

    bits = []
    for name in PARTICLE_LISTS.values():
        path = Path(folder) / name
        if path.exists():
            bits.append(f"{path} ({len(read_star(path)['particles'])} particles)")
        else:
            bits.append(f"{name}: none (no item with particles)")
    return "particle lists: " + "; ".join(bits)


def run_status(args) -> int:
    """``napari-warp status``: per item its status, error, key metrics and per-step records."""
    from .core.errors import NapariWarpError
    from .core.session import SessionSettings, load_settings, session_records

    out = args.out or args.folder
    try:
        settings = load_settings(out) or SessionSettings(input=str(args.folder))
    except NapariWarpError as exc:
        print(f"napari-warp: {exc}", file=sys.stderr)
        return 2
    from dataclasses import replace

    settings = replace(settings, input=str(args.folder))
    records = session_records(settings, out)
    if args.json:
        print(json.dumps(records, indent=1))
        return 0
    counts: dict[str, int] = {}
    for r in records:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
        m = r["metrics"]
        what = r["error"] or "; ".join(r.get("filter_reasons") or []) or (
            f"defocus {m['defocus']:.3f} µm, fit to {m['fit_resolution']:.2f} Å" if m.get("defocus") is not None
            else "") + (f", {m['particles']:.0f} particles" if m.get("particles") is not None else "")
        if "export" in r["steps"] and r["status"] != "failed":
            what += ("; " if what else "") + _exported(r)
        print(f"{r['name']:<32} {r['status']:<12} {what}")
    print(", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no items")
    if settings.extract:
        print(_lists_line(out))
    return 0


def run_export(args) -> int:
    """``napari-warp export``: only the particle export step over an already processed session (outdated items)."""
    from dataclasses import replace

    from .core.errors import NapariWarpError
    from .core.session import export_session

    for flag, key in (("box", "export.box_size"), ("pixel_size", "export.pixel_size"),
                      ("diameter", "export.diameter")):
        if getattr(args, flag) is not None:
            args.set = [f"{key}={getattr(args, flag)}", *(args.set or [])]
    switches = {"no_invert": "export.invert=false", "no_normalize": "export.normalize=false",
                "halves": "export.halves=true", "phase_flip": "export.phase_flip=true"}
    # the session exports from now on (process too), unless --set session.extract=false says otherwise
    args.set = ["session.extract=true", *(v for k, v in switches.items() if getattr(args, k)), *(args.set or [])]
    try:
        if not Path(args.folder).is_dir():
            raise NapariWarpError(f"{args.folder} is not a folder")
        settings, out = _session_settings(args)
    except (ValueError, NapariWarpError) as exc:
        print(f"napari-warp: {exc}", file=sys.stderr)
        return 2
    e = settings.export
    print(f"exporting {args.items} items of {out}: box {e.box_size} px, "
          f"{f'{e.pixel_size:g} Å/px' if e.pixel_size else 'micrograph pixel size'}, "
          f"diameter {f'{e.diameter:g} Å' if e.diameter else 'auto'}, invert {e.invert}, normalize {e.normalize}, "
          f"halves {e.halves}, phase flip {e.phase_flip}", file=sys.stderr)

    def item(rec):
        state = rec["error"] if rec["status"] == "failed" else _exported(rec)
        print(f"\r{rec['name']}: {state}", file=sys.stderr, flush=True)

    try:
        summary = export_session(replace(settings, input=str(args.folder)), out, items=args.items,
                                 device=args.device, progress=_progress("exporting particles"), on_item=item)
    except KeyboardInterrupt:
        print("\nstopped", file=sys.stderr)
        return 1
    for row in summary["items"]:
        print(f"{row['name']:<32} {row['particles']:>7} particles  {row['state']}")
    for row in summary["skipped"]:
        print(f"{row['name']:<32} {'':>7} skipped    {row['reason']}")
    print(f"{summary['total']} particles in {sum(r['particles'] > 0 for r in summary['items'])} item(s); "
          f"{summary['exported']} item(s) exported in this run")
    print(_lists_line(out))
    return 1 if any(r["state"].startswith("failed") for r in summary["items"]) else 0


def run_import_picks(args) -> int:
    """``napari-warp import-picks``: other tools' picks into a session's items (then, with ``--export``, the export
    step as ``napari-warp export`` runs it)."""
    from dataclasses import replace

    from .core.errors import NapariWarpError
    from .core.session import SessionSettings, import_session_picks, load_settings

    out = args.out or args.folder
    try:
        if not Path(args.folder).is_dir():
            raise NapariWarpError(f"{args.folder} is not a folder")
        settings = replace(load_settings(out) or SessionSettings(), input=str(args.folder))
        summary = import_session_picks(out, args.files, settings, pixel_size=args.pixel_size,
                                       diameter=args.diameter, replace=not args.append)
    except (OSError, ValueError, NapariWarpError) as exc:  # unreadable or missing files, nothing matching
        print(f"napari-warp: {exc}", file=sys.stderr)
        return 2
    for file, how in summary.sampling.items():
        print(f"{file}: coordinates read as {how}")
    for row in summary.items:
        warn = f"  ({row['outside']} outside the micrograph: check --pixel-size)" if row["outside"] else ""
        print(f"{row['name']:<32} {row['picks']:>7} picks  from {', '.join(Path(f).name for f in row['files'])}{warn}")
    for file, names in summary.unmatched.items():
        print(f"{file}: {len(names)} micrograph(s) match no item: {', '.join(names)}")
    if summary.untouched:
        print(f"no picks in the files for {len(summary.untouched)} item(s) (left as they were): "
              f"{', '.join(summary.untouched)}")
    print(f"{summary.total} picks imported into {len(summary.items)} item(s)")
    if not args.export:
        return 0
    export = argparse.Namespace(folder=args.folder, out=args.out, box=None, pixel_size=None, diameter=None,
                                no_invert=False, no_normalize=False, halves=False, phase_flip=False, items="all",
                                set=None, device=args.device)
    return run_export(export)


def run_boxnet_train(args) -> int:
    """Train a BoxNet from simulated micrographs and/or CryoPPP sets (the generic model), or retrain one."""
    import platform

    from .core.picking import PickingModel, load_model, save_model
    from .core.picking.data import cryoppp_example, cryoppp_items, simulated_examples
    from .core.picking.model import BoxNet
    from .core.picking.train import TrainingSettings, train

    data_dir = args.data if args.data is not None else _shared_data()
    examples = []
    if args.simulated:
        examples += simulated_examples(args.simulated, data_dir, seed=args.seed, cache=args.cache,
                                       progress=_progress("simulating micrographs"))
    if args.cryoppp:
        items = cryoppp_items(args.cryoppp, sets=tuple(args.sets.split(",")), splits=("train",))
        examples += [cryoppp_example(it) for it in items]
    if not examples:
        print("napari-warp boxnet train: no training data (use --simulated N and/or --cryoppp DIR)", file=sys.stderr)
        return 2
    base = load_model(args.init) if args.init else PickingModel(BoxNet(width=args.width))
    settings = TrainingSettings(epochs=args.epochs, batch_size=args.batch, window=args.window,
                                learning_rate=args.lr, patience=args.patience, seed=args.seed, eval_windows=64)
    record = {"simulated": args.simulated, "simulated_seed": args.seed,
              "cryoppp_sets": args.sets if args.cryoppp else "", "examples": len(examples),
              "init": str(args.init or "random"), "epochs": args.epochs, "window": args.window,
              "batch": args.batch, "lr": args.lr, "command": " ".join(sys.argv[1:]),
              "machine": platform.platform()}

    def checkpoint(history, net):
        model = PickingModel(net=net, name=args.name, version=args.version,
                             trained_on={**record, "history": history.as_dict()})
        save_model(model, args.out)
        print(f"\repoch {history.epoch[-1]}: loss {history.loss[-1]:.4f}, particle F1 {history.new_on_new[-1]:.3f}"
              f" ({history.seconds:.0f} s) -> {args.out}", file=sys.stderr, flush=True)

    model, history = train(base, examples, None, settings, device=args.device,
                           progress=_progress("training"), on_epoch=checkpoint)
    model.name, model.version = args.name, args.version
    model.trained_on = {**record, "history": history.as_dict()}
    save_model(model, args.out)
    print(f"{model.label}: best epoch {history.best_epoch}, particle F1 {max(history.new_on_new):.3f}, "
          f"{history.seconds / 60:.1f} min -> {args.out}")
    return 0


def _shared_data() -> Path | None:
    import os

    for p in (os.environ.get("NAPARI_WARP_TEST_DATA"), Path.cwd().parent / "shared" / "data"):
        if p and Path(p).is_dir():
            return Path(p)
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="napari-warp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="simulate a movie with ground truth, process it and show it in napari")
    demo.add_argument("--headless", action="store_true", help="write the results, open no window")
    demo.add_argument("--out", type=Path, default=Path("napari-warp-demo"), help="output folder")
    demo.add_argument("--size", type=int, default=1024, help="frame size in pixels (square)")
    demo.add_argument("--frames", type=int, default=16, help="number of frames")
    demo.add_argument("--seed", type=int, default=0)

    motion = sub.add_parser("motion", help="motion-correct movies: dose-weighted averages, halves, XML, RELION STAR")
    motion.add_argument("movies", type=Path, nargs="+", help="movie files (MRC/MRCS, TIFF, EER, EM)")
    motion.add_argument("--exposure", type=float, required=True, help="dose per frame in e/Å²")
    motion.add_argument("--out", type=Path, required=True, help="processing folder")
    motion.add_argument("--patch", type=int, help="patch size in pixels (default 512)")
    motion.add_argument("--bfactor", type=float, help="B-factor for the fit in Å² (default -500)")
    motion.add_argument("--local-grid", type=lambda s: tuple(int(v) for v in s.lower().split("x"))[::-1],
                        help="local motion grid XxY, e.g. 5x5 (default: scaled to the field of view)")
    motion.add_argument("--skip-first", type=int, help="frames to leave out at the start")
    motion.add_argument("--skip-last", type=int, help="frames to leave out at the end")
    motion.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: CUDA when present)")
    _add_movie_options(motion)

    ctf = sub.add_parser("ctf", help="fit the CTF with local defocus (movies from their frames, or micrographs)")
    ctf.add_argument("inputs", type=Path, nargs="+", help="movies or micrographs (MRC/MRCS, TIFF, EER, EM)")
    ctf.add_argument("--out", type=Path, required=True, help="processing folder (item XMLs)")
    ctf.add_argument("--from-average", action="store_true",
                     help="fit the aligned average that 'napari-warp motion' wrote into --out")
    ctf.add_argument("--voltage", type=float, default=300.0, help="kV (default 300)")
    ctf.add_argument("--cs", type=float, default=2.7, help="spherical aberration in mm (default 2.7)")
    ctf.add_argument("--amplitude", type=float, default=0.07, help="amplitude contrast (default 0.07)")
    ctf.add_argument("--window", type=int, default=512, help="spectrum/patch size in px (default 512)")
    ctf.add_argument("--range", type=_range, default=None,
                     help="fit range LOW:HIGH in Å (default 0.1–0.6 of Nyquist, e.g. 20:3.3 at 1 Å/px)")
    ctf.add_argument("--defocus", type=_range, default=(0.3, 5.0), help="defocus search range in µm (default 0.3:5)")
    ctf.add_argument("--grid", type=lambda s: tuple(int(v) for v in s.lower().split("x"))[::-1], default=(5, 5),
                     help="local defocus grid XxY (default 5x5; 2x2 = plane, 1x1 = global)")
    ctf.add_argument("--phase", action="store_true", help="fit a phase shift (Volta phase plate)")
    ctf.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: CUDA when present)")
    _add_movie_options(ctf)

    proc = sub.add_parser("process", help="online session: process a folder's movies as they arrive")
    proc.add_argument("folder", type=Path, help="folder the microscope writes movies into")
    mode = proc.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="process what is ready and exit (default)")
    mode.add_argument("--watch", action="store_true", help="keep processing as files arrive (Ctrl+C stops)")
    proc.add_argument("--out", type=Path, help="processing folder (default: the folder itself, as Warp)")
    proc.add_argument("--angpix", type=float, help="pixel size in Å (default: from the headers)")
    proc.add_argument("--exposure", type=float, help="dose per frame in e/Å²")
    proc.add_argument("--gain", type=Path, help="gain reference")
    proc.add_argument("--pattern", help="file patterns, e.g. '*.tif *.eer'")
    proc.add_argument("--recursive", action="store_true", help="also look in sub-folders")
    proc.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                      help="change a setting and keep it in the settings file, e.g. --set ctf.window=384")
    proc.add_argument("--dask", metavar="ADDRESS", help="a dask scheduler address, or 'local' for a LocalCluster")
    proc.add_argument("--settle", type=float, default=1.0, help="seconds a file must stay unchanged (default 1)")
    proc.add_argument("--device", help="torch device (default: CUDA when present)")

    export = sub.add_parser("export", help="extract particles (picks) from the movies of a processed session",
                            description="Extract each item's picks from its movie with its motion model and local "
                            "CTF into particles/<name>.mrcs, and write particles_all.star and particles_good.star "
                            "(RELION 3.1) into the processing folder. Only items whose export is outdated are "
                            "exported. The options are saved to the session's [export] settings (those not given keep "
                            "the saved values; defaults below are a new session's), and the session exports new items "
                            "from now on (session.extract = true).")
    export.add_argument("folder", type=Path, help="the session's input folder")
    export.add_argument("--out", type=Path, help="processing folder (default: the folder itself)")
    export.add_argument("--box", type=int, help="box size in px of the output (even; default 128)")
    export.add_argument("--pixel-size", type=float, help="output pixel size in Å/px (default: the micrograph's)")
    export.add_argument("--diameter", type=float, help="particle diameter in Å; the background for normalisation "
                        "lies outside it (default: 75 %% of the box)")
    export.add_argument("--no-invert", action="store_true", help="keep the contrast (default: protein white)")
    export.add_argument("--no-normalize", action="store_true", help="no background normalisation")
    export.add_argument("--halves", action="store_true", help="also odd/even-frame stacks (particles/odd, even)")
    export.add_argument("--phase-flip", action="store_true", help="phase-flip with each particle's local CTF")
    export.add_argument("--items", choices=("all", "good"), default="all",
                        help="all processed items, or only those passing the filters and not excluded (default all)")
    export.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE",
                        help="change a setting and keep it in the settings file, e.g. --set export.halves=true")
    export.add_argument("--device", help="torch device (default: CUDA when present)")

    imp = sub.add_parser("import-picks", help="import particle picks of RELION, cryoSPARC, EMAN, crYOLO or Topaz into "
                         "a session's items", description="Import other tools' particle picks into a session's items "
                         "(picks/<name>.star), matched by micrograph name, so they are exported with the items' "
                         "motion and local CTF (napari-warp export, or --export). Coordinates become pixels of each "
                         "item's aligned average. BoxNet does not pick imported items again (session.pick on) until "
                         "their picks file is deleted.")
    imp.add_argument("folder", type=Path, help="the session's input folder")
    imp.add_argument("files", type=Path, nargs="+", metavar="FILE",
                     help="pick files: RELION .star (3.0, 3.1 with optics, 5 centred Å), cryoSPARC .cs, EMAN .box, "
                     "crYOLO .cbox, Topaz text")
    imp.add_argument("--out", type=Path, help="processing folder (default: the folder itself)")
    imp.add_argument("--pixel-size", type=float, metavar="Å",
                     help="pixel size in Å/px of the micrographs the pixel coordinates refer to, for files that "
                     "do not state it (EMAN, crYOLO, Topaz, RELION 3.0; default: each item's). A RELION optics "
                     "table's rlnMicrographPixelSize, cryoSPARC's fractional coordinates and RELION 5's Å are used "
                     "as they are")
    imp.add_argument("--diameter", type=float, metavar="Å", help="particle diameter in Å recorded with the picks "
                     "(default: the earlier picks file's, else the session's picking.diameter)")
    imp.add_argument("--append", action="store_true", help="add to the items' picks instead of replacing them")
    imp.add_argument("--export", action="store_true", help="then export the particles as 'napari-warp export' does")
    imp.add_argument("--device", help="torch device for --export (default: CUDA when present)")

    status = sub.add_parser("status", help="per item: status, error, metrics and step records")
    status.add_argument("folder", type=Path)
    status.add_argument("--out", type=Path, help="processing folder (default: the folder itself)")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    boxnet = sub.add_parser("boxnet", help="BoxNet particle picking: train a model")
    bsub = boxnet.add_subparsers(dest="boxnet_command", required=True)
    bt = bsub.add_parser("train", help="train (or retrain) a BoxNet model, with checkpoints after every epoch")
    bt.add_argument("--out", type=Path, required=True, help="model file to write (.pt)")
    bt.add_argument("--simulated", type=int, default=0, help="number of simulated micrographs")
    bt.add_argument("--cryoppp", type=Path, help="CryoPPP folder (<set>/train/{images,labels}/*.png)")
    bt.add_argument("--sets", default="10059,10947", help="CryoPPP sets to train on (default 10059,10947)")
    bt.add_argument("--data", type=Path, help="shared data folder for PDB models and MTFs (default ../shared/data)")
    bt.add_argument("--cache", type=Path, help=".npz cache of the simulated micrographs")
    bt.add_argument("--init", type=Path, help="model to start from (default: a new network)")
    bt.add_argument("--width", type=int, default=8, help="channels of the first layer of a new network (paper: 32)")
    bt.add_argument("--epochs", type=int, default=100)
    bt.add_argument("--batch", type=int, default=8, help="windows per step")
    bt.add_argument("--window", type=int, default=128, help="training window in px at 8 Å/px")
    bt.add_argument("--lr", type=float, default=2e-3, help="initial learning rate (cosine decay to 1 %%)")
    bt.add_argument("--patience", type=int, default=0, help="stop after this many epochs without improvement")
    bt.add_argument("--name", default="boxnet-generic")
    bt.add_argument("--version", default="1")
    bt.add_argument("--seed", type=int, default=0)
    bt.add_argument("--device", help="torch device (default: CUDA when present)")
    args = parser.parse_args(argv)

    if args.command == "boxnet":
        return run_boxnet_train(args)
    if args.command == "process":
        return run_process(args)
    if args.command == "status":
        return run_status(args)
    if args.command == "export":
        return run_export(args)
    if args.command == "import-picks":
        return run_import_picks(args)
    if args.command == "motion":
        return run_motion(args)
    if args.command == "ctf":
        return run_ctf(args)

    if args.command == "demo":
        from .core.errors import NapariWarpError

        try:
            summary = run_demo(args.out, size=args.size, frames=args.frames, seed=args.seed)
        except NapariWarpError as exc:
            print(f"napari-warp: {exc}", file=sys.stderr)
            return 1
        for key, value in summary.items():
            print(f"{key:>22}: {value}")
        print(f"results in {args.out.resolve()}")
        if not args.headless:
            import napari

            demo_viewer(args.out)
            napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
