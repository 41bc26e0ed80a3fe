"""Session and overview docks on a ViewerModel (no canvas), Qt offscreen, over a small processed session."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("qtpy")

DEFOCI = (12000.0, 15000.0, 20000.0)  # Å, of movie_0, movie_1, movie_2


def write_movie(path: Path, defocus: float, seed: int) -> None:
    from napari_warp.core.io.mrc_write import write_mrc
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    sim = simulate_movie(MovieSimulation(shape=(512, 512), n_frames=10, pixel_size=1.0, dose_per_frame=3.0,
                                         defocus=defocus, mtf=None, seed=seed))
    write_mrc(path, sim.frames, pixel_size=1.0, voltage=300.0)


def make_session(folder: Path) -> Path:
    """3 simulated movies and one corrupt file, processed once (motion + CTF) with the settings file saved."""
    from napari_warp.core.session import MovieOptions, Session, SessionSettings, save_settings

    folder.mkdir(parents=True, exist_ok=True)
    for i, d in enumerate(DEFOCI):
        write_movie(folder / f"movie_{i}.mrc", d, i)
        time.sleep(0.02)  # acquisition order = modification time
    (folder / "corrupt.mrc").write_bytes(b"this is not an MRC file" * 40)
    settings = dataclasses.replace(SessionSettings(input=str(folder)), movie=MovieOptions(exposure=3.0))
    save_settings(folder, settings)
    Session(settings, folder, settle=0.2).run(once=True)
    return folder


@pytest.fixture(scope="module")
def processed_session(tmp_path_factory):
    return make_session(tmp_path_factory.mktemp("session"))


@pytest.fixture
def session_copy(processed_session, tmp_path):
    """A private copy of the processed session (tests that change files do not disturb the others)."""
    import shutil

    dst = tmp_path / "session"
    shutil.copytree(processed_session, dst)
    # items are found by stem in the processing folder; the settings' input must follow the copy
    from napari_warp.core.session import load_settings, save_settings

    save_settings(dst, dataclasses.replace(load_settings(dst), input=str(dst)))
    return dst  # copytree keeps modification times (ns): same acquisition order, same failure stamps


@pytest.fixture
def viewer_model():
    from napari.components import ViewerModel

    return ViewerModel()


def _records(folder):
    from napari_warp.core.session import load_settings, session_records

    return {r["name"]: r for r in session_records(load_settings(folder), folder)}


def test_fixture_session_is_processed(processed_session):
    recs = _records(processed_session)
    assert [recs[f"movie_{i}"]["status"] for i in range(3)] == ["processed"] * 3
    assert recs["corrupt"]["status"] == "failed" and "not an MRC file" in recs["corrupt"]["error"]
    for i, d in enumerate(DEFOCI):
        assert recs[f"movie_{i}"]["metrics"]["defocus"] == pytest.approx(d / 1e4, abs=0.05)


def test_session_dock_lists_items_by_status(qtbot, viewer_model, processed_session):
    from qtpy.QtGui import QColor

    from napari_warp._widgets.session import STATUS_COLOURS, SessionWidget

    w = SessionWidget(viewer_model)
    w.input_folder.value = processed_session  # attach: list from the files, no processing
    assert w.folder == processed_session and not w.running
    assert w.table.rowCount() == 4
    rows = {w.table.item(r, 0).text(): r for r in range(4)}
    assert set(rows) == {"movie_0", "movie_1", "movie_2", "corrupt"}
    # acquisition order: the movies first, in the order written
    assert [w.table.item(r, 0).text() for r in range(3)] == ["movie_0", "movie_1", "movie_2"]
    for name, status in (("movie_0", "processed"), ("movie_2", "processed"), ("corrupt", "failed")):
        r = rows[name]
        assert w.table.item(r, 1).text() == status
        assert w.table.item(r, 0).background().color() == QColor(STATUS_COLOURS[status])
    assert "not an MRC file" in w.table.item(rows["corrupt"], 0).toolTip()
    assert "not an MRC file" in w.table.item(rows["corrupt"], 1).toolTip()
    # metrics with units in the header
    assert w.table.horizontalHeaderItem(2).text() == "Defocus (µm)"
    assert float(w.table.item(rows["movie_1"], 2).text()) == pytest.approx(1.5, abs=0.05)
    assert "4 item(s)" in w.status.value and "1 failed" in w.status.value


def test_session_dock_form_loads_folder_settings(qtbot, viewer_model, processed_session):
    from napari_warp._widgets.session import SessionWidget
    from napari_warp.core.session import load_settings

    w = SessionWidget(viewer_model)
    f = w.fields
    assert f["movie.exposure"].value == pytest.approx(1.0)
    w.input_folder.value = processed_session
    stored = load_settings(processed_session)
    assert f["movie.exposure"].value == pytest.approx(3.0)
    assert f["motion.patch_size"].value == stored.motion.patch_size
    assert f["ctf.window"].value == stored.ctf.window
    # the fit range as stored (fractions of Nyquist), and in Å at the items' 1 Å/px in the note: 20–3.33 Å
    assert f["ctf.range_min"].value == pytest.approx(0.1) and f["ctf.range_max"].value == pytest.approx(0.6)
    assert "20–3.33 Å at 1 Å/px" in w.form_note.value
    assert f["ctf.defocus_min"].value == pytest.approx(stored.ctf.defocus_min)
    assert "Å" in f["ctf.defocus_min"].label and "Nyquist" in f["ctf.range_min"].label
    assert "e/Å²" in f["movie.exposure"].label and "Å²" in f["motion.bfactor"].label
    # the untouched form gives back exactly the stored settings (Start must not make every item outdated)
    assert w.settings() == dataclasses.replace(stored, input=str(processed_session))
    f["ctf.window"].value = 256
    f["ctf.range_max"].value = 0.4
    s = w.settings()
    assert s.ctf.window == 256 and s.ctf.range_max == pytest.approx(0.4)
    assert s.motion == stored.motion
    assert "20–5 Å at 1 Å/px" in w.form_note.value  # the note follows the fit range


def test_setting_labels_cover_every_setting():
    """A new setting cannot be forgotten: every key of every section has a label (and so a form field)."""
    from napari_warp.core.session import SETTING_LABELS, SessionSettings

    keys = {f"{sec}.{name}" for sec, values in SessionSettings().sections().items() for name in values}
    assert keys == set(SETTING_LABELS)
    assert all(label for label, _unit in SETTING_LABELS.values())


def test_session_form_is_generated_from_the_dataclasses(qtbot, viewer_model, tmp_path):
    from magicgui.widgets import CheckBox, ComboBox, FileEdit, FloatSpinBox, LineEdit, SpinBox

    from napari_warp._widgets.session import FORM_SECTIONS, SessionWidget
    from napari_warp.core.session import SETTING_LABELS, SessionSettings

    w = SessionWidget(viewer_model)
    sections = SessionSettings().sections()
    assert set(w.fields) == set(SETTING_LABELS) and {s for s, _ in FORM_SECTIONS} == set(sections)
    for key, widget in w.fields.items():
        label, unit = SETTING_LABELS[key]
        assert widget.label == (f"{label} ({unit})" if unit else label)
        assert widget in w.sections[key.partition(".")[0]]  # in its section's sub-form
    kinds = {"movie.gain": FileEdit, "movie.defects": FileEdit, "session.ctf_from": ComboBox,
             "movie.gain_flip_x": CheckBox, "motion.dose_weighting": CheckBox, "motion.patch_size": SpinBox,
             "ctf.window": SpinBox, "motion.bfactor": FloatSpinBox, "ctf.voltage": FloatSpinBox,
             "motion.band": LineEdit, "motion.local_grid": LineEdit, "motion.global_temporal": LineEdit,
             "ctf.grid": LineEdit}
    for key, cls in kinds.items():
        assert isinstance(w.fields[key], cls), key
    assert w.fields["motion.bfactor"].min < -500 and w.fields["motion.dose_bfactor"].min < -4
    assert w.fields["ctf.defocus_max"].max >= 100000  # Å
    assert w.fields["motion.local_grid"].value == "auto" and w.fields["ctf.grid"].value == "5x5"
    assert w.settings() == SessionSettings()  # defaults round-trip

    # every field filled from non-default settings, and the untouched form reproduces them exactly
    gain = tmp_path / "gain.mrc"
    gain.write_bytes(b"")
    s0 = SessionSettings()
    custom = dataclasses.replace(
        s0, input=str(tmp_path), pattern="*.eer", recursive=True, ctf_from="frames",
        movie=dataclasses.replace(s0.movie, pixel_size=0.8263, exposure=0.0417, gain=str(gain), gain_flip_y=True,
                                  eer_group=40, binning=2.0),
        motion=dataclasses.replace(s0.motion, band=(0.03, 0.2), bfactor=-300.0, local_grid=(3, 5),
                                   global_temporal=12, skip_first=1, dose_weighting=False, local_tolerance=0.123456),
        ctf=dataclasses.replace(s0.ctf, voltage=200.0, cs=0.01, amplitude=0.1, range_min=0.123456789,
                                defocus_max=80000.0, fit_phase=True, phase_shift=-12.5, grid=(2, 3)),
        filters=dataclasses.replace(s0.filters, defocus_max=2.5, phase_min=10.0, motion_max=1.5),
    )
    w.load_form(custom)
    assert w.input_folder.value == tmp_path
    assert w.fields["motion.local_grid"].value == "5x3"  # (Gy, Gx) = (3, 5) shown as x×y
    assert w.fields["ctf.grid"].value == "3x2" and w.fields["motion.band"].value == "0.03, 0.2"
    assert w.fields["motion.global_temporal"].value == "12" and w.fields["session.ctf_from"].value == "frames"
    assert w.fields["movie.gain"].value == gain and w.fields["ctf.phase_shift"].value == pytest.approx(-12.5)
    assert w.settings() == custom  # exact, though the spin boxes round 0.123456789

    # edits convert: grids typed as x×y, 'auto', tuples, numbers
    w.fields["motion.local_grid"].value = "auto"
    w.fields["ctf.grid"].value = "4x1"
    w.fields["motion.global_temporal"].value = "auto"
    w.fields["motion.band"].value = "0.05, 0.3"
    w.fields["ctf.range_min"].value = 0.2
    w.fields["movie.gain"].value = None
    s = w.settings()
    assert s.motion.local_grid is None and s.ctf.grid == (1, 4) and s.motion.global_temporal is None
    assert s.motion.band == (0.05, 0.3) and s.ctf.range_min == pytest.approx(0.2) and s.movie.gain == ""
    assert s.ctf.voltage == 200.0 and s.movie.pixel_size == 0.8263  # the untouched ones stay exact

    # invalid values come back naming the setting, in the status line on Start
    w.fields["ctf.grid"].value = "auto"
    with pytest.raises(ValueError, match="ctf.grid"):
        w.settings()
    assert w.start() is None and "ctf.grid" in w.status.value and not w.running


def test_session_form_sections_fold(qtbot, viewer_model):
    from napari_warp._widgets.session import COLLAPSED, FORM_SECTIONS, SessionWidget

    w = SessionWidget(viewer_model)
    w.native.show()
    for sec, _title in FORM_SECTIONS:
        assert w.sections[sec].visible == (sec not in COLLAPSED)
    w.section_buttons["motion"].clicked.emit()  # unfold
    assert w.sections["motion"].visible and w.fields["motion.bfactor"].visible
    w.section_buttons["motion"].clicked.emit()  # fold again
    assert not w.sections["motion"].visible
    w.native.close()


def test_session_dock_opens_item(qtbot, viewer_model, processed_session):
    from qtpy.QtCore import Qt

    from napari_warp._widgets.session import ITEM_KEY, SessionWidget

    w = SessionWidget(viewer_model)
    w.input_folder.value = processed_session
    w.table.setFocus()
    w.table.selectRow(0)
    qtbot.keyClick(w.table, Qt.Key.Key_Down)  # keyboard navigation
    assert w.selected_record()["name"] == "movie_1"
    qtbot.keyClick(w.table, Qt.Key.Key_Return)  # Enter opens
    qtbot.waitUntil(lambda: len(viewer_model.layers) >= 2, timeout=30000)
    average = next(lay for lay in viewer_model.layers if "average" in lay.name)
    overlay = next(lay for lay in viewer_model.layers if lay.metadata.get("napari_warp_role") == "defocus")
    assert average.metadata[ITEM_KEY] == "movie_1"
    # binned to 4 Å/px for display, scale in Å, same 512 Å field of view as the 1 Å/px movie
    assert tuple(average.scale) == pytest.approx((4.0, 4.0)) and average.data.shape == (128, 128)
    assert tuple(str(u) for u in average.units) == ("angstrom", "angstrom")
    assert overlay.metadata["units"] == "µm"
    assert float(np.mean(overlay.data)) == pytest.approx(1.5, abs=0.05)
    extent = np.asarray(overlay.extent.world)
    assert extent[1] - extent[0] == pytest.approx(np.asarray(average.extent.world)[1] - np.asarray(
        average.extent.world)[0], abs=1.0)
    # motion tracks in the same world frame (Å)
    tracks = [lay for lay in viewer_model.layers if lay.__class__.__name__ == "Shapes"]
    assert tracks and tuple(tracks[0].scale) == pytest.approx((1.0, 1.0))
    # opening another item replaces this item's layers
    n = len(viewer_model.layers)
    w.table.selectRow(2)
    w.open_selected()
    qtbot.waitUntil(lambda: any(lay.metadata.get(ITEM_KEY) == "movie_2" for lay in viewer_model.layers),
                    timeout=30000)
    qtbot.waitUntil(lambda: len(viewer_model.layers) == n, timeout=5000)
    assert all(lay.metadata.get(ITEM_KEY) == "movie_2" for lay in viewer_model.layers)


def test_session_dock_include_exclude(qtbot, viewer_model, session_copy):
    from qtpy.QtGui import QColor

    from napari_warp._widgets.session import STATUS_COLOURS, SessionWidget
    from napari_warp.core.session import item_record, load_settings

    folder = session_copy
    w = SessionWidget(viewer_model)
    w.input_folder.value = folder
    assert w.select("movie_1")
    w.exclude_button.clicked.emit()
    settings = load_settings(folder)
    assert item_record(folder, folder / "movie_1.mrc", settings)["manual"] == "exclude"
    row = w.select("movie_1") and w.table.currentRow()
    assert w.table.item(row, 1).text() == "deselected"
    assert w.table.item(row, 0).background().color() == QColor(STATUS_COLOURS["deselected"])
    assert w.selected_record()["name"] == "movie_1"  # the selection survives the refresh
    w.include_button.clicked.emit()
    assert item_record(folder, folder / "movie_1.mrc", settings)["manual"] == "include"
    assert w.table.item(row, 1).text() == "processed"
    w.reset_button.clicked.emit()
    assert item_record(folder, folder / "movie_1.mrc", settings)["manual"] is None


def test_session_dock_processes_in_worker(qtbot, viewer_model, tmp_path):
    from qtpy.QtCore import QTimer

    from napari_warp._widgets.session import SessionWidget
    from napari_warp.core.session import load_settings

    folder = tmp_path / "new"
    folder.mkdir()
    write_movie(folder / "only.mrc", 15000.0, 7)
    w = SessionWidget(viewer_model)
    w.settle = 0.2
    w.poll = 0.2
    w.input_folder.value = folder
    assert w.table.rowCount() == 1 and w.table.item(0, 1).text() == "unprocessed"
    w.fields["movie.exposure"].value = 3.0
    ticks = []
    probe = QTimer()
    probe.setInterval(50)
    probe.timeout.connect(lambda: ticks.append(w.running))
    probe.start()
    worker = w.start()
    assert worker is not None and w.running and not w.start_button.enabled
    assert load_settings(folder).movie.exposure == pytest.approx(3.0)  # Start saved the form
    qtbot.waitUntil(lambda: w.table.item(0, 1).text() == "processed", timeout=120000)
    # the GUI thread kept running its timers while the worker computed
    assert sum(ticks) >= 5 and w.ticks >= 2
    # the progress signal comes from the worker after the item's files (which the table reads) are written
    qtbot.waitUntil(lambda: w.progress.value == 1 and w.progress.max == 1, timeout=30000)
    with qtbot.waitSignal(worker.finished, timeout=30000):
        w.stop()
    probe.stop()
    assert not w.running and w.start_button.enabled
    assert (folder / "average" / "only.mrc").is_file()


def test_overview_plots_filters_and_pick(qtbot, viewer_model, session_copy):
    from types import SimpleNamespace

    from napari_warp._widgets.overview import OverviewWidget
    from napari_warp._widgets.session import ITEM_KEY, SessionWidget
    from napari_warp.core.session import load_settings, session_records

    folder = session_copy
    session = SessionWidget(viewer_model)
    ov = OverviewWidget(viewer_model)
    session.input_folder.value = folder  # the overview follows the session dock's folder
    assert ov.folder == folder
    # the three good items' defoci over acquisition order; the corrupt one has none
    d = ov.plotted["defocus"]
    np.testing.assert_array_equal(d["order"], [1, 2, 3])
    np.testing.assert_allclose(d["values"], np.array(DEFOCI) / 1e4, atol=0.05)
    np.testing.assert_allclose(np.asarray(ov.scatters["defocus"].get_offsets())[:, 1], d["values"])
    assert set(ov.plotted) == {"defocus", "astigmatism", "fit_resolution", "motion"}  # no phase plate: no phase plot
    assert ov.count_numbers == {"processed": 3, "filtered": 0, "failed": 1, "deselected": 0}
    assert "3 pass" in ov.counts.value and "1 failed" in ov.counts.value
    ylabels = [ax.get_ylabel() for ax in ov._figure.axes if ax.get_ylabel()]
    assert ylabels == ["Defocus (µm)", "Astigmatism (Å)", "Fit resolution (Å)", "Motion (Å)"]

    # the defocus range slider excludes the 2 µm item: filtered in the records, saved to the settings file
    hi = ov.defocus_slider.maximum()
    assert ov.defocus_slider.value() == pytest.approx((0.0, hi))  # off: the full range
    ov.defocus_slider.setValue((1.0, 1.8))
    qtbot.waitUntil(lambda: load_settings(folder).filters.defocus_max > 0, timeout=5000)  # debounced save
    f = load_settings(folder).filters
    assert (f.defocus_min, f.defocus_max) == pytest.approx((1.0, 1.8))
    recs = {r["name"]: r for r in session_records(load_settings(folder), folder)}
    assert recs["movie_2"]["status"] == "filtered" and recs["movie_0"]["status"] == "processed"
    assert "defocus" in recs["movie_2"]["filter_reasons"][0]
    assert ov.count_numbers["filtered"] == 1 and ov.plotted["defocus"]["classes"] == ["pass", "pass", "filtered"]
    # the session dock shows it too, and its form shows the new filter
    row = session.select("movie_2") and session.table.currentRow()
    assert session.table.item(row, 1).text() == "filtered"
    assert session.fields["filters.defocus_max"].value == pytest.approx(1.8)
    # back to the full range switches the filter off
    ov.defocus_slider.setValue((0.0, hi))
    ov.apply_filters()
    assert load_settings(folder).filters.defocus_max == 0.0

    # a pick on the second point of the motion plot opens movie_1
    sc = ov.scatters["motion"]
    ov._on_pick(SimpleNamespace(artist=sc, ind=np.array([1])))
    qtbot.waitUntil(lambda: any(lay.metadata.get(ITEM_KEY) == "movie_1" for lay in viewer_model.layers),
                    timeout=30000)
    assert session.selected_record()["name"] == "movie_1"
    # and through matplotlib's pick machinery: a button press on the third defocus point
    from matplotlib.backend_bases import MouseEvent

    ax = ov.scatters["defocus"].axes
    ov._canvas.draw()
    x, y = ax.transData.transform((3, ov.plotted["defocus"]["values"][2]))
    ov._canvas.callbacks.process("button_press_event", MouseEvent("button_press_event", ov._canvas, x, y, button=1))
    qtbot.waitUntil(lambda: any(lay.metadata.get(ITEM_KEY) == "movie_2" for lay in viewer_model.layers),
                    timeout=30000)
