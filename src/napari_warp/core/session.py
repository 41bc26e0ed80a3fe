"""Online processing of a folder that grows during collection (the paper's "Online pre-processing").

A session is an input folder (file pattern, optional recursion), one settings file and a processing folder (by
default the input folder itself, as Warp 1 keeps its ``average/``, ``<name>.xml`` ... beside the movies). Items are
discovered as files arrive; a file is *ready* once its size and modification time have not changed for
``settle`` seconds (default 1 s), so a file still being written is never read.

Per item the Warp XML (``core.item``) records, for each step, the exact settings used (``<OptionsMovement>``,
``<OptionsCTF>``) and a *key*: a hash of those settings, the movie options that shape the input, and the upstream
step's key. A step is outdated exactly when its stored key differs from the key the current settings give, so a
motion change re-runs motion and everything after it, a CTF change re-runs only CTF (when CTF is fitted from the
aligned average; from the raw frames it does not depend on motion). Up-to-date steps are never redone; the XML is
written after each step, atomically, so a crash (even ``kill -9``) loses at most the step in flight.

Statuses: ``unprocessed``, ``processing`` (only known to the process doing it), ``processed``, ``outdated``,
``failed`` (with the reason; retried only when the file or the settings change), ``filtered`` (fails a quality
filter) and ``deselected`` (manually excluded; a manual include overrides the filters, as Warp's
``UnselectManual``).

Particle export (``SessionSettings.extract``, settings ``[export]``) extracts each item's picks from its movie with
its motion model and local CTF. Its key holds the motion and CTF keys, the export settings and a digest of the
picks file's *content*, so picks edited by hand (saved from napari) re-export that item only. The session-wide
``particles_all.star`` (every item with particles) and ``particles_good.star`` (those passing the filters and not
excluded) are rewritten after each item and whenever the selection changes.

Picks from other tools (RELION, cryoSPARC, EMAN, crYOLO, Topaz) are imported into the items by
``import_session_picks``; the item XML marks them (``PickingSource="imported"``), and with ``pick`` on the BoxNet
step counts as done for such an item until its picks file is deleted, so BoxNet never overwrites imported picks.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np

from .ctf_fit import CTFSettings
from .errors import Cancelled, NapariWarpError
from .io.atomic import write_text_atomic
from .io.warp_xml import WarpMetadata, read_warp_xml
from .item import (
    item_paths,
    load_metadata,
    picks_imported,
    run_ctf_step,
    run_export_step,
    run_motion_step,
    run_picking_step,
    settings_params,
)
from .motion import MotionSettings
from .particles import ExportSettings
from .picking import BoxNetSettings, load_model
from .picking.model import model_file_id

__all__ = [
    "SETTINGS_FILE",
    "SETTING_LABELS",
    "STEPS",
    "MovieOptions",
    "QualityFilters",
    "SessionSettings",
    "load_settings",
    "save_settings",
    "apply_overrides",
    "discover",
    "ReadyTracker",
    "step_keys",
    "item_record",
    "session_records",
    "process_item",
    "set_manual",
    "write_micrograph_list",
    "write_particle_lists",
    "export_session",
    "export_summary",
    "PARTICLE_LISTS",
    "ImportSummary",
    "import_session_picks",
    "Session",
]

SETTINGS_FILE = "napari-warp.settings.toml"
STEPS = ("motion", "ctf", "picking", "export")  # picking only when SessionSettings.pick, export when .extract
PARTICLE_LISTS = {"all": "particles_all.star", "good": "particles_good.star"}  # in the processing folder
_PROCESSING_DIRS = {"average", "motion", "powerspectrum", "aligned", "deconvolved", "picks", "mask", "particles"}


# ---------------------------------------------------------------------------------------------------------------
# settings
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MovieOptions:
    """How movies are read. pixel_size: Å/px (0 = from the header). exposure: e/Å² per frame. gain/defects: paths
    ('' = none) with Warp's gain flips/transpose. eer_group: raw EER frames per fraction (0 = the reader's default).
    binning: Fourier-crop factor on load."""

    pixel_size: float = 0.0
    exposure: float = 1.0
    gain: str = ""
    gain_flip_x: bool = False
    gain_flip_y: bool = False
    gain_transpose: bool = False
    defects: str = ""
    eer_group: int = 0
    binning: float = 1.0


@dataclass(frozen=True)
class QualityFilters:
    """Items outside these ranges are filtered out (0 or an inverted range switches a bound off).

    defocus_min/max: µm. astigmatism_sigma: σ above the session's mean astigmatism. phase_min/max: degrees
    (only for items with a fitted phase). resolution_max: Å, the CTF fit must reach at least this resolution.
    motion_max: Å, mean frame-to-frame movement in the first third of the exposure. particles_min: items with fewer
    BoxNet picks are filtered out (only when picking is on).
    """

    defocus_min: float = 0.0
    defocus_max: float = 0.0
    astigmatism_sigma: float = 0.0
    phase_min: float = 0.0
    phase_max: float = 0.0
    resolution_max: float = 0.0
    motion_max: float = 0.0
    particles_min: int = 0


def _template_motion() -> MotionSettings:
    return MotionSettings(pixel_size=1.0, exposure_per_frame=1.0)


def _template_ctf() -> CTFSettings:
    return CTFSettings(pixel_size=1.0)


def _template_picking() -> BoxNetSettings:
    return BoxNetSettings(pixel_size=1.0)


_PER_MOVIE = {"motion": ("pixel_size", "exposure_per_frame"), "ctf": ("pixel_size",), "picking": ("pixel_size",)}
_TOP = ("input", "pattern", "recursive", "ctf_from", "pick", "extract")
_TEMPLATES = ("motion", "ctf", "picking", "export")  # sections that are settings dataclasses of the steps


@dataclass(frozen=True)
class SessionSettings:
    """Everything a session needs; the sections are those of the settings file.

    input: the folder watched. pattern: space-separated globs. recursive: also look in sub-folders.
    ctf_from: "average" (the aligned average; depends on motion) or "frames" (sum of the raw frames' spectra).
    pick: run BoxNet on each aligned average (``picking`` settings).
    extract: export each item's picked particles from its movie (``export`` settings; ``export.pixel_size`` is the
    output's, None = the micrograph's).
    movie, motion, ctf, picking, export, filters: the sections. ``motion``, ``ctf`` and ``picking`` are templates:
    their pixel size and dose are replaced per movie (from ``movie`` or the file header) and are not written to the
    file.
    """

    input: str = "."
    pattern: str = "*.tif *.tiff *.mrc *.mrcs *.eer *.em"
    recursive: bool = False
    ctf_from: str = "average"
    pick: bool = False
    extract: bool = False
    movie: MovieOptions = field(default_factory=MovieOptions)
    motion: MotionSettings = field(default_factory=_template_motion)
    ctf: CTFSettings = field(default_factory=_template_ctf)
    picking: BoxNetSettings = field(default_factory=_template_picking)
    export: ExportSettings = field(default_factory=ExportSettings)
    filters: QualityFilters = field(default_factory=QualityFilters)

    def __post_init__(self):
        if self.ctf_from not in ("average", "frames"):
            raise ValueError(f"ctf_from must be 'average' or 'frames', got {self.ctf_from!r}")

    def sections(self) -> dict[str, dict]:
        """The settings as the file's sections (plain values)."""
        top = {k: getattr(self, k) for k in _TOP}
        out = {"session": top, "movie": dataclasses.asdict(self.movie), "filters": dataclasses.asdict(self.filters)}
        for name in _TEMPLATES:
            values = {f.name: getattr(getattr(self, name), f.name) for f in fields(getattr(self, name))}
            for key in _PER_MOVIE.get(name, ()):
                values.pop(key)
            out[name] = values
        return out

    def motion_for(self, pixel_size: float) -> MotionSettings:
        return replace(self.motion, pixel_size=pixel_size, exposure_per_frame=self.movie.exposure)

    def ctf_for(self, pixel_size: float) -> CTFSettings:
        return replace(self.ctf, pixel_size=pixel_size)

    def picking_for(self, pixel_size: float) -> BoxNetSettings:
        return replace(self.picking, pixel_size=pixel_size)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return '"null"'
    if isinstance(v, (int, float)):
        return repr(float(v)) if isinstance(v, float) and not math.isfinite(v) else repr(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def _to_toml(sections: dict[str, dict]) -> str:
    lines = ["# napari-warp session settings (like Warp's previous.settings). Edit freely, or use",
             "# `napari-warp process FOLDER --set section.key=value`. Lengths in Å unless named otherwise."]
    for name, values in sections.items():
        lines.append(f"\n[{name}]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
    return "\n".join(lines) + "\n"


def _kind(annotation: str) -> str:
    """'bool', 'int', 'float', 'str', 'tuple[int]', 'tuple[float]' from a field's annotation string."""
    a = str(annotation).replace(" ", "")
    for base in ("bool", "int", "float"):
        if a.startswith(f"tuple[{base}"):
            return f"tuple[{base}]"
    for base in ("bool", "int", "float", "str"):
        if a == base or a.startswith(f"{base}|") or a.endswith(f"|{base}"):
            return base
    return "str"


def _coerce(cls_field, default, value, where: str):
    """A file/CLI value in the type the field is annotated with (``None`` allowed where the field allows it).

    Grids typed as ``XxY`` (as everywhere in the UI) become ``(Gy, Gx)``; comma-separated values and TOML lists are
    in the field's own order.
    """
    kind = _kind(cls_field.type) if cls_field is not None else type(default).__name__
    optional = cls_field is not None and "None" in str(cls_field.type)
    try:
        if isinstance(value, str) and value.strip().lower() in ("null", "none", "auto", "") and optional:
            return None
        if value is None:
            if optional:
                return None
            raise ValueError(value)
        if kind == "bool":
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            return bool(value)
        if kind.startswith("tuple"):
            if isinstance(value, str):
                if "x" in value or "×" in value:
                    value = [v for v in value.replace("×", "x").split("x") if v.strip()][::-1]
                else:
                    value = [v for v in value.split(",") if v.strip()]
            return tuple(int(float(v)) if kind == "tuple[int]" else float(v) for v in value)
        if kind == "int":
            number = float(value)
            if number != int(number):
                raise ValueError(value)
            return int(number)
        if kind == "float":
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: {value!r} is not a valid {kind}") from None


def _build(cls, template, values: dict, section: str):
    known = {f.name: f for f in fields(cls)}
    changes = {}
    for key, value in values.items():
        if key not in known:
            raise ValueError(f"[{section}] has no setting {key!r}; known: {', '.join(sorted(known))}")
        changes[key] = _coerce(known[key], getattr(template, key), value, f"{section}.{key}")
    try:
        return replace(template, **changes)
    except ValueError as exc:  # the dataclass's own checks, e.g. an odd box size
        raise ValueError(f"[{section}] {exc}") from None


# "section.key" of every setting in ``SessionSettings.sections()`` -> (label, unit or hint), as the GUI shows it
# ("Label (unit)"); tests check that no setting lacks one.
SETTING_LABELS: dict[str, tuple[str, str]] = {
    "session.input": ("Input folder", "movies"),
    "session.pattern": ("File pattern", "globs"),
    "session.recursive": ("Include sub-folders", ""),
    "session.ctf_from": ("Fit CTF from", "average or frames"),
    "session.pick": ("Pick particles", "BoxNet"),
    "session.extract": ("Export particles", "from the movies"),
    "movie.pixel_size": ("Pixel size", "Å, 0 = header"),
    "movie.exposure": ("Exposure", "e/Å² per frame"),
    "movie.gain": ("Gain reference", "file, empty = none"),
    "movie.gain_flip_x": ("Flip gain in X", ""),
    "movie.gain_flip_y": ("Flip gain in Y", ""),
    "movie.gain_transpose": ("Transpose gain", ""),
    "movie.defects": ("Defect map", "file, empty = none"),
    "movie.eer_group": ("EER frames per fraction", "0 = default"),
    "movie.binning": ("Binning", "Fourier-crop factor"),
    "motion.patch_size": ("Patch size", "px"),
    "motion.patch_overlap": ("Patch overlap", "fraction"),
    "motion.band": ("Fit band", "low, high of Nyquist"),
    "motion.bfactor": ("Fit B-factor", "Å²"),
    "motion.local_grid": ("Local grid", "x×y nodes, auto"),
    "motion.local_temporal": ("Local temporal nodes", ""),
    "motion.global_temporal": ("Global temporal nodes", "auto = per frame"),
    "motion.skip_first": ("Skip first frames", "in averages"),
    "motion.skip_last": ("Skip last frames", "in averages"),
    "motion.pre_exposure": ("Pre-exposure", "e/Å²"),
    "motion.dose_weighting": ("Dose weighting", ""),
    "motion.dose_bfactor": ("Dose B-factor", "Å² per e/Å²"),
    "motion.iterations": ("Iterations", "per step"),
    "motion.max_fit_frames": ("Max fitted frames", "more are grouped"),
    "motion.local_tolerance": ("Resampling tolerance", "px"),
    "motion.prealign": ("Coarse pre-alignment", ""),
    "ctf.voltage": ("Voltage", "kV"),
    "ctf.cs": ("Spherical aberration", "mm"),
    "ctf.amplitude": ("Amplitude contrast", "fraction"),
    "ctf.window": ("Spectrum window", "px"),
    "ctf.range_min": ("Fit range low", "fraction of Nyquist"),
    "ctf.range_max": ("Fit range high", "fraction of Nyquist"),
    "ctf.defocus_min": ("Defocus search min", "Å"),
    "ctf.defocus_max": ("Defocus search max", "Å"),
    "ctf.fit_phase": ("Fit phase shift", "phase plate"),
    "ctf.phase_shift": ("Phase shift", "°, start or fixed"),
    "ctf.phase_nodes": ("Phase temporal nodes", ""),
    "ctf.grid": ("Defocus grid", "x×y nodes"),
    "ctf.pixel_size_delta": ("Mag. anisotropy", "Å"),
    "ctf.pixel_size_angle": ("Mag. anisotropy angle", "°"),
    "picking.diameter": ("Particle diameter", "Å"),
    "picking.threshold": ("Pick threshold", "particle softmax"),
    "picking.mask_threshold": ("Artifact threshold", "artifact softmax"),
    "picking.min_mask_area": ("Min artifact area", "px at 8 Å/px"),
    "picking.mask_distance": ("Distance to artifacts", "Å, auto = radius"),
    "picking.min_distance": ("Min. distance between picks", "Å, auto = 0.4 diameter"),
    "picking.tile": ("Tile", "px at 8 Å/px"),
    "picking.overlap": ("Tile overlap", "px at 8 Å/px"),
    "picking.batch_size": ("Tiles per batch", ""),
    "picking.model": ("BoxNet model", "file, empty = generic"),
    "export.box_size": ("Box size", "px, even"),
    "export.pixel_size": ("Output pixel size", "Å/px, auto = micrograph's"),
    "export.diameter": ("Particle diameter", "Å, auto = 75 % of the box"),
    "export.invert": ("Invert contrast", "protein white"),
    "export.normalize": ("Normalize", "background mean 0, std 1"),
    "export.subtract_ramp": ("Subtract background ramp", "with normalize"),
    "export.halves": ("Odd/even halves", "particles/odd, even"),
    "export.phase_flip": ("Phase flip", "local CTF"),
    "export.dose_weighting": ("Dose weighting", "as the average"),
    "filters.defocus_min": ("Keep defocus from", "µm, 0 = off"),
    "filters.defocus_max": ("Keep defocus to", "µm, 0 = off"),
    "filters.astigmatism_sigma": ("Max astigmatism", "σ above mean, 0 = off"),
    "filters.phase_min": ("Keep phase from", "°, 0 = off"),
    "filters.phase_max": ("Keep phase to", "°, 0 = off"),
    "filters.resolution_max": ("Worst fit resolution", "Å, 0 = off"),
    "filters.motion_max": ("Max motion", "Å, 0 = off"),
    "filters.particles_min": ("Min particles", "0 = off"),
}


def settings_from_sections(sections: dict[str, dict]) -> SessionSettings:
    """Inverse of ``SessionSettings.sections`` (unknown sections or keys raise ValueError naming them)."""
    base = SessionSettings()
    unknown = set(sections) - {"session", "movie", "motion", "ctf", "picking", "export", "filters"}
    if unknown:
        raise ValueError(f"unknown settings section(s): {', '.join(sorted(unknown))}")
    top = dict(sections.get("session", {}))
    extra = set(top) - set(_TOP)
    if extra:
        raise ValueError(f"[session] has no setting(s) {', '.join(sorted(extra))}")
    out = replace(
        base,
        input=str(top.get("input", base.input)),
        pattern=str(top.get("pattern", base.pattern)),
        recursive=_coerce(next(f for f in fields(SessionSettings) if f.name == "recursive"), False,
                          top.get("recursive", base.recursive), "session.recursive"),
        ctf_from=str(top.get("ctf_from", base.ctf_from)),
        pick=_coerce(next(f for f in fields(SessionSettings) if f.name == "pick"), False,
                     top.get("pick", base.pick), "session.pick"),
        extract=_coerce(next(f for f in fields(SessionSettings) if f.name == "extract"), False,
                        top.get("extract", base.extract), "session.extract"),
        movie=_build(MovieOptions, base.movie, sections.get("movie", {}), "movie"),
        motion=_build(MotionSettings, base.motion, sections.get("motion", {}), "motion"),
        ctf=_build(CTFSettings, base.ctf, sections.get("ctf", {}), "ctf"),
        picking=_build(BoxNetSettings, base.picking, sections.get("picking", {}), "picking"),
        export=_build(ExportSettings, base.export, sections.get("export", {}), "export"),
        filters=_build(QualityFilters, base.filters, sections.get("filters", {}), "filters"),
    )
    return out


def load_settings(folder: str | os.PathLike) -> SessionSettings | None:
    """The session settings stored in ``folder`` (None if there are none)."""
    path = Path(folder) / SETTINGS_FILE
    if not path.exists():
        return None
    try:
        sections = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise NapariWarpError(f"{path}: not a valid settings file: {exc}") from None
    try:
        return settings_from_sections(sections)
    except ValueError as exc:
        raise NapariWarpError(f"{path}: {exc}") from None


def save_settings(folder: str | os.PathLike, settings: SessionSettings) -> Path:
    """Write the settings file into ``folder`` (atomically)."""
    path = Path(folder) / SETTINGS_FILE
    write_text_atomic(path, _to_toml(settings.sections()))
    return path


def apply_overrides(settings: SessionSettings, assignments: Iterable[str]) -> SessionSettings:
    """``["ctf.window=384", "movie.exposure=1.2", ...]`` applied to ``settings`` (typed by each field)."""
    sections = settings.sections()
    for text in assignments:
        key, sep, value = text.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"--set {text!r}: expected section.key=value, e.g. ctf.window=384")
        if section not in sections:
            raise ValueError(f"--set {text!r}: no section {section!r}; sections: {', '.join(sections)}")
        sections[section][name.strip()] = value.strip()
    return settings_from_sections(sections)


# ---------------------------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------------------------
def discover(settings: SessionSettings, folder: str | os.PathLike | None = None) -> list[Path]:
    """Movie files of the session, in acquisition order (modification time, then name).

    Hidden files (our temporary files start with '.'), the processing folder's own outputs, the gain reference and
    the defect map are never items.
    """
    root = Path(settings.input)
    skip = {Path(p).resolve() for p in (settings.movie.gain, settings.movie.defects) if p}
    found: dict[Path, float] = {}
    for pattern in settings.pattern.split():
        for p in (root.rglob(pattern) if settings.recursive else root.glob(pattern)):
            rel = p.relative_to(root).parts
            if any(part.startswith(".") for part in rel) or any(part in _PROCESSING_DIRS for part in rel[:-1]):
                continue
            if not p.is_file() or p.resolve() in skip:
                continue
            try:
                found[p] = p.stat().st_mtime
            except FileNotFoundError:
                continue
    return sorted(found, key=lambda p: (found[p], p.name))


class ReadyTracker:
    """Which files have stopped changing: size and mtime unchanged for ``settle`` seconds (and size > 0)."""

    def __init__(self, settle: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.settle = settle
        self.clock = clock
        self._seen: dict[Path, tuple[tuple[int, float], float]] = {}

    def poll(self, paths: Iterable[Path]) -> list[Path]:
        """Observe ``paths`` now; return those that are ready (in the given order)."""
        now = self.clock()
        ready = []
        for p in paths:
            try:
                st = p.stat()
            except FileNotFoundError:
                self._seen.pop(p, None)
                continue
            stamp = (st.st_size, st.st_mtime)
            old = self._seen.get(p)
            if old is None or old[0] != stamp:
                self._seen[p] = (stamp, now)
                continue
            if st.st_size > 0 and now - old[1] >= self.settle:
                ready.append(p)
        return ready

    def ready_since(self, path: Path) -> float | None:
        """Clock time from which ``path`` has been unchanged (None if unknown)."""
        old = self._seen.get(path)
        return None if old is None else old[1]


# ---------------------------------------------------------------------------------------------------------------
# per-item state
# ---------------------------------------------------------------------------------------------------------------
def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_keys(settings: SessionSettings, pixel_size: float, picks: str | None = None) -> dict[str, str]:
    """The key each step's stored record must have to be up to date, for a movie of ``pixel_size`` Å/px.

    picks: digest of the item's picks file (``picks_digest``), part of the export key: picks edited by hand make
    the export outdated, while the picking step (which wrote the file) stays up to date.
    """
    movie = dataclasses.asdict(settings.movie)
    motion = _hash({"movie": movie, "motion": settings_params(settings.motion_for(pixel_size))})
    ctf_input = motion if settings.ctf_from == "average" else _hash({"movie": movie})
    ctf = _hash({"from": settings.ctf_from, "input": ctf_input, "ctf": settings_params(settings.ctf_for(pixel_size))})
    keys = {"motion": motion, "ctf": ctf}
    if settings.pick:  # the model file's content is part of the key: a retrained model makes picking outdated
        keys["picking"] = _hash({"input": motion, "picking": settings_params(settings.picking_for(pixel_size)),
                                 "model": model_file_id(settings.picking.model)})
    if settings.extract:  # from the movie with its motion model and local CTF, at the picks in the file
        keys["export"] = _hash({"motion": motion, "ctf": ctf, "picks": picks or "none",
                                "export": settings_params(settings.export)})
    return keys


_DIGESTS: dict = {}  # path -> (file stamp, digest): a picks file is hashed again only when it changed


def picks_digest(folder: str | os.PathLike, movie: str | os.PathLike) -> str | None:
    """SHA-1 (16 hex) of the item's picks file content, None when it has none."""
    path = item_paths(folder, movie).picks
    stamp = _stat(path)
    if stamp is None:
        return None
    hit = _DIGESTS.get(path)
    if hit is None or hit[0] != stamp:
        hit = (stamp, hashlib.sha1(path.read_bytes()).hexdigest()[:16])
        if len(_DIGESTS) > 100_000:
            _DIGESTS.clear()
        _DIGESTS[path] = hit
    return hit[1]


def _item_keys(settings: SessionSettings, pixel_size: float, folder, movie) -> dict[str, str]:
    """``step_keys`` for one item (with its picks file's digest where the export needs it)."""
    return step_keys(settings, pixel_size, picks_digest(folder, movie) if settings.extract else None)


def _file_stamp(path: Path) -> str:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "missing"
    return f"{st.st_size}:{st.st_mtime_ns}"


def _stat(path: Path) -> tuple | None:
    """(size, mtime_ns, inode) of a file, None if missing: the inode tells atomic rewrites within one mtime tick."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _attr(meta: WarpMetadata, name: str) -> str | None:
    v = meta.get_attr(name)
    return v if v not in (None, "") else None


_STEP_ATTRS = {"motion": ("MotionKey", "MotionProcessedAt"), "ctf": ("CTFKey", "CTFProcessedAt"),
               "picking": ("PickingKey", "PickingProcessedAt"), "export": ("ExportKey", "ExportProcessedAt")}


def _read_meta(folder: Path, movie: Path) -> WarpMetadata | None:
    paths = item_paths(folder, movie)
    if not paths.xml.exists():
        return None
    try:
        return read_warp_xml(paths.xml, kinds=("Movie",))
    except NapariWarpError:
        return None


def _metrics(meta: WarpMetadata) -> dict:
    out: dict[str, float | None] = {}
    for key, attr in (("motion", "MeanFrameMovement"), ("max_local_deviation", "MaxLocalDeviation"),
                      ("particles", "ParticleCount"), ("exported", "ExportedParticles")):
        v = meta.get_attr(attr)
        out[key] = float(v) if v not in (None, "") else None
    if meta.has("CTF"):
        from .io.warp_xml import ctf_from_params

        p = ctf_from_params(meta.get_params("CTF"))
        out["defocus"] = p.get("defocus_a", 0.0) / 1e4
        out["astigmatism"] = p.get("defocus_delta_a")
        out["astigmatism_angle"] = p.get("defocus_angle_deg")
        out["phase_shift"] = p.get("phase_shift_deg")
        out["fit_resolution"] = meta.get_float("CTFResolutionEstimate", None)
    return out


def item_record(folder: str | os.PathLike, movie: str | os.PathLike, settings: SessionSettings) -> dict:
    """The item's state as ``status`` reports it: ``name``, ``path``, ``status``, ``error``, ``metrics`` (defocus
    µm, astigmatism Å, phase shift °, fit resolution Å, motion Å, picks ``particles``, ``exported`` particles),
    ``steps`` (per step: ``key``, ``completed``, ``up_to_date``), ``manual`` (None, "include" or "exclude").
    Filters are applied by ``session_records``."""
    folder, movie = Path(folder), Path(movie)
    meta = _read_meta(folder, movie)
    rec = {"name": item_paths(folder, movie).name, "path": str(movie), "status": "unprocessed", "error": None,
           "metrics": {}, "steps": {}, "manual": None}
    if meta is None:
        return rec
    manual = _attr(meta, "UnselectManual")
    rec["manual"] = None if manual is None else ("exclude" if manual.lower() == "true" else "include")
    rec["metrics"] = _metrics(meta)
    ps = meta.get_float("PixelSize", None) or settings.movie.pixel_size or 1.0
    want = _item_keys(settings, ps, folder, movie)
    stale = False
    for step in want:
        key_attr, at_attr = _STEP_ATTRS[step]
        key, at = _attr(meta, key_attr), _attr(meta, at_attr)
        ok = key is not None and key == want[step]
        if step == "picking" and _attr(meta, "PickingSource") == "imported":  # kept until the picks are deleted
            ok = picks_imported(folder, movie, meta)
        rec["steps"][step] = {"key": key, "completed": at, "up_to_date": ok}
        stale |= not ok
    failed = _attr(meta, "FailedReason")
    if failed is not None:
        same_file = _attr(meta, "FailedStamp") == _file_stamp(movie)
        same_settings = _attr(meta, "FailedKey") == _hash(want)
        if same_file and same_settings:
            rec["status"], rec["error"] = "failed", failed
            return rec
    done_any = any(s["key"] for s in rec["steps"].values())
    rec["status"] = "outdated" if (stale and done_any) else ("unprocessed" if stale else "processed")
    return rec


def _passes(metrics: dict, f: QualityFilters, astig_stats: tuple[float, float] | None) -> list[str]:
    """Reasons an item fails the filters (empty: it passes)."""
    why = []

    def between(name, value, lo, hi, unit):
        if value is None:
            return
        if lo < hi and not (lo <= value <= hi):
            why.append(f"{name} {value:.3g} {unit} outside {lo:g}–{hi:g}")

    between("defocus", metrics.get("defocus"), f.defocus_min, f.defocus_max, "µm")
    if metrics.get("phase_shift"):
        between("phase shift", metrics.get("phase_shift"), f.phase_min, f.phase_max, "°")
    res = metrics.get("fit_resolution")
    if f.resolution_max > 0 and res is not None and res > f.resolution_max:
        why.append(f"fit resolution {res:.2f} Å worse than {f.resolution_max:g} Å")
    n = metrics.get("particles")
    if f.particles_min > 0 and n is not None and n < f.particles_min:
        why.append(f"{n:.0f} particles, fewer than {f.particles_min}")
    mot = metrics.get("motion")
    if f.motion_max > 0 and mot is not None and mot > f.motion_max:
        why.append(f"motion {mot:.2f} Å above {f.motion_max:g} Å")
    ast = metrics.get("astigmatism")
    if f.astigmatism_sigma > 0 and ast is not None and astig_stats is not None and astig_stats[1] > 0:
        z = (ast - astig_stats[0]) / astig_stats[1]
        if z > f.astigmatism_sigma:
            why.append(f"astigmatism {ast:.0f} Å is {z:.1f} σ above the session mean")
    return why


def session_records(settings: SessionSettings, folder: str | os.PathLike | None = None,
                    movies: Sequence[Path] | None = None) -> list[dict]:
    """Records of all items (``item_record``), with quality filters and manual choices applied: a processed item
    failing a filter becomes ``filtered`` (``filter_reasons`` says why) unless manually included; a manually
    excluded one becomes ``deselected``."""
    folder = Path(folder or settings.input)
    movies = discover(settings, folder) if movies is None else movies
    return _apply_selection(settings, folder, [item_record(folder, m, settings) for m in movies])


def _apply_selection(settings: SessionSettings, folder: Path, recs: list[dict]) -> list[dict]:
    """``session_records``' filters and manual choices applied to item records (changed in place)."""
    ast = [r["metrics"].get("astigmatism") for r in recs if r["status"] == "processed"]
    ast = [a for a in ast if a is not None]
    stats = (float(np.mean(ast)), float(np.std(ast))) if len(ast) >= 3 else None
    busy = _current_item(folder)
    for r in recs:
        r["filter_reasons"] = []
        if busy is not None and Path(r["path"]).resolve() == Path(busy) and r["status"] in ("unprocessed", "outdated"):
            r["status"] = "processing"
        if r["status"] != "processed":
            continue
        if r["manual"] == "exclude":
            r["status"] = "deselected"
            continue
        r["filter_reasons"] = _passes(r["metrics"], settings.filters, stats)
        if r["filter_reasons"] and r["manual"] != "include":
            r["status"] = "filtered"
    return recs


_CURRENT = ".napari-warp.current"


def _current_item(folder: Path) -> str | None:
    """The movie a live session process is computing now (its marker file names it and its pid is alive)."""
    try:
        info = json.loads((folder / _CURRENT).read_text())
        os.kill(int(info["pid"]), 0)
        return str(info["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _mark_current(folder: Path, movie: Path | None) -> None:
    marker = folder / _CURRENT
    if movie is None:
        marker.unlink(missing_ok=True)
    else:
        write_text_atomic(marker, json.dumps({"path": str(Path(movie).resolve()), "pid": os.getpid(),
                                              "since": time.time()}))


def set_manual(folder: str | os.PathLike, movie: str | os.PathLike, choice: str | None) -> None:
    """Manual include/exclude of an item (``"include"``, ``"exclude"`` or None), Warp's ``UnselectManual``."""
    paths = item_paths(folder, movie)
    meta = load_metadata(paths, movie)
    meta.set_attr("UnselectManual", {"include": "False", "exclude": "True", None: ""}[choice])
    meta.write(paths.xml)


# ---------------------------------------------------------------------------------------------------------------
# processing one item
# ---------------------------------------------------------------------------------------------------------------
def _open(movie: Path, settings: SessionSettings):
    from .io.movie import open_movie

    m = settings.movie
    return open_movie(
        movie, gain=m.gain or None, defects=m.defects or None, gain_flip_x=m.gain_flip_x, gain_flip_y=m.gain_flip_y,
        gain_transpose=m.gain_transpose, binning=m.binning, eer_group=m.eer_group or None,
        pixel_size=m.pixel_size or None,
    )


def load_frames(movie: str | os.PathLike, settings: SessionSettings, folder: str | os.PathLike | None = None):
    """Open and decode a movie (the prefetch step): ``(Movie, frames (F, Y, X) float32)``; errors as raised.

    With ``folder``, the frames are left undecoded (``None``) when no outdated step needs them whole (only a CTF
    fitted from the aligned average, picking or the export is outdated), so a CTF-only change does not re-read every
    movie; an export then reads the movie chunk by chunk itself.
    """
    mv = _open(Path(movie), settings)
    if folder is not None:
        rec = item_record(folder, movie, settings)
        motion_ok = rec["steps"].get("motion", {}).get("up_to_date", False)
        if motion_ok and settings.ctf_from == "average":
            return mv, None
    return mv, mv.frames()


def _mark_failed(folder: Path, movie: Path, settings: SessionSettings, step: str, reason: str, ps: float,
                 stamp: str) -> None:
    paths = item_paths(folder, movie)
    try:
        meta = load_metadata(paths, movie)
    except NapariWarpError:
        meta = WarpMetadata.new("Movie", {"DataDirectory": str(movie.parent.resolve())})
    meta.set_attr("FailedReason", reason)
    meta.set_attr("FailedStep", step)
    meta.set_attr("FailedStamp", stamp)
    meta.set_attr("FailedKey", _hash(_item_keys(settings, ps, folder, movie)))
    meta.set_attr("PixelSize", ps)  # item_record recomputes the keys with this pixel size
    meta.write(paths.xml)


def _clear_failed(meta: WarpMetadata) -> None:
    for name in ("FailedReason", "FailedStep", "FailedStamp", "FailedKey"):
        if meta.get_attr(name) is not None:
            meta.set_attr(name, "")


def process_item(movie: str | os.PathLike, settings: SessionSettings, folder: str | os.PathLike, *,
                 loaded=None, stamp: str | None = None, device=None,
                 progress: Callable[[int, int], None] | None = None) -> dict:
    """Bring one item up to date: run the outdated steps (motion, CTF, picking, export), each followed by an atomic
    XML write.

    loaded: ``load_frames``' result when prefetched (or an exception it raised). Never raises for a bad movie or a
    failing step: the item is marked failed with the reason, and its record is returned. Picklable arguments, so
    a Dask worker can run it.
    """
    movie, folder = Path(movie), Path(folder)
    stamp = stamp or _file_stamp(movie)  # the file as it was when read: a later change makes a failure retryable
    step = "read"
    ps = settings.movie.pixel_size or 1.0
    try:
        if isinstance(loaded, BaseException):
            raise loaded
        mv, frames = loaded if loaded is not None else load_frames(movie, settings, folder)
        if mv.pixel_size is None:
            raise NapariWarpError(f"{movie}: no pixel size in the header; set movie.pixel_size")
        ps = float(mv.pixel_size)
        want = _item_keys(settings, ps, folder, movie)
        rec = item_record(folder, movie, settings)
        average = None
        if not rec["steps"].get("motion", {}).get("up_to_date"):
            step = "motion"
            result = run_motion_step(mv, settings.motion_for(ps), folder, frames=frames, device=device,
                                     progress=progress)
            average = result["aligned"].average
            _stamp(folder, movie, "motion", want["motion"], ps)
        if not item_record(folder, movie, settings)["steps"]["ctf"]["up_to_date"]:
            step = "ctf"
            if settings.ctf_from == "average":
                if average is None:
                    from .io.movie import read_volume

                    average = read_volume(item_paths(folder, movie).average)[0][0]
                data = average
            else:
                data = frames if frames is not None else mv.frames()
            run_ctf_step(data, settings.ctf_for(ps), folder, movie, device=device, progress=progress)
            _stamp(folder, movie, "ctf", want["ctf"], ps)
        if "picking" in want and not item_record(folder, movie, settings)["steps"]["picking"]["up_to_date"]:
            step = "picking"
            if average is None:
                from .io.movie import read_volume

                average = read_volume(item_paths(folder, movie).average)[0][0]
            run_picking_step(average, settings.picking_for(ps), folder, movie,
                             model=_picking_model(settings.picking.model, device), device=device, progress=progress)
            _stamp(folder, movie, "picking", want["picking"], ps)
        if "export" in want and not item_record(folder, movie, settings)["steps"]["export"]["up_to_date"]:
            step = "export"
            _export(mv if frames is None else frames, settings, folder, movie, ps, device, progress)
    except Exception as exc:  # noqa: BLE001 -- any failure marks the item failed and the session goes on
        reason = str(exc) if isinstance(exc, NapariWarpError) else f"{step} failed: {type(exc).__name__}: {exc}"
        _mark_failed(folder, movie, settings, step, reason, ps, stamp)
    return item_record(folder, movie, settings)


def _export(frames, settings: SessionSettings, folder: Path, movie: Path, ps: float, device, progress) -> dict:
    """The export step of one item, stamped with the key of the picks it read (picking may just have written them;
    picks saved while it runs leave the item outdated)."""
    key = _item_keys(settings, ps, folder, movie)["export"]
    result = run_export_step(frames, settings.export, folder, movie, motion_settings=settings.motion_for(ps),
                             pixel_size=ps, device=device, progress=progress)
    _stamp(folder, movie, "export", key, ps)
    return result


def _picking_model(path: str, device):
    """The BoxNet model of the session, loaded once per process and file content (retrained files reload)."""
    key = (model_file_id(path), str(device))
    if key not in _MODELS:
        _MODELS.clear()
        _MODELS[key] = load_model(path or None, device=device)
    return _MODELS[key]


_MODELS: dict = {}


def _stamp(folder: Path, movie: Path, step: str, key: str, ps: float) -> None:
    paths = item_paths(folder, movie)
    meta = load_metadata(paths, movie)
    key_attr, at_attr = _STEP_ATTRS[step]
    meta.set_attr(key_attr, key)
    now = time.time_ns()
    meta.set_attr(at_attr, time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(now // 1_000_000_000))
                  + f".{now % 1_000_000_000:09d}")
    meta.set_attr("PixelSize", ps)
    _clear_failed(meta)
    meta.write(paths.xml)


# ---------------------------------------------------------------------------------------------------------------
# the session-wide outputs
# ---------------------------------------------------------------------------------------------------------------
_MICROGRAPHS: dict = {}  # item XML -> (stamp, (pixel size, CTF columns)): the list re-reads changed items only


def _by_stamp(cache: dict, path: Path, read: Callable[[], object]):
    """``read()`` once per version of ``path`` (its stat stamp), kept in ``cache``; None (not kept) when the file is
    missing or ``read`` gives None."""
    stamp = _stat(path)
    if stamp is None:
        return None
    hit = cache.get(path)
    if hit is not None and hit[0] == stamp:
        return hit[1]
    value = read()
    if value is not None:
        if len(cache) > 100_000:
            cache.clear()
        cache[path] = (stamp, value)
    return value


def _micrograph_info(folder: Path, movie: Path) -> tuple[float, dict | None] | None:
    """(pixel size Å/px, RELION CTF columns or None) of an item, from its XML (None without one)."""
    return _by_stamp(_MICROGRAPHS, item_paths(folder, movie).xml, lambda: _read_micrograph_info(folder, movie))


def _read_micrograph_info(folder: Path, movie: Path) -> tuple[float, dict | None] | None:
    from .io.warp_xml import ctf_from_params

    paths = item_paths(folder, movie)
    meta = _read_meta(folder, movie)
    if meta is None:
        return None
    p = ctf_from_params(meta.get_params("CTF")) if meta.has("CTF") else {}
    ctf = None
    if p:
        d, a = p["defocus_a"], p.get("defocus_delta_a", 0.0)
        ctf = {"rlnDefocusU": d + a / 2, "rlnDefocusV": d - a / 2, "rlnCtfAstigmatism": a,
               "rlnDefocusAngle": p.get("defocus_angle_deg", 0.0), "rlnPhaseShift": p.get("phase_shift_deg", 0.0),
               "rlnCtfMaxResolution": meta.get_float("CTFResolutionEstimate", 0.0) or 0.0,
               "rlnCtfFigureOfMerit": meta.get_float("CTFScore", 0.0) or 0.0,
               "rlnCtfPowerSpectrum": str(paths.power_spectrum.resolve())}
    return meta.get_float("PixelSize", None) or 1.0, ctf


def write_micrograph_list(settings: SessionSettings, folder: str | os.PathLike, records: Sequence[dict]) -> Path | None:
    """``micrographs_ctf.star`` (RELION 3.1, optics table) of the items that pass, rewritten atomically."""
    from .export import CorrectedMicrograph, write_corrected_micrographs_star

    folder = Path(folder)
    rows = []
    for r in records:
        if r["status"] != "processed":
            continue
        paths = item_paths(folder, r["path"])
        info = _micrograph_info(folder, Path(r["path"]))
        if info is None or not paths.average.exists():
            continue
        ps, ctf = info
        rows.append(CorrectedMicrograph(
            micrograph=paths.average.resolve(), metadata=paths.motion_star.resolve(), pixel_size=ps,
            original_pixel_size=ps / max(settings.movie.binning, 1e-9), voltage=settings.ctf.voltage,
            cs=settings.ctf.cs, amplitude_contrast=settings.ctf.amplitude, ctf=ctf,
        ))
    path = folder / "micrographs_ctf.star"
    if not rows:  # nothing passes (any more): no list, rather than a stale one
        path.unlink(missing_ok=True)
        return None
    write_corrected_micrographs_star(path, rows, project_dir=folder)
    return path


_LISTED: dict = {}  # particles STAR path -> (stamp, ParticleFile): unchanged items are not re-read


def _particle_file(folder: Path, movie: Path):
    """The item's exported particles as a ``particles.ParticleFile`` for ``write_particle_star``, from its own
    particle STAR (None when it has none). Only the rows are needed: the images are a zero-stride stand-in of
    the stack's shape, so no stack is read."""
    paths = item_paths(folder, movie)
    return _by_stamp(_LISTED, paths.particles_star, lambda: _read_particle_file(paths))


def _read_particle_file(paths):
    import pandas as pd

    from .io.star import read_star
    from .particles import ParticleFile, ParticleStack

    blocks = read_star(paths.particles_star)
    optics, rows = blocks["optics"].iloc[0], blocks["particles"]
    n, box = len(rows), int(optics["rlnImageSize"])
    ctf = None
    if "rlnDefocusU" in rows:
        res = rows["rlnCtfMaxResolution"] if "rlnCtfMaxResolution" in rows else np.full(n, np.nan)
        ctf = pd.DataFrame({"defocus_u": rows["rlnDefocusU"].to_numpy(float),
                            "defocus_v": rows["rlnDefocusV"].to_numpy(float),
                            "defocus_angle": rows["rlnDefocusAngle"].to_numpy(float),
                            "phase_shift": rows["rlnPhaseShift"].to_numpy(float),
                            "max_resolution": np.asarray(res, float)})
    scores = rows["rlnAutopickFigureOfMerit"].to_numpy(float) if "rlnAutopickFigureOfMerit" in rows else None
    stack = ParticleStack(
        images=np.broadcast_to(np.zeros((), np.float32), (n, box, box)),
        yx=rows[["rlnCoordinateY", "rlnCoordinateX"]].to_numpy(float),
        pixel_size=float(optics["rlnImagePixelSize"]), micrograph_pixel_size=float(optics["rlnMicrographPixelSize"]),
        ctf=ctf, scores=scores, voltage=float(optics["rlnVoltage"]), cs=float(optics["rlnSphericalAberration"]),
        amplitude=float(optics["rlnAmplitudeContrast"]),
        phase_flipped=bool(int(optics.get("rlnCtfDataArePhaseFlipped", 0))),
    )
    odd, even = paths.particle_halves()
    halves = (odd, even) if odd.exists() and even.exists() else (None, None)
    return ParticleFile(stack=stack, path=paths.particles, micrograph=paths.average, odd=halves[0], even=halves[1])


def write_particle_lists(settings: SessionSettings, folder: str | os.PathLike,
                         records: Sequence[dict]) -> dict[str, Path | None]:
    """``particles_all.star`` (every item whose export is up to date and has particles, whatever the filters say)
    and ``particles_good.star`` (those of them that pass the filters and are not excluded), RELION 3.1 with an
    optics table and paths relative to the folder, rewritten atomically; a list with no item is removed rather than
    left stale. ``records``: ``session_records``' (filters applied). Returns ``{"all": path, "good": path}`` (None
    where removed)."""
    from .particles import write_particle_star

    folder = Path(folder)
    chosen: dict[str, list] = {"all": [], "good": []}
    for r in records:
        if r["status"] not in ("processed", "filtered", "deselected") or not r["metrics"].get("exported"):
            continue
        if not r["steps"].get("export", {}).get("up_to_date"):
            continue
        pf = _particle_file(folder, Path(r["path"]))
        if pf is None:
            continue
        chosen["all"].append(pf)
        if r["status"] == "processed":
            chosen["good"].append(pf)
    out: dict[str, Path | None] = {}
    for which, files in chosen.items():
        path = folder / PARTICLE_LISTS[which]
        if files:
            write_particle_star(path, files)
            out[which] = path
        else:
            path.unlink(missing_ok=True)
            out[which] = None
    return out


def _meta_pixel_size(folder: Path, movie: Path, settings: SessionSettings) -> float:
    meta = _read_meta(folder, movie)
    return (meta.get_float("PixelSize", None) if meta is not None else None) or settings.movie.pixel_size or 1.0


def _export_plan(settings: SessionSettings, folder: Path, items: str, movies: Sequence[Path]) -> tuple[list, list]:
    """(eligible movies, skipped ``{"name", "reason"}``): eligible items have motion, CTF (and picking) up to date
    and, for ``items="good"``, pass the filters and are not excluded."""
    if items not in ("all", "good"):
        raise ValueError(f"items must be 'all' or 'good', got {items!r}")
    upstream = _apply_selection(settings, folder, [item_record(folder, m, replace(settings, extract=False))
                                                   for m in movies])
    keep = ("processed",) if items == "good" else ("processed", "filtered", "deselected")
    chosen = [Path(r["path"]) for r in upstream if r["status"] in keep]
    skipped = [{"name": r["name"], "reason": _skip_reason(r)} for r in upstream if r["status"] not in keep]
    return chosen, skipped


def export_summary(settings: SessionSettings, folder: str | os.PathLike | None = None, *, items: str = "all",
                   movies: Sequence[Path] | None = None, exported_now: Iterable[str] = ()) -> dict:
    """The session's particle export as it stands (``export_session``'s summary, without exporting): ``{"items":
    [{"name", "particles", "state"}], "skipped": [{"name", "reason"}], "total", "exported", "lists": {"all",
    "good": path or None}}``; ``state`` is "exported" (in this run: ``exported_now`` paths), "up to date", "no
    picks", "outdated", "not exported" or "failed: <reason>"."""
    settings = replace(settings, extract=True)
    folder = Path(folder or settings.input)
    movies = discover(settings, folder) if movies is None else list(movies)
    chosen, skipped = _export_plan(settings, folder, items, movies)
    now = {str(p) for p in exported_now}
    rows = [_export_row(item_record(folder, m, settings), str(m) in now) for m in chosen]
    lists = {k: (folder / name if (folder / name).exists() else None) for k, name in PARTICLE_LISTS.items()}
    return {"items": rows, "skipped": skipped, "total": sum(r["particles"] for r in rows), "exported": len(now),
            "lists": lists}


def export_session(settings: SessionSettings, folder: str | os.PathLike | None = None, *, items: str = "all",
                   movies: Sequence[Path] | None = None, device=None,
                   progress: Callable[[int, int], None] | None = None,
                   on_item: Callable[[dict], None] | None = None) -> dict:
    """Run only the export step over a processed session (the CLI's ``export``, the export dock); ``settings``'
    ``extract`` is taken as on. Eligible items have their motion, CTF (and picking) up to date; ``items="good"``
    keeps those passing the filters and not excluded. Only items whose export is outdated are exported (an item
    failing is marked failed, as in ``process_item``); the particle lists are rewritten at the end (also after a
    cancel). ``progress(done, total)`` covers all items (raising ``errors.Cancelled`` from it stops the export).
    Returns ``export_summary``'s summary.
    """
    settings = replace(settings, extract=True)
    folder = Path(folder or settings.input)
    movies = discover(settings, folder) if movies is None else list(movies)
    chosen, _ = _export_plan(settings, folder, items, movies)
    work = [m for m in chosen if not item_record(folder, m, settings)["steps"]["export"]["up_to_date"]]
    done_now: list[Path] = []
    try:
        for i, movie in enumerate(work):
            sub = None if progress is None else (lambda d, t, i=i: progress(i * 1000 + int(1000 * d / max(t, 1)),
                                                                              1000 * len(work)))
            _export_one(movie, settings, folder, device, sub)
            done_now.append(movie)
            if on_item is not None:
                on_item(item_record(folder, movie, settings))
        if progress is not None:
            progress(1, 1)
    finally:  # also after a cancel: the lists show what is exported now
        write_particle_lists(settings, folder, session_records(settings, folder, movies))
    return export_summary(settings, folder, items=items, movies=movies, exported_now=done_now)


def _export_one(movie: Path, settings: SessionSettings, folder: Path, device, progress) -> None:
    """Export one item from its movie; a failure marks the item failed (a cancel propagates)."""
    ps = _meta_pixel_size(folder, movie, settings)
    stamp = _file_stamp(movie)
    try:
        _export(_open(movie, settings), settings, folder, movie, ps, device, progress)
    except Cancelled:
        raise
    except Exception as exc:  # noqa: BLE001 -- as process_item: the item is marked failed, the others go on
        reason = str(exc) if isinstance(exc, NapariWarpError) else f"export failed: {type(exc).__name__}: {exc}"
        _mark_failed(folder, movie, settings, "export", reason, ps, stamp)


def _skip_reason(rec: dict) -> str:
    if rec["status"] == "failed":
        return f"failed: {rec['error']}"
    if rec["status"] == "filtered":
        return "filtered out: " + "; ".join(rec.get("filter_reasons") or [])
    if rec["status"] == "deselected":
        return "excluded manually"
    return f"{rec['status']}: process it first"


def _export_row(rec: dict, now: bool) -> dict:
    n = int(rec["metrics"].get("exported") or 0)
    if rec["status"] == "failed":
        state = f"failed: {rec['error']}"
    elif not rec["steps"].get("export", {}).get("up_to_date"):
        state = "outdated" if rec["steps"].get("export", {}).get("key") else "not exported"
    elif n == 0:
        state = "no picks"
    else:
        state = "exported" if now else "up to date"
    return {"name": rec["name"], "particles": n if state in ("exported", "up to date") else 0, "state": state}


# ---------------------------------------------------------------------------------------------------------------
# picks from other tools
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ImportSummary:
    """What ``import_session_picks`` wrote.

    items: per item that received picks, in session order: ``{"name", "picks"`` (the number imported), ``"files"``
    (the pick files they came from), ``"outside"`` (imported picks outside the average: many mean a wrong pixel
    size)``}``. unmatched: per file, its micrograph names that match no item. untouched: the items without picks in
    the files (their picks are left as they were). sampling: per file, how its coordinates were converted.
    """

    items: list[dict]
    unmatched: dict[str, list[str]]
    untouched: list[str]
    sampling: dict[str, str]

    @property
    def total(self) -> int:
        return sum(r["picks"] for r in self.items)


@dataclass(frozen=True, eq=False)
class _PickFile:
    """A pick file as read, and how its coordinates map onto an item's average: ``kind`` "pixels" (of a micrograph
    at ``pixel_size`` Å/px; None: at the item's own), "centred" (Å from the micrograph centre, RELION 5) or
    "fraction" (pixels of a ``frame`` ``(ny, nx)`` micrograph covering the average's field of view, cryoSPARC)."""

    path: Path
    tool: str
    tables: dict
    kind: str = "pixels"
    pixel_size: float | None = None
    frame: tuple[float, float] = (1.0, 1.0)
    how: str = ""

    def to_average(self, yx: np.ndarray, pixel_size: float, shape: tuple[int, int]) -> np.ndarray:
        """``yx`` as read, in pixels of an average of ``pixel_size`` Å/px and ``shape`` ``(ny, nx)``."""
        if self.kind == "centred":
            return yx / pixel_size + np.asarray(shape, np.float64) / 2  # RELION's float centre, size / 2
        if self.kind == "fraction":
            return yx / np.asarray(self.frame, np.float64) * np.asarray(shape, np.float64)
        return yx * ((self.pixel_size or pixel_size) / pixel_size)


def import_session_picks(folder: str | os.PathLike, files: Iterable[str | os.PathLike], settings: SessionSettings,
                         *, pixel_size: float | None = None, diameter: float | None = None, replace: bool = True,
                         movies: Sequence[Path] | None = None) -> ImportSummary:
    """Import other tools' particle picks (``picking.io.read_picks``: RELION, cryoSPARC, EMAN, crYOLO, Topaz) into
    the session's items, so they are exported with the items' motion and local CTF.

    Micrograph names are matched to the items by ``picking.io.match_picks_to_items``; items without picks in the
    files are left alone. Coordinates become pixels of each item's aligned average, in the sampling the file states
    where it states one: RELION 5 centred coordinates (Å) through the average's pixel size and size; cryoSPARC's as
    fractions of the micrograph (so cryoSPARC may have worked on binned micrographs); RELION pixel coordinates at
    the ``rlnMicrographPixelSize`` of its optics table. Other pixel coordinates (EMAN, crYOLO, Topaz, RELION 3.0)
    are taken at ``pixel_size`` Å/px, by default the item's own. Picks of an item from several files are joined.

    Each item's picks file is written by ``item.save_item_picks`` with the source recorded ("imported from <file>
    (<tool>)") and the XML marked ``PickingSource="imported"``: with ``pick`` on, the BoxNet step counts as done
    for it until its picks file is deleted. The new file content makes the item's export outdated, so the next
    export re-exports these items only. replace: False adds the imported picks to the item's existing ones.
    diameter: particle diameter (Å) recorded in the picks files (default: the earlier file's, else the session's
    ``picking.diameter``).

    Every file is read and matched before anything is written.

    Raises
    ------
    FileNotFoundError
    picking.io.PickImportError
        A file that cannot be read, or none of whose micrographs matches an item (the message names the file, its
        micrograph names and the items').
    NapariWarpError
        No items in the session, or an item without a pixel size.
    """
    from .picking.io import match_picks_to_items

    folder = Path(folder)
    movies = discover(settings, folder) if movies is None else [Path(m) for m in movies]
    items = {item_paths(folder, m).name: Path(m) for m in movies}
    if not items:
        raise NapariWarpError(f"{settings.input}: no items (files matching {settings.pattern!r}) to import picks into")
    sources = [_read_pick_file(Path(f), pixel_size) for f in files]
    plan: dict[str, list] = {}
    unmatched: dict[str, list[str]] = {}
    for src in sources:
        matched, rest = match_picks_to_items(src.tables, list(items), source=src.path)
        if rest:
            unmatched[str(src.path)] = rest
        for name, table in matched.items():
            plan.setdefault(name, []).append((src, table))
    new = {name: _picks_on_average(folder, items[name], plan[name], settings) for name in items if name in plan}
    rows = [_save_imported(folder, items[name], *new[name], settings=settings, diameter=diameter, replace=replace)
            for name in new]
    return ImportSummary(rows, unmatched, [n for n in items if n not in plan], {str(s.path): s.how for s in sources})


def _read_pick_file(path: Path, pixel_size: float | None) -> _PickFile:
    """Read one pick file and decide how its coordinates map onto the averages."""
    from .picking.io import CENTERED_X, CENTERED_Y, COORD_X, COORD_Y, read_picks

    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such pick file")
    if path.suffix.lower() == ".cs":
        return _read_cryosparc_file(path, pixel_size)
    with open(path, "rb") as f:
        head = f.read(4096).decode("utf-8", errors="replace")
    blocks = _star_blocks(path, head)
    if blocks is None:
        tool = {".box": "EMAN", ".cbox": "crYOLO"}.get(path.suffix.lower()) or (
            "Topaz" if "image_name" in head else "EMAN")
        return _pixel_file(path, tool, read_picks(path), pixel_size, None)
    columns = [set(df.columns) for df in blocks.values()]
    if any({"CoordinateX", "CoordinateY"} <= c for c in columns):
        return _pixel_file(path, "crYOLO", read_picks(path), pixel_size, None)
    if not any({COORD_X, COORD_Y} <= c for c in columns) and any({CENTERED_X, CENTERED_Y} <= c for c in columns):
        tables = read_picks(path, micrograph_shape=(0, 0), pixel_size=1.0)  # Å from the centre, as they are
        return _PickFile(path, "RELION 5", tables, "centred", how="Å from the micrograph centre (RELION 5)")
    stated = _optics_pixel_size(path, blocks, pixel_size)
    return _pixel_file(path, "RELION 3.1" if "optics" in blocks else "RELION", read_picks(path), pixel_size, stated)


def _star_blocks(path: Path, head: str) -> dict | None:
    """The blocks of a STAR file (None when it is not one: ``read_picks`` reads it as what it is)."""
    from .errors import MetadataError
    from .io.star import read_star

    first = next((line.split()[0] for line in head.splitlines() if line.strip() and not line.startswith("#")), "")
    if path.suffix.lower() not in (".star", ".cbox") and not first.startswith("data_"):
        return None
    try:
        return read_star(path)
    except MetadataError:
        return None


def _optics_pixel_size(path: Path, blocks: dict, given: float | None) -> float | None:
    """``rlnMicrographPixelSize`` of a RELION 3.1+ optics table: the sampling of the coordinates (None if absent;
    with several, the ``given`` one)."""
    import pandas as pd

    from .picking.io import PickImportError

    optics = blocks.get("optics")
    if optics is None or "rlnMicrographPixelSize" not in optics.columns:
        return None
    values = sorted(set(pd.to_numeric(optics["rlnMicrographPixelSize"], errors="coerce").dropna().round(6)))
    if len(values) > 1 and given is None:
        raise PickImportError(path, f"optics groups at different micrograph pixel sizes ({', '.join(map(str, values))}"
                              " Å/px): give the pixel size of the coordinates, or import them one pixel size at a time")
    return float(values[0]) if len(values) == 1 else None


def _pixel_file(path: Path, tool: str, tables: dict, given: float | None, stated: float | None) -> _PickFile:
    """Pixel coordinates at the pixel size the file states, else the ``given`` one, else the item's."""
    ps = stated or given
    if stated:
        how = f"pixels of micrographs at {ps:g} Å/px (rlnMicrographPixelSize of its optics table)"
    elif given:
        how = f"pixels of micrographs at {ps:g} Å/px (given)"
    else:
        how = "pixels of micrographs at each item's pixel size"
    return _PickFile(path, tool, tables, "pixels", ps, how=how)


def _read_cryosparc_file(path: Path, pixel_size: float | None) -> _PickFile:
    """cryoSPARC's positions are fractions of its micrographs: mapped onto the averages' size, whatever cryoSPARC's
    sampling was (with micrographs of several sizes, its pixels at ``pixel_size``)."""
    from .picking.io import PickImportError, read_picks

    try:
        shapes = np.load(path, allow_pickle=False)["location/micrograph_shape"]
        shapes = np.unique(np.asarray(shapes, np.float64).reshape(-1, 2), axis=0)
    except (ValueError, KeyError, IndexError, TypeError, OSError, EOFError):  # no sizes, or not a table at all
        shapes = np.zeros((0, 2))
    if not len(shapes):  # fractions as they are (read_picks says what is wrong with an unreadable file)
        tables = read_picks(path, micrograph_shape=(1, 1))
        return _PickFile(path, "cryoSPARC", tables, "fraction", how="fractions of the micrograph")
    tables = read_picks(path)
    if len(shapes) > 1:
        if pixel_size is None:
            raise PickImportError(path, f"micrographs of {len(shapes)} different sizes: give the pixel size of the "
                                  "coordinates")
        return _pixel_file(path, "cryoSPARC", tables, pixel_size, None)
    (ny, nx), = shapes
    return _PickFile(path, "cryoSPARC", tables, "fraction", frame=(ny, nx),
                     how=f"fractions of cryoSPARC's {nx:g}×{ny:g} px micrographs")


def _item_geometry(folder: Path, movie: Path, settings: SessionSettings) -> tuple[float, tuple[int, int]]:
    """(pixel size Å/px, shape ``(ny, nx)``) of the item's aligned average: from its XML and file once processed,
    else from the movie as the session reads it (picks imported before the movie is processed)."""
    from .io.mrc import read_mrc_header

    meta = _read_meta(folder, movie)
    ps = meta.get_float("PixelSize", None) if meta is not None else None
    average = item_paths(folder, movie).average
    if ps and average.exists():
        return float(ps), tuple(read_mrc_header(average).shape[1:])
    mv = _open(movie, settings)
    if mv.pixel_size is None:
        raise NapariWarpError(f"{movie}: no pixel size in the header; set movie.pixel_size")
    return float(mv.pixel_size), tuple(mv.shape[1:])


def _picks_on_average(folder: Path, movie: Path, parts: list, settings: SessionSettings) -> tuple:
    """(yx px of the average, scores, the files, how many fall outside it) of one item's imported picks."""
    ps, shape = _item_geometry(folder, movie, settings)
    yx = np.concatenate([src.to_average(table.yx, ps, shape) for src, table in parts]).reshape(-1, 2)
    score = np.concatenate([table.score for _, table in parts])
    outside = int(np.any((yx < -0.5) | (yx > np.asarray(shape) - 0.5), axis=1).sum())
    return yx, score, [src for src, _ in parts], outside


def _save_imported(folder: Path, movie: Path, yx, score, sources: list, outside: int, *, settings: SessionSettings,
                   diameter: float | None, replace: bool) -> dict:
    from .item import save_item_picks
    from .picking.io import read_picks_star

    paths = item_paths(folder, movie)
    n = len(yx)
    if paths.picks.exists() and not replace:
        old = read_picks_star(paths.picks)
        yx, score = np.concatenate([old.yx, yx]), np.concatenate([old.score, score])
    if diameter is None and not paths.picks.exists():
        diameter = settings.picking.diameter
    source = "imported from " + "; ".join(f"{s.path.resolve()} ({s.tool})" for s in sources)
    save_item_picks(folder, movie, yx, None if np.isnan(score).all() else score, source=source, diameter=diameter)
    return {"name": paths.name, "picks": n, "files": [str(s.path) for s in sources], "outside": outside}


# ---------------------------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------------------------
@dataclass
class SessionStats:
    """What the loop has done: items done/failed this run, per-item latency from ready to processed (s)."""

    done: int = 0
    failed: int = 0
    started: float = field(default_factory=time.monotonic)
    latencies: list[float] = field(default_factory=list)

    def rate_per_hour(self) -> float:
        dt = time.monotonic() - self.started
        return 3600.0 * self.done / dt if dt > 0 else 0.0

    def latency(self, q: float = 50.0) -> float | None:
        return float(np.percentile(self.latencies, q)) if self.latencies else None


class Session:
    """The online loop over a folder. ``run(once=True)`` processes what is ready and returns; ``run(once=False)``
    keeps watching until ``stop()``. Work goes to ``client`` (a ``dask.distributed.Client``) when given, else it
    runs here with the next movie prefetched (decoded) in a thread while the current one is computed."""

    def __init__(self, settings: SessionSettings, folder: str | os.PathLike | None = None, *, client=None,
                 settle: float = 1.0, poll: float = 1.0, device=None,
                 on_item: Callable[[dict], None] | None = None,
                 on_progress: Callable[[SessionStats, int, int], None] | None = None):
        self.settings = settings
        self.folder = Path(folder or settings.input).resolve()  # absolute: Dask workers may run elsewhere
        self.client = client
        self.tracker = ReadyTracker(settle)
        self.poll = poll
        self.device = device
        self.on_item = on_item
        self.on_progress = on_progress
        self.stats = SessionStats()
        self.current: Path | None = None
        self._stop = threading.Event()
        self._records: dict[Path, tuple] = {}
        self._last_outputs: list = []

    def stop(self) -> None:
        self._stop.set()

    def record(self, movie: Path) -> dict:
        """``item_record``, re-read only when the item's XML (or the movie file) changed."""
        paths = item_paths(self.folder, movie)
        # hand-edited picks make the export outdated; deleted imported picks, the picking step
        picks = _stat(paths.picks) if self.settings.extract or self.settings.pick else None
        stamp = (_stat(paths.xml), _file_stamp(movie), picks)
        hit = self._records.get(movie)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        rec = item_record(self.folder, movie, self.settings)
        self._records[movie] = (stamp, rec)
        return rec

    def todo(self, ready: Sequence[Path]) -> list[Path]:
        """Ready items with work to do (unprocessed or outdated; failed ones only if their file or settings
        changed)."""
        return [p for p in ready if self.record(p)["status"] in ("unprocessed", "outdated")]

    def run(self, once: bool = True) -> SessionStats:
        self.folder.mkdir(parents=True, exist_ok=True)
        first = True
        while not self._stop.is_set():
            movies = discover(self.settings, self.folder)
            ready = self.tracker.poll(movies)
            if first and once:  # --once: give every file one settle interval to prove it is complete
                time.sleep(self.tracker.settle + 0.05)
                ready = self.tracker.poll(movies)
            first = False
            work = self.todo(ready)
            self._report(movies)
            if work:
                self._process(work, movies)  # rewrites the session-wide lists after each item
            if self._selection_changed(movies):  # filters, manual choices, results written elsewhere
                self._outputs(movies)
            if once and not work:
                break
            if not work:
                self._stop.wait(self.poll)
        return self.stats

    def _report(self, movies: Sequence[Path]) -> None:
        if self.on_progress is not None:
            done = sum(1 for p in movies if self.record(p)["status"] in ("processed", "failed"))
            self.on_progress(self.stats, done, len(movies))

    def _finish(self, path: Path, rec: dict) -> None:
        since = self.tracker.ready_since(path)
        if since is not None:
            self.stats.latencies.append(time.monotonic() - since - self.tracker.settle)
        if rec["status"] == "failed":
            self.stats.failed += 1
        else:
            self.stats.done += 1
        if self.on_item is not None:
            self.on_item(rec)

    def _process(self, work: list[Path], movies: Sequence[Path]) -> None:
        if self.client is not None:
            from dask.distributed import as_completed

            futures = {self.client.submit(process_item, str(p.resolve()), self.settings, str(self.folder),
                                          pure=False): p for p in work}
            for fut in as_completed(list(futures)):
                self._finish(futures[fut], fut.result())
                self._outputs(movies)
                self._report(movies)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") as pool:
            nxt = pool.submit(_safe_load, work[0], self.settings, self.folder)
            for i, p in enumerate(work):
                if self._stop.is_set():
                    break
                stamp, loaded = nxt.result()
                if i + 1 < len(work):  # decode the next movie while this one is computed
                    nxt = pool.submit(_safe_load, work[i + 1], self.settings, self.folder)
                self.current = p
                _mark_current(self.folder, p)  # so a GUI attached to the folder shows it as "processing"
                try:
                    rec = process_item(p, self.settings, self.folder, loaded=loaded, stamp=stamp,
                                       device=self.device)
                finally:
                    _mark_current(self.folder, None)
                    self.current = None
                self._finish(p, rec)
                self._outputs(movies)
                self._report(movies)

    def _stamps(self, movies: Sequence[Path]) -> list:
        out = []
        for p in [self.folder / SETTINGS_FILE, *(item_paths(self.folder, m).xml for m in movies)]:
            try:
                out.append(p.stat().st_mtime_ns)
            except FileNotFoundError:
                out.append(None)
        return out

    def _selection_changed(self, movies: Sequence[Path]) -> bool:
        """Whether the settings file or any item XML changed since the session-wide lists were last written."""
        return self._stamps(movies) != self._last_outputs

    def _outputs(self, movies: Sequence[Path]) -> None:
        # filters and manual choices may change while the session runs (overview dock, an edited settings file):
        # they only select items, so the latest ones apply without recomputing anything
        try:
            stored = load_settings(self.folder)
        except NapariWarpError:
            stored = None
        if stored is not None and stored.filters != self.settings.filters:
            self.settings = replace(self.settings, filters=stored.filters)
        # the cached records (re-read only where an item's files changed): cheap enough to run after every item
        records = _apply_selection(self.settings, self.folder, [dict(self.record(m)) for m in movies])
        write_micrograph_list(self.settings, self.folder, records)
        if self.settings.extract:
            write_particle_lists(self.settings, self.folder, records)
        self._last_outputs = self._stamps(movies)  # what the lists now reflect


def _safe_load(movie: Path, settings: SessionSettings, folder: Path):
    """``(file stamp before reading, load_frames(...) or the exception it raised)``."""
    stamp = _file_stamp(movie)
    try:
        return stamp, load_frames(movie, settings, folder)
    except Exception as exc:  # noqa: BLE001 -- handed to process_item, which records it as the failure
        return stamp, exc
