"""The line-charge case (seed Fig. 5): a density fluctuation along all z at r = 110 cm in sector 9."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from streamcal.detectors.tpc.constants import Grid
from streamcal.detectors.tpc.dataset import (
    LINE_CHARGE_WIDTH,
    SCALAR_FIELDS,
    TENSOR_FIELDS,
    line_charge_profile,
    line_charge_sample,
)
from streamcal.detectors.tpc.density import average_density
from streamcal.detectors.tpc.langevin import apply_map, interpolate_map, space_charge_distortions

GRID = Grid(90, 17, 17)
PHI_LINE = math.radians(9.5 * 20.0)  # centre of sector 9


@pytest.fixture(scope="module")
def sample() -> dict:
    return line_charge_sample(GRID)


def _cell_areas(g: Grid) -> np.ndarray:
    edges = np.concatenate([[g.r[0]], 0.5 * (g.r[1:] + g.r[:-1]), [g.r[-1]]])
    return g.dphi * g.r * np.diff(edges)  # (nr,)


def test_density_fluctuation_is_a_line_along_z(sample: dict) -> None:
    assert set(sample) == set(TENSOR_FIELDS) | set(SCALAR_FIELDS)
    fluct = sample["density_fluctuation"].astype(np.float64)  # (nphi, nr, nz)
    np.testing.assert_allclose(fluct, np.broadcast_to(fluct[:, :, :1], fluct.shape), rtol=0, atol=1e-6 * fluct.max())  # all z
    k, j = np.unravel_index(np.argmax(fluct[:, :, 0]), fluct.shape[:2])
    assert 9 * 20 <= math.degrees(GRID.phi[k]) <= 10 * 20  # sector 9
    assert abs(GRID.r[j] - 110.0) < GRID.dr
    # charge per cm of z: peak (= rho_avg(110 cm)) x 2 pi w^2, with rho_avg exactly ~ 1/r^2
    avg = average_density(GRID)
    rho_110 = avg[0, 0, GRID.nz // 2] * (GRID.r_min / 110.0) ** 2
    per_cm = float(np.sum(fluct[:, :, GRID.nz // 2] * _cell_areas(GRID)))
    assert per_cm == pytest.approx(rho_110 * 2 * math.pi * LINE_CHARGE_WIDTH**2, rel=1e-5)
    assert np.all(sample["density_average"] == avg.astype(np.float32))
    assert float(sample["bias_factor"]) == 1.0 and int(sample["average_index"]) == 13


def test_profile_carries_the_same_charge_on_every_grid() -> None:
    for g in (Grid(90, 17, 17), Grid(180, 33, 33), Grid(180, 65, 65)):
        prof = line_charge_profile(g)
        assert float(np.sum(prof * _cell_areas(g))) == pytest.approx(2 * math.pi * LINE_CHARGE_WIDTH**2, rel=1e-12)
    fine = line_charge_profile(Grid(360, 129, 5))  # resolves the 5 cm Gaussian: peak ~ 1
    assert 0.9 < fine.max() <= 1.0


def test_electrons_are_pulled_towards_the_line(sample: dict) -> None:
    """Distortion fluctuations at z = 0 (the longest drift, as in Fig. 5) point towards the line."""
    dist = sample["distortion_fluctuation"].astype(np.float64)  # (3, nphi, nr, nz) cm
    deg = np.degrees(GRID.phi)
    k = int(np.argmin(np.abs(deg - 188.0)))  # node next to the line's azimuth (190 deg)
    dr = dist[0, k, :, 0]
    inside, outside = GRID.r < 110.0 - LINE_CHARGE_WIDTH, GRID.r > 110.0 + LINE_CHARGE_WIDTH
    assert np.all(dr[inside] > 0.05) and np.all(dr[outside] < 0)  # cm: outwards inside, inwards outside
    j = int(np.argmin(np.abs(GRID.r - 110.0)))
    drphi = dist[1, :, j, 0]
    assert drphi[np.argmin(np.abs(deg - 170.0))] > 0.05 and drphi[np.argmin(np.abs(deg - 210.0))] < -0.05
    # a few mm at most, local: nothing left on the far side of the TPC
    assert 0.2 < np.abs(dist[0, :, :, 0]).max() < 1.0
    far = np.abs(deg - 10.0) < 30.0
    assert np.abs(dist[:, far]).max() < 1e-3 * np.abs(dist).max()
    assert np.abs(dist[2]).max() < 0.2 * np.abs(dist[0]).max()  # dz is small
    # the correction fluctuation is exact too: average + fluctuation inverts the total distortion
    avg = space_charge_distortions(average_density(GRID), GRID)
    total_d = avg.distortion + torch.as_tensor(dist)
    total_c = avg.correction + torch.as_tensor(sample["correction_fluctuation"]).double()
    phi, r, z = (torch.as_tensor(a).reshape(-1) for a in GRID.mesh())
    again = apply_map(total_d, GRID, *apply_map(total_c, GRID, phi, r, z))
    err = torch.stack([again[1] - r, (again[0] - phi) * r, again[2] - z])
    assert float(err.abs().max()) < 1e-4  # cm: 1 um, float32 storage of the fluctuations included


def test_far_field_is_grid_independent(sample: dict) -> None:
    """Away from the line the distortion fluctuations converge under refinement (the line carries
    the same charge on both grids): 90x17x17 vs 180x33x33 agree within 5 % at r >= 150 cm."""
    fine_grid = Grid(180, 33, 33)
    fine = line_charge_sample(fine_grid)
    r = torch.tensor([150.0, 175.0, 200.0, 250.0], dtype=torch.float64)
    phi, z = torch.full_like(r, PHI_LINE), torch.zeros_like(r)
    coarse_dr = interpolate_map(torch.as_tensor(sample["distortion_fluctuation"]).double(), GRID, phi, r, z)[0]
    fine_dr = interpolate_map(torch.as_tensor(fine["distortion_fluctuation"]).double(), fine_grid, phi, r, z)[0]
    assert bool((fine_dr < 0).all())
    np.testing.assert_allclose(coarse_dr.numpy(), fine_dr.numpy(), rtol=0.05)


def test_line_charge_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"sector must be an integer in \[0, 17\]"):
        line_charge_sample(GRID, sector=18)
    with pytest.raises(ValueError, match=r"radius must be inside the drift volume \(83.5, 254.5\) cm"):
        line_charge_sample(GRID, radius=50.0)
    with pytest.raises(ValueError, match=r"width must be a number of cm in \(0, 171.0\)"):
        line_charge_profile(GRID, width=0.0)
    with pytest.raises(ValueError, match="relative_amplitude must be a finite number"):
        line_charge_sample(GRID, relative_amplitude=float("nan"))
