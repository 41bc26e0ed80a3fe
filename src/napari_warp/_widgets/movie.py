"""Open a movie with the acquisition settings a reader cannot guess: gain reference, defects, EER grouping."""

# No `from __future__ import annotations` here: napari injects the viewer by matching the annotation string
# "napari.viewer.Viewer" exactly, and postponed evaluation would quote it twice.
from pathlib import Path

from magicgui.widgets import CheckBox, ComboBox, Container, FileEdit, FloatSpinBox, Label, PushButton, SpinBox
from napari.qt.threading import thread_worker


def describe(movie) -> str:
    """One line a microscopist reads at a glance: size, frames, sampling, voltage, dose."""
    f, y, x = movie.shape
    parts = [f"{x} × {y} px", f"{f} frame{'s' if f != 1 else ''}"]
    parts.append(f"{movie.pixel_size:.4g} Å/px" if movie.pixel_size else "pixel size unknown")
    if movie.voltage:
        parts.append(f"{movie.voltage:.0f} kV")
    if movie.exposure:
        parts.append(f"{movie.exposure:.3g} e/Å² total")
    return " · ".join(parts)


class MovieWidget(Container):
    """Dock: choose a movie and its gain/defects/EER options, then open it as a lazy (frame, y, x) layer in Å."""

    def __init__(self, viewer: "napari.viewer.Viewer"):  # noqa: F821
        self._viewer = viewer
        self.movie = FileEdit(label="Movie", filter="*.mrc *.mrcs *.tif *.tiff *.eer *.em *.st")
        self.gain = FileEdit(label="Gain reference", filter="*.mrc *.tif *.tiff *.gain", nullable=True)
        self.flip_x = CheckBox(text="Flip gain X")
        self.flip_y = CheckBox(text="Flip gain Y")
        self.transpose = CheckBox(text="Transpose gain")
        self.defects = FileEdit(label="Defects", filter="*.mrc *.tif *.tiff *.txt", nullable=True)
        self.binning = FloatSpinBox(label="Binning (Fourier crop)", value=1.0, min=1.0, max=16.0, step=0.5)
        self.pixel_size = FloatSpinBox(
            label="Pixel size (Å, 0 = header)", value=0.0, min=0.0, max=100.0, step=0.001
        )
        self.eer_group = SpinBox(label="EER frames per group", value=40, min=1, max=10000)
        self.eer_upsampling = ComboBox(label="EER rendering", choices=[("1× (4K)", 1), ("2× (8K)", 2), ("4× (16K)", 4)])
        self.open_button = PushButton(text="Open")
        self.status = Label(value="")
        super().__init__(
            widgets=[
                self.movie, self.gain, self.flip_x, self.flip_y, self.transpose, self.defects, self.binning,
                self.pixel_size, self.eer_group, self.eer_upsampling, self.open_button, self.status,
            ]
        )
        self.open_button.changed.connect(self._open)

    def options(self) -> dict:
        """Keyword arguments for :func:`napari_warp.core.io.movie.open_movie` from the form."""
        path = Path(self.movie.value)
        opts = {
            "gain": self.gain.value or None,
            "defects": self.defects.value or None,
            "gain_flip_x": self.flip_x.value,
            "gain_flip_y": self.flip_y.value,
            "gain_transpose": self.transpose.value,
            "binning": self.binning.value,
            "pixel_size": self.pixel_size.value or None,
        }
        if path.suffix.lower() == ".eer":
            opts["eer_group"] = self.eer_group.value
            opts["eer_upsampling"] = self.eer_upsampling.value
        return opts

    def _open(self, *_):
        from .._layers import movie_layer
        from ..core.io.movie import open_movie

        path = Path(self.movie.value)
        opts = self.options()
        self.open_button.enabled = False
        self.status.value = f"Opening {path.name} …"

        @thread_worker
        def work():
            movie = open_movie(path, **opts)
            return movie, movie_layer(movie, open_options={k: v for k, v in opts.items() if v is not None})

        def done(result):
            movie, (data, meta, _kind) = result
            self._viewer.add_image(data, **meta)
            self.status.value = describe(movie)

        def failed(exc):
            self.status.value = f"Could not open: {exc}"

        # Connecting "errored" up front tells the worker the error is handled here (shown in the dock).
        return work(
            _connect={
                "returned": done,
                "errored": failed,
                "finished": lambda: setattr(self.open_button, "enabled", True),
            }
        )
