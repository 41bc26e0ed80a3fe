"""One item (movie) in a processing folder: Warp's file layout, and the processing steps that write into it.

Layout (as Warp writes it, so Warp users find their files)::

    <folder>/<name>.xml                 item metadata: settings used + results per step (Warp XML)
    <folder>/average/<name>.mrc          aligned, dose-weighted average
    <folder>/average/odd/<name>.mrc      odd-frame half average   (even: average/even/)
    <folder>/motion/<name>.star          RELION 3.1 motion STAR (for Bayesian polishing)
    <folder>/powerspectrum/<name>.mrc    mean patch power spectrum of the CTF fit (rfft half, DC at [0, 0])
    <folder>/picks/<name>.star           BoxNet or imported picks (rlnCoordinateX/Y px of the average, figure of
                                         merit, model or source)
    <folder>/mask/<name>.tif             BoxNet artifact mask (uint8, 1 = artifact) at the average's sampling
    <folder>/particles/<name>.mrcs       exported particles (dose-weighted, from the movie; odd/, even/ halves)
    <folder>/particles/<name>.star       their RELION 3.1 particle STAR (optics, CTF per particle)

Every file is written atomically; the XML is written last, so an item whose XML names a result has that result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io.movie import Movie
from .io.mrc_write import write_mrc
from .io.warp_xml import WarpMetadata, format_value, read_warp_xml

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class ItemPaths:
    """Where an item's files live in a processing folder."""

    folder: Path
    name: str

    @property
    def xml(self) -> Path:
        return self.folder / f"{self.name}.xml"

    @property
    def average(self) -> Path:
        return self.folder / "average" / f"{self.name}.mrc"

    @property
    def odd(self) -> Path:
        return self.folder / "average" / "odd" / f"{self.name}.mrc"

    @property
    def even(self) -> Path:
        return self.folder / "average" / "even" / f"{self.name}.mrc"

    @property
    def motion_star(self) -> Path:
        return self.folder / "motion" / f"{self.name}.star"

    @property
    def power_spectrum(self) -> Path:
        return self.folder / "powerspectrum" / f"{self.name}.mrc"

    @property
    def aligned_stack(self) -> Path:
        return self.folder / "aligned" / f"{self.name}.mrcs"

    @property
    def picks(self) -> Path:
        return self.folder / "picks" / f"{self.name}.star"

    @property
    def mask(self) -> Path:
        return self.folder / "mask" / f"{self.name}.tif"

    @property
    def particles(self) -> Path:
        return self.folder / "particles" / f"{self.name}.mrcs"

    @property
    def particles_star(self) -> Path:
        return self.folder / "particles" / f"{self.name}.star"

    def particle_halves(self) -> tuple[Path, Path]:
        """(odd, even) half stacks, where ``particles.write_particle_stack`` puts them."""
        return (self.particles.parent / "odd" / self.particles.name,
                self.particles.parent / "even" / self.particles.name)


def item_paths(folder: str | Path, movie_path: str | Path) -> ItemPaths:
    """The paths of the item for ``movie_path`` in ``folder`` (named after the movie file's stem, as Warp does)."""
    return ItemPaths(Path(folder), Path(movie_path).stem)


def load_metadata(paths: ItemPaths, movie_path: str | Path) -> WarpMetadata:
    """The item's XML if it exists (so other steps' results survive), else a new ``<Movie>``."""
    if paths.xml.exists():
        return read_warp_xml(paths.xml, kinds=("Movie",))
    return WarpMetadata.new("Movie", {"DataDirectory": str(Path(movie_path).parent.resolve())})


def settings_params(settings) -> dict[str, str]:
    """A frozen settings dataclass as Warp-style ``<Param Name= Value=>`` strings (the record of what was used)."""
    out = {}
    for field in dataclasses.fields(settings):
        value = getattr(settings, field.name)
        if isinstance(value, (tuple, list)):
            out[field.name] = ",".join(format_value(v) for v in value)
        elif value is None:
            out[field.name] = "null"
        else:
            out[field.name] = format_value(value)
    return out


def run_motion_step(
    movie: Movie,
    settings,
    folder: str | Path,
    *,
    stack: bool = False,
    gain_path: str | Path | None = None,
    frames=None,
    device=None,
    progress: Progress | None = None,
) -> dict:
    """Fit motion for ``movie``, write the dose-weighted average, odd/even halves, RELION motion STAR and the
    item XML (settings in ``<OptionsMovement>``, grids and metrics on ``<Movie>``). Returns the metrics, paths,
    the model and the averages (``aligned``).

    ``progress(done, total)`` covers the fit and the averaging; raising ``Cancelled`` from it stops the step
    before anything is written.
    """
    from .export import write_motion_star
    from .motion import correct_movie, motion_metrics, motion_to_xml

    paths = item_paths(folder, movie.path)
    t0 = time.perf_counter()
    # frames: the movie already decoded (a session prefetches the next movie while this one is computed)
    model, result = correct_movie(movie if frames is None else frames, settings, device=device, progress=progress,
                                  halves=True, stack=stack)
    t_compute = time.perf_counter() - t0

    ps = model.pixel_size
    write_mrc(paths.average, np.asarray(result.average, np.float32), pixel_size=ps, voltage=movie.voltage)
    write_mrc(paths.odd, np.asarray(result.odd, np.float32), pixel_size=ps, voltage=movie.voltage)
    write_mrc(paths.even, np.asarray(result.even, np.float32), pixel_size=ps, voltage=movie.voltage)
    if stack and result.stack is not None:
        write_mrc(paths.aligned_stack, np.asarray(result.stack, np.float32), pixel_size=ps, voltage=movie.voltage)
    relion = write_motion_star(
        paths.motion_star,
        model,
        Path(movie.path).resolve(),
        gain_path=Path(gain_path).resolve() if gain_path else None,
        binning=movie.binning,
        original_pixel_size=ps / movie.binning,
        movie_shape=movie.stored_shape,
        dose_per_frame=settings.exposure_per_frame,
        pre_exposure=settings.pre_exposure,
        voltage=movie.voltage or 300.0,
        project_dir=paths.folder,
    )

    metrics = motion_metrics(model)
    meta = load_metadata(paths, movie.path)
    meta.set_params("OptionsMovement", settings_params(settings))
    motion_to_xml(meta, model)
    meta.set_attr("MotionProcessedAt", time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta.write(paths.xml)  # last: an XML that names results means the results exist
    return {
        **metrics,
        "relion_polynomial_rms_px": float(relion.fit_rms) if relion.fit_rms is not None else 0.0,
        "seconds": round(time.perf_counter() - t0, 2),
        "compute_seconds": round(t_compute, 2),
        "average": str(paths.average),
        "xml": str(paths.xml),
        "motion_star": str(paths.motion_star),
        "model": model,
        "aligned": result,  # the AlignedAverage arrays, so callers need not read the files back
    }


def run_ctf_step(
    frames,
    settings,
    folder: str | Path,
    movie_path: str | Path,
    *,
    device=None,
    progress: Progress | None = None,
) -> dict:
    """Fit the CTF of ``frames`` (the movie's ``(F, Y, X)`` frames, or its aligned average as ``(Y, X)``) and store
    it in the item of ``movie_path``: settings in ``<OptionsCTF>``, the model and 1D spectra via ``ctf_to_xml``,
    the 2D spectrum in ``powerspectrum/``. Returns the fit (``"fit"``), its key numbers and the paths.
    """
    from .ctf_fit import ctf_to_xml, fit_ctf

    paths = item_paths(folder, movie_path)
    t0 = time.perf_counter()
    fit = fit_ctf(frames, settings, device=device, progress=progress)
    if fit.spectrum_2d is not None:
        write_mrc(paths.power_spectrum, fit.spectrum_2d, pixel_size=settings.pixel_size)
    meta = load_metadata(paths, movie_path)
    meta.set_params("OptionsCTF", settings_params(settings))
    ctf_to_xml(meta, fit)
    meta.set_attr("CTFProcessedAt", time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta.write(paths.xml)
    return {
        "defocus": fit.defocus,
        "astigmatism": fit.astigmatism,
        "astigmatism_angle": fit.astigmatism_angle,
        "phase_shift": fit.phase_shift,
        "fit_resolution": fit.fit_resolution,
        "seconds": round(time.perf_counter() - t0, 2),
        "xml": str(paths.xml),
        "power_spectrum": str(paths.power_spectrum),
        "fit": fit,
    }


def load_ctf(folder: str | Path, movie_path: str | Path):
    """The CTF fit stored in an item (with its 2D spectrum when the file exists), or None if it has none."""
    from .ctf_fit import ctf_from_xml
    from .io.mrc import read_mrc_volume

    paths = item_paths(folder, movie_path)
    if not paths.xml.exists():
        return None
    meta = read_warp_xml(paths.xml, kinds=("Movie",))
    if not meta.has("CTF") or not meta.has("PS1D"):
        return None
    spectrum = read_mrc_volume(paths.power_spectrum)[0][0] if paths.power_spectrum.exists() else None
    return ctf_from_xml(meta, spectrum_2d=spectrum)


def run_picking_step(
    average,
    settings,
    folder: str | Path,
    movie_path: str | Path,
    *,
    model=None,
    device=None,
    progress: Progress | None = None,
) -> dict:
    """Pick particles in the aligned ``average`` ``(Y, X)`` with BoxNet (``settings``: ``BoxNetSettings`` at the
    average's pixel size; ``model``: a loaded ``PickingModel``, else ``settings.model`` or the generic one). Writes
    the picks STAR and the artifact mask, then the item XML (``<OptionsBoxNet>``, ``BoxNetModel``,
    ``ParticleCount``). Returns the ``Picks`` (``"picks"``), the count and the paths."""
    import tifffile

    from .io.atomic import atomic_path
    from .picking import load_model, pick
    from .picking.io import write_picks_star

    paths = item_paths(folder, movie_path)
    t0 = time.perf_counter()
    if model is None:
        model = load_model(settings.model or None, device=device)
    picks = pick(average, settings, model=model, device=device, progress=progress)
    write_picks_star(paths.picks, picks.yx, picks.score, micrograph_name=paths.average.name, model=picks.model,
                     diameter=settings.diameter, threshold=settings.threshold)
    paths.mask.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(paths.mask) as tmp:
        tifffile.imwrite(tmp, picks.mask.astype(np.uint8), compression="zlib")
    meta = load_metadata(paths, movie_path)
    meta.set_params("OptionsBoxNet", settings_params(settings))
    meta.set_attr("BoxNetModel", picks.model)
    meta.set_attr("PickingSource", "boxnet")  # BoxNet's picks replace imported ones (see save_item_picks)
    meta.set_attr("PickingImportedFrom", "")
    meta.set_attr("ParticleCount", len(picks))
    meta.set_attr("PickingProcessedAt", time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta.write(paths.xml)
    return {"particles": len(picks), "model": picks.model, "seconds": round(time.perf_counter() - t0, 2),
            "picks_star": str(paths.picks), "mask": str(paths.mask), "xml": str(paths.xml), "picks": picks}


def save_item_picks(folder: str | Path, movie_path: str | Path, yx, score=None, *, source: str | None = None,
                    diameter: float | None = None) -> Path:
    """Replace the item's picks (e.g. edited by hand in napari) with ``yx`` ``(N, 2)`` px of the average: the picks
    STAR keeps the earlier file's model, diameter and threshold record, and the XML's ``ParticleCount`` follows (so
    the particle-count filter sees the edit). The file's new content makes the item's export step outdated.

    source: for picks imported from another tool, where they come from (``"imported from <file> (<tool>)"``): it is
    recorded in the picks STAR in place of the picking model, and the XML marks the item's picks as imported
    (``PickingSource="imported"``, ``PickingImportedFrom``), so a session's BoxNet step keeps them rather than picking
    the item again (until the picks file is deleted). diameter: the particle diameter (Å) to record (default: the
    earlier file's)."""
    from .picking.io import read_picks_star, write_picks_star

    paths = item_paths(folder, movie_path)
    info = read_picks_star(paths.picks).info if paths.picks.exists() else {}
    record = {"model": info.get("model"), "threshold": info.get("threshold")} if source is None else {"model": source}
    yx = np.asarray(yx, dtype=np.float64).reshape(-1, 2)
    write_picks_star(paths.picks, yx, score, micrograph_name=info.get("micrograph_name") or paths.average.name,
                     diameter=info.get("diameter") if diameter is None else diameter, **record)
    if paths.xml.exists() or source is not None:  # imported before processing: the XML carries the mark
        meta = load_metadata(paths, movie_path)
        meta.set_attr("ParticleCount", len(yx))
        if source is not None:
            _mark_imported(meta, source)
        meta.write(paths.xml)
    return paths.picks


def _mark_imported(meta: WarpMetadata, source: str) -> None:
    meta.set_attr("PickingSource", "imported")
    meta.set_attr("PickingImportedFrom", source.removeprefix("imported from "))
    meta.set_attr("BoxNetModel", "")  # no longer describes the picks
    meta.set_attr("PickingProcessedAt", time.strftime("%Y-%m-%dT%H:%M:%S"))


def picks_imported(folder: str | Path, movie_path: str | Path, meta: WarpMetadata | None = None) -> bool:
    """Whether the item's picks were imported from another tool (``save_item_picks(source=...)``) and are still
    there: a session's BoxNet step then counts as done for the item, whatever its settings."""
    paths = item_paths(folder, movie_path)
    if meta is None:
        if not paths.xml.exists():
            return False
        meta = read_warp_xml(paths.xml, kinds=("Movie",))
    return meta.get_attr("PickingSource") == "imported" and paths.picks.exists()


def load_motion(meta: WarpMetadata, n_frames: int, shape, pixel_size: float):
    """The item's motion model from its XML, for a movie of ``n_frames`` frames of ``shape`` ``(Y, X)`` px, with the
    frames it averaged (``skip_first``/``skip_last`` of its ``<OptionsMovement>``)."""
    from .motion import motion_from_xml

    if not meta.has("GridMovementX"):
        raise ValueError(f"{meta.path or 'item XML'}: no motion model (run the motion step first)")
    opts = meta.get_params("OptionsMovement") if meta.has("OptionsMovement") else {}
    skip = [int(float(opts.get(k, 0) or 0)) for k in ("skip_first", "skip_last")]
    return motion_from_xml(meta, shape, pixel_size, n_frames=n_frames, skip_first=skip[0], skip_last=skip[1])


def _remove(*paths: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def run_export_step(
    frames,
    settings,
    folder: str | Path,
    movie_path: str | Path,
    *,
    motion_settings,
    pixel_size: float | None = None,
    device=None,
    progress: Progress | None = None,
) -> dict:
    """Extract the item's picks (``picks/<name>.star``) from ``frames`` (its movie: an ``io.movie.Movie``, read in
    chunks, or the decoded ``(F, Y, X)`` frames) with its motion model and local CTF (``particles.ExportSettings``
    ``settings``; ``motion_settings``: the dose the average was made with). Writes ``particles/<name>.mrcs`` (+ the
    odd/even halves when asked) and its particle STAR, then the XML (``<OptionsExport>``, ``ExportedParticles``).
    Without picks nothing is extracted (0 particles; earlier stacks are removed so no stale particles remain).
    Returns the count, the ``ParticleStack`` (``"stack"``, None without picks) and the paths."""
    from .ctf_fit import ctf_from_xml
    from .motion import _frames_shape
    from .particles import extract_particles, write_particle_stack, write_particle_star
    from .picking.io import read_picks_star

    paths = item_paths(folder, movie_path)
    t0 = time.perf_counter()
    meta = load_metadata(paths, movie_path)
    ps = float(pixel_size or meta.get_float("PixelSize", None) or motion_settings.pixel_size)
    picks = read_picks_star(paths.picks) if paths.picks.exists() else None
    stack = None
    if picks is not None and len(picks):
        n_frames, ny, nx = _frames_shape(frames)
        motion = load_motion(meta, n_frames, (ny, nx), ps)
        ctf = ctf_from_xml(meta) if meta.has("CTF") else None
        scores = picks.score if np.isfinite(picks.score).all() else None  # hand-made picks may have none
        stack = extract_particles(frames, picks.yx, motion, ctf, settings, motion_settings=motion_settings,
                                  pixel_size=ps, scores=scores, device=device, progress=progress)
        written = write_particle_stack(paths.particles, stack, paths.average)
        write_particle_star(paths.particles_star, [written])
    else:
        _remove(paths.particles, paths.particles_star)
    if stack is None or stack.odd is None:
        _remove(*paths.particle_halves())
    meta = load_metadata(paths, movie_path)  # again: a manual choice may have been saved meanwhile
    meta.set_params("OptionsExport", settings_params(settings))
    meta.set_attr("ExportedParticles", 0 if stack is None else len(stack))
    meta.set_attr("ExportPixelSize", "" if stack is None else stack.pixel_size)
    meta.set_attr("ExportProcessedAt", time.strftime("%Y-%m-%dT%H:%M:%S"))
    meta.write(paths.xml)
    return {"particles": 0 if stack is None else len(stack), "stack": stack, "picks": picks is not None,
            "seconds": round(time.perf_counter() - t0, 2), "particles_mrcs": str(paths.particles),
            "particles_star": str(paths.particles_star), "xml": str(paths.xml)}
