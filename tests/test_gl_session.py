"""Session and overview docks in a real napari viewer under Xvfb: a processed session, an item opened, a screenshot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_widgets_session import make_session

pytestmark = pytest.mark.gl


@pytest.fixture(scope="module")
def processed_session(tmp_path_factory):
    return make_session(tmp_path_factory.mktemp("gl_session"))


def test_session_docks_screenshot(make_napari_viewer, qtbot, tmp_path, processed_session):
    from napari_warp._widgets.session import ITEM_KEY

    viewer = make_napari_viewer(show=True)
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resize(1600, 1000)
    dock, session = viewer.window.add_plugin_dock_widget("napari-warp", "Session (online processing)")
    dock2, overview = viewer.window.add_plugin_dock_widget("napari-warp", "Session overview")
    viewer.window._qt_window.splitDockWidget(dock, dock2, Qt.Orientation.Horizontal)  # side by side, full height
    session.input_folder.value = processed_session
    assert overview.folder == processed_session  # linked to the session dock
    assert session.table.rowCount() == 4 and len(overview.plotted["defocus"]["values"]) == 3
    # a defocus filter (1.0–1.8 µm) filters out the 2 µm item: orange in both docks
    overview.defocus_slider.setValue((1.0, 1.8))
    overview.apply_filters()
    assert overview.count_numbers["filtered"] == 1
    assert session.select("movie_1")
    session.open_selected()
    qtbot.waitUntil(lambda: sum(ITEM_KEY in (lay.metadata or {}) for lay in viewer.layers) >= 2, timeout=60000)
    qtbot.wait(300)
    # the item list in view: scroll the session dock to its end
    bar = session._scroll.verticalScrollBar()
    bar.setValue(bar.maximum())
    viewer.reset_view()
    qtbot.wait(300)

    canvas = viewer.screenshot(canvas_only=True, flash=False)
    assert canvas[..., :3].std() > 10, "canvas is blank"
    shot = viewer.screenshot(canvas_only=False, flash=False)
    assert shot.shape[1] > canvas.shape[1] + 300  # the docks are in the picture
    assert shot[..., :3].std() > 10
    from PIL import Image

    Image.fromarray(shot).save(tmp_path / "session_docks.png")
    overview.native.grab().save(str(tmp_path / "overview_dock.png"))
    folder = os.environ.get("NAPARI_WARP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(shot).save(Path(folder) / "session_docks.png")
        overview.native.grab().save(str(Path(folder) / "overview_dock.png"))
