"""Shared fixtures: the real-data folder, and guards that keep a missing display from aborting the run."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Widget tests run offscreen; gl tests need a real X server (pytest-xvfb provides one when Xvfb is installed).
HAVE_DISPLAY = bool(os.environ.get("DISPLAY")) or shutil.which("Xvfb") is not None
if not HAVE_DISPLAY:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

REPO = Path(__file__).resolve().parents[1]


def _find_data() -> Path | None:
    env = os.environ.get("NAPARI_WARP_TEST_DATA")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if c.is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared real-data folder (``$NAPARI_WARP_TEST_DATA`` or ``../shared/data``); skips when absent."""
    d = _find_data()
    if d is None:
        pytest.skip(
            "real data not found: set NAPARI_WARP_TEST_DATA or place the shared data folder at ../shared/data"
        )
    return d


@pytest.fixture(scope="session")
def sim512():
    """A simulated single-frame 512² micrograph at 4 Å/px (256² at BoxNet's 8 Å/px) of 150 Å particles, with its
    truth (``.frames[0]``, ``.truth.particles``); simulated once for the BoxNet widget and gl tests."""
    from napari_warp.core.simulate import MovieSimulation, simulate_movie

    settings = MovieSimulation(shape=(512, 512), n_frames=1, pixel_size=4.0, particle_diameter=150.0, drift=0.0,
                               local_amplitude=0.0, dose_per_frame=40.0)
    return simulate_movie(settings, device="cpu")


@pytest.fixture(scope="module")
def processed(tmp_path_factory) -> Path:
    """A tiny processed session with picks (``test_session_export.make_session``), once per module."""
    from test_session_export import make_session

    return make_session(tmp_path_factory.mktemp("session"))


@pytest.fixture
def session(processed, tmp_path) -> Path:
    """A private copy of ``processed`` (tests change its files), its settings pointing at the copy."""
    import dataclasses

    from napari_warp.core.session import load_settings, save_settings

    dst = tmp_path / "session"
    shutil.copytree(processed, dst)
    save_settings(dst, dataclasses.replace(load_settings(dst), input=str(dst)))
    return dst


def pytest_collection_modifyitems(config, items):
    if HAVE_DISPLAY:
        return
    skip_gl = pytest.mark.skip(reason="no display: neither $DISPLAY nor Xvfb is available for gl tests")
    for item in items:
        if "gl" in item.keywords:
            item.add_marker(skip_gl)
