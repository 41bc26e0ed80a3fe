"""Motion-correction dock: fit Warp's global + local motion model for a movie and show the average and tracks."""

# No `from __future__ import annotations`: napari injects the viewer by the exact annotation string.
from pathlib import Path

from magicgui.widgets import (
    Container,
    FileEdit,
    FloatSpinBox,
    Label,
    LineEdit,
    ProgressBar,
    PushButton,
    SpinBox,
)
from napari.qt.threading import thread_worker

from ._common import ProgressRun


def parse_grid(text: str) -> tuple[int, int] | None:
    """'XxY' (e.g. '6x4') -> (Gy, Gx) = (4, 6); '' or 'auto' -> None (scaled to the field of view)."""
    text = text.strip().lower()
    if text in ("", "auto"):
        return None
    try:
        x, y = (int(v) for v in text.replace("×", "x").split("x"))
    except ValueError:
        raise ValueError(f"local grid {text!r}: expected e.g. 5x5 or auto") from None
    return (y, x)  # MotionSettings.local_grid is (Gy, Gx)


class MotionWidget(ProgressRun, Container):
    """Dock: motion-correct the chosen movie; results appear as an average (Å) and exaggerated motion tracks."""

    cancelled_message = "motion correction cancelled"

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        self._viewer = viewer
        self._worker = None
        self._open_options: dict = {}
        self._layer_path = None
        self.movie = FileEdit(label="Movie", filter="*.mrc *.mrcs *.tif *.tiff *.eer *.em")
        self.pixel_size = FloatSpinBox(label="Pixel size (Å)", value=1.0, min=0.01, max=100.0, step=0.001)
        self.exposure = FloatSpinBox(label="Dose per frame (e/Å²)", value=1.0, min=0.001, max=100.0, step=0.01)
        self.patch = SpinBox(label="Patch size (px)", value=512, min=64, max=2048, step=64)
        self.local_grid = LineEdit(label="Local grid (x×y)", value="auto")
        self.bfactor = FloatSpinBox(label="Fit B-factor (Å²)", value=-500.0, min=-5000.0, max=0.0, step=50.0)
        self.exaggerate = SpinBox(label="Track exaggeration (×)", value=20, min=1, max=200)
        self.out = FileEdit(label="Save to folder", mode="d", nullable=True)
        self.run_button = PushButton(text="Correct motion")
        self.cancel_button = PushButton(text="Cancel", enabled=False)
        self.progress = ProgressBar(label="Progress", value=0, min=0, max=1000, visible=False)
        self.status = Label(value="Select a movie layer or file.")
        super().__init__(
            widgets=[
                self.movie, self.pixel_size, self.exposure, self.patch, self.local_grid, self.bfactor,
                self.exaggerate, self.out, self.run_button, self.cancel_button, self.progress, self.status,
            ]
        )
        self.run_button.changed.connect(self.run)
        self.cancel_button.changed.connect(self.cancel)
        self._init_progress()
        viewer.layers.selection.events.active.connect(self._from_layer)
        self._from_layer()

    def _from_layer(self, *_):
        """Fill the form from the active layer when it is a movie opened by napari-warp."""
        layer = self._viewer.layers.selection.active
        meta = getattr(layer, "metadata", {}) or {}
        if not meta.get("path"):
            return
        self.movie.value = meta["path"]
        self._open_options = dict(meta.get("open_options") or {})
        self._layer_path = meta["path"]
        if meta.get("pixel_size"):
            self.pixel_size.value = float(meta["pixel_size"])
        frames = layer.data.shape[0] if layer.ndim == 3 else 1
        if meta.get("exposure") and frames:
            self.exposure.value = float(meta["exposure"]) / frames

    def settings(self):
        from ..core.motion import MotionSettings

        return MotionSettings(
            pixel_size=self.pixel_size.value,
            exposure_per_frame=self.exposure.value,
            patch_size=self.patch.value,
            bfactor=self.bfactor.value,
            local_grid=parse_grid(self.local_grid.value),
        )

    def run(self, *_):
        from ..core.io.movie import open_movie

        try:
            settings = self.settings()
        except ValueError as exc:
            self.status.value = str(exc)
            return None
        path = Path(self.movie.value)
        out = self.out.value
        self._start_run(f"Correcting {path.name} …")

        @thread_worker
        def work():
            from ..core.motion import correct_movie, motion_metrics

            # gain, defects, flips, binning: as the layer was opened (only when the form still names that file)
            options = self._open_options if str(path) == str(self._layer_path) else {}
            # The form's pixel size is that of the frames as returned (binned if so); settings carry it.
            movie = open_movie(path, **options)
            if out:
                from ..core.item import run_motion_step

                result = run_motion_step(movie, settings, out, progress=self._report)
                return movie, result["model"], result["aligned"].average, result
            model, avg = correct_movie(movie, settings, progress=self._report, halves=False)
            return movie, model, avg.average, motion_metrics(model)

        def done(result):
            movie, model, average, metrics = result
            self._add_layers(movie, model, average)
            self.status.value = (
                f"{path.name}: first-third movement {metrics['mean_frame_movement']:.2f} Å · "
                f"max local deviation {metrics['max_local_deviation']:.2f} Å"
            )

        def failed(exc):
            self.status.value = f"Stopped: {exc}"

        def finished():
            self._run_finished()

        self._worker = work(_connect={"returned": done, "errored": failed, "finished": finished})
        return self._worker

    def _add_layers(self, movie, model, average):
        from .._layers import image_layer, motion_tracks_layer
        from ..core.demo import binned_for_display

        name = Path(movie.path).stem
        # Shown binned to ~4 Å/px as Warp shows micrographs; the saved average keeps the full sampling.
        shown, ps = binned_for_display(average, model.pixel_size)
        data, meta, _ = image_layer(shown, ps, f"{name} aligned average, {ps:.3g} Å/px")
        self._viewer.add_image(data, **meta)
        data, meta, _ = motion_tracks_layer(model, f"{name} motion ×{self.exaggerate.value}", self.exaggerate.value)
        self._viewer.add_shapes(data, **meta)
