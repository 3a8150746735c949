"""Alignment parameters in ALICE's Euler convention and the injected misalignments, checked
against explicit formulas (AliAlignObj::AnglesToMatrix, the seed's eq. 2 and the weak-mode table)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from streamcal.detectors.its.geometry import ITSGeometryConfig, build_geometry
from streamcal.detectors.its.misalignment import (
    RIGID_MODES,
    WEAK_MODES,
    MisalignmentConfig,
    apply_alignment,
    compose,
    euler_to_matrix,
    global_to_local,
    local_to_global,
    matrix_to_euler,
    misalign,
    mode_vectors,
    random_misalignment,
    weak_mode,
)


@pytest.fixture(scope="module")
def geom():
    return build_geometry(ITSGeometryConfig.small(n_layers=5))


@pytest.fixture(scope="module")
def full():
    return build_geometry()


def alice_angles_to_matrix(psi: float, theta: float, phi: float) -> np.ndarray:
    """AliAlignObj::AnglesToMatrix / o2::detectors::AlignParam::anglesToMatrix, element by element
    (radians), rot[0..8] row-major."""
    sps, cps = math.sin(psi), math.cos(psi)
    sth, cth = math.sin(theta), math.cos(theta)
    sph, cph = math.sin(phi), math.cos(phi)
    rot = [
        cth * cph, -cth * sph, sth,
        sps * sth * cph + cps * sph, -sps * sth * sph + cps * cph, -cth * sps,
        -cps * sth * cph + sps * sph, cps * sth * sph + sps * cph, cth * cps,
    ]
    return np.array(rot).reshape(3, 3)


def rx(a: float) -> np.ndarray:
    return np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])


def ry(b: float) -> np.ndarray:
    return np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])


def rz(g: float) -> np.ndarray:
    return np.array([[math.cos(g), -math.sin(g), 0], [math.sin(g), math.cos(g), 0], [0, 0, 1]])


def cyl(p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.hypot(p[:, 0], p[:, 1]), np.arctan2(p[:, 1], p[:, 0]), p[:, 2]


def wrap(a: np.ndarray) -> np.ndarray:
    return (a + np.pi) % (2 * np.pi) - np.pi


# ------------------------------------------------------------------------------------------------
# Euler convention


def test_euler_matrix_matches_alice_formula_and_product():
    rng = np.random.default_rng(3)
    angles = rng.uniform(-1.2, 1.2, (200, 3))
    got = euler_to_matrix(angles)
    for (a, b, g), m in zip(angles, got):
        np.testing.assert_allclose(m, alice_angles_to_matrix(a, b, g), atol=1e-15)
        np.testing.assert_allclose(m, rx(a) @ ry(b) @ rz(g), atol=1e-15)
    eye = np.broadcast_to(np.eye(3), got.shape)
    np.testing.assert_allclose(np.einsum("nki,nkj->nij", got, got), eye, atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(got), 1.0, atol=1e-14)


def test_euler_small_angle_limit_and_axes():
    # alpha, beta, gamma are right-handed rotations about x, y, z
    a, b, g = 1e-6, -2e-6, 3e-6
    m = euler_to_matrix(np.array([a, b, g]))
    skew = np.array([[0, -g, b], [g, 0, -a], [-b, a, 0]])
    np.testing.assert_allclose(m, np.eye(3) + skew, atol=1e-11)
    np.testing.assert_allclose(euler_to_matrix(np.array([0.3, 0, 0])) @ [0, 1, 0], [0, math.cos(0.3), math.sin(0.3)])
    np.testing.assert_allclose(euler_to_matrix(np.array([0, 0.3, 0])) @ [0, 0, 1], [math.sin(0.3), 0, math.cos(0.3)])
    np.testing.assert_allclose(euler_to_matrix(np.array([0, 0, 0.3])) @ [1, 0, 0], [math.cos(0.3), math.sin(0.3), 0])


def test_matrix_to_euler_inverts_and_matches_alice_extraction():
    rng = np.random.default_rng(4)
    angles = np.stack(
        [rng.uniform(-3, 3, 500), rng.uniform(-1.5, 1.5, 500), rng.uniform(-3, 3, 500)], axis=1
    )
    m = euler_to_matrix(angles)
    np.testing.assert_allclose(matrix_to_euler(m), angles, atol=1e-10)
    # AlignParam::matrixToAngles: psi = atan2(-rot[5], rot[8]), theta = asin(rot[2]), phi = atan2(-rot[1], rot[0])
    flat = m.reshape(-1, 9)
    ref = np.stack(
        [np.arctan2(-flat[:, 5], flat[:, 8]), np.arcsin(flat[:, 2]), np.arctan2(-flat[:, 1], flat[:, 0])], axis=1
    )
    np.testing.assert_allclose(matrix_to_euler(m), ref, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Placement under Theta (seed eq. 2) and local deltas


def test_apply_alignment_is_seed_equation_2(geom):
    rng = np.random.default_rng(5)
    theta = np.concatenate([rng.normal(0, 1e-3, (geom.n_sensors, 3)), rng.normal(0, 0.1, (geom.n_sensors, 3))], 1)
    rot, trans = apply_alignment(geom, theta)
    loc = rng.uniform(-5, 5, (geom.n_sensors, 3))
    for s in rng.choice(geom.n_sensors, 50, replace=False):
        a_r = rx(theta[s, 0]) @ ry(theta[s, 1]) @ rz(theta[s, 2])
        expect = a_r @ (geom.rot[s] @ loc[s] + geom.trans[s]) + theta[s, 3:]
        np.testing.assert_allclose(rot[s] @ loc[s] + trans[s], expect, atol=1e-12)
    eye = np.broadcast_to(np.eye(3), rot.shape)
    np.testing.assert_allclose(np.einsum("nki,nkj->nij", rot, rot), eye, atol=1e-13)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=1e-13)
    # and the ideal geometry for Theta = 0
    r0, t0 = apply_alignment(geom, np.zeros((geom.n_sensors, 6)))
    np.testing.assert_array_equal(r0, geom.rot)
    np.testing.assert_array_equal(t0, geom.trans)


def test_local_deltas(geom):
    n = geom.n_sensors
    rng = np.random.default_rng(6)
    local = np.concatenate([rng.normal(0, 2e-3, (n, 3)), rng.normal(0, 0.05, (n, 3))], 1)
    np.testing.assert_allclose(global_to_local(geom, local_to_global(geom, local)), local, atol=1e-13)
    # a local shift (du, dv, dw) moves the chip centre by du e_u + dv e_v + dw e_w, no rotation
    shift = np.zeros((n, 6))
    shift[:, 3:] = [0.01, -0.02, 0.03]
    rot, trans = apply_alignment(geom, local_to_global(geom, shift))
    expect = geom.trans + geom.rot @ np.array([0.01, -0.02, 0.03])
    np.testing.assert_allclose(trans, expect, atol=1e-13)
    np.testing.assert_allclose(rot, geom.rot, atol=1e-13)
    # a local rotation about w keeps the centre and turns e_u about e_w by that angle
    turn = np.zeros((n, 6))
    turn[:, 2] = 1e-3
    rot, trans = apply_alignment(geom, local_to_global(geom, turn))
    np.testing.assert_allclose(trans, geom.trans, atol=1e-12)
    e_u, e_v = geom.rot[:, :, 0], geom.rot[:, :, 1]
    np.testing.assert_allclose(rot[:, :, 0], math.cos(1e-3) * e_u + math.sin(1e-3) * e_v, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# Global systematic modes: each displacement field against its defining formula

FIELDS = {
    # mode: (dR, dphi, dz) as functions of the ideal (R, phi, z) and amplitude c
    "radial": lambda r, p, z, c: (c * r, 0 * r, 0 * r),
    "curl": lambda r, p, z, c: (0 * r, c * r, 0 * r),
    "telescope": lambda r, p, z, c: (0 * r, 0 * r, c * r),
    "elliptical": lambda r, p, z, c: (c * r * np.cos(2 * p), 0 * r, 0 * r),
    "clamshell": lambda r, p, z, c: (0 * r, c * np.cos(p), 0 * r),
    "skew": lambda r, p, z, c: (0 * r, 0 * r, c * np.cos(p)),
    "conical": lambda r, p, z, c: (c * z, 0 * r, 0 * r),
    "twist": lambda r, p, z, c: (0 * r, c * z, 0 * r),
    "zexpansion": lambda r, p, z, c: (0 * r, 0 * r, c * z),
}
AMPLITUDE = {
    "radial": 2e-4, "curl": 1e-6, "telescope": 3e-4, "elliptical": 2e-4, "clamshell": 1e-4,
    "skew": 0.05, "conical": 1e-4, "twist": 2e-7, "zexpansion": 3e-4,
}


def test_table_covers_the_seed_modes():
    assert set(FIELDS) == set(WEAK_MODES)
    assert len(WEAK_MODES) == 9


@pytest.mark.parametrize("mode", sorted(FIELDS))
def test_weak_mode_field(full, mode):
    c = AMPLITUDE[mode]
    theta = misalign(full, MisalignmentConfig(sigma_rot=(0, 0, 0), sigma_trans=(0, 0, 0), modes=((mode, c),)))
    np.testing.assert_allclose(theta, weak_mode(full, mode, c), rtol=1e-12, atol=1e-13)
    rot, trans = apply_alignment(full, theta)
    r0, p0, z0 = cyl(full.trans)
    r1, p1, z1 = cyl(trans)
    d_r, d_p, d_z = FIELDS[mode](r0, p0, z0, c)
    np.testing.assert_allclose(r1 - r0, d_r, atol=1e-10)
    np.testing.assert_allclose(wrap(p1 - p0), d_p, atol=1e-13)
    np.testing.assert_allclose(z1 - z0, d_z, atol=1e-10)
    # the field is not trivially zero on this geometry
    assert max(np.abs(d_r).max(), (r0 * np.abs(d_p)).max(), np.abs(d_z).max()) > 1e-3
    if mode in ("curl", "clamshell", "twist"):
        # rotational modes turn every point of the chip about the beam axis by dphi(centre)
        loc = np.array([full.half_u, -full.half_v, 0.0])
        g0 = full.rot @ loc + full.trans
        g1 = rot @ loc + trans
        ra, pa_, za = cyl(g0)
        rb, pb, zb = cyl(g1)
        np.testing.assert_allclose(rb, ra, atol=1e-10)
        np.testing.assert_allclose(zb, za, atol=1e-10)
        np.testing.assert_allclose(wrap(pb - pa_), d_p, atol=1e-13)
    else:
        # translational modes move the chip rigidly without turning it
        np.testing.assert_allclose(rot, full.rot, atol=1e-15)


@pytest.mark.parametrize("mode", RIGID_MODES)
def test_rigid_modes(geom, mode):
    theta = weak_mode(geom, mode, 0.01)
    rot, trans = apply_alignment(geom, theta)
    axis = RIGID_MODES.index(mode) % 3
    if mode.startswith("t"):
        expect = geom.trans.copy()
        expect[:, axis] += 0.01
    else:
        r = [rx, ry, rz][axis](0.01)
        expect = geom.trans @ r.T
    np.testing.assert_allclose(trans, expect, atol=1e-12)


def test_modes_compose_exactly_over_random_part(geom):
    cfg = MisalignmentConfig(sigma_rot=(1e-3, 2e-3, 3e-3), sigma_trans=(0.05, 0.05, 0.1),
                             modes=(("curl", 1e-5), ("radial", 1e-3)), seed=11)
    theta = misalign(geom, cfg)
    rand = random_misalignment(geom, cfg)
    rot_r, trans_r = apply_alignment(geom, rand)
    # placement after the modes = curl(radial applied after random) evaluated on the ideal centres
    m_curl, m_rad = weak_mode(geom, "curl", 1e-5), weak_mode(geom, "radial", 1e-3)
    exp_rot, exp_trans = rot_r, trans_r
    for m in (m_curl, m_rad):
        a_r = euler_to_matrix(m[:, :3])
        exp_rot = a_r @ exp_rot
        exp_trans = np.einsum("nij,nj->ni", a_r, exp_trans) + m[:, 3:]
    rot, trans = apply_alignment(geom, theta)
    np.testing.assert_allclose(rot, exp_rot, atol=1e-14)
    np.testing.assert_allclose(trans, exp_trans, atol=1e-11)
    np.testing.assert_allclose(compose(np.zeros_like(rand), rand), rand, atol=1e-15)


def test_random_misalignment_statistics_and_seed(full):
    sig_r, sig_t = (1e-4, 2e-4, 3e-4), (0.005, 0.010, 0.020)
    cfg = MisalignmentConfig(sigma_rot=sig_r, sigma_trans=sig_t, frame="local", seed=7)
    theta = random_misalignment(full, cfg)
    loc = global_to_local(full, theta)
    n = full.n_sensors
    tol = 4.0 / math.sqrt(2 * n)  # 4 sigma on a standard deviation from n draws
    np.testing.assert_allclose(loc.std(axis=0) / np.asarray(sig_r + sig_t), 1.0, atol=tol)
    np.testing.assert_allclose(loc.mean(axis=0) / np.asarray(sig_r + sig_t), 0.0, atol=4.0 / math.sqrt(n))
    np.testing.assert_array_equal(theta, random_misalignment(full, cfg))
    other = random_misalignment(full, MisalignmentConfig(sigma_rot=sig_r, sigma_trans=sig_t, seed=8))
    assert not np.allclose(theta, other)
    glob = random_misalignment(full, MisalignmentConfig(sigma_rot=sig_r, sigma_trans=sig_t, frame="global", seed=7))
    np.testing.assert_allclose(glob.std(axis=0) / np.asarray(sig_r + sig_t), 1.0, atol=tol)


def test_mode_vectors_orthonormal_and_drop_dependent(geom):
    q = mode_vectors(geom, WEAK_MODES + RIGID_MODES)
    np.testing.assert_allclose(q.T @ q, np.eye(q.shape[1]), atol=1e-10)
    # the 9 systematic and 6 rigid-body modes are independent in Theta space
    assert q.shape[1] == len(WEAK_MODES) + len(RIGID_MODES) == 15
    # each column lies in the span of the mode vectors it was built from
    raw = np.stack([weak_mode(geom, m, 1.0).reshape(-1) for m in WEAK_MODES + RIGID_MODES], axis=1)
    np.testing.assert_allclose(q @ (q.T @ raw), raw, atol=1e-9 * np.abs(raw).max())
    dup = mode_vectors(geom, ("radial", "radial"))
    assert dup.shape[1] == 1
    # a dependent mode before an independent one: the basis is still the span of the two, nothing
    # else (a QR that drops the dependent column keeps an arbitrary direction in its place)
    two = mode_vectors(geom, ("radial", "radial", "elliptical"))
    assert two.shape[1] == 2
    raw = np.stack([weak_mode(geom, m, 1.0).reshape(-1) for m in ("radial", "elliptical")], axis=1)
    span = np.linalg.qr(raw)[0]
    np.testing.assert_allclose(span @ (span.T @ two), two, atol=1e-10)
    np.testing.assert_allclose(two @ (two.T @ raw), raw, atol=1e-9 * np.abs(raw).max())
    assert mode_vectors(geom, ()).shape == (6 * geom.n_sensors, 0)


# ------------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"sigma_rot": (1e-4, 1e-4)}, "sigma_rot"),
        ({"sigma_trans": (0.01, -0.01, 0.01)}, "sigma_trans"),
        ({"sigma_trans": (0.01, float("nan"), 0.01)}, "sigma_trans"),
        ({"frame": "sensor"}, "frame"),
        ({"modes": (("bowing", 1e-4),)}, "modes"),
        ({"modes": (("radial", float("inf")),)}, "amplitude"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_misalignment_config(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        MisalignmentConfig(**kwargs)


def test_bad_theta_names_the_argument(geom):
    with pytest.raises(ValueError, match="theta must have shape"):
        apply_alignment(geom, np.zeros((geom.n_sensors, 5)))
    bad = np.zeros((geom.n_sensors, 6))
    bad[3, 4] = np.nan
    with pytest.raises(ValueError, match="apply_alignment: theta must be finite"):
        apply_alignment(geom, bad)
    with pytest.raises(ValueError, match="local must have shape"):
        local_to_global(geom, np.zeros((2, 6)))
    with pytest.raises(ValueError, match="unknown mode"):
        weak_mode(geom, "sagitta", 1.0)
    with pytest.raises(ValueError, match="amplitude"):
        weak_mode(geom, "radial", float("nan"))
    with pytest.raises(ValueError, match="angles"):
        euler_to_matrix(np.zeros(2))
