"""BoxNet docks: pick particles and mask artifacts in a micrograph (live threshold), import/export picks, and retrain
the network on corrected picks with a live plot of the paper's four metrics, then re-pick with the new model.

Layers this module makes, found again through their metadata (``napari_warp_role`` and ``source_id``, the unique id
of the micrograph layer they belong to):

- ``"<micrograph> picks"`` (Points, role ``picks``): circles one particle diameter across, coloured by score. The layer
  is the truth for export and training: delete, add (score 1 = manual) or move points freely.
- ``"<micrograph> artifacts"`` (Labels, role ``artifacts``): the network's artifact mask, 2 = artifact; paint 2 for
  more artifacts and 3 for uncertain areas that training should ignore.

The network's probabilities are kept per Points layer (in memory, ``stored_picks``), so the threshold, the minimum
distance to artifacts and the diameter re-derive the picks instantly without running the network again.
"""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
import math
import time
import weakref
from pathlib import Path

import numpy as np
from magicgui.widgets import (
    CheckBox,
    ComboBox,
    Container,
    FileEdit,
    FloatSlider,
    FloatSpinBox,
    Label,
    ProgressBar,
    PushButton,
    Select,
    SpinBox,
)
from napari.qt.threading import thread_worker
from psygnal import Signal
from qtpy.QtCore import QTimer

from ._common import ProgressRun, refresh_source, theme_colors
from .ctf import _policy, _scroll_area, _selectable

_ROLE = "napari_warp_role"
_NOT_MICROGRAPHS = ("defocus",)  # our overlays that are images but not micrographs
MODEL_FILTER = "BoxNet model (*.pt)"
PICK_FILTER = "Pick files (*.star *.cs *.box *.cbox *.txt *.tsv *.csv);;All files (*)"
DEFAULT_SIMULATED = 4  # generic (simulated) micrographs mixed into retraining
RETRAINED_NAME = "boxnet-retrained"
THROTTLE_MS = 40  # live threshold: at most one re-derivation per this interval while a slider is dragged

# Points layer -> the ``Picks`` (with probabilities) it shows; shared by both docks, forgotten with the layer
_STORED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# (path, mtime) -> PickingModel, so picking again does not re-read the file
_MODELS: dict = {}
# n -> simulated generic examples (3–6 s per micrograph to make), reused by later retrainings
_OLD_EXAMPLES: dict = {}


def _real(layer):
    """The layer itself: napari hands plugin docks a viewer whose layers are short-lived ``PublicOnlyProxy``
    wrappers (new ones at every access, so neither ``is`` nor ``id`` nor weak references work on them)."""
    return getattr(layer, "__wrapped__", layer)


def stored_picks(points_layer):
    """The ``Picks`` (with the network's probabilities) shown by a picks layer, or None (imported or edited only)."""
    return None if points_layer is None else _STORED.get(_real(points_layer))


def load_picking_model(path=None):
    """A ``PickingModel`` from ``path`` (None or '': the shipped generic model), cached while the file is unchanged."""
    from ..core.picking import load_model
    from ..core.picking.model import GENERIC_MODEL

    p = Path(path) if path else GENERIC_MODEL
    try:
        key = (str(p.resolve()), p.stat().st_mtime_ns)
    except OSError:
        if not path:
            raise FileNotFoundError(
                f"the generic BoxNet model is not installed ({p}): choose a model file") from None
        raise FileNotFoundError(f"{p}: no BoxNet model file there") from None
    if key not in _MODELS:
        if len(_MODELS) >= 4:
            _MODELS.pop(next(iter(_MODELS)))
        _MODELS[key] = load_model(p)
    return _MODELS[key]


def _path_or_none(value) -> "Path | None":
    """A FileEdit value: None when empty (magicgui gives Path('.') for an empty field)."""
    if value is None or str(value) in ("", "."):
        return None
    return Path(value)


def micrograph_layers(viewer) -> list:
    """2D, non-RGB Image layers that can be picked (not our defocus overlays)."""
    from napari.layers import Image

    return [layer for layer in viewer.layers
            if isinstance(layer, Image) and not layer.rgb and layer.ndim == 2
            and (layer.metadata or {}).get(_ROLE) not in _NOT_MICROGRAPHS]


def our_layer(viewer, role: str, source):
    """Our ``role`` layer (``"picks"`` or ``"artifacts"``) of the micrograph layer ``source``, or None."""
    if source is None:
        return None
    for layer in viewer.layers:
        meta = layer.metadata or {}
        if meta.get(_ROLE) == role and meta.get("source_id") == str(source.unique_id):
            return layer
    return None


def micrograph_data(layer) -> np.ndarray:
    """The ``(Y, X)`` float32 pixels of a micrograph layer (level 0 of a multiscale one)."""
    return np.asarray(layer.data[0] if layer.multiscale else layer.data, dtype=np.float32)


def _source_meta(layer) -> dict:
    return {"source": layer.name, "source_id": str(layer.unique_id)}


def _on_points_added(event):
    """Points added by hand get the manual score (napari would copy the last selected point's score)."""
    from .._layers import MANUAL_SCORE

    layer = event.source
    if getattr(event.action, "value", event.action) != "added" or "score" not in layer.features:
        return
    n = len(layer.data)
    rows = [int(i) % n for i in event.data_indices] if n else []
    if rows:
        col = layer.features.columns.get_loc("score")
        layer.features.iloc[rows, col] = MANUAL_SCORE
        layer.refresh_colors(update_color_mapping=False)


def show_picks(viewer, image, yx, score, pixel_size: float, diameter: float, *, picks=None, mask=None,
               threshold=None, model: str = "", model_path=None):
    """Show picks ``(N, 2)`` px of ``image`` (a micrograph layer) as its picks layer (updated in place, or added) and
    an artifact ``mask`` as its artifacts layer; both aligned with ``image`` (same scale, translate, units).

    picks: the ``Picks`` they came from (kept for live thresholds), or None (imported). Returns the Points layer.
    """
    from .._layers import mask_layer, picks_layer, score_limits

    meta = {**_source_meta(image), "micrograph": image.name,  # "micrograph": named by File > Save (STAR writer)
            "model": model, "model_path": str(model_path) if model_path else None, "pixel_size": float(pixel_size)}
    data, kw, _ = picks_layer(yx, score, pixel_size, diameter, f"{image.name} picks", threshold=threshold,
                              metadata=meta)
    kw.update(scale=tuple(image.scale[-2:]), translate=tuple(image.translate[-2:]), units=tuple(image.units[-2:]))
    points = our_layer(viewer, "picks", image)
    if points is None:
        points = viewer.add_points(data, **kw)
        points.events.data.connect(_on_points_added)
    else:
        import pandas as pd

        points.data = data
        points.features = pd.DataFrame(kw["features"])
        points.feature_defaults = kw["feature_defaults"]
        points.size = kw["size"]
        points.metadata = {**points.metadata, **kw["metadata"]}
        points.border_contrast_limits = score_limits(threshold)
        points.refresh_colors(update_color_mapping=False)
        points.selected_data = set()
    if picks is not None:
        _STORED[_real(points)] = picks
    else:
        _STORED.pop(_real(points), None)
    if mask is not None:
        data, kw, _ = mask_layer(mask, pixel_size, f"{image.name} artifacts", metadata=_source_meta(image))
        kw.update(scale=tuple(image.scale[-2:]), translate=tuple(image.translate[-2:]),
                  units=tuple(image.units[-2:]))
        labels = our_layer(viewer, "artifacts", image)
        if labels is None:
            labels = viewer.add_labels(data, **kw)
            # under the picks, so the circles stay on top; the picks stay the layer being edited
            viewer.layers.move(viewer.layers.index(labels), viewer.layers.index(points))
            viewer.layers.selection.active = points
        else:
            labels.data = data
    return points


def _show_result(viewer, image, picks, model_path=None):
    """Show a ``Picks`` result of ``image``: picks layer + artifacts layer."""
    s = picks.settings
    return show_picks(viewer, image, picks.yx, picks.score, s.pixel_size, s.diameter, picks=picks, mask=picks.mask,
                      threshold=s.threshold, model=picks.model, model_path=model_path)


def _style_form(status_labels=(), selectable=()):
    for w in status_labels:
        w.native.setWordWrap(True)
        w.native.setSizePolicy(_policy("Expanding"), _policy("Preferred"))
    for w in selectable:
        w.native.setTextInteractionFlags(_selectable())


def _wrap(dock, body: Container) -> None:
    """Dock ``body`` inside a vertical scroll area (napari docks ``dock.native`` without one)."""
    body.native.layout().addStretch(1)  # the form stays at the top of a tall dock
    dock._scroll = _scroll_area(body.native)
    dock.native.layout().addWidget(dock._scroll)
    dock.native.layout().setContentsMargins(0, 0, 0, 0)
    dock.native.setSizePolicy(_policy("Preferred"), _policy("Expanding"))


def _tip(widget, text: str):
    widget.tooltip = text
    return widget


# ---------------------------------------------------------------------------------------------------------------
# picking dock
# ---------------------------------------------------------------------------------------------------------------
class BoxNetWidget(ProgressRun, Container):
    """Dock: BoxNet particle picking and artifact masking of a micrograph, with a live threshold."""

    cancelled_message = "Picking cancelled"

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        from ..core.picking import BoxNetSettings

        self._viewer = viewer
        self._worker = None
        self.last_picks = None

        self.source = _tip(ComboBox(label="Micrograph", choices=self._micrographs, nullable=True),
                           "2D micrograph (Image layer) to pick")
        self.pixel_size = _tip(FloatSpinBox(label="Pixel size (Å/px)", value=1.0, min=0.01, max=100.0, step=0.001),
                               "Å per pixel of the micrograph; filled in from the layer's scale when it is in Å")
        self.diameter = _tip(FloatSpinBox(label="Particle diameter (Å)", value=150.0, min=10.0, max=5000.0,
                                          step=5.0),
                             "Longest particle diameter in Å: the circles are this wide. Changing it re-derives the "
                             "picks instantly.")
        self.threshold = _tip(FloatSlider(label="Threshold (score)", value=BoxNetSettings().threshold, min=0.05,
                                          max=1.0, step=0.01),
                              "Minimum particle score (softmax; the paper's 0.95 suits its wider network). Moving it "
                              "re-derives the picks "
                              "from the stored network output instantly, replacing hand edits of the picks layer.")
        self.min_distance = _tip(FloatSpinBox(label="Min. distance between picks (Å)",
                                              value=BoxNetSettings(diameter=150.0).min_distance_angstrom, min=0.0,
                                              max=10000.0, step=5.0),
                                 "Two picks are at least this far apart (Å): a blob with maxima this far apart is "
                                 "split, and of closer picks the bigger one stays; live. Follows the diameter (0.4 ×) "
                                 "until you change it; lower it for crowded micrographs.")
        self.mask_distance = _tip(FloatSpinBox(label="Min. distance to artifacts (Å)", value=75.0, min=0.0,
                                               max=10000.0, step=5.0),
                                  "Picks closer than this (Å) to a masked artifact are dropped; live. Follows the "
                                  "diameter (half of it) until you change it.")
        self.model_file = _tip(FileEdit(label="Model file (.pt)", mode="r", filter=MODEL_FILTER, nullable=True),
                               "A BoxNet model (.pt); empty = the generic model shipped with napari-warp")
        self.model_label = Label(value="Model: generic (shipped with napari-warp)")
        self.run_button = _tip(PushButton(text="Pick"), "Run BoxNet on the micrograph (picks + artifact mask)")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1000, visible=False)
        self.status = Label(value="Select a micrograph.")
        self.summary = Label(value="")
        self.import_button = _tip(PushButton(text="Import picks…"),
                                  "Read RELION .star, cryoSPARC .cs, EMAN .box, crYOLO .cbox or Topaz picks of this "
                                  "micrograph (matched by name) into its picks layer")
        self.save_button = _tip(PushButton(text="Save picks…"),
                                "Write the picks layer (as edited) as a RELION coordinate STAR file")
        self.legend = Label(value=(
            "Circles: one particle diameter; colour = score, from the threshold (red) to 1 (green); points you "
            "add by hand score 1. "
            "Artifacts layer: <span style='color:#ff5a36'>2 = artifact</span>, "
            "<span style='color:#4fc3f7'>3 = ignore</span> (paint to correct, for retraining)."))
        self._body = Container(widgets=[
            self.source, self.pixel_size, self.diameter, self.threshold, self.min_distance, self.mask_distance,
            self.model_file,
            self.model_label, self.run_button, self.cancel_button, self.progress, self.status, self.summary,
            Container(widgets=[self.import_button, self.save_button], layout="horizontal", labels=False),
            self.legend,
        ])
        super().__init__(widgets=[], labels=False)
        _style_form((self.status, self.summary, self.legend, self.model_label), (self.status, self.summary))
        _wrap(self, self._body)  # after word wrap, so long labels do not widen the dock

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.import_button.changed.connect(self._import_dialog)
        self.save_button.changed.connect(self._save_dialog)
        self.source.changed.connect(self._from_layer)
        self.model_file.changed.connect(self._model_changed)
        # live post-processing, throttled: a drag re-derives the picks with the latest values every THROTTLE_MS
        self._throttle = QTimer()
        self._throttle.setSingleShot(True)
        self._throttle.setInterval(THROTTLE_MS)
        self._throttle.timeout.connect(self.update_threshold)
        self._diameter = float(self.diameter.value)
        self._painted_layers = weakref.WeakSet()
        self.diameter.changed.connect(self._diameter_changed)
        for w in (self.threshold, self.min_distance, self.mask_distance):
            w.changed.connect(self._schedule_update)
        self._init_progress()
        for ev in ("inserted", "removed", "renamed"):
            getattr(viewer.layers.events, ev).connect(self._layers_changed)
        self._layers_changed()

    # -- source --------------------------------------------------------------------------------------------------
    def _micrographs(self, *_):
        return [(layer.name, layer) for layer in micrograph_layers(self._viewer)]

    def reset_choices(self, *_):
        """Called by napari on layer changes (the form lives in ``self._body``)."""
        self._layers_changed()

    def _layers_changed(self, *_):
        if refresh_source(self.source, [lay for _, lay in self._micrographs()], self._viewer):
            self._from_layer()

    def _from_layer(self, *_):
        from .._layers import layer_pixel_size

        layer = self.source.value
        if layer is None:
            return
        ps = layer_pixel_size(layer)
        if ps:
            self.pixel_size.value = ps
        points = our_layer(self._viewer, "picks", layer)
        if points is not None and points.metadata.get("diameter"):
            with self.diameter.changed.blocked():
                self.diameter.value = float(points.metadata["diameter"])
        if points is not None and points.metadata.get("threshold") is not None:
            with self.threshold.changed.blocked():  # each micrograph's picks keep their own threshold
                self.threshold.value = float(points.metadata["threshold"])
        where = f"{ps:.4g} Å/px" if ps else "pixel size unknown: enter it"
        shape = "×".join(str(s) for s in layer.data.shape)
        self.status.value = f"{layer.name}: {shape} px, {where}."
        self._summarize()

    def _model_changed(self, *_):
        path = _path_or_none(self.model_file.value)
        if path is None:
            self.model_label.value = "Model: generic (shipped with napari-warp)"
            return
        try:
            model = load_picking_model(path)
        except (OSError, ValueError, RuntimeError) as exc:
            self.model_label.value = f"Model: cannot read it ({exc})"
            return
        self.model_label.value = f"Model: {model.label}"
        if (threshold := suggested_threshold(model)) is not None:
            self.threshold.value = threshold  # live: re-derives the current picks
            self.model_label.value += f"; threshold {threshold:.2f}, the best on its training picks"

    # -- settings ------------------------------------------------------------------------------------------------
    def settings(self):
        """``BoxNetSettings`` from the form."""
        from ..core.picking import BoxNetSettings

        return BoxNetSettings(pixel_size=float(self.pixel_size.value), diameter=float(self.diameter.value),
                              threshold=float(self.threshold.value), mask_distance=float(self.mask_distance.value),
                              min_distance=float(self.min_distance.value))

    # -- picking -------------------------------------------------------------------------------------------------
    def run(self, *_):
        """Pick the chosen micrograph in a worker thread; returns the worker (None when the form is not ready)."""
        layer = self.source.value
        if layer is None:
            self.status.value = "No 2D micrograph to pick: open one first."
            return None
        settings = self.settings()
        model_path = _path_or_none(self.model_file.value)
        image = micrograph_data(layer)
        self._start_run(f"Picking {layer.name} …")

        @thread_worker
        def work():
            from ..core.picking import pick

            model = load_picking_model(model_path)
            return pick(image, settings, model, progress=self._report), model

        def done(result):
            picks, model = result
            if layer not in self._viewer.layers:
                return
            self.last_picks = picks
            _show_result(self._viewer, layer, picks, model_path or model.path)
            self.model_label.value = f"Model: {model.label}"
            self.status.value = f"Picked {layer.name}: {len(picks)} particles."
            self._summarize()

        def failed(exc):
            from ..core.errors import Cancelled

            if isinstance(exc, Cancelled):
                self.status.value = "Picking cancelled."
            else:
                self.status.value = f"Picking failed: {type(exc).__name__}: {exc}"

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": self._run_finished})
        return self._worker

    def _schedule_update(self, *_):
        if not self._throttle.isActive():
            self._throttle.start()

    def _watch_paint(self, labels) -> None:
        """Re-derive the picks when the artifacts layer is painted (once per layer)."""
        real = _real(labels)
        if real not in self._painted_layers:
            self._painted_layers.add(real)
            real.events.paint.connect(self._schedule_update)

    def _diameter_changed(self, value):
        """The minimum distances (to artifacts, between picks) follow the diameter while they are its defaults."""
        from ..core.picking import BoxNetSettings

        old, new = BoxNetSettings(diameter=self._diameter), BoxNetSettings(diameter=float(value))
        for box, attr in ((self.mask_distance, "mask_distance_angstrom"), (self.min_distance, "min_distance_angstrom")):
            if abs(float(box.value) - getattr(old, attr)) < 1e-6:
                with box.changed.blocked():
                    box.value = getattr(new, attr)
        self._diameter = float(value)
        self._schedule_update()

    def update_threshold(self, *_):
        """Re-derive the chosen micrograph's picks from the stored network output with the form's threshold,
        diameter and minimum distance to artifacts (no network); returns the new ``Picks`` or None."""
        from .._layers import masks_from_labels
        from ..core.picking import apply_threshold

        layer = self.source.value
        points = our_layer(self._viewer, "picks", layer)
        stored = stored_picks(points) if points is not None else None
        if stored is None:
            if points is not None and self.diameter.value > 0:  # imported picks: the circles follow the diameter
                ps = float(points.metadata.get("pixel_size") or self.pixel_size.value)
                points.size = float(self.diameter.value) / ps
                points.metadata = {**points.metadata, "diameter": float(self.diameter.value)}
            return None
        labels = our_layer(self._viewer, "artifacts", layer)
        painted = None  # the artifacts layer as painted and erased by hand replaces the network's mask
        if labels is not None and tuple(labels.data.shape) == tuple(stored.input_shape):
            painted = masks_from_labels(labels.data)[0]
            self._watch_paint(labels)
        picks = apply_threshold(stored, float(self.threshold.value), artifact_mask=painted,
                                diameter=float(self.diameter.value), mask_distance=float(self.mask_distance.value),
                                min_distance=float(self.min_distance.value))
        s = picks.settings
        show_picks(self._viewer, layer, picks.yx, picks.score, s.pixel_size, s.diameter, picks=picks, mask=None,
                   threshold=s.threshold, model=picks.model, model_path=points.metadata.get("model_path"))
        self.last_picks = picks
        self._summarize()
        return picks

    def _summarize(self):
        points = our_layer(self._viewer, "picks", self.source.value)
        if points is None:
            self.summary.value = ""
            return
        meta = points.metadata
        model = meta.get("model") or "?"
        how = (f"threshold {meta['threshold']:.2f}" if meta.get("threshold") is not None else "imported")
        self.summary.value = f"<b>{len(points.data)} picks</b> ({how}) · model {model}"

    # -- import / export -----------------------------------------------------------------------------------------
    def import_picks(self, path):
        """Read a pick file into the chosen micrograph's picks layer; returns the layer (None on failure)."""
        from .._layers import layer_pixel_size
        from ..core.picking.io import PickImportError, match_picks_to_items, read_picks

        layer = self.source.value
        if layer is None:
            self.status.value = "Choose the micrograph the picks belong to first."
            return None
        path = Path(path)
        shape = tuple(layer.data.shape[-2:])
        try:
            tables = read_picks(path, micrograph_shape=shape, pixel_size=layer_pixel_size(layer)
                                or float(self.pixel_size.value))
            try:
                matched, _ = match_picks_to_items(tables, [layer.name], source=path)
                table = matched[layer.name]
            except PickImportError:
                if len(tables) != 1:
                    raise
                table = next(iter(tables.values()))  # one micrograph in the file: it is this one
        except (OSError, ValueError) as exc:
            self.status.value = f"Import failed: {exc}"
            return None
        if table.diameter:
            with self.diameter.changed.blocked():
                self.diameter.value = float(table.diameter)
        points = show_picks(self._viewer, layer, table.yx, table.score, float(self.pixel_size.value),
                            float(self.diameter.value), model=f"imported from {path.name}")
        self.status.value = f"Imported {len(table)} picks from {path.name}."
        self._summarize()
        return points

    def save_picks(self, path):
        """Write the chosen micrograph's picks layer (as edited) as a RELION coordinate STAR file; returns the path."""
        from ..core.picking.io import write_picks_star

        layer = self.source.value
        points = our_layer(self._viewer, "picks", layer)
        if points is None:
            self.status.value = "No picks to save: pick or import first."
            return None
        meta = points.metadata
        score = np.asarray(points.features["score"], dtype=float) if "score" in points.features else None
        try:
            out = write_picks_star(path, np.asarray(points.data, dtype=float).reshape(-1, 2), score,
                                   micrograph_name=layer.name, model=meta.get("model") or None,
                                   diameter=meta.get("diameter"), threshold=meta.get("threshold"))
        except (OSError, ValueError) as exc:
            self.status.value = f"Saving failed: {exc}"
            return None
        self.status.value = f"Saved {len(points.data)} picks to {out}."
        return out

    def _import_dialog(self, *_):
        from qtpy.QtWidgets import QFileDialog

        path, _ = QFileDialog.getOpenFileName(self.native, "Import picks", "", PICK_FILTER)
        if path:
            self.import_picks(path)

    def _save_dialog(self, *_):
        from qtpy.QtWidgets import QFileDialog

        layer = self.source.value
        default = f"{Path(layer.name).stem}_picks.star" if layer is not None else "picks.star"
        path, _ = QFileDialog.getSaveFileName(self.native, "Save picks", default, "RELION STAR (*.star)")
        if path:
            self.save_picks(path)


# ---------------------------------------------------------------------------------------------------------------
# training dock
# ---------------------------------------------------------------------------------------------------------------
METRICS = (  # (TrainingHistory field, legend, colour, line style)
    ("old_on_old", "old net · old data", "#9aa0a6", "--"),
    ("old_on_new", "old net · new data", "#ffb000", "--"),
    ("new_on_old", "new net · old data", "#9ecbff", "-"),
    ("new_on_new", "new net · new data", "#7CFC00", "-"),
)


def default_model_path() -> Path:
    """``~/napari-warp/boxnet-retrained-<date-time>.pt``."""
    return Path.home() / "napari-warp" / f"{RETRAINED_NAME}-{time.strftime('%Y%m%d-%H%M%S')}.pt"


class BoxNetTrainingWidget(ProgressRun, Container):
    """Dock: retrain BoxNet on corrected picks (Points) and painted artifacts (Labels: 2 artifact, 3 ignore),
    diluted with generic data, with a live plot of old/new network F1 on old/new data; save and re-pick."""

    cancelled_message = "Training cancelled"
    metrics_updated = Signal(dict)  # the history so far (GUI thread), after each epoch shown

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        self._viewer = viewer
        self._worker = None
        self._live = None  # history snapshot written by the worker, drawn by the GUI timer
        self._shown_epochs = 0
        self.history = None
        self.model = None  # the retrained PickingModel
        self.model_path = None
        self._pairs_trained = []
        self._figure = self._canvas = None

        self.points = _tip(Select(label="Picks (Points)", choices=self._points_layers, allow_multiple=True),
                           "Points layers with correct particle centres; each belongs to the micrograph it was "
                           "picked on (else to 'Micrograph of other layers')")
        self.masks = _tip(Select(label="Artifacts (Labels)", choices=self._labels_layers, allow_multiple=True),
                           "Optional Labels layers: 2 = artifact, 3 = ignore (uncertain, left out of training)")
        self.fallback = _tip(ComboBox(label="Micrograph of other layers", choices=self._micrographs,
                                      nullable=True),
                             "The micrograph of chosen layers that were not made by the picking dock")
        self.pairing = Label(value="")
        self.pixel_size = _tip(FloatSpinBox(label="Pixel size (Å/px)", value=1.0, min=0.01, max=100.0, step=0.001),
                               "Å per pixel, for micrographs whose layer does not say (layers in Å use their own)")
        self.diameter = _tip(FloatSpinBox(label="Particle diameter (Å)", value=150.0, min=10.0, max=5000.0,
                                          step=5.0), "Particle diameter in Å (sets the training labels)")
        self.start_model = _tip(FileEdit(label="Start model (.pt)", mode="r", filter=MODEL_FILTER, nullable=True),
                                "Model to retrain; empty = the generic model shipped with napari-warp")
        self.epochs = _tip(SpinBox(label="Epochs", value=100, min=1, max=10000),
                           "Passes over the new micrographs' area (100 in the paper)")
        self.patience = _tip(SpinBox(label="Early stop after (epochs)", value=20, min=0, max=10000),
                             "Stop when the new network on new data has not improved for this many epochs (0: never)")
        self.holdout = _tip(SpinBox(label="Held out for early stop (%)", value=20, min=0, max=50, step=5),
                            "Share of each micrograph (a band across it) kept out of training: the new-data curves "
                            "and the best epoch come from it, so the plot shows overfitting (0: train on all)")
        self.window = _tip(SpinBox(label="Window (px at 8 Å/px)", value=128, min=32, max=1024, step=16),
                           "Training window side at the network's 8 Å/px (multiple of 16)")
        self.dilute = _tip(CheckBox(label="Dilute with generic data", value=True),
                           "Mix simulated generic micrographs 1:1 into every batch, so the network keeps what it knew")
        self.n_generic = _tip(SpinBox(label="Generic micrographs", value=DEFAULT_SIMULATED, min=1, max=100),
                              "Simulated micrographs (with artifacts) made for dilution: 3–6 s each, once per session")
        self.out = _tip(FileEdit(label="Save model to (.pt)", mode="w", filter=MODEL_FILTER,
                                 value=default_model_path()),
                        f"Where the retrained model ({RETRAINED_NAME}, version = date-time) is written")
        self.run_button = _tip(PushButton(text="Train"), "Retrain in the background; the plot updates every epoch")
        self.cancel_button = _tip(PushButton(text="Cancel", enabled=False),
                                  "Stop after the current batch, keeping the best network so far")
        self.repick_button = _tip(PushButton(text="Re-pick", enabled=False),
                                  "Pick the trained micrographs again with the retrained model (replaces their picks)")
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1000, visible=False)
        self.status = Label(value="Choose picks (Points) of at least one micrograph.")
        self.plot_box = Container(widgets=[], labels=False)
        self._body = Container(widgets=[
            self.points, self.masks, self.fallback, self.pairing, self.pixel_size, self.diameter, self.start_model,
            self.epochs, self.patience, self.holdout, self.window, self.dilute, self.n_generic, self.out,
            Container(widgets=[self.run_button, self.cancel_button, self.repick_button], layout="horizontal",
                      labels=False),
            self.progress, self.status, self.plot_box,
        ])
        super().__init__(widgets=[], labels=False)
        _style_form((self.status, self.pairing), (self.status,))
        for sel in (self.points, self.masks):
            sel.native.setMaximumHeight(76)
        _wrap(self, self._body)  # after word wrap, so long labels do not widen the dock

        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self.repick_button.changed.connect(self.repick)
        self.dilute.changed.connect(lambda v: setattr(self.n_generic, "enabled", bool(v)))
        for w in (self.points, self.masks, self.fallback):
            w.changed.connect(self._show_pairing)
        self._init_progress()
        self._draw([])
        for ev in ("inserted", "removed", "renamed"):
            getattr(viewer.layers.events, ev).connect(self._layers_changed)
        self._layers_changed()

    # -- layers --------------------------------------------------------------------------------------------------
    def _points_layers(self, *_):
        from napari.layers import Points

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Points)]

    def _labels_layers(self, *_):
        from napari.layers import Labels

        return [(layer.name, layer) for layer in self._viewer.layers if isinstance(layer, Labels)]

    def _micrographs(self, *_):
        return [(layer.name, layer) for layer in micrograph_layers(self._viewer)]

    def reset_choices(self, *_):
        self._layers_changed()

    def _layers_changed(self, *_):
        for w in (self.points, self.masks, self.fallback):
            w.reset_choices()
        if not self.points.value:  # nothing chosen yet: all picks
            self.points.value = [lay for _, lay in self._points_layers()]
        if self.fallback.value is None and (mics := self._micrographs()):
            self.fallback.value = mics[0][1]
        self._show_pairing()

    def _micrograph_of(self, layer):
        """The micrograph layer a Points/Labels layer belongs to: recorded by the picking dock, else by name
        ('<micrograph> picks'), else the fallback choice."""
        mics = [lay for _, lay in self._micrographs()]
        meta = layer.metadata or {}
        for m in mics:
            if meta.get("source_id") == str(m.unique_id):
                return m
        for m in mics:
            if meta.get("source") == m.name or layer.name in (f"{m.name} picks", f"{m.name} artifacts"):
                return m
        return self.fallback.value

    def pairs(self) -> list:
        """``[(micrograph layer, [points layers], labels layer or None)]`` for the chosen layers."""
        out: dict = {}
        for points in self.points.value or []:
            mic = self._micrograph_of(points)
            if mic is not None:  # keyed by unique_id: proxies of one layer differ in id()
                out.setdefault(mic.unique_id, [mic, [], None])[1].append(points)
        for labels in self.masks.value or []:
            mic = self._micrograph_of(labels)
            if mic is not None and mic.unique_id in out:
                out[mic.unique_id][2] = labels
        return [tuple(v) for v in out.values()]

    def _show_pairing(self, *_):
        from .._layers import layer_pixel_size

        pairs = self.pairs()
        if not pairs:
            self.pairing.value = "No picks paired with a micrograph yet."
            return
        lines = []
        for mic, points, labels in pairs:
            n = sum(len(p.data) for p in points)
            extra = f" + {labels.name}" if labels is not None else ""
            lines.append(f"{mic.name}: {n} picks{extra}")
        self.pairing.value = "<br>".join(lines)
        mic, points, _ = pairs[0]
        if ps := layer_pixel_size(mic):
            self.pixel_size.value = ps
        if d := (points[0].metadata or {}).get("diameter"):
            self.diameter.value = float(d)

    # -- settings ------------------------------------------------------------------------------------------------
    def training_settings(self, **overrides):
        """``TrainingSettings`` from the form (keywords override fields, e.g. ``batch_size``)."""
        from ..core.picking.train import TrainingSettings

        values = dict(epochs=int(self.epochs.value), patience=int(self.patience.value),
                      window=int(self.window.value), dilute=bool(self.dilute.value),
                      holdout=int(self.holdout.value) / 100)
        values.update(overrides)
        return TrainingSettings(**values)

    def _examples_input(self):
        """What the worker needs, read from the layers in the GUI thread: ``[(image, Å/px, picks px, artifact,
        ignore, name)]``. Raises ValueError with a message for the status line."""
        from .._layers import layer_pixel_size, masks_from_labels, points_in_image_pixels

        items = []
        for mic, points, labels in self.pairs():
            image = micrograph_data(mic)
            yx = np.concatenate([points_in_image_pixels(p, mic) for p in points])
            inside = np.all((yx >= 0) & (yx < np.asarray(image.shape)), axis=1)
            artifact = ignore = None
            if labels is not None:
                if tuple(labels.data.shape[-2:]) != image.shape:
                    raise ValueError(f"{labels.name} is {labels.data.shape} px but {mic.name} is {image.shape} px: "
                                     "paint artifacts on a Labels layer the size of the micrograph")
                artifact, ignore = masks_from_labels(labels.data)
            items.append((image, layer_pixel_size(mic) or float(self.pixel_size.value), yx[inside], artifact,
                          ignore, mic.name))
        if not items or not any(len(it[2]) for it in items):
            raise ValueError("No picks to learn from: choose Points layers with picks on a micrograph.")
        return items

    # -- training ------------------------------------------------------------------------------------------------
    def run(self, *_, settings=None):
        """Retrain in a worker thread; returns the worker (None when the form is not ready). The model is saved to
        the chosen file when training ends (also when cancelled after at least one epoch)."""
        try:
            items = self._examples_input()
            settings = settings or self.training_settings()
        except ValueError as exc:
            self.status.value = str(exc)
            return None
        start = _path_or_none(self.start_model.value)
        out = _path_or_none(self.out.value) or default_model_path()
        if out.suffix != ".pt":
            out = out.with_suffix(".pt")
        diameter = float(self.diameter.value)
        n_old = int(self.n_generic.value) if settings.dilute else 0
        self._pairs_trained = [p[0] for p in self.pairs()]
        self._live, self._shown_epochs, self.history = None, 0, None
        self._draw([])
        self.repick_button.enabled = False
        self._start_run("Preparing training data …")
        self._phase = self.status.value

        @thread_worker
        def work():
            from ..core.picking import save_model
            from ..core.picking.infer import threshold_on_picks
            from ..core.picking.train import make_example, train

            base = load_picking_model(start)
            new = [make_example(img, ps, yx, diameter, artifact=a, ignore=ig, source=name)
                   for img, ps, yx, a, ig, name in items]
            old = None
            if n_old:
                if n_old not in _OLD_EXAMPLES:
                    from ..core.picking.data import simulated_examples

                    self._phase = f"Simulating {n_old} generic micrographs for dilution …"
                    _OLD_EXAMPLES[n_old] = simulated_examples(n_old, progress=self._report)
                old = _OLD_EXAMPLES[n_old]
            self._phase = f"Training on {len(new)} micrograph(s) …"

            def on_epoch(history, _net):
                self._live = {k: (list(v) if isinstance(v, list) else v) for k, v in history.as_dict().items()}

            model, history = train(base, new, old, settings, progress=self._record, cancel=lambda: self._cancel,
                                   on_epoch=on_epoch)
            if not history.epoch:
                return None, history, None
            threshold = threshold_f1 = None
            if not self._cancel:  # cancelled: save what there is, now
                self._phase = "Choosing the threshold that best matches your picks …"
                threshold, threshold_f1 = threshold_on_picks(
                    model, [(img, ps, yx, diameter, a, ig) for img, ps, yx, a, ig, _ in items], self._report)
            version = time.strftime("%Y%m%d-%H%M%S")
            model.name, model.version = RETRAINED_NAME, version
            model.trained_on = {
                "base_model": base.label, "micrographs": [it[5] for it in items],
                "picks": int(sum(len(it[2]) for it in items)), "diameter_A": diameter,
                "generic_micrographs": n_old, "epochs": int(history.epoch[-1]), "best_epoch": int(history.best_epoch),
                "new_on_new_f1": _finite(history.new_on_new[history.best_epoch - 1]),
                "threshold": threshold, "threshold_f1": threshold_f1,
                "cancelled": bool(self._cancel), "date": version,
            }
            return model, history, save_model(model, out)

        def done(result):
            model, history, path = result
            self.history = history.as_dict()
            self._live = self.history
            self._show_live(force=True)
            if model is None:
                self.status.value = "Training stopped before the first epoch ended: nothing saved."
                return
            self.model, self.model_path = model, path
            best = history.best_epoch
            f1 = history.new_on_new[best - 1]
            how = "cancelled at" if self._cancel else "ran"
            cal = model.trained_on
            tuned = ("" if cal["threshold"] is None else f"Threshold {cal['threshold']:.2f} matches your picks best "
                     f"(F1 {cal['threshold_f1']:.2f}); Re-pick uses it. ")
            if cal["threshold_f1"] == 0:
                tuned += "It finds none of your particles: train longer, or check the diameter and pixel size. "
            self.status.value = (f"Training {how} {history.epoch[-1]} epochs in {history.seconds:.0f} s; best "
                                 f"epoch {best} (new net on new data F1 {f1:.2f}). {tuned}"
                                 f"Saved {model.label} to {path}.")
            self.repick_button.enabled = True
            if _path_or_none(self.out.value) == out:
                self.out.value = default_model_path()  # the next training does not overwrite this one

        def failed(exc):
            from ..core.errors import Cancelled

            if isinstance(exc, Cancelled):
                self.status.value = "Training cancelled."
            else:
                self.status.value = f"Training failed: {type(exc).__name__}: {exc}"

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": self._run_finished})
        return self._worker

    def _record(self, done: int, total: int) -> None:
        """Training progress (worker thread); never raises: ``train`` stops itself through ``cancel``."""
        self._state = (done, max(total, 1))

    def _show_progress(self) -> None:
        super()._show_progress()
        if getattr(self, "_phase", None) and not self._cancel:
            self.status.value = self._phase
        self._show_live()

    def _run_finished(self) -> None:
        self._phase = None
        super()._run_finished()

    def _show_live(self, force: bool = False):
        live = self._live
        if live is None:
            return
        n = len(live["epoch"])
        if n == self._shown_epochs and not force:
            return
        self._shown_epochs = n
        self._draw(live)
        self.metrics_updated.emit(live)

    # -- plot ----------------------------------------------------------------------------------------------------
    def _draw(self, history):
        """The four particle-pixel F1 curves against the epoch (old net dashed: it does not change)."""
        from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
        from matplotlib.figure import Figure

        c = theme_colors(self._viewer)
        if self._figure is None:
            self._figure = Figure(figsize=(4.0, 2.9), dpi=100, layout="constrained")
            self._canvas = FigureCanvasQTAgg(self._figure)
            self._canvas.setMinimumWidth(280)
            self._canvas.setFixedHeight(290)
            self._canvas.setSizePolicy(_policy("Expanding"), _policy("Fixed"))
            self.plot_box.native.layout().addWidget(self._canvas)
        fig = self._figure
        fig.clear()
        fig.set_facecolor(c["bg"])
        ax = fig.add_subplot()
        ax.set_facecolor(c["axes"])
        text = c["text"]
        epochs = list(history["epoch"]) if history else []
        handles = {}
        for key, label, colour, style in METRICS:
            values = list(history[key]) if history else []
            (handles[key],) = ax.plot(epochs, values, ls=style, color=colour, lw=1.3,
                                      marker="o" if len(epochs) < 12 else None, ms=3, label=label)
        best = ax.axvline(history["best_epoch"] if history and history.get("best_epoch") else np.nan,
                          color=c["accent"], lw=1.0, ls=":", label="best epoch")
        ax.set_xlim(0.5, max(epochs[-1] if epochs else 1, 2) + 0.5)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("epoch", color=text, fontsize=8)
        ax.set_ylabel("particle-pixel F1 (soft)", color=text, fontsize=8)
        ax.tick_params(colors=text, labelsize=7.5, length=3)
        for s in ax.spines.values():
            s.set_color(text)
        # above the axes: early epochs sit anywhere in [0, 1]
        # columns: the old network (and the best epoch), the new network
        order = [handles["old_on_old"], handles["old_on_new"], best, handles["new_on_old"], handles["new_on_new"]]
        ax.legend(handles=order, fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False,
                  labelcolor=text, ncol=2, handlelength=1.6, columnspacing=1.0, borderaxespad=0.2)
        ax.xaxis.get_major_locator().set_params(integer=True)
        self._canvas.draw()  # now: a deferred draw could outlive a closed dock

    # -- re-pick -------------------------------------------------------------------------------------------------
    def repick(self, *_):
        """Pick the trained micrographs with the retrained model in a worker (their picks layers are replaced);
        returns the worker, or None without a retrained model."""
        from .._layers import layer_pixel_size
        from ..core.picking import BoxNetSettings

        if self.model is None:
            self.status.value = "Train a model first."
            return None
        jobs = []
        for mic in self._pairs_trained:
            if mic not in self._viewer.layers:
                continue
            old = our_layer(self._viewer, "picks", mic)
            meta = old.metadata if old is not None else {}
            threshold = suggested_threshold(self.model) or meta.get("threshold")
            stored = stored_picks(old) if old is not None else None
            settings = BoxNetSettings(
                pixel_size=layer_pixel_size(mic) or float(self.pixel_size.value),
                diameter=float(self.diameter.value),
                threshold=BoxNetSettings().threshold if threshold is None else float(threshold),
                mask_distance=stored.settings.mask_distance if stored is not None else None,
                min_distance=stored.settings.min_distance if stored is not None else None)
            jobs.append((mic, micrograph_data(mic), settings))
        if not jobs:
            self.status.value = "The trained micrographs are no longer open."
            return None
        model, path = self.model, self.model_path
        self._start_run(f"Re-picking {len(jobs)} micrograph(s) with {model.label} …")
        self.repick_button.enabled = False

        @thread_worker
        def work():
            from ..core.picking import pick

            out = []
            for i, (mic, image, settings) in enumerate(jobs):
                self._phase = f"Re-picking {mic.name} ({i + 1}/{len(jobs)}) …"
                out.append((mic, pick(image, settings, model, progress=self._report)))
            return out

        def done(results):
            shown = []
            for mic, picks in results:
                if mic in self._viewer.layers:
                    _show_result(self._viewer, mic, picks, path)
                    shown.append(f"{mic.name}: {len(picks)}")
            self.status.value = f"Re-picked with {model.label}: " + ", ".join(shown) + " picks."
            folders = use_in_sessions([m for m, _, _ in jobs], path, float(self.diameter.value),
                                      suggested_threshold(model))
            if folders:
                self.status.value += (f" Session {', '.join(f.name for f in folders)} now picks with this model: "
                                      "start processing to re-pick all its micrographs.")

        def failed(exc):
            from ..core.errors import Cancelled

            self.status.value = ("Re-picking cancelled." if isinstance(exc, Cancelled)
                                 else f"Re-picking failed: {type(exc).__name__}: {exc}")

        def finished():
            self._run_finished()
            self.repick_button.enabled = self.model is not None

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": finished})
        return self._worker


def use_in_sessions(micrographs, model_path, diameter: float, threshold: float | None = None) -> list:
    """Point the sessions the ``micrographs`` came from (session-dock item layers) at ``model_path``: their settings
    file gets ``session.pick = true``, ``picking.model``, ``picking.diameter`` (and ``picking.threshold`` when
    given), so every item's picking step is outdated and the next processing run re-picks them all. Returns the
    session folders changed."""
    from ..core.session import apply_overrides, load_settings, save_settings

    folders = []
    for mic in micrographs:
        folder = (getattr(mic, "metadata", None) or {}).get("folder")
        if not folder or Path(folder) in folders:
            continue
        settings = load_settings(folder)
        if settings is None:
            continue
        changes = ["session.pick=true", f"picking.model={Path(model_path)}", f"picking.diameter={diameter:g}"]
        if threshold is not None:
            changes.append(f"picking.threshold={threshold:g}")
        save_settings(folder, apply_overrides(settings, changes))
        folders.append(Path(folder))
    return folders


def suggested_threshold(model) -> "float | None":
    """The threshold a retrained model's training picks suggest (stored in its ``trained_on``), or None."""
    value = (getattr(model, "trained_on", None) or {}).get("threshold")
    return float(value) if value is not None else None


def _finite(value) -> "float | None":
    value = float(value)
    return value if math.isfinite(value) else None
