"""The shipped generic BoxNet on simulated micrographs with known particle positions, and retraining on user picks.

Truth: the simulator's particle centres. A pick matches a true centre within half a diameter, one to one.
"""

from __future__ import annotations

import pytest
import torch

from napari_warp.core.picking import BoxNetSettings, load_model, pick
from napari_warp.core.picking.metrics import score_picks
from napari_warp.core.picking.model import GENERIC_MODEL
from napari_warp.core.picking.train import TrainingSettings, make_example, train
from napari_warp.core.simulate import MovieSimulation, simulate_movie

pytestmark = pytest.mark.slow


def _micrograph(seed: int, **changes):
    s = MovieSimulation(**{**dict(shape=(768, 768), n_frames=1, pixel_size=3.0, dose_per_frame=40.0, drift=0.0,
                                  local_amplitude=0.0, defocus=15000.0, mtf="k3", seed=seed), **changes})
    movie = simulate_movie(s, device="cpu")
    return movie.frames[0], movie.truth.particles, movie.truth.particle_diameter


def _f1(model, micrographs, pixel_size: float, threshold: float = BoxNetSettings().threshold) -> float:
    tp = fp = fn = 0
    for image, truth, d in micrographs:
        picks = pick(image, BoxNetSettings(pixel_size=pixel_size, diameter=d, threshold=threshold), model=model,
                     device="cpu")
        r = 0.5 * d / pixel_size
        s = score_picks(picks.yx, truth, r, exclude_border=r, shape=image.shape)
        tp, fp, fn = tp + s.true_positives, fp + s.false_positives, fn + s.false_negatives
    return 2 * tp / max(2 * tp + fp + fn, 1)


def test_generic_model_ships_small_and_named():
    assert GENERIC_MODEL.is_file(), "the generic BoxNet model must ship inside the package"
    assert GENERIC_MODEL.stat().st_size <= 25e6
    model = load_model()
    assert model.name == "boxnet-generic" and model.trained_on.get("examples", 0) > 0
    assert "cryoppp_sets" in model.trained_on and model.trained_on["simulated"] > 0


def test_generic_model_picks_simulated_particles():
    torch.manual_seed(0)
    micrographs = [_micrograph(500 + i, particle_diameter=180.0, particle_density=0.25) for i in range(2)]
    assert _f1(load_model(), micrographs, 3.0) >= 0.85


def test_retraining_on_user_points_improves_f1_on_held_out_micrographs():
    """A sample unlike anything the generic model saw (bright particles on a dark background, as in negative
    stain): retraining on two micrographs' true positions raises F1 on a third it did not see."""
    torch.manual_seed(0)

    def stained(seed):
        image, truth, d = _micrograph(seed, shape=(512, 512), particle_diameter=160.0, particle_density=0.3)
        return -image, truth, d

    train_set = [stained(600 + i) for i in range(2)]
    test_set = [stained(700)]
    generic = load_model()
    before = _f1(generic, test_set, 3.0)
    examples = [make_example(img, 3.0, truth, d) for img, truth, d in train_set]
    retrained, history = train(generic, examples, None, TrainingSettings(epochs=8, patience=0, eval_windows=8),
                               device="cpu")
    after = _f1(retrained, test_set, 3.0)
    assert len(history.epoch) == 8
    assert history.new_on_new[history.best_epoch - 1] > history.old_on_new[0]  # the paper's metrics say so too
    assert before < 0.5 and after >= before + 0.3, (before, after)
