"""Sample data from core.simulate: the same simulated movie as ``napari-warp demo``, with its ground truth."""

from __future__ import annotations

from ._layers import image_layer, points_layer, track_positions, tracks_layer


def simulated_movie(size: int = 512, frames: int = 16, seed: int = 0) -> list:
    """A gain-corrected simulated movie (frame, y, x) in Å, its plain average binned for display, and the true
    particle positions and motion tracks (exaggerated ×20) as layers."""
    from .core.demo import binned_for_display, demo_simulation
    from .core.simulate import simulate_movie

    settings = demo_simulation(size=size, frames=frames, seed=seed)
    sim = simulate_movie(settings)
    ps = settings.pixel_size
    movie = sim.frames * sim.gain if sim.gain is not None else sim.frames
    average, average_ps = binned_for_display(movie.mean(axis=0), ps)
    positions = track_positions(movie.shape[1:])
    return [
        image_layer(movie, ps, "movie (gain-corrected)", preview=movie[0], visible=False),
        image_layer(average, average_ps, f"average, {average_ps:.3g} Å/px"),
        points_layer(sim.truth.particles, ps, "true particles", diameter=sim.truth.particle_diameter),
        tracks_layer(positions, sim.truth.shifts(positions), ps, "true motion ×20", exaggerate=20.0),
    ]
