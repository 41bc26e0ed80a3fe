"""core.grid: Warp's CubicGrid (einspline, natural boundaries) against Warp's own evaluations."""

from __future__ import annotations

import numpy as np
import pytest
import starfile
import torch

from napari_warp.core.grid import (
    CubicGrid,
    evaluate_cubic_grid,
    evaluate_cubic_grid_lattice,
    node_coordinates,
    spline_coefficients,
)


def _load_reference(path):
    """reference{1,2,3}d.star -> values (Z, Y, X), coords (N, 3) as (z, y, x), expected (N,)."""
    tables = starfile.read(path)
    grid, ev = tables["grid"], tables["eval"]
    axes = ["iz", "iy", "ix"]
    shape = [int(grid[c].max()) + 1 if c in grid else 1 for c in axes]
    values = np.zeros(shape)
    index = tuple(grid[c].to_numpy() if c in grid else np.zeros(len(grid), int) for c in axes)
    values[index] = grid["value"].to_numpy()
    coords = np.stack([ev[c].to_numpy() if c in ev else np.zeros(len(ev)) for c in ["z", "y", "x"]], axis=-1)
    return torch.tensor(values), torch.tensor(coords), torch.tensor(ev["value"].to_numpy())


@pytest.mark.parametrize("name, shape", [("1d", (1, 1, 10)), ("2d", (1, 6, 10)), ("3d", (8, 6, 10))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reproduces_warp_cubicgrid(data_dir, name, shape, dtype):
    values, coords, expected = _load_reference(data_dir / "warp-reference" / f"reference{name}.star")
    assert values.shape == shape
    out = CubicGrid(values.to(dtype)).evaluate(coords.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


def test_interpolates_nodes_and_margins():
    torch.manual_seed(0)
    values = torch.randn(4, 5, 6, dtype=torch.float64)
    for margins in [(0.0, 0.0, 0.0), (1 / 8, 1 / 10, 1 / 12)]:
        axes = [node_coordinates(n, m, dtype=torch.float64) for n, m in zip(values.shape, margins)]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        torch.testing.assert_close(CubicGrid(values, margins).evaluate(coords), values)
    # Warp's centered spacing: node i of n at (i + 0.5) / n
    g = CubicGrid.zeros((1, 1, 4), centered_spacing=True)
    assert g.margins == (0.0, 0.0, 0.125)
    torch.testing.assert_close(node_coordinates(4, 0.125), torch.tensor([0.125, 0.375, 0.625, 0.875]))


def test_constant_linear_and_natural_boundaries():
    # one node: constant everywhere; two nodes: a straight line
    x = torch.linspace(0, 1, 11, dtype=torch.float64)
    coords = torch.stack([torch.rand(11, dtype=torch.float64), torch.rand(11, dtype=torch.float64), x], -1)
    assert torch.allclose(CubicGrid(torch.full((1, 1, 1), 2.5)).evaluate(coords.float()), torch.tensor(2.5))
    line = CubicGrid(torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)).evaluate(coords)
    torch.testing.assert_close(line, 1 + 2 * x)
    # natural boundary: second derivative vanishes at the end nodes (and not in the middle)
    g = CubicGrid(torch.tensor([[[0.0, 1.0, -1.0, 2.0, 0.5]]], dtype=torch.float64))
    h = 1e-4

    def second(u):
        pts = torch.tensor([[0, 0, u - h], [0, 0, u], [0, 0, u + h]], dtype=torch.float64)
        f = g.evaluate(pts)
        return (f[0] - 2 * f[1] + f[2]) / h**2

    # the end pieces extend smoothly past the span, so a central difference at the end nodes is fair
    assert abs(second(0.0)) < 1e-3 and abs(second(1.0)) < 1e-3
    assert abs(second(0.5)) > 10.0
    # ... which makes a linear ramp exactly reproduced (a clamped or periodic spline would bend it)
    ramp = CubicGrid(torch.linspace(-1, 2, 7, dtype=torch.float64).reshape(1, 1, 7))
    torch.testing.assert_close(ramp.evaluate(coords), -1 + 3 * x)


def test_gradients_match_finite_differences():
    torch.manual_seed(1)
    values = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    coords = torch.rand(20, 3, dtype=torch.float64, requires_grad=True)
    target = torch.randn(20, dtype=torch.float64)

    def loss(v, c):
        return ((CubicGrid(v).evaluate(c) - target) ** 2).sum()

    gv, gc = torch.autograd.grad(loss(values, coords), (values, coords))
    eps = 1e-6
    for idx in [(0, 0, 0), (1, 2, 3), (2, 3, 4)]:
        d = torch.zeros_like(values)
        d[idx] = eps
        fd = (loss(values + d, coords) - loss(values - d, coords)) / (2 * eps)
        assert gv[idx].item() == pytest.approx(fd.item(), rel=1e-6, abs=1e-9)
    d = torch.zeros_like(coords)
    d[7, 2] = eps
    fd = (loss(values, coords + d) - loss(values, coords - d)) / (2 * eps)
    assert gc[7, 2].item() == pytest.approx(fd.item(), rel=1e-5)
    assert torch.autograd.gradcheck(lambda v: CubicGrid(v).evaluate(coords.detach()), (values,))


def test_batched_channels_and_4d():
    torch.manual_seed(2)
    values = torch.randn(2, 3, 4, 5, dtype=torch.float64)  # two channels of a (3, 4, 5) grid
    coords = torch.rand(6, 7, 3, dtype=torch.float64)
    both = evaluate_cubic_grid(values, coords)
    assert both.shape == (2, 6, 7)
    torch.testing.assert_close(both[1], CubicGrid(values[1]).evaluate(coords))
    # a 4D (t, z, y, x) grid that is constant along t equals the 3D grid
    v4 = values[0].expand(3, 3, 4, 5).clone()
    c4 = torch.cat([torch.rand(6, 7, 1, dtype=torch.float64), coords], -1)
    torch.testing.assert_close(CubicGrid(v4).evaluate(c4), both[0])
    assert spline_coefficients(torch.zeros(1, 6, 10)).shape == (1, 8, 12)


def test_resized_like_warp():
    g = CubicGrid(torch.tensor([[[0.0, 2.0, 1.0]]], dtype=torch.float64))
    fine = g.resized((1, 1, 5))
    assert fine.dims == (1, 1, 5) and fine.margins == (0.0, 0.0, 0.0)
    torch.testing.assert_close(fine.values[0, 0, ::2], g.values[0, 0])  # old nodes are kept
    x = torch.linspace(0, 1, 9, dtype=torch.float64)
    coords = torch.stack([torch.zeros_like(x), torch.zeros_like(x), x], -1)
    line = CubicGrid(torch.tensor([[[1.0, 3.0]]], dtype=torch.float64)).resized((2, 3, 6))
    torch.testing.assert_close(line.evaluate(coords), 1 + 2 * x)  # linear stays linear
    assert CubicGrid.zeros((1, 2, 2), centered_spacing=True).resized((1, 3, 3)).margins == (0.0, 1 / 6, 1 / 6)


def test_evaluate_on_grid_quirks():
    g = CubicGrid(torch.arange(8, dtype=torch.float64).reshape(2, 2, 2))
    out = g.evaluate_on_grid((1, 3, 2))
    assert out.shape == (1, 3, 2)
    # a single z sample is taken at z = 0.5 (Warp), halfway between the two z planes
    torch.testing.assert_close(out[0, 0], (g.values[0, 0] + g.values[1, 0]) / 2)


def test_lattice_evaluation_matches_pointwise():
    torch.manual_seed(3)
    values = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    margins = (0.1, 0.0, 0.05)
    axes = [torch.rand(n, dtype=torch.float64) for n in (3, 7, 6)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    torch.testing.assert_close(
        evaluate_cubic_grid_lattice(values, axes, margins), evaluate_cubic_grid(values, coords, margins)
    )
