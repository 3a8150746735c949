"""Langevin distortions and corrections against closed forms and the inverse-map property."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import iv, kv

from streamcal.detectors.tpc.constants import C0, C1, DRIFT_LENGTH, E_DRIFT, R_IFC, Grid
from streamcal.detectors.tpc.langevin import (
    COMPONENTS,
    Distortions,
    apply_map,
    correct_points,
    global_corrections,
    global_distortions,
    interpolate_map,
    local_distortions,
    space_charge_distortions,
)
from streamcal.detectors.tpc.poisson import PoissonSolver

METHODS = ("follow", "recursive")
UM = 1e-4  # cm


def uniform(grid: Grid, value: float) -> torch.Tensor:
    return torch.full(grid.shape, value, dtype=torch.float64)


def realistic_density(grid: Grid, amplitude: float = 0.5) -> np.ndarray:
    """rho/eps0 (V/cm^2) falling as 1/r^2 and linearly towards the central electrode, with a
    sector-like phi modulation; amplitude 0.5 gives ~7 cm of dr at the inner field cage."""
    phi, r, z = grid.mesh()
    return amplitude * (R_IFC / r) ** 2 * (1 - 0.3 * z / DRIFT_LENGTH) * (1 + 0.1 * np.cos(18 * phi))


def expected_uniform(grid: Grid, er: float, ephi: float, ez: float, c0: float = C0,
                     c1: float = C1) -> np.ndarray:
    """Drift through a uniform field from each node to the readout: dr/dz = alpha,
    r dphi/dz = beta (Langevin, first order) integrate to dr = alpha dL and
    r0 dphi = r0 (beta/alpha) ln(1 + alpha dL / r0); dz = (|Ez_tot|/E0 - 1) dL."""
    ez_tot = ez - E_DRIFT
    alpha = (c0 * er + c1 * ephi) / ez_tot
    beta = (c0 * ephi - c1 * er) / ez_tot
    _, r0, z = grid.mesh()
    dl = grid.length - z
    if abs(alpha) > 1e-12:
        drphi = r0 * beta / alpha * np.log1p(alpha * dl / r0)
    else:
        drphi = beta * dl
    return np.stack([alpha * dl, drphi, (abs(ez_tot) / E_DRIFT - 1) * dl])


# -- closed forms ------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
def test_uniform_radial_field_gives_analytic_drift(method: str) -> None:
    g = Grid(16, 9, 17)
    er = 2.0  # V/cm on top of the nominal Ez = -E_DRIFT
    zero = uniform(g, 0.0)
    dist = global_distortions(local_distortions(uniform(g, er), zero, zero, g), g, method=method)
    dl = torch.as_tensor(g.length - g.z)
    # The first-order form: dr = c0 Er/Ez dL, r dphi = -c1 Er/Ez dL, dz = 0.
    ez = -E_DRIFT
    torch.testing.assert_close(dist[0], (C0 * er / ez * dl).expand(g.shape), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dist[1], (-C1 * er / ez * dl).expand(g.shape), rtol=2e-2, atol=0.0)
    assert dist[2].abs().max() < 1e-12
    # Electrons move inwards (against E) and the E x B drift is along +phi for c1 > 0.
    assert (dist[0][..., :-1] < 0).all() and (dist[1][..., :-1] > 0).all()
    # And the integrated path: exact to rounding for r and z; for r dphi the mid-step radius is
    # exact to (alpha dz / r)^2 / 12 per step when following the electron, the recursion also
    # interpolates the (nonlinear in r) global map between radial nodes.
    rtol = 1e-7 if method == "follow" else 1e-4
    np.testing.assert_allclose(dist.numpy(), expected_uniform(g, er, 0.0, 0.0), rtol=rtol, atol=1e-12)


@settings(max_examples=20, deadline=None)
@given(
    er=st.floats(-20.0, 20.0), ephi=st.floats(-20.0, 20.0), ez=st.floats(-60.0, 60.0),
    nz=st.integers(3, 12), method=st.sampled_from(METHODS), flip=st.booleans(),
)
def test_any_uniform_field_gives_analytic_drift(
    er: float, ephi: float, ez: float, nz: int, method: str, flip: bool
) -> None:
    g = Grid(8, 5, nz)
    c1 = -C1 if flip else C1
    local = local_distortions(uniform(g, er), uniform(g, ephi), uniform(g, ez), g, c1=c1)
    dist = global_distortions(local, g, method=method).numpy()
    expected = expected_uniform(g, er, ephi, ez, c1=c1)
    # r and z displacements are exact; r dphi see test_uniform_radial_field_gives_analytic_drift.
    np.testing.assert_allclose(dist[[0, 2]], expected[[0, 2]], rtol=1e-9, atol=1e-10)
    alpha = (C0 * er + c1 * ephi) / (ez - E_DRIFT)
    step = (alpha * g.dz / g.r_min) ** 2 / 12 * (g.nz - 1)  # bound of the midpoint-radius error
    # The recursion interpolates the global r dphi map between 5 radial nodes 43 cm apart.
    rtol = 2 * step + 1e-9 if method == "follow" else 1e-2
    np.testing.assert_allclose(dist[1], expected[1], rtol=0, atol=rtol * np.abs(expected[1]).max() + 1e-12)


def analytic_field(grid: Grid) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Grounded cylinder with rho/eps0 = A sin(k z), k = pi / L, A = 0.05: V = f(r) sin(k z),
    Er = g(r) sin(k z), Ez = -k f(r) cos(k z) with f = (A/k^2)(1 - a I0 - b K0) and
    g = -f' = (A/k)(a I1 - b K1). Returns (V, Er, Ez, g) on the grid."""
    amp, k = 0.05, math.pi / grid.length
    a, b = np.linalg.solve([[iv(0, k * grid.r_min), kv(0, k * grid.r_min)],
                            [iv(0, k * grid.r_max), kv(0, k * grid.r_max)]], np.ones(2))
    _, r, z = grid.mesh()
    f = amp / k**2 * (1 - a * iv(0, k * r) - b * kv(0, k * r))
    radial = amp / k * (a * iv(1, k * r) - b * kv(1, k * r))
    return f * np.sin(k * z), radial * np.sin(k * z), -f * k * np.cos(k * z), radial


def test_local_dz_integrates_the_potential() -> None:
    # Along a straight line, dz(z0) = int_z0^L (|Ez - E0|/E0 - 1) dz = -int Ez/E0 = -V(z0)/E0.
    g = Grid(4, 17, 65)
    v, _, ez, _ = analytic_field(g)
    zero = np.zeros(g.shape)
    local = local_distortions(zero, zero, ez, g)
    summed = torch.flip(torch.cumsum(torch.flip(local[2], [-1]), -1), [-1])  # sum over z >= z0
    np.testing.assert_allclose(summed.numpy(), -v / E_DRIFT, rtol=0, atol=1e-3 * np.abs(v).max() / E_DRIFT)


def test_local_dr_integrates_a_z_dependent_field() -> None:
    # With Ez_sc = 0: sum of local dr over z >= z0 = -(c0/E0) int_z0^L Er dz, and
    # int_z0^L Er dz = g(r) (cos k z0 - cos k L) / k for the closed-form field.
    g = Grid(4, 17, 65)
    _, er, _, radial = analytic_field(g)
    zero = np.zeros(g.shape)
    local = local_distortions(er, zero, zero, g)
    k = math.pi / g.length
    _, _, z = g.mesh()
    exact = -C0 / E_DRIFT * radial * (np.cos(k * z) - np.cos(k * g.length)) / k
    summed = torch.flip(torch.cumsum(torch.flip(local[0], [-1]), -1), [-1])
    np.testing.assert_allclose(summed.numpy(), exact, rtol=0, atol=1e-3 * np.abs(exact).max())
    np.testing.assert_allclose(local[1].numpy(), -C1 / C0 * local[0].numpy(), rtol=1e-12, atol=1e-15)


def test_physical_signs_for_positive_space_charge() -> None:
    g = Grid(18, 17, 17)
    dist = space_charge_distortions(realistic_density(g), g, corrections=False).distortion
    mid = g.nz // 2
    dr, drphi, dz = dist[0, :, :, mid], dist[1, :, :, mid], dist[2, :, :, mid]
    # Electrons are pulled towards the positive ions: outwards at the IFC, inwards at the OFC.
    assert (dr[:, 0] > 1.0).all() and (dr[:, -1] < 0).all()
    # E x B with the sign of c1: r dphi = -c1 int Er/Ez, Er < 0 at the IFC.
    assert (drphi[:, 0] < 0).all()
    # Slower drift in the second half (Ez_sc > 0 there): the point appears further from the readout.
    assert (dz[:, 1:-1] < 0).all()
    flipped = space_charge_distortions(realistic_density(g), g, corrections=False, c1=-C1).distortion
    assert (flipped[1, :, 0, mid] > 0).all()


# -- corrections -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def realistic_maps() -> tuple[Grid, Distortions]:
    g = Grid(90, 17, 17)
    return g, space_charge_distortions(realistic_density(g), g)


def test_realistic_magnitude(realistic_maps: tuple[Grid, Distortions]) -> None:
    _, res = realistic_maps
    assert 3.0 < float(res.distortion[0].abs().max()) < 20.0  # cm, order of 10 cm at the IFC


def test_corrections_undo_distortions_at_random_points(realistic_maps: tuple[Grid, Distortions]) -> None:
    g, res = realistic_maps
    rng = np.random.default_rng(7)
    n = 5000
    phi = torch.as_tensor(rng.uniform(0, 2 * np.pi, n))
    r = torch.as_tensor(rng.uniform(g.r_min, g.r_max, n))
    z = torch.as_tensor(rng.uniform(0, g.length, n))
    measured = apply_map(res.distortion, g, phi, r, z)
    moved = torch.stack([measured[1] - r, (measured[0] - phi) * r, measured[2] - z])
    assert float(moved.abs().max()) > 1.0  # the distortions are large
    back = correct_points(res.distortion, g, *measured)
    err = torch.stack([back[1] - r, (back[0] - phi) * r, back[2] - z])
    assert float(err.abs().max()) < 1 * UM


def test_correction_map_inverts_distortion_map(realistic_maps: tuple[Grid, Distortions]) -> None:
    # For a point measured on a node, correcting then distorting returns it to the node.
    g, res = realistic_maps
    assert res.correction is not None and res.correction.shape == (3, *g.shape)
    phi, r, z = (torch.as_tensor(a).reshape(-1) for a in g.mesh())
    true = apply_map(res.correction, g, phi, r, z)
    again = apply_map(res.distortion, g, *true)
    err = torch.stack([again[1] - r, (again[0] - phi) * r, again[2] - z])
    assert float(err.abs().max()) < 1 * UM
    # To first order the correction is minus the distortion.
    assert float((res.correction + res.distortion).abs().max()) < 0.3 * float(res.distortion.abs().max())


def test_corrections_raise_when_not_converged(realistic_maps: tuple[Grid, Distortions]) -> None:
    g, res = realistic_maps
    with pytest.raises(RuntimeError, match="did not converge"):
        global_corrections(res.distortion, g, tol=1e-12, max_iter=2)


# -- API ---------------------------------------------------------------------------------------
def test_batched_numpy_and_float32() -> None:
    g = Grid(12, 9, 9)
    rho = np.stack([realistic_density(g, 0.3), realistic_density(g, 0.6)])  # (2, nphi, nr, nz)
    res = space_charge_distortions(rho, g)
    assert res.distortion.shape == res.correction.shape == (2, 3, *g.shape)
    assert res.distortion.dtype == torch.float64
    for i in range(2):
        single = space_charge_distortions(rho[i], g)
        torch.testing.assert_close(res.distortion[i], single.distortion, rtol=1e-12, atol=1e-12)
        # The fixed-point iteration stops on the batch's largest step: equal to tol (1e-5 cm).
        torch.testing.assert_close(res.correction[i], single.correction, rtol=0, atol=2e-5)
    res32 = space_charge_distortions(torch.as_tensor(rho, dtype=torch.float32), g)
    assert res32.distortion.dtype == torch.float32
    torch.testing.assert_close(res32.distortion.double(), res.distortion, rtol=0, atol=10 * UM)
    torch.testing.assert_close(res32.correction.double(), res.correction, rtol=0, atol=10 * UM)
    assert space_charge_distortions(rho[0], g, corrections=False).correction is None
    assert COMPONENTS == ("dr", "drphi", "dz")


@pytest.mark.parametrize("method", METHODS)
def test_float32_matches_float64_to_a_fraction_of_a_micron(method: str) -> None:
    # A float32 azimuth near 2 pi resolves 4.8e-7 rad, 1.2e-4 cm at the outer field cage: more than
    # the float32 stopping tolerance (1e-4 cm). Following electrons and inverting the map on the
    # displacement (not the position) keeps float32 at its relative precision; on 180 phi nodes
    # the position-based iteration never converged and drphi was off by up to 5 um.
    from streamcal.detectors.tpc.density import DensitySimulator

    g = Grid(180, 17, 17)
    rho = DensitySimulator(g).sample(seed=1).density[0]  # a random 50 kHz map: ~10 cm of dr
    r64 = space_charge_distortions(rho, g, method=method)
    r32 = space_charge_distortions(torch.as_tensor(rho, dtype=torch.float32), g, method=method)
    assert float(r64.distortion[0].abs().max()) > 5.0
    assert float((r32.distortion.double() - r64.distortion).abs().max()) < 0.5 * UM
    assert float((r32.correction.double() - r64.correction).abs().max()) < 1 * UM


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    g = Grid(36, 9, 9)
    rho = torch.as_tensor(realistic_density(g))
    cpu = space_charge_distortions(rho, g)
    gpu = space_charge_distortions(rho.cuda(), g)
    torch.testing.assert_close(gpu.distortion.cpu(), cpu.distortion, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu.correction.cpu(), cpu.correction, rtol=1e-7, atol=1e-7)


def test_interpolation_is_periodic_and_exact_for_linear_maps() -> None:
    g = Grid(8, 5, 6)
    phi, r, z = g.mesh()
    lin = torch.as_tensor(np.stack([2 + 0.1 * r - 0.03 * z, np.cos(phi), np.zeros_like(r)]))
    pts_r = torch.tensor([g.r_min, 100.0, 200.0, g.r_max], dtype=torch.float64)
    pts_z = torch.tensor([0.0, 10.0, 123.4, g.length], dtype=torch.float64)
    pts_phi = torch.tensor([0.0, 2 * np.pi - 0.5 * g.dphi, -0.5 * g.dphi, 7 * g.dphi + 2 * np.pi],
                           dtype=torch.float64)
    out = interpolate_map(lin, g, pts_phi, pts_r, pts_z)
    torch.testing.assert_close(out[0], 2 + 0.1 * pts_r - 0.03 * pts_z, rtol=1e-12, atol=1e-12)
    wrap = 0.5 * (math.cos(7 * g.dphi) + 1.0)  # halfway between the last node and phi = 0
    torch.testing.assert_close(out[1], torch.tensor([1.0, wrap, wrap, math.cos(7 * g.dphi)],
                                                    dtype=torch.float64))


def test_invalid_inputs_name_the_argument() -> None:
    g = Grid(8, 5, 6)
    zero = torch.zeros(g.shape, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"ephi must have shape .*got \(8, 6, 5\)"):
        local_distortions(zero, torch.zeros(8, 6, 5), zero, g)
    with pytest.raises(ValueError, match="e_drift must be"):
        local_distortions(zero, zero, zero, g, e_drift=-400.0)
    with pytest.raises(ValueError, match="reaches the nominal drift field"):
        local_distortions(zero, zero, zero + 500.0, g)
    # a density in V/m^2 instead of V/cm^2 (x 1e4): the error points at the units
    with pytest.raises(ValueError, match=r"check the units: the density is rho/eps0 in V/cm\^2"):
        space_charge_distortions(1e4 * realistic_density(g), g)
    with pytest.raises(ValueError, match=r"method must be one of \('follow', 'recursive'\)"):
        global_distortions(torch.zeros(3, *g.shape), g, method="euler")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"local must have shape \(\.\.\., 3, nphi, nr, nz\)"):
        global_distortions(torch.zeros(2, *g.shape), g)
    with pytest.raises(ValueError, match="solver is for grid 8x5x7"):
        space_charge_distortions(np.zeros(g.shape), g, solver=PoissonSolver("8x5x7"))
    with pytest.raises(ValueError, match="rho contains non-finite"):
        space_charge_distortions(np.full(g.shape, np.nan), g)
    with pytest.raises(ValueError, match="tol must be"):
        global_corrections(torch.zeros(3, *g.shape), g, tol=0.0)
