"""ITS2 track-based alignment model: per-sensor linear layer Phi and the chi^2 cost C(Theta).

Implements the seed's formalism ("Formalism: Network Parameters to Alignment Parameters" and
"Teaching the AI What 'Better Alignment' Means"):

* Per sensor a single-layer perceptron (input 2, output 3, linear) with parameters
  ``Phi = (w11, w21, w12, w22, w13, w23, b1, b2, b3)`` mapping the normalised local position
  ``s~ = D l`` (``D = diag(1/h_u, 1/h_v)``, ``Delta = 0`` because the local origin is the chip
  centre, ``PO = 1``: s~1 along u, s~2 along v) to global (seed, eq. 1)::

      g = R_GEOM [(W0 + W) s~ + b] + T_GEOM,   W0 = diag(h_u, h_v) (the seed's d1, d2),
      W = [[w11, w21], [w12, w22], [w13, w23]]   (row = output, column = input),

  so ``Phi = 0`` is the ideal geometry. ``Phi.reshape(N, 9)[:, :6]`` is ``W`` row-major.
* Theta = (alpha, beta, gamma, tau1, tau2, tau3) in ALICE's convention (see
  ``streamcal.detectors.its.misalignment``): ``g = a_R (R_GEOM l + T_GEOM) + a_T`` (seed, eq. 2).
  Equating both forms gives ``W = (R_GEOM^T a_R R_GEOM - 1)[:, :2] W0`` and
  ``b = R_GEOM^T (a_T + (a_R - 1) T_GEOM)`` (:func:`theta_to_phi`), its inverse
  (:func:`phi_to_theta`, Gram-Schmidt on the two columns, third column their cross product) and
  the analytic Jacobian ``dPhi/dTheta`` (:func:`phi_theta_jacobian`).
* The cost (seed, "C(Theta)")::

      C = 1/N_event sum_i chi2_i / nu_i,   chi2_i = sum_tracks (chi2_track + chi2_vertex),

  with, per track, a circle in the bending plane and a straight line ``z = z0 + tan(lambda) s``
  in (arc length, z). The circle fit is Karimaki's (NIM A 305 (1991) 187) closed-form weighted
  fit relative to the event vertex ``O``: residual ``e = kappa r^2 - (y cos phi - x sin phi) +
  delta``, which equals the signed distance to the circle divided by ``(1 + rho d)`` (a relative
  1e-4 effect for ITS tracks), minimised exactly (2 x 2 eigenproblem, no iteration). The vertex
  term (seed, chi2_vertex) is the vertex itself entered as a measured point at ``O`` with
  ``sigma_vertex``: its residual is the distance of the fitted trajectory's closest point to the
  vertex (xy: ``delta``; z: ``z0``, whose variance also takes the xy vertex error along the
  track, ``sigma_vertex_z^2 + tan^2(lambda) sigma_vertex_xy^2``). Per hit ``sigma^2 =
  sigma_intrinsic^2 + sigma_MS^2`` (seed: ``sigma^2 = sigma_IPR^2 + sum_q sigma_SPP,q^2``): the
  intrinsic part is ``sigma_u`` projected on the circle normal (xy) and ``sigma_v`` plus the u
  error's shift of the arc length (z), the multiple-scattering part the Highland variance of the
  inner layers, ``sum_l theta0_l^2 (r - r_l)^2`` (times ``1/cos^2 lambda`` in xy,
  ``1/cos^4 lambda`` in z). The weights are computed once per track from its hits on the ideal
  geometry, so they do not depend on Theta, with the momentum and dip of a fit with the full
  scattering covariance (:meth:`ITSAlignmentModel._weight_fit`): those of a plain fit follow
  the track's own kicks, and weights correlated with the residuals bias the minimum (several
  micrometres in the outer layers). The degrees of freedom per event are ``nu = sum_tracks
  (n_xy + n_z - 5)``.
* Expected value of chi2/nu at the true geometry. For a linear least-squares fit with diagonal
  weights ``W`` and true measurement covariance ``C``, ``E[chi2] = tr(P C)`` with
  ``P = W - W J (J^T W J)^-1 J^T W`` (J: residual derivatives by the 5 track parameters).

  - Without multiple scattering and with a vertex measured with the configured
    ``sigma_vertex`` (``vertex="given"``) or no vertex term, ``C = W^-1`` and E[chi2/nu] = 1;
    measured 1.002 +- 0.002 on simulated ITS-like samples (0.998 +- 0.004 on the full ITS2 with
    |eta| < 1).
  - A vertex without error (simulation truth) weighted with ``sigma_vertex`` contributes less
    than its two degrees of freedom: about 0.78 for the default resolutions and 5-layer tracks
    (0.84 on the full ITS2). A vertex fitted from the same tracks (``vertex="fit"``) likewise
    gives about 0.77 (its three coordinates are not subtracted from nu).
  - With multiple scattering the weights use the *diagonal* of the scattering covariance (the
    seed's independent per-hit sigma_SPP): each hit's variance is right, but one kick moves
    every later hit coherently and the 5 fitted track parameters absorb most of that
    correlated part, so ``tr(P C) < nu``: about 0.65 (vertex with its resolution) and 0.57-0.59
    (exact vertex) for a pT spectrum from 0.3 GeV/c, 0.64 / 0.59 for the default simulation on
    the full ITS2. The measured chi2/nu equals tr(P C)/nu with the full Highland covariance
    within its statistical error where every scatterer is a hit; on the real layout the dead
    chip edges scatter without a hit and the measured value is ~5 % above that hits-only
    estimate. This is the expected value of this cost, not a bias of the alignment: the
    residuals stay zero-mean at the true geometry (any positive weights give an unbiased fit),
    only the weighting is not the optimal one (a fit with the full covariance, e.g. general
    broken lines, would give chi2/nu = 1).
* Gradient: at the fitted track parameters dchi2/dparams = 0, so ``dchi2/dhit`` is the partial
  derivative at fixed track parameters (envelope theorem): ``2 w e de/dg``. The fast path
  (:class:`ITSAlignmentModel.forward`) uses this closed form in a custom autograd function and
  accumulates ``dC/dPhi`` with one ``index_add_`` per chunk of tracks. Approximations, shared with
  :meth:`ITSAlignmentModel.forward_autograd` (the straightforward differentiable version,
  autograd through the same fits, used as baseline and to test the fast gradient) unless
  stated:

  - a fitted vertex (``vertex="fit"``) is held constant; against differences of the cost
    with it recomputed this changes the directional derivative along the gradient by ~1e-2
    relative (the weights do not depend on Theta: nothing to hold there);
  - fast path only: the rz residuals depend on the circle parameters through the arc length
    (the line fit is not stationary in them); that second-order coupling is dropped, a relative
    difference to the autograd gradient of 2e-5 .. 1e-3 on the test samples; on the full ITS2
    halfway to a default ``MisalignmentConfig`` misalignment 2.5e-4 with multiple scattering and
    3e-2 without it (large rz residuals in units of their small errors).

* Fast path layout (:meth:`ITSAlignmentModel.forward`). Tracks are grouped by hit count into dense
  hit-major chunks: per-hit arrays (n, T) without padding or mask, small enough to stay in cache.
  What does not depend on Phi (sensor ids, s~, the hit on the ideal geometry relative to the
  reference point, the weights, dC/dchi2 per track) is built once per batch and cached on it; since
  ``g = R_G W0 s~ + T_G + R_G (W s~ + b)``, a call gathers only the per-sensor displacement table
  ``R_G (W s~ + b)`` (N, 9) per chunk, runs the fits without an autograd graph and scatters ``dC/dg
  (x) (s~1, s~2, 1)`` with one ``index_add_``. Per-track solves are in float64. With
  ``precision="float32"`` the per-hit arithmetic is float32 (positions relative to the vertex, so
  ~0.02 um rounding at r = 400 mm against 5 um resolution) and the weights are computed in float64:
  cost within 2e-6 relative and gradient within 1e-4 of float64 on the test samples; on the full
  ITS2 6e-5 .. 1e-4 halfway to the truth and 1.2e-3 at the truth, where the gradient is statistical
  noise only. Measured on a 2-core machine with the full ITS2 (160k tracks per call, the per-batch
  part cached): 1.3-1.9e6 tracks/s forward + backward in float64 at 1-2 threads, 2.2-3.2e6 in
  float32, against 0.7-1.1e5 (float64) for :meth:`ITSAlignmentModel.forward_autograd`, which fits
  every track's weights at every call; building the per-batch part (with the weights' scattering
  fit) runs at 0.18-0.30e6 tracks/s. Throughput, per-stage profile and epochs:
  ``scripts/bench_its_align.py``.

No training loop here: the optimisers are in ``streamcal.detectors.its.align``.
"""

from __future__ import annotations

import contextlib
import math
import numbers
from dataclasses import dataclass
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # pragma: no cover
    from streamcal.detectors.its.geometry import ITSGeometry

__all__ = [
    "ITSAlignmentConfig",
    "TrackBatch",
    "Chi2Output",
    "ITSAlignmentModel",
    "euler_to_matrix",
    "euler_derivatives",
    "matrix_to_euler",
    "theta_to_phi",
    "phi_to_theta",
    "phi_theta_jacobian",
    "phi_theta_vjp",
    "highland_theta0",
]

PION_MASS = 0.13957


@dataclass(frozen=True)
class ITSAlignmentConfig:
    """Frozen, validated configuration of the alignment cost.

    Args:
        sigma_u, sigma_v: intrinsic resolution (mm) along u and v.
        b_field: solenoid field (T), for the momentum that enters multiple scattering.
        vertex: ``"given"`` (the batch carries each event's vertex, e.g. from reconstruction),
            ``"fit"`` (estimated per event from its tracks plus the beam spot, then held fixed)
            or ``"none"`` (no vertex term; tracks are fitted relative to the beam spot).
        sigma_vertex_xy, sigma_vertex_z: vertex uncertainty (mm) in the vertex term.
        beam_spot: nominal beam position (mm) and ``sigma_beam_xy`` its transverse size, used by
            ``vertex="fit"`` and ``"none"``.
        multiple_scattering: include sigma_MS in the hit weights.
        mass: particle mass hypothesis (GeV/c^2).
        precision: dtype of the per-hit arithmetic.
    """

    sigma_u: float = 0.005
    sigma_v: float = 0.005
    b_field: float = 0.5
    vertex: Literal["given", "fit", "none"] = "given"
    sigma_vertex_xy: float = 0.015
    sigma_vertex_z: float = 0.02
    beam_spot: tuple[float, float, float] = (0.0, 0.0, 0.0)
    sigma_beam_xy: float = 0.015
    multiple_scattering: bool = True
    mass: float = PION_MASS
    precision: Literal["float64", "float32"] = "float64"

    def __post_init__(self) -> None:
        for name in ("sigma_u", "sigma_v", "b_field", "sigma_vertex_xy", "sigma_vertex_z", "sigma_beam_xy"):
            val = getattr(self, name)
            if not (val > 0 and math.isfinite(val)):
                raise ValueError(f"ITSAlignmentConfig.{name} must be a positive finite float, got {val}")
        if self.vertex not in ("given", "fit", "none"):
            raise ValueError(f"ITSAlignmentConfig.vertex must be 'given', 'fit' or 'none', got {self.vertex!r}")
        if self.precision not in ("float64", "float32"):
            raise ValueError(
                f"ITSAlignmentConfig.precision must be 'float64' or 'float32', got {self.precision!r}"
            )
        if len(self.beam_spot) != 3:
            raise ValueError("ITSAlignmentConfig.beam_spot must have 3 entries (x, y, z)")
        if self.mass < 0:
            raise ValueError(f"ITSAlignmentConfig.mass must be >= 0, got {self.mass}")


@dataclass
class TrackBatch:
    """Tracks padded to a fixed hit count (built by ``align.pack_tracks``).

    Attributes:
        sensor: (T, K) int64 sensor id (0 on padding).
        local: (T, K, 2) measured local (u, v) in mm (0 on padding).
        mask: (T, K) bool, True for real hits.
        event: (T,) int64 event index in ``0 .. n_events - 1``.
        n_events: number of events.
        vertex: (n_events, 3) event vertex (mm) for ``vertex="given"``, else None.
    """

    sensor: Tensor
    local: Tensor
    mask: Tensor
    event: Tensor
    n_events: int
    vertex: Tensor | None = None

    def __getstate__(self) -> dict[str, Any]:
        # the fast path's per-batch cache (``ITSAlignmentModel.forward``) is rebuilt, never shipped
        return {k: v for k, v in self.__dict__.items() if k != "_fast_plan"}

    @property
    def n_tracks(self) -> int:
        return int(self.sensor.shape[0])

    def validate(self, n_sensors: int | None = None, where: str = "TrackBatch") -> None:
        """Raise ValueError (naming the field) unless shapes, dtypes and values are consistent:
        finite local positions, sensor ids in ``0 .. n_sensors - 1``, event ids in
        ``0 .. n_events - 1``, at least 3 hits per track (5 track parameters), a finite
        ``(n_events, 3)`` vertex if one is given."""
        for name in ("sensor", "local", "mask", "event"):
            kind = type(getattr(self, name)).__name__
            if not isinstance(getattr(self, name), Tensor):
                raise ValueError(f"{where}: TrackBatch.{name} must be a torch.Tensor, got {kind}")
        if self.sensor.ndim != 2:
            raise ValueError(f"{where}: TrackBatch.sensor must have shape (T, K), got {tuple(self.sensor.shape)}")
        t, k = self.sensor.shape
        if self.sensor.dtype.is_floating_point or self.sensor.dtype == torch.bool:
            raise ValueError(f"{where}: TrackBatch.sensor must be an integer tensor, got {self.sensor.dtype}")
        if tuple(self.local.shape) != (t, k, 2):
            raise ValueError(f"{where}: TrackBatch.local must have shape ({t}, {k}, 2), got {tuple(self.local.shape)}")
        if not self.local.dtype.is_floating_point:
            raise ValueError(f"{where}: TrackBatch.local must be a floating-point tensor, got {self.local.dtype}")
        if not bool(torch.isfinite(self.local).all()):
            raise ValueError(f"{where}: TrackBatch.local must be finite (found NaN or inf)")
        if tuple(self.mask.shape) != (t, k) or self.mask.dtype != torch.bool:
            raise ValueError(
                f"{where}: TrackBatch.mask must be a bool tensor of shape ({t}, {k}), "
                f"got {self.mask.dtype} {tuple(self.mask.shape)}"
            )
        if tuple(self.event.shape) != (t,) or self.event.dtype.is_floating_point or self.event.dtype == torch.bool:
            raise ValueError(
                f"{where}: TrackBatch.event must be an integer tensor of shape ({t},), "
                f"got {self.event.dtype} {tuple(self.event.shape)}"
            )
        if not (isinstance(self.n_events, numbers.Integral) and self.n_events >= (1 if t else 0)):
            raise ValueError(f"{where}: TrackBatch.n_events must be an integer >= 1, got {self.n_events!r}")
        if t and (int(self.event.min()) < 0 or int(self.event.max()) >= self.n_events):
            raise ValueError(f"{where}: TrackBatch.event must be in 0..{self.n_events - 1}")
        if n_sensors is not None and t and (int(self.sensor.min()) < 0 or int(self.sensor.max()) >= n_sensors):
            raise ValueError(f"{where}: TrackBatch.sensor ids must be in 0..{n_sensors - 1}")
        if t and int(self.mask.sum(1).min()) < 3:
            raise ValueError(f"{where}: TrackBatch.mask must give every track at least 3 hits")
        if self.vertex is not None:
            if not isinstance(self.vertex, Tensor) or tuple(self.vertex.shape) != (self.n_events, 3):
                shape = tuple(self.vertex.shape) if isinstance(self.vertex, Tensor) else type(self.vertex).__name__
                raise ValueError(f"{where}: TrackBatch.vertex must have shape ({self.n_events}, 3), got {shape}")
            if not self.vertex.dtype.is_floating_point or not bool(torch.isfinite(self.vertex).all()):
                raise ValueError(f"{where}: TrackBatch.vertex must be a finite floating-point tensor")


@dataclass
class Chi2Output:
    """Result of a cost evaluation.

    Attributes:
        cost: scalar C (differentiable w.r.t. the model's Phi).
        chi2: (T,) chi2 per track (track + vertex terms), detached.
        ndf: (T,) degrees of freedom per track.
        event_chi2, event_ndf: (n_events,) per event sums.
    """

    cost: Tensor
    chi2: Tensor
    ndf: Tensor
    event_chi2: Tensor
    event_ndf: Tensor


# ------------------------------------------------------------------------------------------------
# Phi <-> Theta


def euler_to_matrix(angles: Tensor) -> Tensor:
    """ALICE ``R_x(alpha) R_y(beta) R_z(gamma)``: (..., 3) -> (..., 3, 3)."""
    a, b, g = angles.unbind(-1)
    sa, ca, sb, cb, sg, cg = a.sin(), a.cos(), b.sin(), b.cos(), g.sin(), g.cos()
    r0 = torch.stack([cb * cg, -cb * sg, sb], -1)
    r1 = torch.stack([sa * sb * cg + ca * sg, -sa * sb * sg + ca * cg, -cb * sa], -1)
    r2 = torch.stack([-ca * sb * cg + sa * sg, ca * sb * sg + sa * cg, cb * ca], -1)
    return torch.stack([r0, r1, r2], -2)


def euler_derivatives(angles: Tensor) -> Tensor:
    """d a_R / d(alpha, beta, gamma): (..., 3) -> (..., 3 [angle], 3, 3)."""
    a, b, g = angles.unbind(-1)
    z, o = torch.zeros_like(a), torch.ones_like(a)

    def mat(rows: list[list[Tensor]]) -> Tensor:
        return torch.stack([torch.stack(r, -1) for r in rows], -2)

    sa, ca, sb, cb, sg, cg = a.sin(), a.cos(), b.sin(), b.cos(), g.sin(), g.cos()
    rx, ry, rz = mat([[o, z, z], [z, ca, -sa], [z, sa, ca]]), mat([[cb, z, sb], [z, o, z], [-sb, z, cb]]), mat(
        [[cg, -sg, z], [sg, cg, z], [z, z, o]]
    )
    drx = mat([[z, z, z], [z, -sa, -ca], [z, ca, -sa]])
    dry = mat([[-sb, z, cb], [z, z, z], [-cb, z, -sb]])
    drz = mat([[-sg, -cg, z], [cg, -sg, z], [z, z, z]])
    return torch.stack([drx @ ry @ rz, rx @ dry @ rz, rx @ ry @ drz], -3)


def matrix_to_euler(rot: Tensor) -> Tensor:
    """Inverse of :func:`euler_to_matrix` for |beta| < pi/2: (..., 3, 3) -> (..., 3)."""
    beta = torch.asin(rot[..., 0, 2].clamp(-1.0, 1.0))
    gamma = torch.atan2(-rot[..., 0, 1], rot[..., 0, 0])
    alpha = torch.atan2(-rot[..., 1, 2], rot[..., 2, 2])
    return torch.stack([alpha, beta, gamma], -1)


def _check_params(fn: str, name: str, value: Tensor, width: int, rot_geom: Tensor, trans_geom: Tensor,
                  half: Tensor) -> None:
    """ValueError naming ``fn`` and the argument unless ``value`` is a finite (N, width) tensor and
    the placement is ``rot_geom`` (N, 3, 3), ``trans_geom`` (N, 3), ``half`` (2,) > 0."""
    if not isinstance(value, Tensor) or value.ndim != 2 or value.shape[1] != width:
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"{fn}: {name} must have shape (N, {width}), got {shape}")
    n = value.shape[0]
    if not value.dtype.is_floating_point or not bool(torch.isfinite(value).all()):
        raise ValueError(f"{fn}: {name} must be finite floating point (found NaN, inf or {value.dtype})")
    if tuple(rot_geom.shape) != (n, 3, 3):
        raise ValueError(f"{fn}: rot_geom must have shape ({n}, 3, 3), got {tuple(rot_geom.shape)}")
    if tuple(trans_geom.shape) != (n, 3):
        raise ValueError(f"{fn}: trans_geom must have shape ({n}, 3), got {tuple(trans_geom.shape)}")
    if tuple(half.shape) != (2,) or not bool((half > 0).all()):
        raise ValueError(f"{fn}: half must be (h_u, h_v) > 0, got {half}")


# Component-major 3 x 3 algebra for the per-sensor maps below: a matrix stack is (3, 3, N) (or
# (..., 3, 3, N)), so every entry is a contiguous (N,) row and a product is three broadcast
# multiply-adds (much faster on the CPU than batched 3 x 3 matmuls).


_CM_CACHE: dict[str, tuple[tuple[int, int, int], Tensor, Tensor]] = {}


def _cm(mats: Tensor) -> Tensor:
    """(N, 3, 3) -> (3, 3, N). The last result is kept while the input is unchanged (the
    geometry's R_G, transposed on every Theta <-> Phi map otherwise)."""
    key = (id(mats), mats._version, mats.data_ptr())
    hit = _CM_CACHE.get("rot")
    if hit is not None and hit[0] == key and not mats.requires_grad:
        return hit[1]
    out = mats.permute(1, 2, 0).contiguous()
    if not mats.requires_grad:
        _CM_CACHE["rot"] = (key, out, mats)  # holds ``mats``: its id is not reused while cached
    return out


def _cm_mm(a: Tensor, b: Tensor) -> Tensor:
    """Matrix product of component-major stacks (..., 3, 3, N)."""
    out = a[..., :, 0, None, :] * b[..., None, 0, :, :]
    out = out + a[..., :, 1, None, :] * b[..., None, 1, :, :]
    return out + a[..., :, 2, None, :] * b[..., None, 2, :, :]


def _cm_mv(a: Tensor, v: Tensor) -> Tensor:
    """(..., 3, 3, N) @ (..., 3, N) -> (..., 3, N)."""
    out = a[..., :, 0, :] * v[..., None, 0, :] + a[..., :, 1, :] * v[..., None, 1, :]
    return out + a[..., :, 2, :] * v[..., None, 2, :]


def _cm_cross(u: Tensor, v: Tensor) -> Tensor:
    """Cross product of component-major vectors (..., 3, N)."""
    u0, u1, u2 = u.unbind(-2)
    v0, v1, v2 = v.unbind(-2)
    return torch.stack([u1 * v2 - u2 * v1, u2 * v0 - u0 * v2, u0 * v1 - u1 * v0], -2)


def _cm_euler(angles: Tensor) -> Tensor:
    """:func:`euler_to_matrix` of (3, N) angles as (3, 3, N)."""
    a, b, g = angles.unbind(0)
    sa, ca, sb, cb, sg, cg = a.sin(), a.cos(), b.sin(), b.cos(), g.sin(), g.cos()
    return torch.stack([
        torch.stack([cb * cg, -cb * sg, sb]),
        torch.stack([sa * sb * cg + ca * sg, -sa * sb * sg + ca * cg, -cb * sa]),
        torch.stack([-ca * sb * cg + sa * sg, ca * sb * sg + sa * cg, cb * ca]),
    ])


def _local_frame(theta: Tensor, rot_geom: Tensor, trans_geom: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Component-major pieces of the Theta -> Phi map: a_R - 1 (3, 3, N), R_G^T (3, 3, N),
    ``R_G^T (a_R - 1) R_G`` restricted to its first two columns (3, 2, N) and
    ``R_G^T (a_R - 1) T_G`` (3, N)."""
    a_r = _cm_euler(theta.t()[:3]) - torch.eye(3, dtype=theta.dtype, device=theta.device)[..., None]
    rot = _cm(rot_geom)
    rot_t = rot.transpose(0, 1)
    cols = _cm_mv(a_r, rot[:, :2].transpose(0, 1))  # (2, 3, N): (a_R - 1) R_G[:, j]
    q2 = _cm_mv(rot_t, cols).transpose(0, 1)  # (3, 2, N)
    c = _cm_mv(rot_t, _cm_mv(a_r, trans_geom.t()))
    return a_r, rot_t, q2, c


def _rows_mv(m: list[list[Tensor]], v: list[Tensor]) -> list[Tensor]:
    """Matrix (3 x 3 rows of (N,)) times vector (3 rows of (N,)): 3 rows (N,). Row-wise, each
    temporary a single (N,) row (cache-resident where the (3, 3, N) stacks are not)."""
    return [torch.mul(m[i][0], v[0]).addcmul_(m[i][1], v[1]).addcmul_(m[i][2], v[2]) for i in range(3)]


def _rows_cross(u: list[Tensor], v: list[Tensor]) -> list[Tensor]:
    """Cross product of two vectors given as 3 rows (N,)."""
    return [torch.mul(u[1], v[2]).addcmul_(u[2], v[1], value=-1.0),
            torch.mul(u[2], v[0]).addcmul_(u[0], v[2], value=-1.0),
            torch.mul(u[0], v[1]).addcmul_(u[1], v[0], value=-1.0)]


def _rows_frame(t: Tensor, rot: Tensor) -> tuple[list[Tensor], list[list[Tensor]], list[list[Tensor]]]:
    """Row-wise pieces of the Theta -> Phi map for Theta rows ``t`` (6, N) and the component-major
    R_G ``rot`` (3, 3, N): the sines and cosines (sa, ca, sb, cb, sg, cg), ``a_R - 1`` and
    ``R_G^T`` as 3 x 3 rows."""
    sa, ca, sb, cb, sg, cg = t[0].sin(), t[0].cos(), t[1].sin(), t[1].cos(), t[2].sin(), t[2].cos()
    sasb, casb = sa * sb, ca * sb
    a_r1 = [[(cb * cg).sub_(1.0), -cb * sg, sb],
            [torch.addcmul(ca * sg, sasb, cg), torch.addcmul(ca * cg, sasb, sg, value=-1.0).sub_(1.0), -cb * sa],
            [torch.addcmul(sa * sg, casb, cg, value=-1.0), torch.addcmul(sa * cg, casb, sg), (cb * ca).sub_(1.0)]]
    rot_t = [[rot[j, i] for j in range(3)] for i in range(3)]
    return [sa, ca, sb, cb, sg, cg], a_r1, rot_t


def theta_to_phi(theta: Tensor, rot_geom: Tensor, trans_geom: Tensor, half: Tensor) -> Tensor:
    """Theta (N, 6) -> Phi (N, 9) (see module docstring); ``half = (h_u, h_v)``."""
    _check_params("theta_to_phi", "theta", theta, 6, rot_geom, trans_geom, half)
    t = theta.t().contiguous()
    rot = _cm(rot_geom)
    _, a_r1, rot_t = _rows_frame(t, rot)
    # W[:, j] = R_G^T (a_R - 1) R_G[:, j] h_j, b = R_G^T (a_T + (a_R - 1) T_G)
    w = [[x.mul_(half[j]) for x in _rows_mv(rot_t, _rows_mv(a_r1, [rot[0, j], rot[1, j], rot[2, j]]))]
         for j in range(2)]
    tg = trans_geom.t()
    b = _rows_mv(rot_t, [x.add_(t[3 + i]) for i, x in enumerate(_rows_mv(a_r1, [tg[0], tg[1], tg[2]]))])
    return torch.stack([w[0][0], w[1][0], w[0][1], w[1][1], w[0][2], w[1][2], *b], 1)


def phi_to_theta(phi: Tensor, rot_geom: Tensor, trans_geom: Tensor, half: Tensor) -> Tensor:
    """Phi (N, 9) -> Theta (N, 6). The two columns of ``1 + W / W0`` are orthonormalised
    (Gram-Schmidt) so the result is a rotation even for an inconsistent Phi."""
    _check_params("phi_to_theta", "phi", phi, 9, rot_geom, trans_geom, half)
    p = phi.t()
    w = p[:6].reshape(3, 2, -1)  # (3 outputs, 2 inputs, N)
    eye = torch.eye(3, dtype=phi.dtype, device=phi.device)[..., None]  # (3, 3, 1)
    q1 = eye[:, 0] + w[:, 0] / half[0]  # (3, N)
    q2 = eye[:, 1] + w[:, 1] / half[1]
    q1 = q1 / q1.norm(dim=0, keepdim=True)
    q2 = q2 - (q1 * q2).sum(0, keepdim=True) * q1
    q2 = q2 / q2.norm(dim=0, keepdim=True)
    q = torch.stack([q1, q2, _cm_cross(q1, q2)], 1) - eye  # (3, 3 columns, N): Q - 1
    rot = _cm(rot_geom)
    m = _cm_mm(rot, q)  # R_G (Q - 1); a_R - 1 = R_G (Q - 1) R_G^T

    def a_r(i: int, j: int) -> Tensor:
        return m[i, 0] * rot[j, 0] + m[i, 1] * rot[j, 1] + m[i, 2] * rot[j, 2] + (1.0 if i == j else 0.0)

    a_t = _cm_mv(rot, p[6:]) - _cm_mv(m, _cm_mv(rot.transpose(0, 1), trans_geom.t()))  # R_G b - (a_R - 1) T_G
    # matrix_to_euler
    beta = torch.asin(a_r(0, 2).clamp(-1.0, 1.0))
    gamma = torch.atan2(-a_r(0, 1), a_r(0, 0))
    alpha = torch.atan2(-a_r(1, 2), a_r(2, 2))
    return torch.cat([torch.stack([alpha, beta, gamma]), a_t]).t().contiguous()


def phi_theta_jacobian(theta: Tensor, rot_geom: Tensor, trans_geom: Tensor, half: Tensor) -> Tensor:
    """Analytic dPhi/dTheta: (N, 9, 6). With ``d a_R / d angle = [omega] a_R`` (``[.]`` the cross
    product matrix; ``omega`` = e_x, R_x(alpha) e_y, a_R e_z for alpha, beta, gamma) and
    ``R_G^T [omega] R_G = [R_G^T omega]``: ``dW = (u x B[:, j]) h_j``, ``db = u x c`` with
    ``u = R_G^T omega``, ``B = R_G^T a_R R_G``, ``c = R_G^T a_R T_G``."""
    _check_params("phi_theta_jacobian", "theta", theta, 6, rot_geom, trans_geom, half)
    a_r1, rot_t, q2, c = _local_frame(theta, rot_geom, trans_geom)
    alpha = theta.t()[0]
    a_z = a_r1[:, 2] + torch.tensor([0.0, 0.0, 1.0], dtype=theta.dtype, device=theta.device)[:, None]  # a_R e_z
    u = torch.stack([rot_t[:, 0], rot_t[:, 1] * alpha.cos() + rot_t[:, 2] * alpha.sin(), _cm_mv(rot_t, a_z)])
    b2 = q2 + torch.eye(3, 2, dtype=theta.dtype, device=theta.device)[..., None]  # (R_G^T a_R R_G)[:, :2]
    dw = _cm_cross(u[:, None], b2.transpose(0, 1)[None]) * half[None, :, None, None]  # (3 angles, 2 in, 3 out, N)
    db = _cm_cross(u, (c + _cm_mv(rot_t, trans_geom.t()))[None])  # (3 angles, 3, N): u x R_G^T a_R T_G
    jac = theta.new_zeros(theta.shape[0], 9, 6)
    jac[:, :6, :3] = dw.permute(3, 2, 1, 0).reshape(-1, 6, 3)
    jac[:, 6:, :3] = db.permute(2, 1, 0)
    jac[:, 6:, 3:] = rot_geom.transpose(1, 2)
    return jac


def phi_theta_vjp(theta: Tensor, grad_phi: Tensor, rot_geom: Tensor, trans_geom: Tensor, half: Tensor) -> Tensor:
    """``(dPhi/dTheta)^T g`` per sensor: a gradient ``g = dC/dPhi`` (N, 9) mapped to ``dC/dTheta``
    (N, 6) without forming the (N, 9, 6) Jacobian. With the notation of
    :func:`phi_theta_jacobian` and ``(u x v) . g = u . (v x g)``: ``dC/dangle_a = u_a . v``,
    ``v = sum_j h_j B[:, j] x dC/dW[:, j] + c x dC/db`` (``c = R_G^T a_R T_G``), and ``dC/dtau =
    R_G dC/db``. Equal to ``einsum("npk,np->nk", phi_theta_jacobian(...), g)`` to rounding."""
    _check_params("phi_theta_vjp", "theta", theta, 6, rot_geom, trans_geom, half)
    if tuple(grad_phi.shape) != (theta.shape[0], 9) or not grad_phi.dtype.is_floating_point:
        raise ValueError(f"phi_theta_vjp: grad_phi must be a floating-point ({theta.shape[0]}, 9) tensor, got "
                         f"{grad_phi.dtype} {tuple(grad_phi.shape)}")
    return _vjp_rows(theta.t().contiguous(), grad_phi.to(theta.dtype).t().contiguous(), _cm(rot_geom),
                     trans_geom.t(), half)


def _vjp_rows(t: Tensor, g: Tensor, rot: Tensor, tg: Tensor, half: Tensor) -> Tensor:
    """:func:`phi_theta_vjp` of Theta rows ``t`` (6, N) and gradient rows ``g`` (9, N), with R_G
    component-major (3, 3, N) and T_G as rows (3, N): dC/dTheta (N, 6)."""
    (sa, ca, sb, cb, _, _), a_r1, rot_t = _rows_frame(t, rot)
    rows = [[rot[i, j] for j in range(3)] for i in range(3)]
    v = _rows_cross(_rows_mv(rot_t, [x.add_(tg[i]) for i, x in enumerate(_rows_mv(a_r1, [tg[0], tg[1], tg[2]]))]),
                    [g[6], g[7], g[8]])  # c x dC/db
    for j in range(2):
        b = _rows_mv(rot_t, _rows_mv(a_r1, [rot[0, j], rot[1, j], rot[2, j]]))  # (B - 1)[:, j]
        b[j] = b[j].add_(1.0)
        for x, y in zip(v, _rows_cross(b, [g[j], g[2 + j], g[4 + j]])):
            x.add_(y, alpha=float(half[j]))
    rv = _rows_mv(rows, v)  # R_G v: u_a . v = (R_G u_a) . (R_G v), R_G u = (e_x, R_x(alpha) e_y, a_R e_z)
    d_beta = torch.mul(ca, rv[1]).addcmul_(sa, rv[2])
    d_gamma = torch.mul(sb, rv[0]).addcmul_(cb * sa, rv[1], value=-1.0).addcmul_(cb * ca, rv[2])
    return torch.stack([rv[0], d_beta, d_gamma, *_rows_mv(rows, [g[6], g[7], g[8]])], 1)


def highland_theta0(p: Tensor, x_x0: Tensor, mass: float = PION_MASS) -> Tensor:
    """Highland angle (rad) for momentum ``p`` (GeV/c) and thickness ``x_x0`` (X0), unit charge."""
    beta2 = p * p / (p * p + mass * mass)
    safe = x_x0.clamp_min(1e-12)
    th = 0.0136 / (beta2.sqrt() * p) * safe.sqrt() * (1.0 + 0.038 * torch.log(safe / beta2))
    return torch.where(x_x0 > 0, th, torch.zeros_like(th))


# ------------------------------------------------------------------------------------------------
# Track fits (closed form, vectorised over (T, K) padded hits)


def _circle_fit(x: Tensor, y: Tensor, w: Tensor, wv: Tensor) -> dict[str, Tensor]:
    """Karimaki weighted circle fit relative to the reference point (0, 0), which is also a
    measured point with weight ``wv`` (the vertex term; 0 for none). x, y, w: (T, K)."""
    r2 = x * x + y * y
    s_w = w.sum(1) + wv  # (T,)
    mx = (w * x).sum(1) / s_w
    my = (w * y).sum(1) / s_w
    mr = (w * r2).sum(1) / s_w
    xc, yc, rc = x - mx[:, None], y - my[:, None], r2 - mr[:, None]
    wx, wy, wr = w * xc, w * yc, w * rc
    cxx = ((wx * xc).sum(1) + wv * mx * mx) / s_w
    cxy = ((wx * yc).sum(1) + wv * mx * my) / s_w
    cyy = ((wy * yc).sum(1) + wv * my * my) / s_w
    cxr = ((wx * rc).sum(1) + wv * mx * mr) / s_w
    cyr = ((wy * rc).sum(1) + wv * my * mr) / s_w
    crr = (((wr * rc).sum(1) + wv * mr * mr) / s_w).clamp_min(1e-30)
    m11 = cyy - cyr * cyr / crr
    m22 = cxx - cxr * cxr / crr
    m12 = -cxy + cyr * cxr / crr
    ang = 0.5 * torch.atan2(-2.0 * m12, m22 - m11)
    c, s = ang.cos(), ang.sin()
    sign = torch.where(c * mx + s * my < 0, -1.0, 1.0).to(x.dtype)  # direction: towards the hits
    c, s = c * sign, s * sign
    kappa = (c * cyr - s * cxr) / crr
    delta = (my * c - mx * s) - kappa * mr
    e = kappa[:, None] * r2 - (y * c[:, None] - x * s[:, None]) + delta[:, None]
    return {"kappa": kappa, "cos": c, "sin": s, "delta": delta, "e": e}


def _arc_length(x: Tensor, y: Tensor, fit: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Transverse arc length from the point of closest approach ``delta (-sin, cos)`` to each
    hit; returns (s, ds/dx, ds/dy)."""
    c, s, d, k = fit["cos"][:, None], fit["sin"][:, None], fit["delta"][:, None], fit["kappa"][:, None]
    qx, qy = x + d * s, y - d * c
    chord = torch.sqrt(qx * qx + qy * qy).clamp_min(1e-12)
    a = (k.abs() * chord).clamp(max=1.0 - 1e-12)  # rho * chord / 2 with rho = 2 kappa
    small = a < 1e-3
    a_safe = torch.where(small, torch.full_like(a, 0.5), a)
    ratio = torch.where(small, 1.0 + a * a / 6.0, torch.asin(a_safe) / a_safe)
    arc = chord * ratio
    dsdc = torch.rsqrt(1.0 - a * a)
    return arc, dsdc * qx / chord, dsdc * qy / chord


def _line_fit(sarc: Tensor, z: Tensor, w: Tensor, wv: Tensor) -> dict[str, Tensor]:
    """Weighted straight line ``z = z0 + t s`` with the vertex as a point at (0, 0), weight wv."""
    s_w = w.sum(1) + wv
    ms = (w * sarc).sum(1) / s_w
    mz = (w * z).sum(1) / s_w
    sc, zc = sarc - ms[:, None], z - mz[:, None]
    ws = w * sc
    css = ((ws * sc).sum(1) + wv * ms * ms) / s_w
    csz = ((ws * zc).sum(1) + wv * ms * mz) / s_w
    tanl = csz / css.clamp_min(1e-30)
    z0 = mz - tanl * ms
    rz = z - z0[:, None] - tanl[:, None] * sarc
    return {"z0": z0, "tanl": tanl, "rz": rz}


# ------------------------------------------------------------------------------------------------
# Fast path: tracks grouped by hit count in dense hit-major chunks (see ITSAlignmentModel.forward)

# Row order of the per-hit coordinates in the fast path: z, x, y, then r^2 = x^2 + y^2, so that
# rows 0..2 are the position and rows 1..3 the (x, y, r^2) of the circle fit, both contiguous.
_ZXY = (2, 0, 1)
_CHUNK_FIELDS = ("idx", "sid", "st", "pos", "w_xy", "w_z", "wv_xy", "wv_z", "scale", "event", "mask")
# Phi (N, 9) = (w11, w21, w12, w22, w13, w23, b1, b2, b3) as (3 local axes k, 3 [W[:, 0], W[:, 1], b]):
# row k holds W[k, 0], W[k, 1], b[k]
_PHI_COLUMNS = torch.tensor([0, 1, 6, 2, 3, 7, 4, 5, 8])


@dataclass
class _Chunk:
    """Tracks with (mostly) the same number of hits, hit-major: per-hit arrays are (..., n, T)
    with hit j of track t at ``[..., j, t]`` (contiguous per hit index). Small groups of hit
    counts share a chunk, padded to its largest count with zero-weight hits (``mask``)."""

    idx: Tensor  # (T,) the tracks' rows in the batch
    sid: Tensor  # (n T,) sensor ids of the (n, T) hits, flattened
    st: Tensor  # (2, n, T): s~1, s~2
    pos: Tensor  # (3, n, T): z, x, y on the ideal geometry minus the track's pass-1 reference point
    w_xy: Tensor  # (n, T): the hits' weights (ITSAlignmentModel._weights), 0 on padding
    w_z: Tensor  # (n, T)
    wv_xy: Tensor | None  # (T,): the vertex term's weights; None for vertex="none"
    wv_z: Tensor | None  # (T,)
    scale: Tensor  # (T,) dC/dchi2 of the track (per-hit dtype)
    event: Tensor  # (T,) event index
    mask: Tensor | None  # (n, T) 1 for real hits, 0 for padding (per-hit dtype); None: no padding


@dataclass
class _Plan:
    """The part of the fast path that depends on the batch but not on Phi, built once per batch
    (cached on it, see :meth:`ITSAlignmentModel.forward`)."""

    key: tuple[Any, ...]
    chunks: list[_Chunk]
    ndf: Tensor  # (T,) float64
    ev_ndf: Tensor  # (E,) float64
    n_hits: int


def _chunk_bounds(counts: list[int], sizes: list[int], chunk: int) -> list[tuple[int, int, int]]:
    """Chunks ``(lo, hi, n)`` of tracks sorted by hit count (``sizes[i]`` tracks with
    ``counts[i]`` hits): a group of at least ``chunk // 4`` tracks is split evenly into chunks of
    at most ``chunk``; smaller groups join the following groups until the chunk holds
    ``chunk // 4`` tracks (padded to the largest hit count ``n``): few chunks for small batches,
    little padding."""
    out: list[tuple[int, int, int]] = []
    lo = start = 0  # the pending chunk is [lo, start)
    n_pending = 0
    for n, size in zip(counts, sizes):
        if start > lo and (start - lo >= chunk // 4 or start - lo + size > chunk):
            out.append((lo, start, n_pending))
            lo = start
        if start == lo and size >= chunk // 4:
            k = -(-size // chunk)
            out.extend((lo + size * i // k, lo + size * (i + 1) // k, n) for i in range(k))
            lo = start = lo + size
            continue
        start += size
        n_pending = n
    if start > lo:
        out.append((lo, start, n_pending))
    return out


def _karimaki_solve(mean: Tensor, cov: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Karimaki's closed-form circle (as in :func:`_circle_fit`) from the weighted means (3, T)
    and covariances (3, 3, T) of (x, y, r^2), float64: kappa, cos(phi), sin(phi), delta (T,)."""
    mx, my, mr = mean.unbind(0)
    cxx, cxy, cxr = cov[0].unbind(0)
    cyy, cyr = cov[1, 1], cov[1, 2]
    crr = cov[2, 2].clamp_min(1e-30)
    m11 = cyy - cyr * cyr / crr
    m22 = cxx - cxr * cxr / crr
    m12 = cyr * cxr / crr - cxy
    ang = 0.5 * torch.atan2(-2.0 * m12, m22 - m11)
    c, s = ang.cos(), ang.sin()
    sign = torch.where(c * mx + s * my < 0, -1.0, 1.0).to(c.dtype)  # direction: towards the hits
    c, s = c * sign, s * sign
    kappa = (c * cyr - s * cxr) / crr
    delta = (my * c - mx * s) - kappa * mr
    return kappa, c, s, delta


def _dense_moments(v: Tensor, w: Tensor | None, wv: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted means (3, T) and covariances (3, 3, T) of ``v`` (3, n, T) with hit weights ``w``
    (n, T) (None: 1) and the reference point (the origin) as a further point of weight ``wv``
    (T,) (None: 0), returned in float64; also the centred ``v``."""
    if w is None and wv is None:
        mean = v.mean(1)
        vc = v - mean[:, None]
        wvc, sw = vc, None
    elif w is None:  # unit hit weights and the reference point: no weight array to multiply by
        sw = wv + v.shape[1]
        mean = v.sum(1).div_(sw)
        vc = v - mean[:, None]
        wvc = vc
    else:
        sw = w.sum(0) if wv is None else w.sum(0) + wv
        mean = (v * w).sum(1).div_(sw)
        vc = v - mean[:, None]
        wvc = vc * w
    # products as (n, T) and (2, n, T) slabs: no (3, 3, n, T) temporary
    diag = (wvc * vc).sum(1)  # xx, yy, rr
    xo = (wvc[0] * vc[1:]).sum(1)  # xy, xr
    yr = (wvc[1] * vc[2]).sum(0)
    cov = torch.stack([diag[0], xo[0], xo[1], xo[0], diag[1], yr, xo[1], yr, diag[2]]).double().view(3, 3, -1)
    m64 = mean.double()
    if sw is None:
        return m64, cov / v.shape[1], vc
    if wv is not None:
        cov += wv.double() * m64[:, None] * m64[None]
    return m64, cov / sw.double(), vc


def _dense_line(sarc: Tensor, z: Tensor, w: Tensor | None, wv: Tensor | None) -> tuple[Tensor, Tensor]:
    """Weighted straight line ``z = z0 + t s`` (as in :func:`_line_fit`) of (n, T) hits: z0, t
    (T,) in float64."""
    if w is None and wv is None:
        ms, mz = sarc.mean(0), z.mean(0)
        sc = sarc - ms
        css = (sc * sc).mean(0).double()
        csz = (sc * (z - mz)).mean(0).double()
    else:
        sw = (w.sum(0) if wv is None else w.sum(0) + wv) if w is not None else wv + sarc.shape[0]
        ms = (sarc if w is None else w * sarc).sum(0).div_(sw)
        mz = (z if w is None else w * z).sum(0).div_(sw)
        sc = sarc - ms
        wsc = sc if w is None else w * sc
        css, csz = (wsc * sc).sum(0).double(), (wsc * (z - mz)).sum(0).double()
        if wv is not None:
            wv64 = wv.double()
            css += wv64 * ms.double() ** 2
            csz += wv64 * ms.double() * mz.double()
        css, csz = css / sw.double(), csz / sw.double()
    tanl = csz / css.clamp_min(1e-30)
    return mz.double() - tanl * ms.double(), tanl


def _dense_arc(x: Tensor, y: Tensor, kappa: Tensor, c: Tensor, s: Tensor, d: Tensor
               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Arc length (as in :func:`_arc_length`) of (n, T) hits for per-track circle parameters in
    the hits' dtype: (s, qx, qy, chord, a) with ``q`` the hit relative to the point of closest
    approach and ``a = |kappa| chord`` (so ``s = asin(a) / |kappa|``)."""
    qx = x + d * s
    qy = y - d * c
    chord = (qx * qx).addcmul_(qy, qy).sqrt_().clamp_min_(1e-12)
    kc = kappa.abs().clamp_min(1e-30)
    amax = 1.0 - 1e-12 if x.dtype == torch.float64 else 1.0 - 1e-6
    a = (chord * kc).clamp_max_(amax)
    return torch.asin(a).div_(kc), qx, qy, chord, a


def _vertex_from_tracks(event: Tensor, n_events: int, c: Tensor, s: Tensor, d: Tensor, z0: Tensor, w_max: Tensor,
                        cfg: ITSAlignmentConfig) -> Tensor:
    """Event vertices (E, 3) relative to the reference point from first-pass track fits (see
    :meth:`ITSAlignmentModel._fit_vertex`); ``w_max`` (T,) the track's largest xy hit weight."""
    # transverse impact-parameter weight: first-layer hit weight as a proxy
    wt = 1.0 / (1.0 / w_max.clamp_min(1e-12) + cfg.sigma_u**2)
    nx, ny = -s, c  # track normal at closest approach; n . (v - ref) = delta

    def per_event(val: Tensor) -> Tensor:
        return torch.zeros(n_events, dtype=c.dtype, device=c.device).index_add_(0, event, val)

    a11 = per_event(wt * nx * nx) + cfg.sigma_beam_xy**-2
    a12 = per_event(wt * nx * ny)
    a22 = per_event(wt * ny * ny) + cfg.sigma_beam_xy**-2
    b1 = per_event(wt * nx * d)
    b2 = per_event(wt * ny * d)
    det = a11 * a22 - a12 * a12
    vx = (a22 * b1 - a12 * b2) / det
    vy = (a11 * b2 - a12 * b1) / det
    nz = per_event(torch.ones_like(c)).clamp_min(1.0)
    return torch.stack([vx, vy, per_event(z0) / nz], 1)


_profiler_enabled = getattr(torch.autograd, "_profiler_enabled", lambda: False)


def _stage(name: str) -> Any:
    """A profiler label for a stage of the fast path while the torch profiler runs, else nothing
    (see ``scripts/bench_its_align.py``)."""
    if _profiler_enabled():
        return torch.autograd.profiler.record_function(name)
    return contextlib.nullcontext()


class _FastChi2(torch.autograd.Function):
    """C(Phi) whose value and gradient dC/dPhi were computed without a graph (closed-form
    envelope-theorem gradient, see the module docstring)."""

    @staticmethod
    def forward(ctx: Any, phi: Tensor, cost: Tensor, grad_phi: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(grad_phi)
        return cost.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (grad_phi,) = ctx.saved_tensors
        return grad_phi * grad_out, None, None


class ITSAlignmentModel(nn.Module):
    """Per-sensor linear layers Phi (N, 9) and the chi^2 cost of a :class:`TrackBatch`.

    Buffers: ``rot_geom`` (N, 3, 3), ``trans_geom`` (N, 3), ``half`` (2,), ``sensor_layer`` (N,),
    ``layer_radius`` (L,), ``layer_x0`` (L,). Parameter: ``phi`` (N, 9), zero = ideal geometry.
    """

    def __init__(
        self,
        config: ITSAlignmentConfig,
        rot_geom: Tensor,
        trans_geom: Tensor,
        half: tuple[float, float],
        sensor_layer: Tensor,
        layer_radius: Tensor,
        layer_x0: Tensor,
    ) -> None:
        super().__init__()
        self.config = config
        dt = torch.float64
        if not isinstance(config, ITSAlignmentConfig):
            raise ValueError(f"ITSAlignmentModel: config must be an ITSAlignmentConfig, got {type(config).__name__}")
        n = rot_geom.shape[0] if rot_geom.ndim == 3 else -1
        if tuple(rot_geom.shape) != (n, 3, 3) or n < 1:
            raise ValueError(f"ITSAlignmentModel: rot_geom must have shape (N, 3, 3), got {tuple(rot_geom.shape)}")
        if tuple(trans_geom.shape) != (n, 3):
            raise ValueError(f"ITSAlignmentModel: trans_geom must have shape ({n}, 3), got {tuple(trans_geom.shape)}")
        if tuple(sensor_layer.shape) != (n,):
            raise ValueError(f"ITSAlignmentModel: sensor_layer must have shape ({n},), got {tuple(sensor_layer.shape)}")
        n_layers = layer_radius.shape[0] if layer_radius.ndim == 1 else -1
        if n_layers < 1 or tuple(layer_x0.shape) != (n_layers,):
            raise ValueError(
                f"ITSAlignmentModel: layer_radius and layer_x0 must have the same shape (L,), got "
                f"{tuple(layer_radius.shape)} and {tuple(layer_x0.shape)}"
            )
        if int(sensor_layer.min()) < 0 or int(sensor_layer.max()) >= n_layers:
            raise ValueError(f"ITSAlignmentModel: sensor_layer must be in 0..{n_layers - 1}")
        for name, val in (("rot_geom", rot_geom), ("trans_geom", trans_geom), ("layer_radius", layer_radius),
                          ("layer_x0", layer_x0)):
            if not bool(torch.isfinite(val).all()):
                raise ValueError(f"ITSAlignmentModel: {name} must be finite (found NaN or inf)")
        if len(half) != 2 or not all(h > 0 and math.isfinite(h) for h in half):
            raise ValueError(f"ITSAlignmentModel: half must be two positive half sizes (h_u, h_v) in mm, got {half}")
        self.register_buffer("rot_geom", rot_geom.to(dt))
        self.register_buffer("trans_geom", trans_geom.to(dt))
        self.register_buffer("half_size", torch.tensor(half, dtype=dt))
        self.register_buffer("sensor_layer", sensor_layer.to(torch.int64))
        self.register_buffer("layer_radius", layer_radius.to(dt))
        self.register_buffer("layer_x0", layer_x0.to(dt))
        self.phi = nn.Parameter(torch.zeros(n, 9, dtype=dt))

    @classmethod
    def from_geometry(cls, geom: ITSGeometry, config: ITSAlignmentConfig | None = None) -> ITSAlignmentModel:
        return cls(
            ITSAlignmentConfig() if config is None else config,
            torch.as_tensor(geom.rot),
            torch.as_tensor(geom.trans),
            (geom.half_u, geom.half_v),
            torch.as_tensor(geom.layer.astype("int64")),
            torch.as_tensor(geom.layer_radius),
            torch.as_tensor(geom.layer_x0),
        )

    @property
    def n_sensors(self) -> int:
        return int(self.phi.shape[0])

    # --- Phi <-> Theta --------------------------------------------------------------------------
    def _theta_key(self) -> tuple[tuple[tuple[int, int], ...], tuple[Tensor, ...]]:
        """Identity and in-place version of Phi and the geometry buffers (and the tensors
        themselves, so their ids are not reused while a cached Theta lives)."""
        inputs = (self.phi, self.rot_geom, self.trans_geom, self.half_size)
        return tuple((id(t), t._version) for t in inputs), inputs

    def theta(self) -> Tensor:
        """Current Theta (N, 6) from Phi (a new tensor; computed once while Phi and the geometry
        are unchanged, tracked by their version counters; after :meth:`set_theta` the Theta it
        was given)."""
        key, inputs = self._theta_key()
        cached = self.__dict__.get("_theta_cache")
        if cached is None or cached[0] != key:
            cached = (key, phi_to_theta(self.phi.detach(), self.rot_geom, self.trans_geom, self.half_size), inputs)
            self.__dict__["_theta_cache"] = cached
        return cached[1].clone()

    def __getstate__(self) -> dict[str, Any]:
        # derived caches (Theta, the component-major R_G, the ideal placement) are recomputed, never pickled
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__.copy()
        return {k: v for k, v in state.items() if k not in ("_theta_cache", "_rot_zxy_cache", "_nominal_table_cache")}

    @torch.no_grad()
    def set_theta(self, theta: Tensor) -> None:
        """Set Phi from Theta (N, 6). Inside the Euler angles' principal range (here |alpha|,
        |gamma| < 3 and |beta| < 1.5 rad), where :func:`phi_to_theta` of the new Phi gives this
        Theta back to rounding, :meth:`theta` then returns it without mapping Phi back."""
        theta = torch.as_tensor(theta, dtype=self.phi.dtype)
        self.phi.copy_(theta_to_phi(theta, self.rot_geom, self.trans_geom, self.half_size))
        ang = theta[:, :3].abs().amax(0).tolist() if theta.shape[0] else [0.0, 0.0, 0.0]
        if ang[0] < 3.0 and ang[1] < 1.5 and ang[2] < 3.0:
            key, inputs = self._theta_key()
            self.__dict__["_theta_cache"] = (key, theta.clone(), inputs)

    def jacobian(self, theta: Tensor | None = None) -> Tensor:
        """dPhi/dTheta (N, 9, 6) at ``theta`` (default: current)."""
        theta = self.theta() if theta is None else theta
        return phi_theta_jacobian(theta, self.rot_geom, self.trans_geom, self.half_size)

    def theta_grad(self, grad_phi: Tensor, sensors: Tensor | None = None) -> Tensor:
        """``dC/dTheta`` (N, 6) from ``dC/dPhi`` (N, 9) at the current Theta (:func:`phi_theta_vjp`,
        equal to ``jacobian()`` applied to it, to rounding). ``sensors`` (int64 ids): map only
        those rows; the others are set to zero, which is exact for sensors whose ``dC/dPhi`` is
        zero (those without hits in the batch)."""
        n = self.n_sensors
        if tuple(grad_phi.shape) != (n, 9):
            raise ValueError(f"ITSAlignmentModel.theta_grad: grad_phi must have shape ({n}, 9), "
                             f"got {tuple(grad_phi.shape)}")
        theta = self.theta()
        if sensors is None:
            return phi_theta_vjp(theta, grad_phi, self.rot_geom, self.trans_geom, self.half_size)
        if sensors.ndim != 1 or sensors.dtype != torch.int64:
            raise ValueError(f"ITSAlignmentModel.theta_grad: sensors must be a 1-d int64 tensor of ids, got "
                             f"{sensors.dtype} {tuple(sensors.shape)}")
        out = theta.new_zeros(n, 6)
        out[sensors] = _vjp_rows(theta[sensors].t().contiguous(), grad_phi[sensors].to(theta.dtype).t().contiguous(),
                                 _cm(self.rot_geom)[..., sensors], self.trans_geom[sensors].t(), self.half_size)
        return out

    # --- geometry ---------------------------------------------------------------------------------
    def placement_table(self, phi: Tensor) -> Tensor:
        """Per-sensor affine map in global frame, flattened (N, 9): columns
        ``R_G (W0 + W)[:, 0]``, ``R_G (W0 + W)[:, 1]``, ``R_G b + T_G``."""
        n = phi.shape[0]
        w0 = phi.new_zeros(3, 2)
        w0[0, 0], w0[1, 1] = self.half_size[0], self.half_size[1]
        w = phi[:, :6].reshape(n, 3, 2) + w0  # (N, 3, 2): W0 + W
        a = self.rot_geom @ w  # (N, 3, 2)
        c = (self.rot_geom @ phi[:, 6:, None])[..., 0] + self.trans_geom  # (N, 3)
        return torch.cat([a[:, :, 0], a[:, :, 1], c], 1)  # (N, 9)

    def _nominal_table(self) -> Tensor:
        """:meth:`placement_table` of the ideal geometry (Phi = 0) in float64, cached while the
        geometry buffers are unchanged."""
        key = tuple((id(b), b._version) for b in (self.rot_geom, self.trans_geom, self.half_size))
        cached = self.__dict__.get("_nominal_table_cache")
        if cached is None or cached[0] != key:
            phi0 = torch.zeros(self.n_sensors, 9, dtype=torch.float64, device=self.trans_geom.device)
            cached = (key, self.placement_table(phi0), (self.rot_geom, self.trans_geom, self.half_size))
            self.__dict__["_nominal_table_cache"] = cached
        return cached[1]

    def global_positions(self, batch: TrackBatch, phi: Tensor | None = None, table: Tensor | None = None) -> Tensor:
        """Global hit positions (T, K, 3) under ``phi`` (default: current) or a precomputed
        :meth:`placement_table`."""
        if table is None:
            table = self.placement_table(self.phi if phi is None else phi)
        s_t = batch.local.to(table.dtype) / self.half_size.to(table.dtype)  # (T, K, 2) normalised local
        tab = table[batch.sensor]  # (T, K, 9)
        return tab[..., 0:3] * s_t[..., :1] + tab[..., 3:6] * s_t[..., 1:] + tab[..., 6:9]

    # --- cost --------------------------------------------------------------------------------------
    def forward(self, batch: TrackBatch, chunk_tracks: int = 8192, *, cache: bool = True) -> Chi2Output:
        """C(Theta) for ``batch`` with the fast closed-form gradient w.r.t. ``phi``.

        Same cost as :meth:`forward_autograd`; the gradient is the envelope-theorem closed form of
        the module docstring, accumulated per sensor without an autograd graph (layout: module
        docstring, "Fast path layout"). Tracks are grouped by hit count into chunks of at most
        ``chunk_tracks`` tracks. The Phi-independent part is built (and the batch validated) once
        per batch and cached on it, about 43 (float32) or 73 (float64) bytes per hit; it is
        rebuilt when a tensor of the batch or a geometry buffer of the model is replaced or
        modified in place (tracked by the tensors' version counters, so not for writes through
        ``.data``), for another model, precision or ``chunk_tracks``, and is never pickled.
        ``cache=False`` builds it for this call only (the first call on a batch costs about one
        more call).
        """
        if not (isinstance(chunk_tracks, int) and chunk_tracks >= 1):
            raise ValueError(f"ITSAlignmentModel.forward: chunk_tracks must be an integer >= 1, got {chunk_tracks!r}")
        need = torch.is_grad_enabled() and self.phi.requires_grad
        dt = torch.float64 if self.config.precision == "float64" else torch.float32
        dev = self.phi.device
        with torch.no_grad():
            with _stage("its.plan"):
                plan = self._plan(batch, chunk_tracks, dt, cache, "ITSAlignmentModel.forward")
            tab = self._displacement_table(self.phi.detach(), dt)  # (N, 9)
            chi2 = torch.zeros(batch.n_tracks, dtype=torch.float64, device=dev)
            ev_chi2 = torch.zeros(batch.n_events, dtype=torch.float64, device=dev)
            cost = torch.zeros((), dtype=torch.float64, device=dev)
            acc = torch.zeros(9, self.n_sensors, dtype=dt, device=dev) if need else None
            shifts: list[Tensor | None] = [None] * len(plan.chunks)
            if self.config.vertex == "fit":
                shifts = self._fast_vertex(plan, tab, batch.n_events)
            for ch, sh in zip(plan.chunks, shifts):
                c2 = self._fast_chunk(ch, tab, acc, sh)
                chi2[ch.idx] = c2
                ev_chi2.index_add_(0, ch.event, c2)
                cost += (c2 * ch.scale).sum()
            grad_phi = None if acc is None else self._grad_from_table(acc)
        if grad_phi is None:
            return Chi2Output(cost, chi2, plan.ndf, ev_chi2, plan.ev_ndf)
        out = _FastChi2.apply(self.phi, cost, grad_phi)
        return Chi2Output(out, chi2, plan.ndf, ev_chi2, plan.ev_ndf)

    def _plan_key(self, batch: TrackBatch, chunk: int, dt: torch.dtype) -> tuple[Any, ...]:
        """Identity and in-place version of every input of the plan (the plan holds the objects,
        so their ids are not reused while it lives)."""
        tensors = (batch.sensor, batch.local, batch.mask, batch.event, batch.vertex, self.rot_geom,
                   self.trans_geom, self.half_size, self.sensor_layer, self.layer_radius, self.layer_x0)
        ids = tuple((id(t), t._version) if isinstance(t, Tensor) else (id(t), None) for t in tensors)
        return (ids, batch.n_events, self.config, chunk, dt, self.phi.device, tensors)

    def _plan(self, batch: TrackBatch, chunk: int, dt: torch.dtype, cache: bool, where: str) -> _Plan:
        if not isinstance(batch, TrackBatch):
            raise ValueError(f"{where}: batch must be a TrackBatch, got {type(batch).__name__}")
        key = self._plan_key(batch, chunk, dt)
        plan = batch.__dict__.get("_fast_plan") if cache else None
        if plan is not None and plan.key[:-1] == key[:-1]:
            return plan
        self._check_batch(batch, where)
        plan = self._build_plan(batch, chunk, dt, key)
        if cache:
            batch.__dict__["_fast_plan"] = plan
        return plan

    def _build_plan(self, batch: TrackBatch, chunk: int, dt: torch.dtype, key: tuple[Any, ...]) -> _Plan:
        dev = self.phi.device
        mask = batch.mask.to(dev)
        event = batch.event.to(dev, torch.int64)
        nh = mask.sum(1)
        ndf = self._ndf(nh)
        ev_ndf = torch.zeros(batch.n_events, dtype=torch.float64, device=dev).index_add_(0, event, ndf)
        scale = self._event_scale(ev_ndf)[event]  # (T,) dC/dchi2_track
        ref = self._vertex(batch, None, torch.float64).to(dev)  # (T, 3) pass-1 reference point
        # tracks grouped by hit count (a counting sort): every chunk is a slice of the sorted arrays
        counts = torch.unique(nh).tolist()
        groups = [torch.nonzero(nh == n)[:, 0] for n in counts]
        order = torch.cat(groups) if groups else torch.zeros(0, dtype=torch.int64, device=dev)
        sensor = batch.sensor.to(dev, torch.int64).index_select(0, order)
        local = batch.local.to(dev, torch.float64).index_select(0, order)
        m = mask.index_select(0, order)
        if bool((m[:, 1:] & ~m[:, :-1]).any()):  # real hits first in every row (pack_tracks does so)
            first = torch.argsort((~m).to(torch.int8), dim=1, stable=True)
            sensor = sensor.gather(1, first)
            local = local.gather(1, first[..., None].expand(-1, -1, 2))
            m = m.gather(1, first)
        ref, scale, event = ref.index_select(0, order), scale.index_select(0, order), event.index_select(0, order)
        # per sensor: u axis, v axis, centre (global), layer
        rot, half = self.rot_geom, self.half_size
        per_sensor = torch.cat([rot[:, :, 0], rot[:, :, 1], self.trans_geom, self.sensor_layer[:, None].double()], 1)
        chunks: list[_Chunk] = []
        for lo, hi, n in _chunk_bounds(counts, [g.numel() for g in groups], chunk):
            sid = sensor[lo:hi, :n].t().contiguous()  # (n, T)
            loc = local[lo:hi, :n].permute(2, 1, 0)  # (2, n, T)
            tab = per_sensor.index_select(0, sid.reshape(-1)).t().reshape(10, n, hi - lo)
            glob = tab[0:3] * loc[0] + tab[3:6] * loc[1] + tab[6:9] - ref[lo:hi].t()[:, None]  # (3, n, T)
            st = torch.stack([loc[0] / half[0], loc[1] / half[1]])
            mk = m[lo:hi, :n].t()
            # the weights, from the hits on the ideal geometry (Phi-independent): (T, n) layout
            sens, mk_t = sensor[lo:hi, :n], m[lo:hi, :n]
            gx, gy, gz = (glob[i].t() for i in range(3))
            w_xy, w_z, wv_xy, wv_z = self._weights(gx, gy, sens, mk_t, self._weight_fit(gx, gy, gz, sens, mk_t))
            chunks.append(_Chunk(
                idx=order[lo:hi],
                sid=sid.reshape(-1),
                st=st.to(dt),
                pos=glob[list(_ZXY)].to(dt),  # z, x, y
                w_xy=w_xy.t().to(dt).contiguous(),
                w_z=w_z.t().to(dt).contiguous(),
                wv_xy=None if self.config.vertex == "none" else wv_xy.to(dt),
                wv_z=None if self.config.vertex == "none" else wv_z.to(dt),
                scale=scale[lo:hi],
                event=event[lo:hi],
                mask=None if bool(mk.all()) else mk.to(dt).contiguous(),
            ))
        return _Plan(key, chunks, ndf, ev_ndf, int(nh.sum()))

    @torch.no_grad()
    def hit_derivatives(self, batch: TrackBatch, chunk_tracks: int = 8192) -> Iterator[tuple[Tensor, ...]]:
        """What the Gauss-Newton blocks need of every hit at the current Phi, from the fast
        path's layout (built and cached as by :meth:`forward`), per chunk of ``m`` hit slots:
        ``(sensor (m,), g (3, m), d_e (3, m), d_rz (3, m), w_e (m,), w_rz (m,))`` in float64 with
        ``g`` the hit's global position (x, y, z), ``d_e``, ``d_rz`` the derivatives of its two
        residuals w.r.t. ``g`` at fixed track parameters and ``w = 2 c_t w_hit`` their weights
        in C (``c_t = dC/dchi2`` of the track; 0 on padding slots)."""
        dt = torch.float64 if self.config.precision == "float64" else torch.float32
        plan = self._plan(batch, chunk_tracks, dt, True, "ITSAlignmentModel.hit_derivatives")
        tab = self._displacement_table(self.phi.detach(), dt)
        shifts: list[Tensor | None] = [None] * len(plan.chunks)
        if self.config.vertex == "fit":
            shifts = self._fast_vertex(plan, tab, batch.n_events)
        ref = self._vertex(batch, None, torch.float64)[:, list(_ZXY)]  # (T, 3) z, x, y
        f64 = torch.float64
        for ch, sh in zip(plan.chunks, shifts):
            b = self._fast_positions(ch, tab, sh)
            w_xy, w_z = ch.w_xy, ch.w_z
            z, x, y, _ = b.unbind(0)
            _, k, c, s, _, _, _, qx, qy, chord, a, _, tl = self._fast_fit(b, ch)
            f = tl / (chord * (1.0 - a * a).sqrt())  # tan(lambda) |ds/dq| / |q|
            origin = ref.index_select(0, ch.idx).t()  # (3, T) z, x, y
            if sh is not None:
                origin = origin + sh.to(f64)
            g = torch.stack([x.to(f64) + origin[1], y.to(f64) + origin[2], z.to(f64) + origin[0]]).reshape(3, -1)
            d_e = torch.stack([2 * k * x + s, 2 * k * y - c, torch.zeros_like(x)]).to(f64).reshape(3, -1)
            d_z = torch.stack([-f * qx, -f * qy, torch.ones_like(x)]).to(f64).reshape(3, -1)
            sc = 2.0 * ch.scale.to(f64)
            yield (ch.sid, g, d_e, d_z, (w_xy.to(f64) * sc).reshape(-1), (w_z.to(f64) * sc).reshape(-1))

    def plan_tensors(self, batch: TrackBatch, chunk_tracks: int = 8192) -> list[Tensor]:
        """The batch's Phi-independent layout (:meth:`forward`'s per-batch cache, built if need
        be) as a flat list of tensors, to be stored with the batch and given back to
        :meth:`attach_plan` (a replay then skips building it). It holds for this model's
        geometry, configuration and precision only."""
        dt = torch.float64 if self.config.precision == "float64" else torch.float32
        plan = self._plan(batch, chunk_tracks, dt, True, "ITSAlignmentModel.plan_tensors")
        out = [plan.ndf, plan.ev_ndf, torch.tensor([plan.n_hits, len(plan.chunks)])]
        for ch in plan.chunks:
            out += [getattr(ch, name) if getattr(ch, name) is not None else torch.zeros(0, dtype=dt)
                    for name in _CHUNK_FIELDS]
        return out

    def attach_plan(self, batch: TrackBatch, tensors: Sequence[Tensor], chunk_tracks: int = 8192) -> None:
        """Give ``batch`` the layout :meth:`plan_tensors` made of the same tracks (by this
        model's configuration) as its cached layout. The list's structure, dtypes and shapes are
        checked against the batch (ValueError naming the part), not the values: a layout stored
        with other tracks gives a wrong cost."""
        where = "ITSAlignmentModel.attach_plan"
        if not isinstance(batch, TrackBatch):  # the layout replaces the hits' values: only their shapes are checked
            raise ValueError(f"{where}: batch must be a TrackBatch, got {type(batch).__name__}")
        dt = torch.float64 if self.config.precision == "float64" else torch.float32
        t, e = batch.n_tracks, batch.n_events
        tensors = list(tensors)
        if len(tensors) < 3 or tuple(tensors[2].shape) != (2,):
            raise ValueError(f"{where}: not a layout of plan_tensors (got {len(tensors)} tensors)")
        n_hits, n_chunks = (int(v) for v in tensors[2])
        if len(tensors) != 3 + n_chunks * len(_CHUNK_FIELDS):
            raise ValueError(f"{where}: {len(tensors)} tensors for {n_chunks} chunks (expected "
                             f"{3 + n_chunks * len(_CHUNK_FIELDS)})")
        ndf, ev_ndf = tensors[0], tensors[1]
        if tuple(ndf.shape) != (t,) or tuple(ev_ndf.shape) != (e,):
            raise ValueError(f"{where}: ndf / ev_ndf of shapes {tuple(ndf.shape)} / {tuple(ev_ndf.shape)} for a batch "
                             f"of {t} tracks and {e} events")
        if n_hits != int(batch.mask.sum()):
            raise ValueError(f"{where}: the layout has {n_hits} hits, the batch {int(batch.mask.sum())}")
        chunks, covered = [], 0
        for c in range(n_chunks):
            f = dict(zip(_CHUNK_FIELDS, tensors[3 + c * len(_CHUNK_FIELDS): 3 + (c + 1) * len(_CHUNK_FIELDS)]))
            n, tc = (f["st"].shape[1], f["st"].shape[2]) if f["st"].ndim == 3 else (-1, -1)
            has_v = self.config.vertex != "none"
            shapes = {"idx": (tc,), "sid": (n * tc,), "st": (2, n, tc), "pos": (3, n, tc), "w_xy": (n, tc),
                      "w_z": (n, tc), "wv_xy": (tc,) if has_v else (0,), "wv_z": (tc,) if has_v else (0,),
                      "scale": (tc,), "event": (tc,)}
            for name, shape in shapes.items():
                if tuple(f[name].shape) != shape:
                    raise ValueError(f"{where}: chunk {c}: {name} of shape {tuple(f[name].shape)}, expected {shape}")
            for name in ("st", "pos", "w_xy", "w_z") + (("wv_xy", "wv_z") if has_v else ()):
                if f[name].dtype != dt:
                    raise ValueError(f"{where}: chunk {c}: {name} is {f[name].dtype}, the model computes in {dt}")
            mask = f["mask"] if f["mask"].numel() else None
            if mask is not None and (tuple(mask.shape) != (n, tc) or mask.dtype != dt):
                raise ValueError(f"{where}: chunk {c}: mask of {mask.dtype} {tuple(mask.shape)}, expected {dt} {(n, tc)}")
            covered += tc
            chunks.append(_Chunk(idx=f["idx"].long(), sid=f["sid"].long(), st=f["st"], pos=f["pos"],
                                 w_xy=f["w_xy"], w_z=f["w_z"], wv_xy=f["wv_xy"] if has_v else None,
                                 wv_z=f["wv_z"] if has_v else None, scale=f["scale"].double(),
                                 event=f["event"].long(), mask=mask))
        if covered != t:
            raise ValueError(f"{where}: the chunks hold {covered} tracks, the batch {t}")
        key = self._plan_key(batch, chunk_tracks, dt)
        batch.__dict__["_fast_plan"] = _Plan(key, chunks, ndf.double(), ev_ndf.double(), n_hits)

    def _rot_zxy(self) -> Tensor:
        """R_G component-major (3 [z, x, y], 3, N), cached while ``rot_geom`` is unchanged."""
        rot = self.rot_geom
        key = (id(rot), rot._version)
        cached = self.__dict__.get("_rot_zxy_cache")
        if cached is None or cached[0] != key:
            cached = (key, rot[:, list(_ZXY), :].permute(1, 2, 0).contiguous(), rot)
            self.__dict__["_rot_zxy_cache"] = cached
        return cached[1]

    def _displacement_table(self, phi: Tensor, dt: torch.dtype) -> Tensor:
        """Per-sensor displacement of a hit from the ideal geometry, ``R_G (W s~ + b)``, as a
        (N, 9) table: columns ``R_G W[:, 0]``, ``R_G W[:, 1]``, ``R_G b``, each in (z, x, y)."""
        rz = self._rot_zxy()  # (3 i, 3 k, N)
        m = phi.t().index_select(0, _PHI_COLUMNS.to(phi.device)).view(3, 3, -1)  # (3 k, 3 [W0, W1, b], N)
        out = rz[:, 0, None] * m[None, 0]  # (3 i, 3 col, N)
        out.addcmul_(rz[:, 1, None], m[None, 1]).addcmul_(rz[:, 2, None], m[None, 2])
        return out.permute(2, 1, 0).reshape(-1, 9).to(dt)  # (N, 3 col, 3 i)

    def _grad_from_table(self, acc: Tensor) -> Tensor:
        """dC/dPhi (N, 9) from the per-sensor sums ``acc`` (9, N) of ``dC/dg (x) (s~1, s~2, 1)``
        (rows as :meth:`_displacement_table`): rotate with R_G^T per sensor."""
        rz = self._rot_zxy()  # (3 i, 3 k, N)
        g = acc.to(torch.float64).view(3, 3, -1)  # (3 col, 3 i, N)
        dm = rz[0, :, None] * g[None, :, 0]  # (3 k, 3 col, N): sum_i R[i, k] acc[col, i]
        dm.addcmul_(rz[1, :, None], g[None, :, 1]).addcmul_(rz[2, :, None], g[None, :, 2])
        out = torch.empty(9, dm.shape[2], dtype=torch.float64, device=acc.device)
        out[_PHI_COLUMNS.to(acc.device)] = dm.view(9, -1)
        return out.t().contiguous()

    def _fast_positions(self, ch: _Chunk, tab: Tensor, shift: Tensor | None) -> Tensor:
        """(4, n, T): z, x, y relative to the reference point, and r^2."""
        n, t = ch.pos.shape[1:]
        d = tab.index_select(0, ch.sid).view(n, t, 3, 3).permute(2, 3, 0, 1)  # (3 [A0, A1, c], 3 [z, x, y], n, T)
        b = torch.empty(4, n, t, dtype=tab.dtype, device=tab.device)
        p = torch.addcmul(ch.pos, d[0], ch.st[0], out=b[:3])
        p.addcmul_(d[1], ch.st[1]).add_(d[2])
        if shift is not None:  # (3, T): the fitted vertex relative to the pass-1 reference
            p.sub_(shift[:, None])
        torch.mul(b[1], b[1], out=b[3]).addcmul_(b[2], b[2])
        return b

    def _pass1_vertex(self, n_tracks: int, device: Any = None) -> tuple[Tensor, Tensor] | None:
        """The vertex point's weights (T,) in the unit-weight fits of :meth:`_weight_fit`,
        relative to a hit's (1: ``sigma_u``, ``sigma_v``), float64: a given vertex enters them
        with its resolution (``(sigma_u / sigma_vertex_xy)^2``, ``(sigma_v / sigma_vertex_z)^2``);
        None for ``vertex="fit"`` and ``"none"`` (the fits of the hits alone)."""
        cfg = self.config
        if cfg.vertex != "given":
            return None
        one = torch.ones(n_tracks, dtype=torch.float64, device=device)
        return one * (cfg.sigma_u / cfg.sigma_vertex_xy) ** 2, one * (cfg.sigma_v / cfg.sigma_vertex_z) ** 2

    def _fast_pass1(self, b: Tensor, ch: _Chunk) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``vertex="fit"``: the fits of the hits ``b`` (4, n, T) with unit weights from which the
        event vertices are fitted (as :meth:`_evaluate`): (cos, sin, delta, z0) (T,) float64."""
        z, x, y, _ = b.unbind(0)
        mask = ch.mask
        mean, cov, _ = _dense_moments(b[1:].double(), None if mask is None else mask.double(), None)
        k64, c64, s64, d64 = _karimaki_solve(mean, cov)
        dt = b.dtype
        arc = _dense_arc(x, y, k64.to(dt), c64.to(dt), s64.to(dt), d64.to(dt))[0]
        z0 = _dense_line(arc, z, mask, None)[0]
        return c64, s64, d64, z0

    def _fast_vertex(self, plan: _Plan, tab: Tensor, n_events: int) -> list[Tensor | None]:
        """``vertex="fit"``: the first pass of every chunk, the event vertices from it (as
        :meth:`_fit_vertex`), and per chunk the vertex shift (3, T) (z, x, y)."""
        per_track = []
        for ch in plan.chunks:
            with _stage("its.positions"):
                b = self._fast_positions(ch, tab, None)
            with _stage("its.pass1"):
                c, s, d, z0 = self._fast_pass1(b, ch)
            per_track.append(torch.stack([c, s, d, z0, ch.w_xy.amax(0).double()]))
        if not plan.chunks:
            return []
        c, s, d, z0, wt = torch.cat(per_track, 1)
        event = torch.cat([ch.event for ch in plan.chunks])
        v = _vertex_from_tracks(event, n_events, c, s, d, z0, wt, self.config)  # (E, 3) x, y, z
        v = v[:, list(_ZXY)].t().to(tab.dtype)  # (3, E) z, x, y
        return [v[:, ch.event] for ch in plan.chunks]

    @staticmethod
    def _fast_fit(b: Tensor, ch: _Chunk) -> tuple[Tensor, ...]:
        """The circle and line fits of the hits ``b`` (4, n, T) of chunk ``ch`` with its weights:
        (centred coordinates vc, kappa, cos, sin, delta in the hits' dtype, delta float64, arc
        length, q_x, q_y, chord, a (as :func:`_dense_arc`), z0 float64, tan(lambda) in the hits'
        dtype)."""
        dt = b.dtype
        z, x, y, _ = b.unbind(0)
        mean, cov, vc = _dense_moments(b[1:], ch.w_xy, ch.wv_xy)
        k64, c64, s64, d64 = _karimaki_solve(mean, cov)
        k, c, s, d = (q.to(dt) for q in (k64, c64, s64, d64))
        arc, qx, qy, chord, a = _dense_arc(x, y, k, c, s, d)
        z064, tl64 = _dense_line(arc, z, ch.w_z, ch.wv_z)
        return vc, k, c, s, d, d64, arc, qx, qy, chord, a, z064, tl64.to(dt)

    def _fast_chunk(self, ch: _Chunk, tab: Tensor, acc: Tensor | None, shift: Tensor | None) -> Tensor:
        """chi2 per track (T,) float64 of one chunk; adds its dC/dg (x) (s~1, s~2, 1) to ``acc``."""
        dt = tab.dtype
        with _stage("its.positions"):
            b = self._fast_positions(ch, tab, shift)
        w_xy, w_z, wv_xy, wv_z = ch.w_xy, ch.w_z, ch.wv_xy, ch.wv_z
        with _stage("its.fit"):
            z, x, y, _ = b.unbind(0)
            vc, k, c, s, d, d64, arc, qx, qy, chord, a, z064, tl = self._fast_fit(b, ch)
            # e = kappa r^2 + x sin - y cos + delta, from the centred coordinates
            e = (vc[2] * k).addcmul_(vc[0], s).addcmul_(vc[1], c, value=-1.0)
            rz = torch.addcmul(z - z064.to(dt), arc, tl, value=-1.0)
            we, wr = w_xy * e, w_z * rz
            chi2 = (we * e).sum(0).double() + (wr * rz).sum(0).double()
            if wv_xy is not None and wv_z is not None:
                chi2 += wv_xy.double() * d64 * d64 + wv_z.double() * z064 * z064
        if acc is None:
            return chi2
        with _stage("its.gradient"):
            n, t = e.shape
            sc2 = 2.0 * ch.scale.to(dt)
            ge, gz = we.mul_(sc2), wr.mul_(sc2)  # dC/de, dC/drz
            # ds/d(x, y) = q / (chord sqrt(1 - a^2)); f = dC/drz tan(lambda) |ds/dq| / |q|
            f = a.mul_(a).neg_().add_(1.0).sqrt_().mul_(chord).reciprocal_().mul_(gz).mul_(tl)
            alpha = torch.addcmul(-f, ge, 2.0 * k)
            beta = torch.addcmul(ge, f, d, value=-1.0)
            vals = torch.empty(3, 3, n, t, dtype=dt, device=tab.device)  # (3 [s~1, s~2, 1], 3 [z, x, y], n, T)
            g = vals[2]  # dC/dg: z, x, y
            g[0] = gz
            torch.mul(alpha, x, out=g[1]).addcmul_(beta, s)
            torch.mul(alpha, y, out=g[2]).addcmul_(beta, c, value=-1.0)
            torch.mul(g, ch.st[0], out=vals[0])
            torch.mul(g, ch.st[1], out=vals[1])
        with _stage("its.scatter"):
            acc.index_add_(1, ch.sid, vals.view(9, -1))
        return chi2

    def _forward_padded(self, batch: TrackBatch, chunk_tracks: int = 4096) -> Chi2Output:
        """The padded predecessor of :meth:`forward` (same cost and gradient), kept as a reference
        for tests and benchmarks: :meth:`_evaluate` on chunks of the (T, K) padded batch. Tracks
        are processed in chunks of ``chunk_tracks`` (sorted by hit count, each chunk
        trimmed to its longest track; whole events per chunk for ``vertex="fit"``), which keeps
        the per-hit arrays cache-resident and the padding small.
        """
        self._check_batch(batch, "ITSAlignmentModel._forward_padded")
        if not (isinstance(chunk_tracks, int) and chunk_tracks >= 1):
            raise ValueError(
                f"ITSAlignmentModel._forward_padded: chunk_tracks must be an integer >= 1, got {chunk_tracks!r}")
        need = torch.is_grad_enabled() and self.phi.requires_grad
        dt = torch.float64 if self.config.precision == "float64" else torch.float32
        with torch.no_grad():
            table = self.placement_table(self.phi.detach()).to(dt)
            nh = batch.mask.sum(1)
            ndf = self._ndf(nh)
            ev_ndf = torch.zeros(batch.n_events, dtype=torch.float64).index_add_(0, batch.event, ndf)
            scale_ev = self._event_scale(ev_ndf)
            chi2 = torch.zeros(batch.n_tracks, dtype=torch.float64)
            ev_chi2 = torch.zeros(batch.n_events, dtype=torch.float64)
            grad_phi = torch.zeros_like(self.phi) if need else None
            cost = torch.zeros((), dtype=torch.float64)
            for idx in self._chunks(batch, nh, chunk_tracks):
                k = max(int(nh[idx].max()), 1)
                sub = TrackBatch(batch.sensor[idx, :k], batch.local[idx, :k], batch.mask[idx, :k],
                                 batch.event[idx], batch.n_events, batch.vertex)
                res = self._evaluate(sub, None, need_grad=need, scale_ev=scale_ev, table=table)
                cost += res["cost"]
                chi2[idx] = res["chi2"].to(torch.float64)
                ev_chi2 += res["event_chi2"]
                if grad_phi is not None:
                    grad_phi += self._phi_grad_from_hits(res["grad_g"], sub.sensor, res["s_tilde"], self.n_sensors)
        if grad_phi is None:
            return Chi2Output(cost, chi2, ndf, ev_chi2, ev_ndf)
        out = _FastChi2.apply(self.phi, cost, grad_phi)
        return Chi2Output(out, chi2, ndf, ev_chi2, ev_ndf)

    def _chunks(self, batch: TrackBatch, nh: Tensor, chunk: int) -> list[Tensor]:
        t = batch.n_tracks
        if self.config.vertex == "fit":
            # contiguous whole events (tracks are grouped by event)
            bounds = [0]
            while bounds[-1] < t:
                nxt = min(bounds[-1] + chunk, t)
                if nxt < t:
                    ev = batch.event[nxt - 1]
                    nxt = int(torch.searchsorted(batch.event, ev, right=True)) if bool(
                        (batch.event[1:] >= batch.event[:-1]).all()) else t
                bounds.append(max(nxt, bounds[-1] + 1))
            return [torch.arange(a, b) for a, b in zip(bounds, bounds[1:])]
        order = torch.argsort(nh, stable=True)
        return list(order.split(chunk))

    def _ndf(self, nh: Tensor) -> Tensor:
        return 2.0 * nh.to(torch.float64) + (2.0 if self.config.vertex != "none" else 0.0) - 5.0

    @staticmethod
    def _event_scale(ev_ndf: Tensor) -> Tensor:
        """dC/dchi2_event = 1 / (N_event nu_event) for events with nu > 0 (others are dropped)."""
        good = ev_ndf > 0
        n_good = good.sum().clamp_min(1)
        return torch.where(good, 1.0 / (ev_ndf.clamp_min(1.0) * n_good), torch.zeros_like(ev_ndf))

    def forward_autograd(self, batch: TrackBatch) -> Chi2Output:
        """The straightforward version: autograd through positions and fits (a fitted vertex held
        constant). Same value as :meth:`forward`."""
        self._check_batch(batch, "ITSAlignmentModel.forward_autograd")
        res = self._evaluate(batch, self.phi, need_grad=False)
        return self._to_output(res, res["cost"])

    def _check_batch(self, batch: TrackBatch, where: str) -> None:
        if not isinstance(batch, TrackBatch):
            raise ValueError(f"{where}: batch must be a TrackBatch, got {type(batch).__name__}")
        batch.validate(self.n_sensors, where)
        if self.config.vertex == "given" and batch.vertex is None:
            raise ValueError(f"{where}: ITSAlignmentConfig.vertex='given' needs TrackBatch.vertex (n_events, 3)")

    def _to_output(self, res: dict[str, Tensor], cost: Tensor) -> Chi2Output:
        return Chi2Output(cost, res["chi2"].detach(), res["ndf"], res["event_chi2"].detach(), res["event_ndf"])

    # --- internals ---------------------------------------------------------------------------------
    def _hit_variances(self, x: Tensor, y: Tensor, sensor: Tensor, fit: dict[str, Tensor]) -> dict[str, Tensor]:
        """The parts of the hits' variances for the track parameters ``fit`` (kappa, cos, sin,
        tanl (T,)), hits ``x``, ``y`` (T, K) relative to the reference point, float64: the
        intrinsic ``var_int_xy``, ``var_int_z`` (T, K) and, with multiple scattering, the
        Highland variance ``ms_theta2`` (T, L) of every layer for the momentum of ``fit``, the
        hits' layers ``ms_layer`` and radii ``ms_r`` (T, K) and ``sec2`` (T,).

        xy: ``sigma_u`` projected on the circle normal. z: ``sigma_v`` plus the part of the u
        error that moves the hit along the track, which shifts its arc length and so the
        predicted z by ``tan(lambda) (t . e_u) du`` (t: track direction in xy)."""
        cfg = self.config
        f64 = torch.float64
        k, c, s, tl = (fit[key].to(f64) for key in ("kappa", "cos", "sin", "tanl"))
        # gradient of the circle residual: the circle normal (up to 1 + rho d)
        gx = 2 * k[:, None] * x + s[:, None]
        gy = 2 * k[:, None] * y - c[:, None]
        gn = torch.sqrt(gx * gx + gy * gy).clamp_min(1e-12)
        eu = self.rot_geom[:, :2, 0].to(f64)[sensor]  # (T, K, 2) u direction in xy
        normal_u = (eu[..., 0] * gx + eu[..., 1] * gy) / gn  # e_u . n
        along_u = (eu[..., 1] * gx - eu[..., 0] * gy) / gn  # e_u . t
        out = {"var_int_xy": (cfg.sigma_u * normal_u) ** 2,
               "var_int_z": cfg.sigma_v**2 + (cfg.sigma_u * tl[:, None] * along_u) ** 2}
        if cfg.multiple_scattering:
            sec2 = 1.0 + tl * tl  # 1 / cos^2(lambda)
            pt = (0.3 * cfg.b_field / (2000.0 * k.abs().clamp_min(1e-12))).clamp(0.05, 1e4)
            x0 = self.layer_x0.to(f64)[None, :] * sec2.sqrt()[:, None]
            out.update(ms_theta2=highland_theta0((pt * sec2.sqrt())[:, None], x0, cfg.mass) ** 2,  # (T, L)
                       ms_layer=self.sensor_layer[sensor], ms_r=torch.sqrt(x * x + y * y), sec2=sec2)
        return out

    def _kick_columns(self, var: dict[str, Tensor], mask: Tensor, plane: str) -> tuple[Tensor, Tensor]:
        """The scattering's part of the hits' noise, ``S = diag(intrinsic) + G G^T``: ``G`` (T, K,
        L), one column per layer ``l``, its Highland kick ``theta0_l`` moving every later hit of
        the track by ``theta0_l (r - r_l)`` (times ``sec lambda`` across the track, ``plane="xy"``,
        ``sec^2 lambda`` in z, ``"z"``), from :meth:`_hit_variances` ``var``; 0 on ``mask``-ed
        out hits. Also the intrinsic variances (T, K), 1 where masked out."""
        f64 = torch.float64
        m = mask.to(f64)
        sec2 = var["sec2"].to(f64)
        scale = sec2.sqrt() if plane == "xy" else sec2  # (T,)
        n_layers = self.layer_radius.shape[0]
        before = torch.arange(n_layers, device=m.device) < var["ms_layer"][..., None]  # (T, K, L)
        lever = (var["ms_r"].to(f64)[..., None] - self.layer_radius.to(f64)) * before  # (T, K, L)
        kick = var["ms_theta2"].to(f64).clamp_min(0.0).sqrt() * scale[:, None]  # (T, L)
        intrinsic = torch.where(mask.bool(), var["var_int_" + plane].to(f64).clamp_min(1e-30), torch.ones_like(m))
        return lever * kick[:, None, :] * m[..., None], intrinsic

    @staticmethod
    def _gls_step(jac: Tensor, kicks: Tensor, res: Tensor, var: Tensor) -> Tensor:
        """One generalised least-squares step (T, p) of the track parameters for residuals
        ``res`` (T, n) with derivatives ``jac`` (T, n, p) and the covariance ``diag(var) + G G^T``,
        ``G = kicks`` (T, n, q) (one column per scatterer, in units of its width): solved with
        the kicks as q more parameters under a unit Gaussian prior (the same solution, a
        (p + q)-dimensional symmetric system per track)."""
        p = jac.shape[-1]
        a = torch.cat([jac, kicks], -1)  # (T, n, p + q)
        aw = a / var[..., None]
        n_mat = a.transpose(1, 2) @ aw
        prior = torch.cat([jac.new_zeros(p), jac.new_ones(kicks.shape[-1])])
        n_mat = n_mat + torch.diag_embed(prior.expand(a.shape[0], -1))
        rhs = aw.transpose(1, 2) @ res[..., None]
        return -torch.linalg.solve(n_mat, rhs)[:, :p, 0]

    def _weight_fit(self, x: Tensor, y: Tensor, z: Tensor, sensor: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """The track parameters (kappa, cos, sin, delta, tanl (T,), float64) the weights are
        computed from, for hits ``x, y, z`` (T, K) relative to the reference point: a fit with
        unit weights (and a given vertex with its resolution, :meth:`_pass1_vertex`), then with
        multiple scattering one generalised least-squares step with the residuals' full
        covariance for that fit's momentum (the intrinsic errors, the vertex's, and one Highland
        kick per layer that moves every later hit, as ``align.noise_factors``).

        Why not the first fit alone: its momentum follows the track's own kicks (a track bent
        more by its scattering looks softer and gets larger scattering variances, so smaller
        weights), and weights correlated with the residuals bias the cost's minimum: on the
        full ITS2 at the true geometry the weighted mean residual across the track, signed by the
        curvature, was -5.5 / -4.2 / +5.2 / +9.1 um in layers 3-6 with the first fit's momentum
        (the hits look radially displaced), and +3.1 / +2.2 / -2.6 / -7.6 um with the weighted
        fit's. The estimate of a fit with the true covariance is uncorrelated with the residuals
        of every linear fit of the same hits (they are functions of its own residuals), and with
        it they are -0.24 / -0.12 / +0.24 / +0.20 um, within their statistical errors (0.3-0.9
        um), as with the true momentum."""
        cfg = self.config
        f64 = torch.float64
        x, y, z = x.to(f64), y.to(f64), z.to(f64)
        m = mask.to(f64)
        t = x.shape[0]
        v1 = self._pass1_vertex(t, x.device)
        zero = x.new_zeros(t)
        f1 = _circle_fit(x, y, m, zero if v1 is None else v1[0])
        arc = _arc_length(x, y, f1)[0]
        l1 = _line_fit(arc, z, m, zero if v1 is None else v1[1])
        fit = {"kappa": f1["kappa"], "cos": f1["cos"], "sin": f1["sin"], "delta": f1["delta"], "tanl": l1["tanl"]}
        if not cfg.multiple_scattering or t == 0:
            return fit
        var = self._hit_variances(x, y, sensor, fit)
        nl = self.layer_radius.shape[0] - 1  # the last layer's kick moves no later hit
        one = torch.ones_like(x)
        c, s = f1["cos"][:, None], f1["sin"][:, None]
        # per plane: derivatives by the track parameters, kick columns, residuals, intrinsic variances
        j_xy = torch.stack([x * x + y * y, x * c + y * s, one], -1) * m[..., None]  # de / d(kappa, phi, delta)
        j_z = torch.stack([-one, -arc], -1) * m[..., None]  # drz / d(z0, tan(lambda))
        planes = [[j_xy, *self._kick_columns(var, mask, "xy"), f1["e"] * m],
                  [j_z, *self._kick_columns(var, mask, "z"), l1["rz"] * m]]
        if v1 is not None:  # the given vertex: one more point, at the origin, with its resolution
            tl = l1["tanl"]
            rows = (([0.0, 0.0, 1.0], cfg.sigma_vertex_xy**2 * one[:, 0], f1["delta"]),
                    ([-1.0, 0.0], cfg.sigma_vertex_z**2 + (cfg.sigma_vertex_xy * tl) ** 2, -l1["z0"]))
            for plane, (jv, vv, rv) in zip(planes, rows):
                jac, kicks, var_int, res = plane
                plane[:] = [torch.cat([jac, x.new_tensor(jv).expand(t, 1, -1)], 1),
                            torch.cat([kicks, kicks.new_zeros(t, 1, kicks.shape[2])], 1),
                            torch.cat([var_int, vv[:, None]], 1), torch.cat([res, rv[:, None]], 1)]
        d_xy, d_z = (self._gls_step(jac, kicks[..., :nl], res, var_int) for jac, kicks, var_int, res in planes)
        ang = torch.atan2(f1["sin"], f1["cos"]) + d_xy[:, 1]
        return {"kappa": f1["kappa"] + d_xy[:, 0], "cos": ang.cos(), "sin": ang.sin(),
                "delta": f1["delta"] + d_xy[:, 2], "tanl": l1["tanl"] + d_z[:, 1]}

    def _weights(self, x: Tensor, y: Tensor, sensor: Tensor, mask: Tensor, fit: dict[str, Tensor],
                 noise: dict[str, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Weights 1/sigma^2 (float64) for the track parameters ``fit`` (:meth:`_weight_fit`) of
        hits ``x, y`` (T, K) relative to the reference point: per hit (T, K) for the xy and z
        residuals, per track (T,) for the xy and z vertex residuals (0 for ``vertex="none"``).
        ``noise``: filled with the parts of the hit variances that the noise model of the errors
        needs (``align.noise_factors``, :meth:`_hit_variances`).

        Per hit the intrinsic variances of :meth:`_hit_variances` plus, with multiple scattering,
        the diagonal of the Highland covariance (see the module docstring). Vertex:
        ``sigma_vertex_xy`` across the track; the z residual (trajectory z at the point of
        closest approach) also takes the xy error along the track, ``sigma_vertex_z^2 +
        tan(lambda)^2 sigma_vertex_xy^2``."""
        cfg = self.config
        var = self._hit_variances(x.double(), y.double(), sensor, fit)
        tl = fit["tanl"].double()
        var_xy, var_z = var["var_int_xy"], var["var_int_z"]
        if noise is not None:
            noise.update(var)
        if cfg.multiple_scattering:
            th2, lay, r, sec2 = var["ms_theta2"], var["ms_layer"], var["ms_r"], var["sec2"]
            rad = self.layer_radius.double()[None, :]
            zero = th2.new_zeros(th2.shape[0], 1)
            ca = torch.cat([zero, th2.cumsum(1)[:, :-1]], 1)  # exclusive cumulative sums over layers
            cb = torch.cat([zero, (th2 * rad).cumsum(1)[:, :-1]], 1)
            cc = torch.cat([zero, (th2 * rad * rad).cumsum(1)[:, :-1]], 1)
            ms = (r * r * ca.gather(1, lay) - 2 * r * cb.gather(1, lay) + cc.gather(1, lay)).clamp_min(0.0)
            var_xy = var_xy + ms * sec2[:, None]
            var_z = var_z + ms * (sec2 * sec2)[:, None]
        m = mask.double()
        if cfg.vertex != "none":
            wv_xy = torch.full_like(tl, cfg.sigma_vertex_xy**-2)
            wv_z = 1.0 / (cfg.sigma_vertex_z**2 + (cfg.sigma_vertex_xy * tl) ** 2)
        else:
            wv_xy = wv_z = torch.zeros_like(tl)
        return m / var_xy.clamp_min(1e-30), m / var_z, wv_xy, wv_z

    def _vertex(self, batch: TrackBatch, glob: Tensor, dt: torch.dtype) -> Tensor:
        """Per-track reference point / vertex (T, 3), detached."""
        cfg = self.config
        if cfg.vertex == "given":
            if batch.vertex is None:
                raise ValueError("ITSAlignmentConfig.vertex='given' needs TrackBatch.vertex")
            return batch.vertex.to(dt)[batch.event]
        return torch.tensor(cfg.beam_spot, dtype=dt).expand(batch.n_tracks, 3)

    def _fit_vertex(self, batch: TrackBatch, fit: dict[str, Tensor], lfit: dict[str, Tensor], ref: Tensor,
                    w_xy: Tensor) -> Tensor:
        """Event vertex from first-pass track fits: least squares of the tracks' transverse
        distance plus the beam spot (xy), weighted mean of z at closest approach (z)."""
        v = _vertex_from_tracks(batch.event, batch.n_events, fit["cos"], fit["sin"], fit["delta"], lfit["z0"],
                                w_xy.max(1).values, self.config)  # (E, 3) relative to the reference point
        return ref + v[batch.event]

    def _evaluate(self, batch: TrackBatch, phi: Tensor | None, need_grad: bool,
                  scale_ev: Tensor | None = None, table: Tensor | None = None) -> dict[str, Tensor]:
        """Fits and chi^2 of ``batch`` (all tracks at once). ``scale_ev`` (n_events,) overrides
        the per-event normalisation (when ``batch`` is a chunk); ``table`` a precomputed
        placement table (then ``phi`` is unused)."""
        cfg = self.config
        dt = torch.float64 if cfg.precision == "float64" else torch.float32
        if table is None:
            assert phi is not None
            table = self.placement_table(phi).to(dt)
        glob = self.global_positions(batch, table=table)  # (T, K, 3)
        ref = self._vertex(batch, glob, dt)
        mask = batch.mask
        # the weights, from the hits on the ideal geometry (independent of Phi, see _weight_fit);
        # a fitted vertex from a fit of this Phi's hits with unit weights
        with torch.no_grad():
            f64 = torch.float64
            nominal = self.global_positions(batch, table=self._nominal_table())
            nominal = nominal - self._vertex(batch, None, f64)[:, None]
            xn, yn, zn = nominal.unbind(-1)
            noise: dict[str, Tensor] = {}
            wfit = self._weight_fit(xn, yn, zn, batch.sensor, mask)
            w_xy, w_z, wv_xy, wv_z = (w.to(dt) for w in self._weights(xn, yn, batch.sensor, mask, wfit, noise))
            if cfg.vertex == "fit":
                x0, y0, z0 = (glob[..., i].detach() - ref[:, i, None] for i in range(3))
                m = mask.to(dt)
                zero_v = torch.zeros(batch.n_tracks, dtype=dt)
                f1 = _circle_fit(x0, y0, m, zero_v)
                l1 = _line_fit(_arc_length(x0, y0, f1)[0], z0, m, zero_v)
                ref = self._fit_vertex(batch, f1, l1, ref, w_xy)
        # pass 2: full weights and the vertex term
        x, y, z = (glob[..., i] - ref[:, i, None] for i in range(3))
        fit = _circle_fit(x, y, w_xy, wv_xy)
        arc, dsdx, dsdy = _arc_length(x, y, fit)
        lfit = _line_fit(arc, z, w_z, wv_z)
        e, rz = fit["e"], lfit["rz"]
        chi2 = (w_xy * e * e).sum(1) + wv_xy * fit["delta"] ** 2 + (w_z * rz * rz).sum(1) + wv_z * lfit["z0"] ** 2
        ndf = self._ndf(mask.sum(1))  # (T,) float64
        ev_ndf = torch.zeros(batch.n_events, dtype=torch.float64).index_add_(0, batch.event, ndf)
        if scale_ev is None:
            scale_ev = self._event_scale(ev_ndf)
        ev_chi2 = torch.zeros(batch.n_events, dtype=torch.float64).index_add(0, batch.event, chi2.to(torch.float64))
        cost = (ev_chi2 * scale_ev).sum()
        out: dict[str, Tensor] = {
            "cost": cost, "chi2": chi2, "ndf": ndf, "event_chi2": ev_chi2, "event_ndf": ev_ndf,
            "e": e, "rz": rz, "w_xy": w_xy, "w_z": w_z, "kappa": fit["kappa"], "cos": fit["cos"],
            "sin": fit["sin"], "delta": fit["delta"], "z0": lfit["z0"], "tanl": lfit["tanl"],
            "arc": arc, "x": x, "y": y, "z": z, "ref": ref, "wv_xy": wv_xy, "wv_z": wv_z,
            **{"noise_" + key: val for key, val in noise.items()},  # align.noise_factors
        }
        if need_grad:
            a = scale_ev[batch.event].to(dt)[:, None]  # (T, 1) d C / d chi2_track
            k = fit["kappa"][:, None]
            c, s = fit["cos"][:, None], fit["sin"][:, None]
            ge = 2.0 * a * w_xy * e
            gz = 2.0 * a * w_z * rz
            tl = lfit["tanl"][:, None]
            gx = ge * (2 * k * x + s) - gz * tl * dsdx
            gy = ge * (2 * k * y - c) - gz * tl * dsdy
            out["grad_g"] = torch.stack([gx, gy, gz], -1)  # (T, K, 3) dC/dg (0 on padding)
            out["sensor"] = batch.sensor
            out["s_tilde"] = batch.local.to(dt) / self.half_size.to(dt)
        return out

    def _phi_grad_from_hits(self, grad_g: Tensor, sensor: Tensor, s_tilde: Tensor, n: int) -> Tensor:
        """dC/dPhi from dC/dg per hit: accumulate ``g (x) (s~1, s~2, 1)`` per sensor in the global
        frame, then rotate with R_G^T (per sensor, not per hit)."""
        gg = grad_g.reshape(-1, 3)  # (T*K, 3)
        st = s_tilde.reshape(-1, 2).to(gg.dtype)
        vals = torch.cat([gg * st[:, :1], gg * st[:, 1:], gg], 1)  # (T*K, 9): dA0, dA1, dc
        acc = torch.zeros(n, 9, dtype=gg.dtype).index_add_(0, sensor.reshape(-1), vals).to(torch.float64)
        acc = acc.reshape(n, 3, 3)  # (N, 3 [A0, A1, c], 3 xyz)
        loc = acc @ self.rot_geom  # (N, 3, 3): row i = R_G^T (d/d col i)
        dw = loc[:, :2, :].transpose(1, 2)  # (N, 3 outputs, 2 inputs)
        return torch.cat([dw.reshape(n, 6), loc[:, 2, :]], 1)
