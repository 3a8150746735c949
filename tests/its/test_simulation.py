"""Track simulator against closed-form physics: helix radius R = pT / (0.3 B), the Highland
multiple-scattering angle, the intrinsic resolution, the Tsallis pT spectrum; hits on the
misaligned chips; determinism and the Arrow schema."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pytest
from scipy import stats

from streamcal.detectors.its.geometry import ITSGeometryConfig, LayerSpec, build_geometry
from streamcal.detectors.its.misalignment import MisalignmentConfig, apply_alignment, misalign, weak_mode
from streamcal.detectors.its.simulation import (
    HIT_SCHEMA,
    PION_MASS,
    SimulationConfig,
    highland_theta0,
    sample_pt,
    simulate,
    simulate_batch,
)

B = 0.5  # T


@pytest.fixture(scope="module")
def geom4():
    """The first four ITS2 layers at full length (IB 270 mm, middle layer 840 mm)."""
    return build_geometry(ITSGeometryConfig.small(n_layers=4, chips_v=(9, 9, 9, 28)))


def col(batch: pa.RecordBatch, name: str) -> np.ndarray:
    return batch.column(name).to_numpy(zero_copy_only=False)


def track_index(batch: pa.RecordBatch, tracks_per_event: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per hit a dense track id, and per track the index of its first and last hit."""
    key = col(batch, "event") * tracks_per_event + col(batch, "track")
    assert np.all(np.diff(key) >= 0), "rows must be grouped by event and track"
    _, first, inv = np.unique(key, return_index=True, return_inverse=True)
    last = np.r_[first[1:], key.size] - 1
    return inv, first, last


def circle_residuals(batch: pa.RecordBatch, glob: np.ndarray, tracks_per_event: int):
    """Circle through (vertex, first hit, last hit) of every track in the transverse plane.
    Returns (R per track, hit distance to its circle minus R, hit track id, circle centre per track,
    vertex per track)."""
    inv, first, last = track_index(batch, tracks_per_event)
    vtx = np.stack([col(batch, "vx"), col(batch, "vy")], 1)[first]
    p2 = glob[first, :2] - vtx
    p3 = glob[last, :2] - vtx
    d = 2.0 * (p2[:, 0] * p3[:, 1] - p3[:, 0] * p2[:, 1])
    d = np.where(last > first, d, np.nan)  # one-hit tracks define no circle
    s2, s3 = (p2 * p2).sum(1), (p3 * p3).sum(1)
    centre = np.stack([(p3[:, 1] * s2 - p2[:, 1] * s3) / d, (p2[:, 0] * s3 - p3[:, 0] * s2) / d], 1)
    radius = np.hypot(centre[:, 0], centre[:, 1])
    rel = glob[:, :2] - vtx[inv] - centre[inv]
    return radius, np.hypot(rel[:, 0], rel[:, 1]) - radius[inv], inv, centre, vtx


# ------------------------------------------------------------------------------------------------
# Output format


def test_arrow_schema(geom4):
    batch = simulate_batch(geom4, SimulationConfig(seed=1), 20)
    expected = pa.schema([
        ("event", pa.int64()), ("track", pa.int32()), ("sensor", pa.int32()), ("layer", pa.int8()),
        ("u", pa.float64()), ("v", pa.float64()),
        ("x", pa.float64()), ("y", pa.float64()), ("z", pa.float64()),
        ("u_true", pa.float64()), ("v_true", pa.float64()),
        ("pt", pa.float32()), ("charge", pa.int8()),
        ("vx", pa.float64()), ("vy", pa.float64()), ("vz", pa.float64()),
    ])
    assert batch.schema.equals(expected)
    assert HIT_SCHEMA.equals(expected)
    assert batch.num_rows > 20
    # the global hit is the measured local hit placed with the ideal geometry
    sid = col(batch, "sensor")
    loc = np.stack([col(batch, "u"), col(batch, "v"), np.zeros(batch.num_rows)], 1)
    glob = np.stack([col(batch, "x"), col(batch, "y"), col(batch, "z")], 1)
    np.testing.assert_allclose(geom4.to_global(sid, loc), glob, atol=1e-12)
    np.testing.assert_array_equal(col(batch, "layer"), geom4.layer[sid])
    # rows ordered by event, track, then radius
    inv, first, _ = track_index(batch, 8)
    r = np.hypot(glob[:, 0], glob[:, 1])
    same = inv[1:] == inv[:-1]
    assert np.all(np.diff(r)[same] > 0)


def test_defaults_follow_the_issue(geom4):
    cfg = SimulationConfig()
    assert (cfg.tracks_per_event, cfg.b_field, cfg.pt_min, cfg.sigma_u, cfg.sigma_v) == (8, 0.5, 0.2, 0.005, 0.005)
    batch = simulate_batch(geom4, cfg, 200)
    ev, trk = col(batch, "event"), col(batch, "track")
    assert ev.min() == 0 and ev.max() == 199
    assert trk.min() >= 0 and trk.max() <= 7
    assert np.unique(ev * 8 + trk).size > 0.99 * 1600  # almost every track leaves hits
    assert col(batch, "pt").min() >= np.float32(0.2)


# ------------------------------------------------------------------------------------------------
# Helix


def _helix_config(**kw) -> SimulationConfig:
    base = dict(pt_spectrum="uniform", pt_min=0.2, pt_max=1.0, multiple_scattering=False, sigma_u=0.0,
                sigma_v=0.0, seed=21)
    base.update(kw)
    return SimulationConfig(**base)


def _check_helix(batch: pa.RecordBatch, glob: np.ndarray, b_field: float = B) -> None:
    radius, resid, inv, centre, vtx = circle_residuals(batch, glob, 8)
    _, first, last = track_index(batch, 8)
    pt = col(batch, "pt").astype(np.float64)[first]
    q = col(batch, "charge")[first]
    r_expect = 1000.0 * pt / (0.3 * b_field)  # R [m] = pT [GeV/c] / (0.3 B [T])
    n_hits = np.bincount(inv)
    ok = n_hits >= 3
    assert ok.sum() > 500
    np.testing.assert_allclose(radius[ok], r_expect[ok], rtol=2e-5)
    assert np.abs(resid[ok[inv]]).max() < 1e-5  # mm
    # a positive track in B along +z turns clockwise: centre to the right of the direction
    p2 = glob[first, :2] - vtx
    cross = p2[:, 0] * centre[:, 1] - p2[:, 1] * centre[:, 0]
    np.testing.assert_array_equal(np.sign(cross[ok]), -q[ok])
    # rz: z - vz grows linearly with the transverse arc length from the vertex
    rel = glob[:, :2] - vtx[inv]
    chord = np.hypot(rel[:, 0], rel[:, 1])
    arc = 2.0 * radius[inv] * np.arcsin(np.clip(chord / (2.0 * radius[inv]), 0, 1))
    slope = (glob[:, 2] - col(batch, "vz")) / arc
    np.testing.assert_allclose(slope, slope[first][inv], atol=1e-9)


def test_hits_lie_on_helix_of_radius_pt_over_03b(geom4):
    cfg = _helix_config()
    batch = simulate_batch(geom4, cfg, 400)
    glob = np.stack([col(batch, "x"), col(batch, "y"), col(batch, "z")], 1)
    _check_helix(batch, glob)


def test_helix_radius_scales_with_field(geom4):
    batch = simulate_batch(geom4, _helix_config(b_field=2.0), 200)
    glob = np.stack([col(batch, "x"), col(batch, "y"), col(batch, "z")], 1)
    _check_helix(batch, glob, b_field=2.0)


def test_loopers_stop_at_their_maximum_radius():
    """pT = 0.02 GeV/c in 0.5 T: R = 133.3 mm, so no hit beyond |vertex| + 2 R."""
    geom = build_geometry(ITSGeometryConfig.small(n_layers=7))
    cfg = _helix_config(pt_spectrum="fixed", pt_min=0.02, pt_max=0.02, beam_spot_sigma=(0.0, 0.0, 0.0))
    batch = simulate_batch(geom, cfg, 300)
    glob = np.stack([col(batch, "x"), col(batch, "y"), col(batch, "z")], 1)
    r = np.hypot(glob[:, 0], glob[:, 1])
    assert r.max() <= 2 * 1000 * 0.02 / (0.3 * B) + 1e-6
    assert set(np.unique(col(batch, "layer"))) == {0, 1, 2, 3, 4}  # 243.9 mm < 2R < 342.3 mm
    _check_helix(batch, glob)


# ------------------------------------------------------------------------------------------------
# Multiple scattering


def highland(p: float | np.ndarray, x_x0: float | np.ndarray, beta: float | np.ndarray = 1.0):
    """PDG Highland formula, unit charge: 13.6 MeV / (beta c p) sqrt(x/X0) (1 + 0.038 ln(x / (X0 beta^2)))."""
    return 0.0136 / (beta * p) * np.sqrt(x_x0) * (1.0 + 0.038 * np.log(x_x0 / beta**2))


def test_highland_value():
    # 1 GeV/c, beta = 1, 1 % X0: 13.6 MeV/GeV * 0.1 * (1 + 0.038 ln 0.01) = 1.1220 mrad
    assert highland(1.0, 0.01) == pytest.approx(1.1220e-3, abs=1e-7)
    assert highland_theta0(1.0, 0.01, mass=0.0) == pytest.approx(1.1220e-3, abs=1e-7)
    beta = 1.0 / math.sqrt(1.0 + PION_MASS**2)
    assert highland_theta0(1.0, 0.01) == pytest.approx(highland(1.0, 0.01, beta), rel=1e-12)
    assert highland_theta0(0.3, 0.0035) == pytest.approx(
        highland(0.3, 0.0035, 0.3 / math.hypot(0.3, PION_MASS)), rel=1e-12
    )
    assert highland_theta0(1.0, 0.0) == 0.0


@pytest.mark.parametrize("eta_max", [0.0, 1.0])
def test_multiple_scattering_rms_is_highland(eta_max):
    """One 1 % X0 layer at r = 30 mm, a massless layer at 60 mm; pT = 1 GeV/c, beta = 1, vertex
    at the origin, no smearing. The kink at the first layer, from the exact helix chords before
    and after it, has an RMS of theta0(p, x/X0 / cos(incidence)) in both projections: the
    transverse angle times cos(lambda), and the dip angle lambda."""
    pu, pv = 512 * 0.02688, 1024 * 0.02924  # active matrix = chip: every stave crossing is a hit
    gcfg = ITSGeometryConfig(
        layers=(LayerSpec(16, 1, 5, 30.0, 0.01), LayerSpec(48, 1, 5, 60.0, 0.0)), chip_pitch_u=pu, chip_pitch_v=pv
    )
    geom = build_geometry(gcfg)
    cfg = SimulationConfig(pt_spectrum="fixed", pt_min=1.0, pt_max=1.0, eta_max=eta_max, mass=0.0,
                           beam_spot_sigma=(0.0, 0.0, 0.0), sigma_u=0.0, sigma_v=0.0, seed=5 if eta_max == 0 else 6)
    batch = simulate_batch(geom, cfg, 3000)
    inv, first, _ = track_index(batch, 8)
    layer = col(batch, "layer")
    n0 = np.bincount(inv, weights=layer == 0).astype(int)
    n1 = np.bincount(inv, weights=layer == 1).astype(int)
    good = (n0 == 1) & (n1 >= 1)  # one crossing of the material, then a measured point
    assert good.sum() > 15000
    a_idx = first[good]  # hit on layer 0
    b_idx = a_idx + 1  # first hit on layer 1
    glob = np.stack([col(batch, "x"), col(batch, "y"), col(batch, "z")], 1)
    a, b = glob[a_idx], glob[b_idx]
    q = col(batch, "charge")[a_idx]
    k = -q * 0.3 * B / 1000.0  # signed curvature (1/mm) at pT = 1 GeV/c

    def chord(p0, p1):
        d = p1[:, :2] - p0[:, :2]
        c = np.hypot(d[:, 0], d[:, 1])
        return np.arctan2(d[:, 1], d[:, 0]), 2.0 * np.arcsin(k * c / 2.0) / k

    ang1, s1 = chord(np.zeros_like(a), a)
    ang2, s2 = chord(a, b)
    phi_in = ang1 + k * s1 / 2.0  # transverse direction at a, arriving
    phi_out = ang2 - k * s2 / 2.0  # transverse direction at a, leaving
    lam_in = np.arctan(a[:, 2] / s1)  # dip before and after
    lam_out = np.arctan((b[:, 2] - a[:, 2]) / s2)
    kink_t = ((phi_out - phi_in + np.pi) % (2 * np.pi) - np.pi) * np.cos(lam_in)
    kink_z = lam_out - lam_in
    normal = geom.rot[col(batch, "sensor")[a_idx], :, 2]
    d_in = np.stack([np.cos(lam_in) * np.cos(phi_in), np.cos(lam_in) * np.sin(phi_in), np.sin(lam_in)], 1)
    cos_inc = np.abs(np.sum(d_in * normal, axis=1))
    p = 1.0 / np.cos(lam_in)  # |p| = pT / cos(lambda)
    theta0 = highland(p, 0.01 / cos_inc)
    if eta_max > 0:
        assert cos_inc.min() < 0.7  # the path-length and momentum dependence are exercised
    n = good.sum()
    tol = 4.0 / math.sqrt(2 * n)
    for kink in (kink_t, kink_z):
        pull = kink / theta0
        assert pull.std() == pytest.approx(1.0, abs=tol)
        assert pull.mean() == pytest.approx(0.0, abs=4.0 / math.sqrt(n))
        assert np.mean(np.abs(pull) < 1.0) == pytest.approx(0.6827, abs=0.015)  # Gaussian core
        if eta_max == 0:
            normal_inc = cos_inc > 0.9995  # the reference case: 1 GeV/c, 1 % X0 -> 1.1220 mrad
            rms = math.sqrt(np.mean(kink[normal_inc] ** 2))
            assert rms == pytest.approx(1.1220e-3, rel=4.0 / math.sqrt(2 * normal_inc.sum()))
    assert abs(np.corrcoef(kink_t, kink_z)[0, 1]) < 4.0 / math.sqrt(n)


# ------------------------------------------------------------------------------------------------
# Resolution and the misaligned geometry


def test_intrinsic_resolution(geom4):
    cfg = SimulationConfig(sigma_u=0.005, sigma_v=0.008, multiple_scattering=False, seed=3)
    batch = simulate_batch(geom4, cfg, 2000)
    n = batch.num_rows
    assert n > 30000
    for meas, true, sigma in (("u", "u_true", 0.005), ("v", "v_true", 0.008)):
        d = col(batch, meas) - col(batch, true)
        assert d.std() == pytest.approx(sigma, rel=4.0 / math.sqrt(2 * n))
        assert d.mean() == pytest.approx(0.0, abs=4.0 * sigma / math.sqrt(n))
        assert np.mean(np.abs(d) < sigma) == pytest.approx(0.6827, abs=0.01)
        assert stats.kurtosis(d) == pytest.approx(0.0, abs=0.1)  # Gaussian tails
    assert np.abs(col(batch, "u_true")).max() <= geom4.half_u
    assert np.abs(col(batch, "v_true")).max() <= geom4.half_v


def test_hits_are_on_the_misaligned_chips(geom4):
    theta = misalign(geom4, MisalignmentConfig(sigma_rot=(2e-3, 2e-3, 2e-3), sigma_trans=(0.1, 0.1, 0.1),
                                               modes=(("radial", 5e-4), ("twist", 1e-6)), seed=4))
    cfg = _helix_config()
    ideal = simulate_batch(geom4, cfg, 400)
    batch = next(simulate(geom4, cfg, 400, theta=theta, batch_events=400))
    rot, trans = apply_alignment(geom4, theta)
    sid = col(batch, "sensor")
    loc = np.stack([col(batch, "u_true"), col(batch, "v_true"), np.zeros(batch.num_rows)], 1)
    np.testing.assert_array_equal(loc[:, :2], np.stack([col(batch, "u"), col(batch, "v")], 1))  # sigma = 0
    true_glob = np.einsum("nij,nj->ni", rot[sid], loc) + trans[sid]
    _check_helix(batch, true_glob)  # the true crossings are on the helix ...
    seen = np.stack([col(batch, "x"), col(batch, "y"), col(batch, "z")], 1)
    _, resid, _, _, _ = circle_residuals(batch, seen, 8)
    assert np.sqrt(np.nanmean(resid**2)) > 0.02  # ... the ideal-geometry reading of them is not
    # same tracks (same seed): the misalignment moves the local hits by about its size
    assert batch.num_rows == pytest.approx(ideal.num_rows, rel=0.02)


def test_shifted_chips_keep_their_hits(geom4):
    """Shift every chip by 0.5 mm along z: hits near the chip boundaries land on the neighbour
    chip, so the number of hits stays the same (without the neighbour search ~1.7 % are lost)."""
    cfg = _helix_config(eta_max=0.5, beam_spot_sigma=(0.01, 0.01, 10.0))
    ideal = simulate_batch(geom4, cfg, 3000)
    shifted = next(simulate(geom4, cfg, 3000, theta=weak_mode(geom4, "tz", 0.5), batch_events=3000))
    for li in range(4):
        n0 = int(np.sum(col(ideal, "layer") == li))
        n1 = int(np.sum(col(shifted, "layer") == li))
        assert n1 == pytest.approx(n0, rel=0.003), li
    v = col(shifted, "v_true")
    v_ideal = col(ideal, "v_true")
    # the hit distribution in v moves by -0.5 mm modulo the 30 mm pitch: same spread
    assert v.std() == pytest.approx(v_ideal.std(), rel=0.02)


def test_inner_barrel_is_efficient():
    geom = build_geometry(ITSGeometryConfig.small(n_layers=3, chips_v=(9, 9, 9)))
    cfg = SimulationConfig(eta_max=0.8, beam_spot_sigma=(0.015, 0.015, 20.0), seed=8)
    batch = simulate_batch(geom, cfg, 2000)
    inv, _, _ = track_index(batch, 8)
    n_trk = 2000 * 8
    assert inv.max() + 1 == n_trk
    for li in range(3):
        has = np.bincount(inv, weights=col(batch, "layer") == li, minlength=n_trk) > 0
        assert has.mean() > 0.99, li  # dead: 60 um chip gaps in z; phi is hermetic


# ------------------------------------------------------------------------------------------------
# pT spectrum


def test_tsallis_spectrum_matches_closed_form_cdf():
    cfg = SimulationConfig(pt_min=0.2, pt_max=20.0, tsallis_n=7.0, tsallis_t=0.15)
    pt = sample_pt(np.random.default_rng(2), 100_000, cfg)
    a, n = cfg.tsallis_n * cfg.tsallis_t, cfg.tsallis_n

    def prim(x):  # integral of x (1 + x/a)^-n dx
        y = 1.0 + x / a
        return a * a * (y ** (2 - n) / (2 - n) - y ** (1 - n) / (1 - n))

    def cdf(x):
        x = np.clip(x, cfg.pt_min, cfg.pt_max)
        return (prim(x) - prim(cfg.pt_min)) / (prim(cfg.pt_max) - prim(cfg.pt_min))

    assert pt.min() >= 0.2 and pt.max() <= 20.0
    assert stats.kstest(pt, cdf).pvalue > 1e-3
    uni = sample_pt(np.random.default_rng(2), 50_000, SimulationConfig(pt_spectrum="uniform", pt_max=2.0))
    assert stats.kstest(uni, stats.uniform(0.2, 1.8).cdf).pvalue > 1e-3


# ------------------------------------------------------------------------------------------------
# Determinism


def test_same_seed_same_events(geom4):
    theta = misalign(geom4, MisalignmentConfig(seed=2))
    cfg = SimulationConfig(seed=9)
    a = list(simulate(geom4, cfg, 250, theta=theta, batch_events=100))
    b = list(simulate(geom4, cfg, 250, theta=theta, batch_events=100))
    assert len(a) == 3
    assert all(x.equals(y) for x, y in zip(a, b))
    c = list(simulate(geom4, SimulationConfig(seed=10), 250, theta=theta, batch_events=100))
    assert not a[0].equals(c[0])
    events = np.concatenate([col(x, "event") for x in a])
    assert np.unique(events).tolist() == list(range(250))
    assert a[2].equals(simulate_batch(geom4, cfg, 50, placement=apply_alignment(geom4, theta), batch_index=2,
                                      event_offset=200))
    assert list(simulate(geom4, cfg, 0)) == []


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"tracks_per_event": 0}, "tracks_per_event"),
        ({"b_field": 0.0}, "b_field"),
        ({"b_field": float("nan")}, "b_field"),
        ({"pt_min": 0.0}, "pt_min"),
        ({"pt_min": 2.0, "pt_max": 1.0}, "pt_max"),
        ({"pt_spectrum": "exponential"}, "pt_spectrum"),
        ({"tsallis_n": 2.0}, "tsallis_n"),
        ({"tsallis_t": 0.0}, "tsallis_t"),
        ({"eta_max": -1.0}, "eta_max"),
        ({"beam_spot_sigma": (0.01, 0.01)}, "beam_spot_sigma"),
        ({"beam_spot_sigma": (0.01, -0.01, 1.0)}, "beam_spot_sigma"),
        ({"sigma_u": -0.001}, "sigma_u"),
        ({"sigma_v": -0.001}, "sigma_v"),
        ({"mass": -1.0}, "mass"),
        ({"seed": -3}, "seed"),
    ],
)
def test_bad_simulation_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        SimulationConfig(**kwargs)


def test_bad_call_arguments(geom4):
    cfg = SimulationConfig()
    with pytest.raises(ValueError, match="n_events"):
        simulate_batch(geom4, cfg, 0)
    with pytest.raises(ValueError, match="placement"):
        simulate_batch(geom4, cfg, 5, placement=(geom4.rot[:-1], geom4.trans[:-1]))
    bad = (geom4.rot.copy(), geom4.trans.copy())
    bad[1][0, 0] = np.inf
    with pytest.raises(ValueError, match="placement must be finite"):
        simulate_batch(geom4, cfg, 5, placement=bad)
    with pytest.raises(ValueError, match="theta must have shape"):
        next(simulate(geom4, cfg, 5, theta=np.zeros((3, 6))))
    with pytest.raises(ValueError, match="batch_events"):
        next(simulate(geom4, cfg, 5, batch_events=0))
    with pytest.raises(ValueError, match="n_events"):
        next(simulate(geom4, cfg, -1))
    with pytest.raises(TypeError, match="config"):
        simulate_batch(geom4, {"seed": 1}, 5)  # type: ignore[arg-type]
