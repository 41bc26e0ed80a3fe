"""What the docks share: plot colours from the napari theme, and the long-run pattern (worker, polled progress bar,
cancel flag raised from the core progress callback)."""

from qtpy.QtCore import QTimer


def theme_colors(viewer) -> dict:
    """Matplotlib colours matching the viewer's napari theme: ``bg``, ``axes``, ``text``, ``accent`` (hex)."""
    try:
        from napari.utils.theme import get_theme

        t = get_theme(viewer.theme)
        return {"bg": t.foreground.as_hex(), "axes": t.background.as_hex(), "text": t.text.as_hex(),
                "accent": t.current.as_hex()}
    except (KeyError, ValueError, AttributeError):
        return {"bg": "#2e333e", "axes": "#23242b", "text": "#f0f1f2", "accent": "#4560c4"}


def refresh_source(combo, layers: list, viewer) -> bool:
    """Refresh a layer ``combo`` after layer changes; when it lost its choice, take the selected layer if it is one of
    ``layers``, else the first. Returns True when the choice changed (compared with ``!=``: napari hands plugin docks
    a fresh proxy of the same layer on every access, so ``is`` would always differ)."""
    before = combo.value
    combo.reset_choices()
    if combo.value is None and layers:
        active = viewer.layers.selection.active
        combo.value = active if active in layers else layers[0]
    return combo.value != before


class ProgressRun:
    """Mixin for a dock with ``progress`` (ProgressBar 0–1000), ``run_button``, ``cancel_button`` and ``status``.

    ``_report`` is the core progress callback: it runs in the worker thread, only records the state (the GUI polls
    it every 100 ms) and raises ``Cancelled`` once ``cancel()`` was asked for. Call ``_init_progress()`` in
    ``__init__``, ``_start_run(message)`` before starting the worker and ``_run_finished()`` from its ``finished``.
    """

    cancelled_message = "cancelled"

    def _init_progress(self) -> None:
        self._cancel = False
        self._state = (0, 1)
        self._timer = QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self._show_progress)

    def _report(self, done: int, total: int) -> None:
        """Core progress callback (worker thread): record progress, stop when cancelled."""
        from ..core.errors import Cancelled

        self._state = (done, max(total, 1))
        if self._cancel:
            raise Cancelled(self.cancelled_message)

    def _show_progress(self) -> None:
        done, total = self._state
        self.progress.value = int(1000 * done / total)

    def _start_run(self, message: str) -> None:
        self._cancel = False
        self._state = (0, 1)
        self.run_button.enabled = False
        self.cancel_button.enabled = True
        self.progress.visible = True
        self.status.value = message
        self._timer.start()

    def _run_finished(self) -> None:
        self._timer.stop()
        self._show_progress()
        self.run_button.enabled = True
        self.cancel_button.enabled = False

    def cancel(self, *_) -> None:
        self._cancel = True
        self.status.value = "Cancelling …"
