"""Space-charge distortions and corrections of drifting electrons (first-order Langevin).

Conventions (see :mod:`streamcal.detectors.tpc.constants`): arrays ``[phi, r, z]``, electrons
drift towards the readout at ``z = L`` (+z). The nominal drift field therefore points along -z:
the total longitudinal field is ``Ez_tot = Ez - E0`` with ``E0 = E_DRIFT > 0`` and ``Ez`` the
space-charge field from :meth:`PoissonSolver.field`, so ``Ez_tot < 0`` and ``-e E`` pushes
electrons towards +z.

Local distortions (the displacement over one z step ``[z_j, z_{j+1}]``, stored at node ``j``;
zero at the readout node), from the first-order solution of the Langevin equation with the
magnetic field along z (Rossegger et al., NIM A 632 (2011) 95; the O2 ``SpaceCharge`` class):

    dr      = c0 int Er/Ez_tot dz + c1 int Ephi/Ez_tot dz
    r dphi  = c0 int Ephi/Ez_tot dz - c1 int Er/Ez_tot dz
    dz      = int (v(E)/v0 - 1) dz,     v(E)/v0 = |Ez_tot| / E0

with ``c0 = 1/(1 + (omega tau)^2)``, ``c1 = omega tau/(1 + (omega tau)^2)``. With
``Ez_tot = -E0`` a positive ``Er`` gives ``dr = -c0 Er/E0 dL < 0`` (electrons move against the
field) and ``r dphi = +c1 Er/E0 dL``; these c1 signs hold for B pointing along the nominal drift
field (-z here); pass ``c1=-C1`` for the opposite field polarity. The z distortion model: the
drift velocity is proportional to the field magnitude (constant mobility) and, to first order,
``|E| = |Ez_tot|``. Time-to-z conversion with the nominal velocity ``v0`` then places a point at
``z + dz``: an electron that drifts faster than nominal arrives early and appears closer to the
readout (``dz > 0``). Integrals use the trapezoid rule on the field at both ends of the step.

Global distortions (the bias of a point measured at the readout): the electron starting at a
node is followed plane by plane to the readout, the local distortions of each plane being
interpolated bilinearly in (phi, r) (periodic in phi, clamped at the field cages) at its current,
displaced position, and summed, the r dphi step being turned into an angle at the mid-step
radius ``r + dr/2`` (exact to second order for a uniform field) (``method="follow"``, cost
~nz^2/2 planes). ``method="recursive"``
uses the equivalent recursion ``D(x, z_j) = d(x, z_j) + D(x + d(x, z_j), z_{j+1})`` from the
readout back (cost ~nz planes); both agree to second order in the grid spacing.

Map convention (distortions and corrections alike): a map ``m`` with components
``(dr, drphi, dz)`` moves the point ``(phi, r, z)`` to
``(phi + drphi / r, r + dr, z + dz)`` where ``r`` is the radius of the point it is applied at
(:func:`apply_map`). Corrections are the inverse of the distortion map: for a measured
(distorted) point ``y`` the true point ``x`` solves ``x + D(x) = y``; it is found by the fixed-point
iteration ``x <- y - D(x)`` (with ``D`` trilinearly interpolated), a contraction when the
distortions vary by less than their own spacing (``|grad D| < 1``; ~0.2 at the inner field cage
for average maps with ~7 cm of dr), so the error shrinks by about that factor per iteration (9
iterations for such a map at 90x17x17); it stops when no point moves by more than ``tol``
(default 1e-5 cm = 0.1 um; the remaining error is about ``tol |grad D| / (1 - |grad D|)``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from streamcal.detectors.tpc.constants import C0, C1, E_DRIFT, Grid, parse_grid
from streamcal.detectors.tpc.poisson import PoissonSolver

__all__ = [
    "COMPONENTS",
    "Distortions",
    "local_distortions",
    "global_distortions",
    "global_corrections",
    "correct_points",
    "interpolate_map",
    "apply_map",
    "space_charge_distortions",
]

COMPONENTS: tuple[str, str, str] = ("dr", "drphi", "dz")
Method = Literal["follow", "recursive"]
_METHODS = ("follow", "recursive")


@dataclass(frozen=True)
class Distortions:
    """Ground-truth maps of one or a batch of density maps, in cm.

    Attributes:
        distortion: ``(..., 3, nphi, nr, nz)``, components :data:`COMPONENTS` (dr, drphi, dz):
            the shift of a point starting at each node as measured at the readout.
        correction: same shape, the shift that brings a point measured at each node back to its
            true position (the inverse map), or ``None`` when not computed.
    """

    distortion: torch.Tensor
    correction: torch.Tensor | None = None


def _check_map(m: torch.Tensor, grid: Grid, argument: str) -> None:
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{argument} must be a torch.Tensor, got {type(m).__name__}")
    if m.ndim < 4 or tuple(m.shape[-4:]) != (3, *grid.shape):
        raise ValueError(
            f"{argument} must have shape (..., 3, nphi, nr, nz) = (..., 3, {grid.nphi}, {grid.nr}, "
            f"{grid.nz}) for grid {grid}, got {tuple(m.shape)}"
        )
    if not m.is_floating_point():
        raise ValueError(f"{argument} must be float32 or float64, got {m.dtype}")


def _as_field(x: torch.Tensor | np.ndarray, grid: Grid, argument: str) -> torch.Tensor:
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if not t.is_floating_point():
        raise ValueError(f"{argument} must be a float32 or float64 array, got {t.dtype}")
    if t.ndim < 3 or tuple(t.shape[-3:]) != grid.shape:
        raise ValueError(
            f"{argument} must have shape (..., nphi, nr, nz) = (..., {grid.nphi}, {grid.nr}, "
            f"{grid.nz}) for grid {grid}, got {tuple(t.shape)}"
        )
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{argument} contains non-finite values (NaN or inf)")
    return t


def local_distortions(
    er: torch.Tensor | np.ndarray,
    ephi: torch.Tensor | np.ndarray,
    ez: torch.Tensor | np.ndarray,
    grid: Grid | str | tuple[int, int, int],
    *,
    c0: float = C0,
    c1: float = C1,
    e_drift: float = E_DRIFT,
) -> torch.Tensor:
    """Local distortions over each z step (module docstring formulas), shape ``(..., 3, nphi, nr, nz)``.

    Args:
        er, ephi, ez: the space-charge field (V/cm), each ``(..., nphi, nr, nz)``; the nominal
            drift field ``-e_drift`` is added to ``ez`` here.
        grid: the grid of the field.
        c0, c1: Langevin coefficients ``1/(1+(wt)^2)`` and ``wt/(1+(wt)^2)``.
        e_drift: nominal drift field magnitude (V/cm), > 0.

    Returns:
        ``(dr, r dphi, dz)`` in cm for the step from ``z_j`` to ``z_{j+1}``, stored at ``j``;
        zero on the last (readout) plane.
    """
    g = parse_grid(grid, argument="grid")
    if not (isinstance(e_drift, (int, float)) and math.isfinite(e_drift) and e_drift > 0):
        raise ValueError(f"e_drift must be a finite field magnitude > 0 V/cm, got {e_drift!r}")
    for name, c in (("c0", c0), ("c1", c1)):
        if not (isinstance(c, (int, float)) and math.isfinite(c)):
            raise ValueError(f"{name} must be a finite number, got {c!r}")
    er_t = _as_field(er, g, "er")
    ephi_t = _as_field(ephi, g, "ephi").to(er_t)
    ez_t = _as_field(ez, g, "ez").to(er_t)
    if not (er_t.shape == ephi_t.shape == ez_t.shape):
        raise ValueError(
            f"er, ephi and ez must have the same shape, got {tuple(er_t.shape)}, "
            f"{tuple(ephi_t.shape)}, {tuple(ez_t.shape)}"
        )
    ez_tot = ez_t - e_drift
    if bool((ez_tot >= 0).any()):
        raise ValueError(
            f"ez: the space-charge field reaches the nominal drift field ({e_drift} V/cm) "
            "somewhere; the first-order Langevin solution does not apply (check the units: the "
            "density is rho/eps0 in V/cm^2, ~0.7 V/cm^2 at the inner field cage at 50 kHz Pb-Pb; "
            "fields in V/cm)"
        )
    half = 0.5 * g.dz
    out = er_t.new_zeros(er_t.shape[:-3] + (3,) + g.shape)  # (..., 3, nphi, nr, nz)

    def integral(f: torch.Tensor) -> torch.Tensor:  # trapezoid over [z_j, z_{j+1}], (..., nz-1)
        return half * (f[..., :-1] + f[..., 1:])

    int_r = integral(er_t / ez_tot)
    int_phi = integral(ephi_t / ez_tot)
    out[..., 0, :, :, :-1] = c0 * int_r + c1 * int_phi
    out[..., 1, :, :, :-1] = c0 * int_phi - c1 * int_r
    out[..., 2, :, :, :-1] = integral(ez_tot.abs() / e_drift - 1.0)
    return out


# -- interpolation ---------------------------------------------------------------------------
def _wrap_phi(m: torch.Tensor) -> torch.Tensor:
    """Append the phi = 0 plane at phi = 2 pi along axis -1 (for periodic interpolation)."""
    return torch.cat([m, m[..., :1]], dim=-1)


def _norm(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return (x - lo) * (2.0 / (hi - lo)) - 1.0


def _phi_norm(phi: torch.Tensor) -> torch.Tensor:
    return torch.remainder(phi, 2.0 * math.pi) * (1.0 / math.pi) - 1.0


def _sample_volume(vol: torch.Tensor, grid: Grid, phi: torch.Tensor, r: torch.Tensor,
                   z: torch.Tensor) -> torch.Tensor:
    """Trilinear samples of ``vol`` (B, C, nz, nr, nphi+1) at points (B, N): returns (B, C, N)."""
    coords = torch.stack(
        [_phi_norm(phi), _norm(r, grid.r_min, grid.r_max), _norm(z, 0.0, grid.length)], dim=-1
    )  # (B, N, 3) as (x=phi, y=r, z=z)
    out = F.grid_sample(vol, coords[:, None, None], mode="bilinear", padding_mode="border",
                        align_corners=True)  # (B, C, 1, 1, N)
    return out[:, :, 0, 0]


def _volume(m: torch.Tensor) -> torch.Tensor:
    """(B, C, nphi, nr, nz) -> (B, C, nz, nr, nphi+1), the layout of ``grid_sample``."""
    return _wrap_phi(m.permute(0, 1, 4, 3, 2)).contiguous()


def interpolate_map(
    m: torch.Tensor, grid: Grid | str | tuple[int, int, int], phi: torch.Tensor,
    r: torch.Tensor, z: torch.Tensor,
) -> torch.Tensor:
    """Trilinear interpolation of a map ``(..., C, nphi, nr, nz)`` at points ``(..., N)``.

    Periodic in phi; r and z are clamped to the grid (constant extrapolation). ``phi``, ``r``,
    ``z`` share the leading dims of ``m``. Returns ``(..., C, N)``.
    """
    g = parse_grid(grid, argument="grid")
    if m.ndim < 4 or tuple(m.shape[-3:]) != g.shape:
        raise ValueError(f"m must have shape (..., C, {g.nphi}, {g.nr}, {g.nz}), got {tuple(m.shape)}")
    lead = m.shape[:-4]
    pts = torch.broadcast_tensors(phi, r, z)
    if pts[0].shape[:-1] != lead:
        raise ValueError(
            f"phi, r, z must have shape (*{tuple(lead)}, N) matching the leading dims of m, "
            f"got {tuple(pts[0].shape)}"
        )
    phi_, r_, z_ = (p.to(m).reshape(-1, p.shape[-1]) for p in pts)  # (B, N)
    vol = _volume(m.reshape(-1, *m.shape[-4:]))
    return _sample_volume(vol, g, phi_, r_, z_).reshape(*lead, m.shape[-4], -1)


def apply_map(
    m: torch.Tensor, grid: Grid | str | tuple[int, int, int], phi: torch.Tensor,
    r: torch.Tensor, z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Move points by a distortion or correction map ``(..., 3, nphi, nr, nz)``.

    ``(phi, r, z) -> (phi + drphi / r, r + dr, z + dz)`` with the map interpolated trilinearly at
    the points (shape ``(..., N)``). Returns the new ``(phi, r, z)``; phi is not wrapped.
    """
    g = parse_grid(grid, argument="grid")
    _check_map(m, g, "m")
    d = interpolate_map(m, g, phi, r, z)  # (..., 3, N)
    return phi + d[..., 1, :] / r, r + d[..., 0, :], z + d[..., 2, :]


# -- global distortions ----------------------------------------------------------------------
def global_distortions(
    local: torch.Tensor, grid: Grid | str | tuple[int, int, int], *, method: Method = "follow"
) -> torch.Tensor:
    """Global distortions ``(..., 3, nphi, nr, nz)`` from :func:`local_distortions`.

    The electron starting at each node drifts plane by plane to the readout; at each plane the
    local distortion is interpolated at its displaced (phi, r) and added (module docstring).
    ``drphi`` is ``r0 * (phi_readout - phi0)`` with ``r0`` the starting radius.

    Args:
        local: local distortions ``(..., 3, nphi, nr, nz)`` in cm.
        grid: their grid.
        method: ``"follow"`` (every electron followed, ~nz^2/2 plane interpolations) or
            ``"recursive"`` (``D_j(x) = d_j(x) + D_{j+1}(x + d_j(x))``, ~nz).
    """
    g = parse_grid(grid, argument="grid")
    _check_map(local, g, "local")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    lead = local.shape[:-4]
    loc = local.reshape(-1, 3, *g.shape)  # (B, 3, nphi, nr, nz)
    nb = loc.shape[0]
    kw = {"dtype": loc.dtype, "device": loc.device}
    r_nodes = torch.as_tensor(g.r, **kw)
    phi_nodes = torch.as_tensor(g.phi, **kw)
    # Local maps per z plane in grid_sample's 2D layout: (nz, B, 3, nr, nphi+1), (H, W) = (r, phi).
    planes = _wrap_phi(loc.permute(4, 0, 1, 3, 2)).contiguous()
    out = loc.new_zeros(nb, 3, g.nphi, g.nr, g.nz)  # (B, 3, nphi, nr, nz); 0 at the readout
    phi0 = phi_nodes[:, None].expand(g.nphi, g.nr)  # (nphi, nr)
    r0 = r_nodes[None, :].expand(g.nphi, g.nr)

    def sample(plane: torch.Tensor, phi: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        # plane (B, 3, nr, nphi+1), points (B, N) -> (B, 3, N)
        coords = torch.stack([_phi_norm(phi), _norm(r, g.r_min, g.r_max)], dim=-1)  # (B, N, 2)
        s = F.grid_sample(plane, coords[:, None], mode="bilinear", padding_mode="border",
                          align_corners=True)  # (B, 3, 1, N)
        return s[:, :, 0]

    if method == "follow":
        # Displacements (dphi, dr, dz) of the electrons started on planes 0..nz-2,
        # (B, 3, nz-1, nphi*nr); those started on planes 0..j are all on plane j at step j (a
        # contiguous prefix along axis 2). Accumulating the displacement rather than the position
        # keeps float32 at its relative precision on it (an azimuth near 2 pi resolves 4.8e-7 rad).
        phi_start = phi0.reshape(1, 1, -1)  # (1, 1, nphi*nr)
        r_start = r0.reshape(1, 1, -1)
        acc = loc.new_zeros(nb, 3, g.nz - 1, g.nphi * g.nr)
        for j in range(g.nz - 1):
            n = j + 1
            a = acc[:, :, :n]  # (B, 3, n, nphi*nr), a view
            q = r_start + a[:, 1]  # current radius
            d = sample(planes[j], (phi_start + a[:, 0]).reshape(nb, -1), q.reshape(nb, -1)).view(nb, 3, n, -1)
            a[:, 0] += d[:, 1] / (q + 0.5 * d[:, 0])  # r dphi -> dphi at the mid-step radius
            a[:, 1] += d[:, 0]
            a[:, 2] += d[:, 2]
        # (B, 3, nz-1, nphi*nr) -> (B, 3, nphi, nr, nz-1)
        dist = torch.stack([acc[:, 1], acc[:, 0] * r_start, acc[:, 2]], dim=1)
        out[..., :-1] = dist.view(nb, 3, g.nz - 1, g.nphi, g.nr).permute(0, 1, 3, 4, 2)
        return out.reshape(*lead, 3, *g.shape)

    # recursive: D_j(x) = d_j(x) + D_{j+1}(x'), x' = (phi + d_rphi / r_mid, r + d_r) on plane j+1,
    # r_mid = r + d_r / 2; the r phi component is r0 * dphi, so the part from plane j+1 is scaled
    # by r0 / r'.
    acc = loc.new_zeros(nb, 3, g.nr, g.nphi + 1)  # D on the readout plane, grid_sample layout
    for j in range(g.nz - 2, -1, -1):
        d = planes[j][..., :-1].permute(0, 1, 3, 2)  # (B, 3, nphi, nr)
        q = r0 + d[:, 0]  # displaced positions on plane j+1, (B, nphi, nr)
        dphi = d[:, 1] / (r0 + 0.5 * d[:, 0])
        s = sample(acc, (phi0 + dphi).reshape(nb, -1), q.reshape(nb, -1)).view(nb, 3, g.nphi, g.nr)
        dn = torch.stack([d[:, 0] + s[:, 0], r0 * dphi + s[:, 1] * (r0 / q), d[:, 2] + s[:, 2]], 1)
        out[..., j] = dn
        acc = _wrap_phi(dn.permute(0, 1, 3, 2)).contiguous()
    return out.reshape(*lead, 3, *g.shape)


def _invert(
    vol: torch.Tensor, grid: Grid, phi_y: torch.Tensor, r_y: torch.Tensor, z_y: torch.Tensor,
    tol: float, max_iter: int,
) -> torch.Tensor:
    """Solve ``apply_map(D, x) = y`` by ``x <- y - D(x)``; ``vol`` is D (dr, drphi, dz) in the
    layout (B, 3, nz, nr, nphi+1), the points are (B, N). Returns the shift ``x - y`` as
    (B, N, 3) in (dphi, dr, dz).

    The iteration runs on the shift ``c = x - y`` (``c <- -D(y + c)``), not on the position: a
    float32 azimuth near 2 pi resolves only 4.8e-7 rad (1.2e-4 cm at the outer field cage), which
    would bound both the convergence test and ``x_phi - y_phi``; the shift keeps ~1e-7 relative."""
    y = torch.stack([phi_y, r_y, z_y], dim=-1)  # (B, N, 3) as (phi, r, z), grid_sample's order
    vol = vol[:, [1, 0, 2]]  # channels in the same order: (drphi, dr, dz)
    kw = {"dtype": y.dtype, "device": y.device}
    lo = torch.tensor([0.0, grid.r_min, 0.0], **kw)
    scale = torch.tensor([1.0 / math.pi, 2.0 / (grid.r_max - grid.r_min), 2.0 / grid.length], **kw)
    c = torch.zeros_like(y)  # the shift x - y, (B, N, 3)
    step = torch.zeros(())
    for _ in range(max_iter):
        x = y + c
        u = (x - lo) * scale - 1.0  # grid_sample coordinates in [-1, 1], (B, N, 3)
        u[..., 0] = torch.remainder(x[..., 0], 2.0 * math.pi) * (1.0 / math.pi) - 1.0
        d = F.grid_sample(vol, u[:, None, None], mode="bilinear", padding_mode="border",
                          align_corners=True)[:, :, 0, 0].transpose(1, 2)  # (B, N, 3)
        d[..., 0] /= x[..., 1]  # r dphi -> dphi at the point
        new = -d
        moved = (new - c).abs()
        moved[..., 0] *= r_y  # dphi -> r dphi
        step = moved.amax()
        c = new
        if float(step) <= tol:
            return c
    raise RuntimeError(
        f"corrections did not converge: last fixed-point step {float(step):.3g} cm > tol={tol} "
        f"after max_iter={max_iter} iterations (is the distortion map a contraction?)"
    )


def _check_iteration(tol: float | None, max_iter: int, dtype: torch.dtype) -> float:
    """Validate the iteration settings; returns ``tol`` with its default for ``dtype``."""
    if tol is None:
        return 1e-5 if dtype == torch.float64 else 1e-4
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive length in cm, got {tol!r}")
    if not (isinstance(max_iter, int) and max_iter >= 1):
        raise ValueError(f"max_iter must be an integer >= 1, got {max_iter!r}")
    return float(tol)


def global_corrections(
    distortion: torch.Tensor, grid: Grid | str | tuple[int, int, int], *, tol: float | None = None,
    max_iter: int = 100,
) -> torch.Tensor:
    """Corrections ``(..., 3, nphi, nr, nz)``: the inverse of the distortion map at every node.

    For the measured point ``y`` at each node, the true point ``x`` with ``x + D(x) = y`` is found
    by the fixed-point iteration ``x <- y - D(x)`` (``D`` interpolated trilinearly at ``x`` and
    applied as in :func:`apply_map`, ``dphi = drphi / x_r``), started at ``x = y``, until no point moves by more
    than ``tol`` cm (r dphi for phi; default 1e-5 cm = 0.1 um in float64, 1e-4 cm in float32,
    whose positions resolve ~2e-5 cm); the correction is
    ``(x_r - y_r, (x_phi - y_phi) y_r, x_z - y_z)``, iterated as the shift ``x - y`` itself so that
    float32 keeps its relative precision on it. Nodes that no electron reaches (next to a
    field cage the distortions point away from) get the inverse of the distortion map extended
    by its boundary values.

    Raises:
        RuntimeError: when the iteration has not converged after ``max_iter`` iterations (the
            map is then not a contraction, i.e. not invertible this way).
    """
    g = parse_grid(grid, argument="grid")
    _check_map(distortion, g, "distortion")
    tol = _check_iteration(tol, max_iter, distortion.dtype)
    lead = distortion.shape[:-4]
    dist = distortion.reshape(-1, 3, *g.shape)  # (B, 3, nphi, nr, nz)
    nb = dist.shape[0]
    kw = {"dtype": dist.dtype, "device": dist.device}
    phi_y, r_y, z_y = (torch.as_tensor(a, **kw).reshape(1, -1).expand(nb, -1) for a in g.mesh())
    shift = _invert(_volume(dist), g, phi_y, r_y, z_y, tol, max_iter)  # (B, N, 3): dphi, dr, dz
    corr = torch.stack([shift[..., 1], shift[..., 0] * r_y, shift[..., 2]], dim=1)  # (B, 3, N)
    return corr.reshape(*lead, 3, *g.shape)


def correct_points(
    distortion: torch.Tensor, grid: Grid | str | tuple[int, int, int], phi: torch.Tensor,
    r: torch.Tensor, z: torch.Tensor, *, tol: float | None = None, max_iter: int = 100,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """True positions of measured points ``(phi, r, z)`` (each ``(..., N)``, leading dims those of
    ``distortion``): the exact inverse of :func:`apply_map` with ``distortion`` at any point, by the
    fixed-point iteration of :func:`global_corrections` (no interpolation of a correction map)."""
    g = parse_grid(grid, argument="grid")
    _check_map(distortion, g, "distortion")
    tol = _check_iteration(tol, max_iter, distortion.dtype)
    lead = distortion.shape[:-4]
    pts = torch.broadcast_tensors(phi, r, z)
    if pts[0].shape[:-1] != lead:
        raise ValueError(
            f"phi, r, z must have shape (*{tuple(lead)}, N) matching the leading dims of "
            f"distortion, got {tuple(pts[0].shape)}"
        )
    shape = pts[0].shape
    phi_y, r_y, z_y = (p.to(distortion).reshape(-1, shape[-1]) for p in pts)  # (B, N)
    vol = _volume(distortion.reshape(-1, 3, *g.shape))
    shift = _invert(vol, g, phi_y, r_y, z_y, tol, max_iter)  # (B, N, 3): dphi, dr, dz
    x = (phi_y + shift[..., 0], r_y + shift[..., 1], z_y + shift[..., 2])
    return x[0].reshape(shape), x[1].reshape(shape), x[2].reshape(shape)


_SOLVERS: dict[tuple[Grid, torch.dtype, str], PoissonSolver] = {}


def _solver(grid: Grid, dtype: torch.dtype, device: torch.device) -> PoissonSolver:
    key = (grid, dtype, str(device))
    if key not in _SOLVERS:
        if len(_SOLVERS) >= 8:
            _SOLVERS.pop(next(iter(_SOLVERS)))
        _SOLVERS[key] = PoissonSolver(grid, dtype=dtype, device=device)
    return _SOLVERS[key]


def space_charge_distortions(
    rho: torch.Tensor | np.ndarray,
    grid: Grid | str | tuple[int, int, int],
    *,
    solver: PoissonSolver | None = None,
    corrections: bool = True,
    c0: float = C0,
    c1: float = C1,
    e_drift: float = E_DRIFT,
    method: Method = "follow",
    tol: float | None = None,
    max_iter: int = 100,
) -> Distortions:
    """The whole ground truth for density maps ``rho`` = rho/eps0 (V/cm^2), ``(..., nphi, nr, nz)``:
    Poisson solve, field, local and global distortions, corrections.

    Args:
        rho: density, a tensor (its device and float dtype are kept; other dtypes -> float64) or
            a numpy array (float64 on CPU). Ignored when ``solver`` is given: then the solver's
            dtype and device are used.
        grid: the grid of ``rho``.
        solver: a :class:`PoissonSolver` for ``grid`` to reuse (one is cached per grid, dtype,
            device otherwise).
        corrections: also compute the inverse map (:func:`global_corrections`).
        c0, c1, e_drift: see :func:`local_distortions`.
        method: see :func:`global_distortions`.
        tol, max_iter: see :func:`global_corrections`.

    Returns:
        :class:`Distortions` with ``distortion`` and ``correction`` (``None`` unless
        ``corrections``), each ``(..., 3, nphi, nr, nz)`` in cm.
    """
    g = parse_grid(grid, argument="grid")
    if solver is None:
        if isinstance(rho, torch.Tensor):
            dtype = rho.dtype if rho.dtype in (torch.float32, torch.float64) else torch.float64
            solver = _solver(g, dtype, rho.device)
        else:
            solver = _solver(g, torch.float64, torch.device("cpu"))
    elif not isinstance(solver, PoissonSolver):
        raise ValueError(f"solver must be a PoissonSolver or None, got {type(solver).__name__}")
    elif solver.grid != g:
        raise ValueError(f"solver is for grid {solver.grid}, but grid is {g}")
    v = solver.solve(rho)
    er, ephi, ez = solver.field(v)
    local = local_distortions(er, ephi, ez, g, c0=c0, c1=c1, e_drift=e_drift)
    dist = global_distortions(local, g, method=method)
    corr = global_corrections(dist, g, tol=tol, max_iter=max_iter) if corrections else None
    return Distortions(distortion=dist, correction=corr)
