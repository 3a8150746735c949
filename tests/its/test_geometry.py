"""ITS2 geometry against the published layout (ITS upgrade TDR, J. Phys. G 41 (2014) 087002;
ALPIDE numbers as quoted in the seed) and against the closed-form frame conventions."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcal.detectors.its.geometry import (
    ITS2_LAYERS,
    ITS2_N_SENSORS,
    ITSGeometryConfig,
    LayerSpec,
    build_geometry,
)

# Published ITS2 layout (TDR table 1.1 / the seed): staves and chips per layer, minimum radii.
STAVES = (12, 16, 20, 24, 30, 42, 48)
CHIPS_PER_STAVE = (9, 9, 9, 112, 112, 196, 196)
CHIPS_PER_LAYER = (108, 144, 180, 2688, 3360, 8232, 9408)
R_MIN_MM = (22.4, 30.1, 37.8, 194.4, 243.9, 342.3, 391.8)
# Stave lengths along z: IB stave 271 mm, ML half-stave 843 mm, OL half-stave 1475 mm.
STAVE_LENGTH_MM = (271.0, 271.0, 271.0, 843.0, 843.0, 1475.0, 1475.0)


@pytest.fixture(scope="module")
def full():
    return build_geometry()


def test_published_chip_counts(full):
    assert sum(CHIPS_PER_LAYER) == 24_120 == ITS2_N_SENSORS == full.n_sensors
    assert [s * c for s, c in zip(STAVES, CHIPS_PER_STAVE)] == list(CHIPS_PER_LAYER)
    assert tuple(np.diff(full.layer_first)) == CHIPS_PER_LAYER
    assert tuple(np.bincount(full.layer)) == CHIPS_PER_LAYER
    for li in range(7):
        on = full.layer == li
        assert np.unique(full.stave[on]).size == STAVES[li]
        assert np.all(np.bincount(full.stave[on]) == CHIPS_PER_STAVE[li])
    assert full.n_layers == 7


def test_published_pixel_numbers(full):
    cfg = full.config
    # ALPIDE: 512 x 1024 pixels of 26.88 x 29.24 um -> active 13.76 x 29.94 mm in a 15 x 30 mm chip
    assert (cfg.pixel_pitch_u, cfg.pixel_pitch_v) == (0.02688, 0.02924)
    assert cfg.active_u == pytest.approx(13.76, abs=0.005)
    assert cfg.active_v == pytest.approx(29.94, abs=0.005)
    assert (cfg.chip_pitch_u, cfg.chip_pitch_v) == (15.0, 30.0)
    # "24,120 ALPIDE sensors, 12.5 billion pixels"
    n_pix = full.n_sensors * cfg.n_pixels_u * cfg.n_pixels_v
    assert n_pix == pytest.approx(12.5e9, rel=0.02)
    assert 2 * full.half_u == pytest.approx(cfg.active_u)
    assert 2 * full.half_v == pytest.approx(cfg.active_v)


def test_material_budget(full):
    np.testing.assert_allclose(full.layer_x0, [0.0035] * 3 + [0.01] * 4)


def test_minimum_radii_and_stave_lengths(full):
    normal_dist = np.einsum("ni,ni->n", full.trans, full.rot[:, :, 2])  # T . e_w
    for li in range(7):
        on = full.layer == li
        assert normal_dist[on].min() == pytest.approx(R_MIN_MM[li], abs=1e-9)
        # every chip plane is at r_min (even staves) or beyond it
        assert np.all(normal_dist[on] >= R_MIN_MM[li] - 1e-9)
        z = full.trans[on, 2]
        length = z.max() - z.min() + full.config.chip_pitch_v
        assert length == pytest.approx(STAVE_LENGTH_MM[li], rel=0.005)
        assert z.mean() == pytest.approx(0.0, abs=1e-9)  # centred on the nominal IP


def test_rotations_orthonormal_right_handed(full):
    r = full.rot
    eye = np.broadcast_to(np.eye(3), r.shape)
    np.testing.assert_allclose(np.einsum("nki,nkj->nij", r, r), eye, atol=1e-13)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-13)


def test_local_frame_conventions(full):
    e_u, e_v, e_w = full.rot[:, :, 0], full.rot[:, :, 1], full.rot[:, :, 2]
    # v along the beam, w horizontal and pointing outwards, u = v x w along increasing phi
    np.testing.assert_allclose(e_v, np.broadcast_to([0.0, 0.0, 1.0], e_v.shape), atol=1e-15)
    assert np.all(np.abs(e_w[:, 2]) < 1e-15)
    assert np.all(np.einsum("ni,ni->n", e_w, full.trans) > 0)
    np.testing.assert_allclose(np.cross(e_v, e_w), e_u, atol=1e-15)
    phi = np.arctan2(full.trans[:, 1], full.trans[:, 0])
    tangent = np.stack([-np.sin(phi), np.cos(phi), np.zeros_like(phi)], axis=1)
    # e_u has a positive component along d/dphi at the chip centre
    assert np.all(np.einsum("ni,ni->n", e_u, tangent) > 0.5)


def test_stave_azimuths_and_chip_pitch(full):
    for li, lay in enumerate(full.config.layers):
        k = np.arange(lay.n_staves)
        np.testing.assert_allclose(full.stave_phi[li], 2 * np.pi * k / lay.n_staves)
        on = np.nonzero(full.layer == li)[0]
        st0 = on[full.stave[on] == 0]
        # chips of stave 0 tile the stave on a 15 x 30 mm grid centred on the stave centre
        u = np.einsum("ni,ni->n", full.trans[st0], full.rot[st0, :, 0])
        v = full.trans[st0, 2]
        assert np.unique(np.round(u, 9)).size == lay.chips_u
        assert np.unique(np.round(v, 9)).size == lay.chips_v
        if lay.chips_u > 1:
            np.testing.assert_allclose(np.diff(np.unique(np.round(u, 9))), 15.0, atol=1e-9)
        np.testing.assert_allclose(np.diff(np.unique(np.round(v, 9))), 30.0, atol=1e-9)


def test_sensor_id_matches_dense_numbering(full):
    sid = full.sensor_id(full.layer, full.stave, full.chip_u, full.chip_v)
    np.testing.assert_array_equal(sid, np.arange(full.n_sensors))


def test_local_global_round_trip(full):
    rng = np.random.default_rng(1)
    sid = rng.integers(0, full.n_sensors, 5000)
    loc = rng.uniform(-1, 1, (5000, 3)) * [full.half_u, full.half_v, 0.05]
    glob = full.to_global(sid, loc)
    np.testing.assert_allclose(full.to_local(sid, glob), loc, atol=1e-11)
    # chip centre maps to T_GEOM; distances are preserved (a rigid map)
    np.testing.assert_allclose(full.to_global(sid, np.zeros((5000, 3))), full.trans[sid], atol=1e-12)
    d_loc = np.linalg.norm(loc[1:] - loc[:-1], axis=1)
    same = sid[1:] == sid[:-1]
    np.testing.assert_allclose(np.linalg.norm(glob[1:] - glob[:-1], axis=1)[same], d_loc[same])
    # the active-area corner of a chip lies on its plane at distance sqrt(hu^2 + hv^2) from the centre
    corner = full.to_global(np.array([0]), np.array([[full.half_u, full.half_v, 0.0]]))[0]
    assert np.linalg.norm(corner - full.trans[0]) == pytest.approx(math.hypot(full.half_u, full.half_v))
    assert np.dot(corner - full.trans[0], full.rot[0, :, 2]) == pytest.approx(0.0, abs=1e-12)


def _segments_intersect(a0, a1, b0, b1) -> bool:
    def orient(p, q, r):
        return (q[0] - p[0]) * (r[1] - p[1]) - (q[1] - p[1]) * (r[0] - p[0])

    return (orient(a0, a1, b0) * orient(a0, a1, b1) < 0) and (orient(b0, b1, a0) * orient(b0, b1, a1) < 0)


def test_neighbouring_staves_do_not_intersect_but_overlap_in_phi(full):
    cfg = full.config
    for li, lay in enumerate(cfg.layers):
        h = cfg.stave_half_width(li)
        phi, rad = full.stave_phi[li], full.stave_radius[li]
        ends = []
        for k in range(lay.n_staves):
            n = np.array([math.cos(phi[k]), math.sin(phi[k])])
            t = np.array([-n[1], n[0]])
            ends.append((rad[k] * n - h * t, rad[k] * n + h * t))
        for k in range(lay.n_staves):
            a, b = ends[k], ends[(k + 1) % lay.n_staves]
            assert not _segments_intersect(a[0], a[1], b[0], b[1]), (li, k)
            # azimuthal coverage of neighbours overlaps (no phi crack at the stave level)
            hi_k = math.atan2(a[1][1], a[1][0])
            lo_next = math.atan2(b[0][1], b[0][0])
            assert (hi_k - lo_next + math.pi) % (2 * math.pi) - math.pi > 0, (li, k)


def test_inner_barrel_active_area_is_hermetic_in_phi(full):
    """A straight ray from the IP at eta = 0 hits the active matrix of some chip of every IB layer
    (staves overlap by more than the inactive chip edge)."""
    phis = np.linspace(-np.pi, np.pi, 20001)
    dirs = np.stack([np.cos(phis), np.sin(phis), np.zeros_like(phis)], axis=1)
    for li in range(3):
        on = np.nonzero(full.layer == li)[0]
        covered = np.zeros(phis.size, dtype=bool)
        for s in on[full.chip_v[on] == 4]:  # the chips at z = 0
            n, c = full.rot[s, :, 2], full.trans[s]
            lam = np.dot(c, n) / (dirs @ n)
            ok = lam > 0
            p = lam[:, None] * dirs - c
            u, v = p @ full.rot[s, :, 0], p @ full.rot[s, :, 1]
            covered |= ok & (np.abs(u) <= full.half_u) & (np.abs(v) <= full.half_v)
        assert covered.all(), li


def test_small_geometry_counts():
    cfg = ITSGeometryConfig.small(n_layers=3, staves=(12, 16, 20), chips_v=(2, 3, 4), chips_u=(1, 1, 2))
    g = build_geometry(cfg)
    assert cfg.n_sensors == g.n_sensors == 12 * 2 + 16 * 3 + 20 * 8
    assert tuple(np.diff(g.layer_first)) == (24, 48, 160)
    assert [lay.r_min for lay in cfg.layers] == list(R_MIN_MM[:3])
    default_small = build_geometry(ITSGeometryConfig.small())
    assert default_small.n_layers == 4
    assert default_small.n_sensors == 12 * 3 + 16 * 3 + 20 * 3 + 24 * 16


def test_default_layers_are_its2():
    assert ITSGeometryConfig().layers == ITS2_LAYERS
    assert [lay.n_staves for lay in ITS2_LAYERS] == list(STAVES)
    assert [lay.chips_per_stave for lay in ITS2_LAYERS] == list(CHIPS_PER_STAVE)


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda: LayerSpec(11, 1, 9, 22.4, 0.0035), "n_staves"),
        (lambda: LayerSpec(12, 0, 9, 22.4, 0.0035), "chips_u"),
        (lambda: LayerSpec(12, 1, 0, 22.4, 0.0035), "chips_v"),
        (lambda: LayerSpec(12, 1, 9, -1.0, 0.0035), "r_min"),
        (lambda: LayerSpec(12, 1, 9, float("nan"), 0.0035), "r_min"),
        (lambda: LayerSpec(12, 1, 9, 22.4, 1.5), "x_x0"),
        (lambda: ITSGeometryConfig(layers=()), "layers"),
        (lambda: ITSGeometryConfig(layers=(ITS2_LAYERS[1], ITS2_LAYERS[0])), "r_min"),
        (lambda: ITSGeometryConfig(layers=(LayerSpec(12, 1, 9, 22.4, 0.0), LayerSpec(12, 1, 9, 23.0, 0.0))),
         "reach layer 1"),
        (lambda: ITSGeometryConfig(chip_pitch_u=0.0), "chip_pitch_u"),
        (lambda: ITSGeometryConfig(pixel_pitch_v=-1.0), "pixel_pitch_v"),
        (lambda: ITSGeometryConfig(n_pixels_u=0), "n_pixels_u"),
        (lambda: ITSGeometryConfig(chip_pitch_u=10.0), "active matrix"),
        (lambda: ITSGeometryConfig(stagger_margin=-1.0), "stagger_margin"),
        (lambda: ITSGeometryConfig.small(n_layers=8), "n_layers"),
        (lambda: ITSGeometryConfig.small(n_layers=3, staves=(12, 16)), "staves"),
    ],
)
def test_bad_config_names_the_argument(make, needle):
    with pytest.raises(ValueError, match=needle):
        make()


def test_bad_lookups_name_the_argument():
    g = build_geometry(ITSGeometryConfig.small(n_layers=2))
    with pytest.raises(ValueError, match="stave"):
        g.sensor_id(0, 12, 0, 0)
    with pytest.raises(ValueError, match="iv"):
        g.sensor_id(0, 0, 0, 3)
    with pytest.raises(ValueError, match="layer"):
        g.sensor_id(2, 0, 0, 0)
    with pytest.raises(ValueError, match="sensor ids"):
        g.to_global(np.array([g.n_sensors]), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="local"):
        g.to_global(np.array([0]), np.zeros((1, 2)))
    with pytest.raises(ValueError, match="glob"):
        g.to_local(np.array([0]), np.zeros((1, 2)))
    with pytest.raises(TypeError, match="config"):
        build_geometry({"layers": ()})  # type: ignore[arg-type]
