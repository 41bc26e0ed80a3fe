"""Particle export dock, and saving a session item's edited picks from the session dock, on a ViewerModel (no
canvas, Qt offscreen) over a tiny processed session (test_session_export's)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import mrcfile
import numpy as np
import pytest

pytest.importorskip("qtpy")

from test_session_export import N_PICKS, star_items  # noqa: E402


@pytest.fixture
def viewer_model():
    from napari.components import ViewerModel

    return ViewerModel()


def _record(folder: Path, name: str) -> dict:
    from napari_warp.core.session import load_settings, session_records

    return {r["name"]: r for r in session_records(load_settings(folder), folder)}[name]


def test_export_dock_exports_and_shows_the_total(qtbot, viewer_model, session):
    from napari_warp._widgets.export import ExportWidget
    from napari_warp.core.session import load_settings, set_manual

    set_manual(session, session / "m1.mrc", "exclude")
    dock = ExportWidget(viewer_model)
    dock.folder_edit.value = session
    # the form shows the session's [export] settings and the items as they stand, with units in the labels
    assert dock.box_size.value == 128 and dock.box_size.label == "Box size (px)"
    assert "Å/px" in dock.pixel_size.label and "(Å" in dock.diameter.label
    assert dock.table.rowCount() == 3 and dock.table.item(0, 2).text() == "not exported"
    assert "Total: 0 particles" in dock.total.value and "3 processed item(s), 3 to export" in dock.status.value

    dock.box_size.value = 40
    dock.halves.value = True
    dock.which.value = "good"
    worker = dock.run()
    assert worker is not None and not dock.run_button.enabled and dock.cancel_button.enabled
    with qtbot.waitSignal(worker.finished, timeout=60000):
        pass
    qtbot.waitUntil(lambda: dock.run_button.enabled, timeout=5000)
    n_good = N_PICKS["m0"] + N_PICKS["m2"]
    assert f"Total: {n_good} particles</b> in 2 item(s)" in dock.total.value, dock.total.value
    assert str(session / "particles_good.star") in dock.total.value
    rows = {dock.table.item(r, 0).text(): (dock.table.item(r, 1).text(), dock.table.item(r, 2).text())
            for r in range(dock.table.rowCount())}
    assert rows["m0"] == (str(N_PICKS["m0"]), "exported") and rows["m2"] == (str(N_PICKS["m2"]), "exported")
    assert rows["m1"][1] == "skipped: excluded manually"
    assert dock.progress.value == 1000 and "Exported 2 item(s)" in dock.status.value
    # the form went into the session's settings, and the files are there
    s = load_settings(session)
    assert s.extract and s.export.box_size == 40 and s.export.halves
    assert mrcfile.read(session / "particles" / "m0.mrcs").shape == (N_PICKS["m0"], 40, 40)
    assert (session / "particles" / "even" / "m2.mrcs").exists()
    assert star_items(session / "particles_good.star") == {"particles/m0.mrcs": 6, "particles/m2.mrcs": 5}


def test_export_dock_cancel_and_errors(qtbot, viewer_model, session, tmp_path):
    from napari_warp._widgets.export import ExportWidget

    dock = ExportWidget(viewer_model)
    assert dock.run() is None and "Choose" in dock.status.value
    dock.folder_edit.value = tmp_path / "empty"
    (tmp_path / "empty").mkdir()
    assert dock.run() is None and "not a processed session" in dock.status.value

    dock.folder_edit.value = session
    report = dock._report

    def cancel_at_once(done, total):  # as a click on Cancel while the first item is read
        dock.cancel()
        report(done, total)

    dock._report = cancel_at_once
    worker = dock.run()
    with qtbot.waitSignal(worker.finished, timeout=60000):
        pass
    qtbot.waitUntil(lambda: dock.run_button.enabled, timeout=5000)
    assert "cancelled" in dock.status.value
    assert not (session / "particles" / "m0.mrcs").exists() and not (session / "particles_all.star").exists()


def test_export_dock_follows_the_session_dock(qtbot, viewer_model, session):
    from napari_warp._widgets.export import ExportWidget
    from napari_warp._widgets.session import SessionWidget

    sd = SessionWidget(viewer_model)
    dock = ExportWidget(viewer_model)
    sd.input_folder.value = session
    assert dock.folder == session and dock.table.rowCount() == 3
    # the session dock's form has the export section, folded, from the same settings
    assert "export" in sd.sections and sd.fields["export.box_size"].value == 128


def test_session_dock_saves_edited_picks(qtbot, viewer_model, session):
    from napari_warp._widgets.session import SessionWidget, item_picks_layer
    from napari_warp.core.picking.io import read_picks_star
    from napari_warp.core.session import export_session, load_settings, save_settings

    settings = dataclasses.replace(load_settings(session), extract=True)
    save_settings(session, settings)
    export_session(settings, session, device="cpu")
    assert _record(session, "m1")["status"] == "processed"

    w = SessionWidget(viewer_model)
    w.input_folder.value = session
    assert not w.save_picks_button.enabled  # no item opened yet
    assert w.save_picks() is None and "open an item" in w.item_info.value
    assert w.select("m1")
    w.open_selected()
    qtbot.waitUntil(lambda: item_picks_layer(viewer_model) is not None, timeout=30000)
    layer = item_picks_layer(viewer_model)
    assert w.save_picks_button.enabled and len(layer.data) == N_PICKS["m1"]
    before = read_picks_star(session / "picks" / "m1.star")
    # the user adds a pick by hand (data pixels of the average) and deletes the first one
    layer.add(np.array([[64.0, 80.0]]))
    layer.selected_data = {0}
    layer.remove_selected()
    w.save_picks_button.clicked.emit()
    after = read_picks_star(session / "picks" / "m1.star")
    np.testing.assert_allclose(after.yx, np.vstack([before.yx[1:], [[64.0, 80.0]]]))
    assert after.score[-1] == pytest.approx(1.0)  # a hand-made pick's score
    assert after.info["diameter"] == before.info["diameter"]
    rec = _record(session, "m1")
    assert rec["status"] == "outdated" and not rec["steps"]["export"]["up_to_date"]
    assert rec["steps"]["ctf"]["up_to_date"] and rec["metrics"]["particles"] == N_PICKS["m1"]
    assert _record(session, "m0")["status"] == "processed"  # only the edited item
    assert "outdated now" in w.item_info.value
    row = w.select("m1") and w.table.currentRow()
    assert w.table.item(row, 1).text() == "outdated" and "particle export" in w.table.item(row, 1).toolTip()
    # closing the item's layers disables the button again
    viewer_model.layers.clear()
    assert not w.save_picks_button.enabled
