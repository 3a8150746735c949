"""Alignment parameters Theta in ALICE's convention, random misalignment and global weak modes.

Alignment parameters (the seed's "Alignment Parameters (ALICE)")
----------------------------------------------------------------
Per sensor ``Theta = (alpha, beta, gamma, tau1, tau2, tau3)``: three Euler angles (rad) and a
translation (mm). As in ALICE's ``AliAlignObj`` / O2's ``detectors::AlignParam`` (angles psi,
theta, phi = alpha, beta, gamma), the rotation is

    a_R = R_x(alpha) @ R_y(beta) @ R_z(gamma)

    = [[ cb cg,              -cb sg,              sb    ],
       [ sa sb cg + ca sg,   -sa sb sg + ca cg,   -cb sa],
       [-ca sb cg + sa sg,    ca sb sg + sa cg,    cb ca]]

and the delta is *global*: it acts on the ideally placed sensor in the global frame (seed, eq. 2),

    g = a_R (R_GEOM l + T_GEOM) + a_T,   a_T = (tau1, tau2, tau3).

So rotations are about the global origin, not about the sensor centre. :func:`local_to_global`
and :func:`global_to_local` convert from and to "local" deltas (a rotation about the sensor
centre in the sensor frame and a shift along (u, v, w)), which is how per-sensor tolerances are
usually quoted and how the measurement-direction residuals are evaluated.

Global systematic modes (the seed's 3 x 3 table; Brown et al., CMS weak modes)
-------------------------------------------------------------------------------
Each mode moves every sensor rigidly according to a displacement field evaluated at the sensor
centre ``(R, phi, z)`` (cylindrical, mm); ``c`` is the mode amplitude:

============  =====================  ==========================================================
mode          field                  realisation in Theta
============  =====================  ==========================================================
radial        dR = c R               tau = c (x, y, 0)                          (c: 1)
curl          dphi = c R             gamma = c R (rotation about z)             (c: rad/mm)
telescope     dz = c R               tau3 = c R                                 (c: 1)
elliptical    dR = c R cos(2 phi)    tau = c R cos(2 phi) (cos phi, sin phi, 0) (c: 1)
clamshell     dphi = c cos(phi)      gamma = c cos(phi)                         (c: rad)
skew          dz = c cos(phi)        tau3 = c cos(phi)                          (c: mm)
conical       dR = c z               tau = c z (cos phi, sin phi, 0)            (c: 1)
twist         dphi = c z             gamma = c z                                (c: rad/mm)
zexpansion    dz = c z               tau3 = c z                                 (c: 1)
============  =====================  ==========================================================

The rotational modes use gamma (a rotation about the global z axis through the origin), which
moves the centre by ``R dphi`` in r-phi and turns the chip with it.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
from scipy.linalg import orth

from streamcal.detectors.its.geometry import ITSGeometry

__all__ = [
    "WeakMode",
    "WEAK_MODES",
    "RIGID_MODES",
    "euler_to_matrix",
    "matrix_to_euler",
    "local_to_global",
    "global_to_local",
    "weak_mode",
    "mode_vectors",
    "MisalignmentConfig",
    "random_misalignment",
    "compose",
    "misalign",
    "apply_alignment",
    "check_theta",
]

WeakMode = Literal[
    "radial", "curl", "telescope", "elliptical", "clamshell", "skew", "conical", "twist", "zexpansion"
]
WEAK_MODES: tuple[str, ...] = get_args(WeakMode)
RIGID_MODES: tuple[str, ...] = ("tx", "ty", "tz", "rx", "ry", "rz")


def check_theta(geom: ITSGeometry, theta: np.ndarray, where: str, name: str = "theta") -> np.ndarray:
    """``theta`` as a float64 (N, 6) array for ``geom``, or a ValueError naming ``where`` and ``name``."""
    arr = np.asarray(theta, dtype=np.float64)
    if arr.shape != (geom.n_sensors, 6):
        raise ValueError(f"{where}: {name} must have shape ({geom.n_sensors}, 6), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{where}: {name} must be finite (found NaN or inf)")
    return arr


def euler_to_matrix(angles: np.ndarray) -> np.ndarray:
    """ALICE rotation ``R_x(alpha) R_y(beta) R_z(gamma)`` for angles ``(..., 3)``; returns (..., 3, 3)."""
    angles = np.asarray(angles, dtype=np.float64)
    if angles.shape[-1:] != (3,):
        raise ValueError(f"euler_to_matrix: angles must have shape (..., 3), got {angles.shape}")
    a, b, g = angles[..., 0], angles[..., 1], angles[..., 2]
    sa, ca, sb, cb, sg, cg = np.sin(a), np.cos(a), np.sin(b), np.cos(b), np.sin(g), np.cos(g)
    rows = [
        [cb * cg, -cb * sg, sb],
        [sa * sb * cg + ca * sg, -sa * sb * sg + ca * cg, -cb * sa],
        [-ca * sb * cg + sa * sg, ca * sb * sg + sa * cg, cb * ca],
    ]
    return np.stack([np.stack(r, axis=-1) for r in rows], axis=-2)


def matrix_to_euler(rot: np.ndarray) -> np.ndarray:
    """Inverse of :func:`euler_to_matrix` (|beta| < pi/2): (..., 3, 3) -> (..., 3)."""
    rot = np.asarray(rot, dtype=np.float64)
    if rot.shape[-2:] != (3, 3):
        raise ValueError(f"matrix_to_euler: rot must have shape (..., 3, 3), got {rot.shape}")
    beta = np.arcsin(np.clip(rot[..., 0, 2], -1.0, 1.0))
    gamma = np.arctan2(-rot[..., 0, 1], rot[..., 0, 0])
    alpha = np.arctan2(-rot[..., 1, 2], rot[..., 2, 2])
    return np.stack([alpha, beta, gamma], axis=-1)


def local_to_global(geom: ITSGeometry, local: np.ndarray) -> np.ndarray:
    """Local deltas ``(rot_u, rot_v, rot_w, du, dv, dw)`` (rotation about the chip centre in its
    frame, shift along u, v, w) -> global Theta. ``a_R = R_G r R_G^T``,
    ``a_T = R_G t + T_G - a_R T_G`` so that ``a_R (R_G l + T_G) + a_T = R_G (r l + t) + T_G``."""
    local = check_theta(geom, local, "local_to_global", "local")
    r_loc = euler_to_matrix(local[:, :3])
    a_r = np.einsum("nij,njk,nlk->nil", geom.rot, r_loc, geom.rot)
    a_t = (np.einsum("nij,nj->ni", geom.rot, local[:, 3:]) + geom.trans
           - np.einsum("nij,nj->ni", a_r, geom.trans))
    return np.concatenate([matrix_to_euler(a_r), a_t], axis=1)


def global_to_local(geom: ITSGeometry, theta: np.ndarray) -> np.ndarray:
    """Inverse of :func:`local_to_global`: global Theta (N, 6) -> local deltas (N, 6)."""
    theta = check_theta(geom, theta, "global_to_local")
    a_r = euler_to_matrix(theta[:, :3])
    r_loc = np.einsum("nji,njk,nkl->nil", geom.rot, a_r, geom.rot)
    t = np.einsum("nji,nj->ni", geom.rot, np.einsum("nij,nj->ni", a_r, geom.trans) + theta[:, 3:] - geom.trans)
    return np.concatenate([matrix_to_euler(r_loc), t], axis=1)


def weak_mode(geom: ITSGeometry, mode: str, amplitude: float) -> np.ndarray:
    """Theta (N, 6) of one global systematic mode (see the module table) or rigid-body mode
    (``tx, ty, tz``: translation in mm; ``rx, ry, rz``: rotation in rad about the global axes)."""
    x, y, z = geom.trans[:, 0], geom.trans[:, 1], geom.trans[:, 2]
    r = np.hypot(x, y)
    phi = np.arctan2(y, x)
    theta = np.zeros((geom.n_sensors, 6))
    c = float(amplitude)
    if not math.isfinite(c):
        raise ValueError(f"weak_mode: amplitude must be finite, got {amplitude}")
    if mode == "radial":
        theta[:, 3], theta[:, 4] = c * x, c * y
    elif mode == "curl":
        theta[:, 2] = c * r
    elif mode == "telescope":
        theta[:, 5] = c * r
    elif mode == "elliptical":
        d = c * r * np.cos(2 * phi)
        theta[:, 3], theta[:, 4] = d * np.cos(phi), d * np.sin(phi)
    elif mode == "clamshell":
        theta[:, 2] = c * np.cos(phi)
    elif mode == "skew":
        theta[:, 5] = c * np.cos(phi)
    elif mode == "conical":
        theta[:, 3], theta[:, 4] = c * z * np.cos(phi), c * z * np.sin(phi)
    elif mode == "twist":
        theta[:, 2] = c * z
    elif mode == "zexpansion":
        theta[:, 5] = c * z
    elif mode in RIGID_MODES:
        theta[:, RIGID_MODES.index(mode) % 3 + (3 if mode[0] == "t" else 0)] = c
    else:
        raise ValueError(f"weak_mode: unknown mode {mode!r}; allowed: {WEAK_MODES + RIGID_MODES}")
    return theta


def mode_vectors(geom: ITSGeometry, modes: tuple[str, ...]) -> np.ndarray:
    """Orthonormal basis (6N, m) of the span of the linearised ``modes`` in Theta space
    (rows ordered sensor-major: ``Theta.reshape(-1)``). Linearly dependent modes are dropped."""
    if not modes:
        return np.zeros((6 * geom.n_sensors, 0))
    mat = np.stack([weak_mode(geom, m, 1.0).reshape(-1) for m in modes], axis=1)  # (6N, m)
    norm = np.linalg.norm(mat, axis=0, keepdims=True)
    mat = mat[:, norm[0] > 0] / norm[:, norm[0] > 0]  # a mode that moves nothing (e.g. twist at z=0)
    if mat.shape[1] == 0:
        return np.zeros((6 * geom.n_sensors, 0))
    return orth(mat, rcond=1e-9)  # SVD: a dependent mode before an independent one is dropped cleanly


@dataclass(frozen=True)
class MisalignmentConfig:
    """Random per-sensor misalignment plus global systematic modes.

    Args:
        sigma_rot: (rot_u, rot_v, rot_w) Gaussian sigma (rad) of the local rotation about the chip
            centre (``frame="local"``) or of (alpha, beta, gamma) (``frame="global"``).
        sigma_trans: (du, dv, dw) sigma (mm) of the local shift, or of (tau1, tau2, tau3).
        frame: ``"local"`` (about the chip centre, converted to ALICE's global delta) or
            ``"global"`` (Theta drawn directly).
        modes: ``(mode, amplitude)`` pairs added on top, see the module table.
        seed: random seed.
    """

    sigma_rot: tuple[float, float, float] = (1e-4, 1e-4, 1e-4)
    sigma_trans: tuple[float, float, float] = (0.01, 0.01, 0.01)
    frame: Literal["local", "global"] = "local"
    modes: tuple[tuple[str, float], ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("sigma_rot", "sigma_trans"):
            val = getattr(self, name)
            if len(val) != 3 or any(not (s >= 0 and math.isfinite(s)) for s in val):
                raise ValueError(f"MisalignmentConfig.{name} must be 3 non-negative finite floats, got {val}")
        if self.frame not in ("local", "global"):
            raise ValueError(f"MisalignmentConfig.frame must be 'local' or 'global', got {self.frame!r}")
        for m in self.modes:
            if len(m) != 2 or m[0] not in WEAK_MODES + RIGID_MODES:
                raise ValueError(
                    f"MisalignmentConfig.modes entries must be (mode, amplitude) with mode in "
                    f"{WEAK_MODES + RIGID_MODES}, got {m!r}"
                )
            if not (isinstance(m[1], numbers.Real) and math.isfinite(m[1])):
                raise ValueError(
                    f"MisalignmentConfig.modes: amplitude of {m[0]!r} must be a finite number, got {m[1]!r}"
                )
        if not (isinstance(self.seed, (int, np.integer)) and self.seed >= 0):
            raise ValueError(f"MisalignmentConfig.seed must be a non-negative integer, got {self.seed!r}")


def random_misalignment(geom: ITSGeometry, config: MisalignmentConfig) -> np.ndarray:
    """Random per-sensor Theta (N, 6) (no global modes)."""
    rng = np.random.default_rng(config.seed)
    sig = np.asarray(config.sigma_rot + config.sigma_trans)
    draw = rng.standard_normal((geom.n_sensors, 6)) * sig
    if config.frame == "local":
        return local_to_global(geom, draw)
    return draw


def compose(outer: np.ndarray, inner: np.ndarray) -> np.ndarray:
    """Theta of the global delta ``outer`` applied after ``inner`` (both (N, 6)):
    ``a_R = a_R^o a_R^i``, ``a_T = a_R^o a_T^i + a_T^o``. Exact, not linearised."""
    r_o, r_i = euler_to_matrix(outer[:, :3]), euler_to_matrix(inner[:, :3])
    a_r = np.einsum("nij,njk->nik", r_o, r_i)
    a_t = np.einsum("nij,nj->ni", r_o, inner[:, 3:]) + outer[:, 3:]
    return np.concatenate([matrix_to_euler(a_r), a_t], axis=1)


def misalign(geom: ITSGeometry, config: MisalignmentConfig) -> np.ndarray:
    """True Theta (N, 6): the random per-sensor part, then each configured global mode composed
    on top in order (:func:`compose`; each mode's field is evaluated at the *ideal* chip centre)."""
    theta = random_misalignment(geom, config)
    for name, amp in config.modes:
        theta = compose(weak_mode(geom, name, amp), theta)
    return theta


def apply_alignment(geom: ITSGeometry, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Actual placement ``(rot, trans)`` of every sensor under Theta: ``R = a_R R_GEOM``,
    ``T = a_R T_GEOM + a_T`` (seed, eq. 2)."""
    theta = check_theta(geom, theta, "apply_alignment")
    a_r = euler_to_matrix(theta[:, :3])
    rot = np.einsum("nij,njk->nik", a_r, geom.rot)
    trans = np.einsum("nij,nj->ni", a_r, geom.trans) + theta[:, 3:]
    return rot, trans
