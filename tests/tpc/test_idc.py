"""IDCs: decomposition, 1D IDC vs rate, full-granularity memory, Fourier input, density from IDCs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from streamcal.detectors.tpc.constants import PADS_PER_SECTOR, PADS_TOTAL, Grid
from streamcal.detectors.tpc.density import DensityConfig, MultiplicityModel, average_density, eta_acceptance
from streamcal.detectors.tpc.idc import (
    IDCConfig,
    IDCHistory,
    IDCSimulator,
    PadGeometry,
    density_from_idc,
    idc_0d,
    idc_1d,
    idc_decomposition,
    idc_fourier,
)


@settings(max_examples=50, deadline=None)
@given(
    hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 12), st.integers(1, 5), st.integers(1, 9)),
        elements=st.one_of(st.just(0.0), st.floats(1e-3, 1e6)),
    )
)
def test_decomposition_recomposes_exactly(idc: np.ndarray) -> None:
    dec = idc_decomposition(idc)
    assert dec.idc0.shape == idc.shape[1:] and dec.idc1.shape == (idc.shape[0],) and dec.delta.shape == idc.shape
    np.testing.assert_allclose(dec.recompose(), idc, rtol=1e-12, atol=1e-12 * max(float(idc.max()), 1.0))
    live = dec.idc0 > 0
    if live.any():
        np.testing.assert_allclose(dec.idc1.mean(), 1.0, rtol=1e-12)  # <IDC1>_t = 1 by construction


def test_decomposition_of_simulated_maps() -> None:
    series = IDCSimulator(IDCConfig(rows_per_group=8, pads_per_group=10, n_sides=1)).simulate(40, seed=1)
    dec = idc_decomposition(series.idc)
    np.testing.assert_allclose(dec.recompose(), series.idc, rtol=1e-6)
    # IDC1 follows the 1D IDC (same events for every pad)
    assert np.corrcoef(dec.idc1, series.idc_1d)[0, 1] > 0.99
    assert series.idc_0d == pytest.approx(series.idc_1d.mean())
    assert idc_0d(series.idc) == pytest.approx(float(np.mean(idc_1d(series.idc))))


def test_1d_idc_tracks_the_rate() -> None:
    """The 0D IDC is proportional to the rate; the 1D IDC fluctuates per ms as eq. 1 at N = rate x 1 ms."""
    config = IDCConfig(rows_per_group=19, pads_per_group=20, n_sides=1, fine_bins_per_pad=1)
    means = {}
    for rate in (10_000.0, 50_000.0):
        series = IDCSimulator(config, DensityConfig(rate_hz=rate)).simulate(200, seed=int(rate))
        one = series.idc_1d
        means[rate] = one.mean()
        mu, var = MultiplicityModel().track_moments(eta_acceptance())
        n_per_ms = rate * 1e-3
        predicted = math.sqrt((1 + var / mu**2 + 1 / mu) / n_per_ms)  # eq. 1, full readout plane
        assert one.std(ddof=1) / one.mean() == pytest.approx(predicted, rel=0.15)
    assert means[50_000.0] / means[10_000.0] == pytest.approx(5.0, rel=0.1)


def test_full_granularity_maps_and_memory() -> None:
    geo = PadGeometry()
    assert int(geo.pads_per_row.sum()) == PADS_PER_SECTOR and geo.pads_per_row.size == 152
    assert np.all(np.diff(geo.pads_per_row) >= 0)
    config = IDCConfig()  # full pad granularity, both sides
    assert config.map_shape == (2, 18, PADS_PER_SECTOR) and math.prod(config.map_shape) == PADS_TOTAL == 524_160
    series = IDCSimulator(config).simulate(2, seed=3)
    assert series.idc.shape == (2, 2, 18, PADS_PER_SECTOR) and series.idc.dtype == np.float32
    assert np.all(series.idc >= 0) and series.idc.mean() > 0

    # the 3D IDC history: 200 ms x 524,160 pads in float32 = 419.3 MB (< ~1 GB); float16 half of it
    assert IDCHistory.required_nbytes(config.map_shape, 200, np.float32) == 200 * 524_160 * 4 == 419_328_000
    assert IDCHistory.required_nbytes(config.map_shape, 200, np.float16) == 209_664_000
    history = IDCHistory(config.map_shape, 200, np.float32)  # one allocation
    assert history.nbytes == 419_328_000 <= 1_000_000_000
    history.push(series.idc[0])
    history.push(series.idc[1])
    assert len(history) == 2
    np.testing.assert_array_equal(history.ordered(), series.idc)


def test_history_ring_order() -> None:
    h = IDCHistory((2, 3), length=3)
    maps = [np.full((2, 3), i, dtype=np.float32) for i in range(5)]
    for m in maps:
        h.push(m)
    assert len(h) == 3
    np.testing.assert_array_equal(h.ordered()[:, 0, 0], [2, 3, 4])
    with pytest.raises(ValueError, match=r"idc_map must have shape \(2, 3\)"):
        h.push(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="dtype must be float16, float32 or float64"):
        IDCHistory(4, dtype=np.int32)
    with pytest.raises(ValueError, match="length must be an integer >= 1"):
        IDCHistory(4, length=0)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(8, 400), k=st.integers(1, 3), amplitude=st.floats(-0.5, 0.5), phase=st.floats(0, 2 * math.pi))
def test_fourier_normalisation(n: int, k: int, amplitude: float, phase: float) -> None:
    t = np.arange(n)
    idc1 = 1.0 + amplitude * np.cos(2 * math.pi * k * t / n + phase)
    coeffs = idc_fourier(idc1, k + 1)  # [Re c_0..c_k, Im c_0..c_k]
    re, im = coeffs[: k + 1], coeffs[k + 1 :]
    assert abs(re[0]) < 1e-12 and abs(im[0]) < 1e-12  # mean relative deviation 0
    assert math.hypot(re[k], im[k]) == pytest.approx(abs(amplitude) / 2, abs=1e-12)  # half the peak size
    np.testing.assert_allclose(idc_fourier(np.ones(n), 2), 0.0)
    offset = idc_fourier(np.full(n, 1.05), 1)
    assert offset[0] == pytest.approx(0.05)


def test_fourier_bad_input() -> None:
    with pytest.raises(ValueError, match=r"n_coefficients must be an integer in \[1, 101\]"):
        idc_fourier(np.ones(200), 102)


def test_density_from_idc_history() -> None:
    """The 3D IDC history determines the density: it reproduces the average map (statistically)."""
    dc = DensityConfig(time_bin=0.01)  # 20 maps of 10 ms: faster, same physics
    ic = IDCConfig(n_sides=1, fine_bins_per_pad=1)
    series = IDCSimulator(ic, dc).simulate(None, seed=7)
    g = Grid(90, 17, 17)
    rho = density_from_idc(series.idc, g, density_config=dc, idc_config=ic)
    avg = average_density(g, dc)
    assert rho.shape == g.shape
    inner = slice(2, -2)  # pad rows cover 85.2-245.8 cm; the outermost nodes get partial cells
    profile = rho.mean(axis=(0, 2))[inner] / avg.mean(axis=(0, 2))[inner]
    np.testing.assert_allclose(profile, 1.0, atol=0.1)
    assert rho.sum() / avg.sum() == pytest.approx(1.0, abs=0.08)
    with pytest.raises(ValueError, match="idc must have shape"):
        density_from_idc(series.idc[:5], g, density_config=dc, idc_config=ic)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rows_per_group": 0}, "rows_per_group must be an integer >= 1"),
        ({"pads_per_group": 1.5}, "pads_per_group must be an integer >= 1"),
        ({"n_sides": 3}, "n_sides must be 1 or 2"),
        ({"rows_per_group": 200}, r"rows_per_group must be <= pad_rows \(152\)"),
    ],
)
def test_idc_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        IDCConfig(**kwargs)


def test_decomposition_bad_input() -> None:
    with pytest.raises(ValueError, match="idc must be finite and >= 0"):
        idc_decomposition(np.array([[1.0, -1.0]]))
    with pytest.raises(ValueError, match="idc must have shape"):
        idc_decomposition(np.ones(3))


def _traced_peak(fn) -> tuple[object, int]:
    import tracemalloc

    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_full_granularity_simulation_memory_per_map() -> None:
    """Simulating full-granularity maps needs the output plus a fixed working set (~45 MB measured),
    so one ion drift time (200 maps of 524,160 pads, 419.3 MB in float32) stays well below ~1 GB."""
    series, peak = _traced_peak(lambda: IDCSimulator().simulate(4, seed=2))
    working = peak - series.idc.nbytes
    assert series.idc.nbytes == 4 * PADS_TOTAL * 4
    assert working < 100e6
    assert 200 * PADS_TOTAL * 4 + working < 1e9


@pytest.mark.slow
def test_full_ion_drift_time_history_fits_in_1_gb() -> None:
    """The whole 3D IDC history at full granularity, simulated in one call (8 s, 465 MB peak measured)."""
    series, peak = _traced_peak(lambda: IDCSimulator().simulate(200, seed=3))
    assert series.idc.shape == (200, 2, 18, PADS_PER_SECTOR)
    assert peak < 1e9
    dec = idc_decomposition(series.idc[:, 0, :2])  # IDC0 / IDC1 / IDCDelta of two sectors
    assert dec.idc1.shape == (200,) and abs(dec.idc1.mean() - 1.0) < 1e-9


def test_idc_maps_of_the_density_simulation_determine_its_density() -> None:
    """IDCs from the same simulation as the density map: 2D maps per ms on the grid's cells, whose
    history gives the density back exactly; their 1D IDC is the sample's relative 1D IDC."""
    from streamcal.detectors.tpc.density import DensitySimulator, density_from_readout, sector_epsilon_map

    factors = np.linspace(0.8, 1.2, 18)  # a local epsilon map, which the IDCs see
    dc = DensityConfig(epsilon_map=sector_epsilon_map(factors))
    g = Grid(36, 9, 9)
    sample = DensitySimulator(g, dc).sample(seed=4, n=2)
    maps = sample.idc_maps()
    assert maps.shape == (2, 200, 36, 9) and np.all(maps >= 0)
    eps = dc.epsilon_on(g.phi[:, None], g.r[None, :])
    edges = np.concatenate([[g.r[0]], 0.5 * (g.r[1:] + g.r[:-1]), [g.r[-1]]])
    electrons = maps / (eps * np.diff(edges)[None, :] * dc.ionisation_per_cm)
    np.testing.assert_allclose(density_from_readout(electrons, g, dc), sample.density, rtol=1e-12)
    ratio = np.stack([idc_1d(m) for m in maps]) / sample.idc1d()
    np.testing.assert_allclose(ratio, ratio[0, 0], rtol=1e-12)
