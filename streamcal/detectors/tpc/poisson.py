"""Fast direct Poisson solver for one TPC side (hollow cylinder, zero Dirichlet boundaries).

Solves the second-order finite-difference discretisation of

    laplace(V) = d2V/dr2 + (1/r) dV/dr + (1/r^2) d2V/dphi2 + d2V/dz2 = -rho/eps0

on the grid of :class:`~streamcal.detectors.tpc.constants.Grid` (arrays indexed ``[phi, r, z]``),
with ``V = 0`` on the inner and outer field cages (``r = r_min, r_max``), the central electrode
(``z = 0``) and the readout (``z = L``), periodic in phi. The input ``rho`` is rho/eps0 in
V/cm^2, the output ``V`` is in V.

Discretisation (the standard 7-point stencil; ``h = dr``, ``i`` the r index):

* r:   ``(V[i+1] - 2 V[i] + V[i-1]) / h^2 + (V[i+1] - V[i-1]) / (2 h r_i)``
  (identical to the conservative form ``(r_{i+1/2} (V[i+1]-V[i]) - r_{i-1/2} (V[i]-V[i-1])) / (r_i h^2)``);
* phi: ``(V[k+1] - 2 V[k] + V[k-1]) / (r_i^2 dphi^2)``, periodic;
* z:   ``(V[j+1] - 2 V[j] + V[j-1]) / dz^2``.

Direct solution by separation of variables (exact for the discrete system, up to rounding):

1. phi: real FFT. Mode ``m`` of the periodic second difference has eigenvalue
   ``-lambda_m / r^2`` with ``lambda_m = 4 sin^2(m dphi / 2) / dphi^2``.
2. z: discrete sine transform DST-I over the ``nz - 2`` interior nodes (it diagonalises the
   second difference with zero end values). Mode ``n = 1..nz-2`` has eigenvalue
   ``-mu_n``, ``mu_n = 4 sin^2(n pi / (2 (nz - 1))) / dz^2``.
3. r: for each (m, n) a tridiagonal system over the ``nr - 2`` interior radii,
   ``a_i V[i-1] + (-2/h^2 - lambda_m / r_i^2 - mu_n) V[i] + c_i V[i+1] = -rho_i``,
   ``a_i = 1/h^2 - 1/(2 h r_i)``, ``c_i = 1/h^2 + 1/(2 h r_i)``. Two equivalent solvers:

   * ``"thomas"``: the Thomas algorithm with the LU factors of every (m, n) system precomputed
     (the systems are strictly diagonally dominant, so no pivoting is needed); a loop of
     ``2 (nr - 2)`` vectorised steps. Fastest on CPU.
   * ``"eig"``: matrix diagonalisation. The r operator of mode m is ``A_m = D^-1 T_m`` with
     ``D = diag(r_i)`` and ``T_m`` symmetric tridiagonal, so
     ``A_m = D^-1/2 Q_m diag(nu_m) Q_m^T D^1/2`` with ``Q_m`` orthogonal (``eigh`` of
     ``D^-1/2 T_m D^-1/2``) and ``V = D^-1/2 Q_m (Q_m^T D^1/2 (-rho)) / (nu_m - mu_n)``: two
     batched matrix products, a handful of kernels in all. Fastest on GPUs.

The field ``E = -grad V`` uses second-order central differences inside, second-order one-sided
differences on the r and z boundary nodes and periodic differences in phi,
``E_phi = -(1/r) dV/dphi``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from streamcal.detectors.tpc.constants import STANDARD_GRIDS, Grid, parse_grid

if TYPE_CHECKING:
    import scipy.sparse

__all__ = [
    "PoissonSolver",
    "solve_poisson",
    "laplacian_matrix",
    "closed_form_solution",
    "solver_check",
]

RMethod = Literal["auto", "thomas", "eig"]
_R_METHODS = ("auto", "thomas", "eig")


def _as_dtype(dtype: torch.dtype | str, *, argument: str = "dtype") -> torch.dtype:
    allowed = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, str):
        if dtype not in allowed:
            raise ValueError(f"{argument} must be one of {sorted(allowed)}, got {dtype!r}")
        return allowed[dtype]
    if dtype not in (torch.float32, torch.float64):
        raise ValueError(f"{argument} must be torch.float32 or torch.float64, got {dtype!r}")
    return dtype


def _check_shape(x: torch.Tensor, grid: Grid, argument: str) -> None:
    if x.ndim < 3 or tuple(x.shape[-3:]) != grid.shape:
        raise ValueError(
            f"{argument} must have shape (..., nphi, nr, nz) = (..., {grid.nphi}, {grid.nr}, "
            f"{grid.nz}) for grid {grid}, got {tuple(x.shape)}"
        )


def _to_tensor(
    x: torch.Tensor | np.ndarray, grid: Grid, *, argument: str, dtype: torch.dtype,
    device: torch.device, check_finite: bool,
) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(np.asarray(x))
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{argument} must be a real floating-point array, got dtype {x.dtype}")
    _check_shape(x, grid, argument)
    x = x.to(device=device, dtype=dtype)
    if check_finite and not bool(torch.isfinite(x).all()):
        raise ValueError(f"{argument} contains non-finite values (NaN or inf)")
    return x


class PoissonSolver:
    """Direct solver of ``laplace(V) = -rho/eps0`` on ``grid`` (see the module docstring).

    Everything that depends only on the grid (eigenvalues, transforms, LU factors or
    eigenvectors of the radial systems) is computed once here, in float64, then cast.

    Args:
        grid: the (phi x r x z) grid, a :class:`Grid` or ``"180x33x33"``.
        dtype: ``torch.float64`` (default) or ``torch.float32`` (or their names).
        device: torch device (``"cpu"``, ``"cuda"``, ...).
        r_method: radial solve, ``"thomas"``, ``"eig"`` or ``"auto"`` (thomas on CPU, eig
            elsewhere). ``scripts/bench_tpc_solver.py`` times both: on a 2-core CPU thomas is
            faster from 180x65x65 up (up to ~2x at 180x129x129), on par at 180x33x33, and eig is
            ~0.1 ms faster at 90x17x17 (0.2-0.3 ms against 0.35-0.4 ms).
    """

    def __init__(
        self,
        grid: Grid | str | tuple[int, int, int],
        *,
        dtype: torch.dtype | str = torch.float64,
        device: torch.device | str = "cpu",
        r_method: RMethod = "auto",
    ) -> None:
        self.grid = parse_grid(grid, argument="grid")
        self.dtype = _as_dtype(dtype)
        self.device = torch.device(device)
        if r_method not in _R_METHODS:
            raise ValueError(f"r_method must be one of {_R_METHODS}, got {r_method!r}")
        on_cpu = self.device.type == "cpu"
        self.r_method: str = ("thomas" if on_cpu else "eig") if r_method == "auto" else r_method

        g = self.grid
        nm = g.nphi // 2 + 1  # number of real-FFT modes in phi
        nri, nzi = g.nr - 2, g.nz - 2  # interior unknowns in r and z
        h = g.dr
        r_int = g.r[1:-1]  # (nri,)
        m = np.arange(nm)
        lam = 4.0 * np.sin(0.5 * m * g.dphi) ** 2 / g.dphi**2  # (nm,)
        n = np.arange(1, nzi + 1)
        mu = 4.0 * np.sin(0.5 * math.pi * n / (g.nz - 1)) ** 2 / g.dz**2  # (nzi,)
        lower = 1.0 / h**2 - 1.0 / (2.0 * h * r_int)  # a_i, (nri,)
        upper = 1.0 / h**2 + 1.0 / (2.0 * h * r_int)  # c_i, (nri,)
        kw: dict[str, Any] = {"dtype": self.dtype, "device": self.device}

        # DST-I as matrix products over all nz nodes, so that no slicing copy is needed: the
        # forward matrix has zero rows for the two z boundary nodes (their rho is ignored), the
        # inverse one zero columns (V = 0 there). S_jk = sin(pi j k / (nz-1)) and S^-1 = 2/(nz-1) S.
        sine = np.sin(math.pi * np.outer(n, n) / (g.nz - 1))  # (nzi, nzi)
        fwd_z = np.zeros((g.nz, nzi))
        fwd_z[1:-1] = sine
        inv_z = np.zeros((nzi, g.nz))
        # The right-hand side of the mode equations is -rho: the sign goes in here too.
        inv_z[:, 1:-1] = -2.0 / (g.nz - 1) * sine
        self._fwd_z = torch.as_tensor(fwd_z, **kw)  # (nz, nzi)
        self._inv_z = torch.as_tensor(inv_z, **kw)  # (nzi, nz)
        self._fwd_z_t = self._fwd_z.T.contiguous()  # (nzi, nz)
        self._inv_z_t = self._inv_z.T.contiguous()  # (nz, nzi)

        if self.r_method == "thomas":
            # Diagonal of mode (m, n) at radius i: b = -2/h^2 - lam_m / r_i^2 - mu_n.
            diag = (
                -2.0 / h**2
                - lam[:, None, None] / r_int[None, None, :] ** 2
                - mu[None, :, None]
            )  # (nm, nzi, nri)
            w = np.empty_like(diag)  # 1 / pivot
            cp = np.empty_like(diag)  # modified upper coefficient c'_i
            w[..., 0] = 1.0 / diag[..., 0]
            cp[..., 0] = upper[0] * w[..., 0]
            for i in range(1, nri):
                w[..., i] = 1.0 / (diag[..., i] - lower[i] * cp[..., i - 1])
                cp[..., i] = upper[i] * w[..., i]
            # Laid out (nri, nzi, nm, 2) like one radius of the data (B, nr, nzi, nm, re/im),
            # duplicated over (real, imag): a broadcast trailing axis of 1 is several times slower.
            w, cp = (np.repeat(a.transpose(2, 1, 0)[..., None], 2, -1) for a in (w, cp))
            self._w = torch.as_tensor(w, **kw)  # (nri, nzi, nm, 2)
            self._cp = torch.as_tensor(cp, **kw)  # (nri, nzi, nm, 2)
            self._lower = [float(x) for x in lower]
        else:
            sq = np.sqrt(r_int)
            fwd = np.zeros((nm, nri, g.nr))  # zero columns: rho on the r boundaries is ignored
            bwd = np.zeros((nm, g.nr, nri))  # zero rows: V = 0 on the r boundaries
            inv = np.empty((nm, nri, nzi))
            off = (r_int[:-1] + 0.5 * h) / h**2 / (sq[:-1] * sq[1:])  # r_{i+1/2}/h^2, symmetrised
            for k in range(nm):
                # B = D^-1/2 T D^-1/2 with T = D A (symmetric): diagonal -2/h^2 - lam/r^2.
                b = np.diag(-2.0 / h**2 - lam[k] / r_int**2) + np.diag(off, 1) + np.diag(off, -1)
                nu, q = np.linalg.eigh(b)
                fwd[k, :, 1:-1] = q.T * sq[None, :]  # Q^T D^1/2
                bwd[k, 1:-1, :] = q / sq[:, None]  # D^-1/2 Q
                # (A - mu) V = -rho  =>  V_hat = -rho_hat / (nu - mu); the sign is in inv_z.
                inv[k] = 1.0 / (nu[:, None] - mu[None, :])
            self._fwd = torch.as_tensor(fwd, **kw)  # (nm, nri, nr)
            self._bwd = torch.as_tensor(bwd, **kw)  # (nm, nr, nri)
            self._inv = torch.as_tensor(np.repeat(inv[..., None], 2, -1), **kw)  # (nm, nri, nzi, 2)
        r = torch.as_tensor(g.r, **kw)
        self._inv_r = (1.0 / r)[:, None]  # (nr, 1) for E_phi

    def __repr__(self) -> str:
        return (
            f"PoissonSolver(grid={self.grid}, dtype={self.dtype}, device={self.device}, "
            f"r_method={self.r_method!r})"
        )

    # -- solve ----------------------------------------------------------------------------
    def solve(self, rho: torch.Tensor | np.ndarray, *, check_finite: bool = True) -> torch.Tensor:
        """Potential ``V`` (V) for the density ``rho`` = rho/eps0 (V/cm^2).

        Args:
            rho: shape ``(..., nphi, nr, nz)``; values on the r and z boundary nodes are ignored.
            check_finite: reject NaN/inf in ``rho`` (one reduction; switch off in tight loops).

        Returns:
            ``V`` of shape ``(..., nphi, nr, nz)``, the solver's dtype and device, zero on the
            r and z boundary nodes.
        """
        g = self.grid
        x = _to_tensor(rho, g, argument="rho", dtype=self.dtype, device=self.device,
                       check_finite=check_finite)
        batch = x.shape[:-3]
        nm, nri, nzi = g.nphi // 2 + 1, g.nr - 2, g.nz - 2
        x = x.reshape(-1, g.nphi, g.nr, g.nz)  # (B, nphi, nr, nz)
        if self.r_method == "eig":
            f = (x.reshape(-1, g.nz) @ self._fwd_z).view(-1, g.nphi, g.nr, nzi)  # z sine modes
            fh = torch.fft.rfft(f, dim=1).contiguous()  # phi modes, complex (B, nm, nr, nzi)
            fr = torch.view_as_real(fh).view(-1, nm, g.nr, 2 * nzi)  # (B, nm, nr, nzi*2)
            u = torch.matmul(self._fwd, fr).view(-1, nm, nri, nzi, 2) * self._inv
            v = torch.matmul(self._bwd, u.view(-1, nm, nri, 2 * nzi))  # (B, nm, nr, nzi*2)
            vh = torch.view_as_complex(v.view(-1, nm, g.nr, nzi, 2))  # (B, nm, nr, nzi)
            v = torch.fft.irfft(vh, n=g.nphi, dim=1)  # (B, nphi, nr, nzi)
            out = v.reshape(-1, nzi) @ self._inv_z  # back to z nodes, zero on z = 0 and z = L
        else:
            # Phi modes first, laid out with one radius per contiguous slab (the layout the CPU
            # FFT returns, so usually without a copy), then the z sine modes as a batched product.
            xh = torch.fft.rfft(x, dim=1).permute(0, 2, 3, 1).contiguous()  # (B, nr, nz, nm)
            xr = torch.view_as_real(xh).view(-1, g.nr, g.nz, 2 * nm)  # (B, nr, nz, nm*2)
            d = torch.matmul(self._fwd_z_t, xr).view(-1, g.nr, nzi, nm, 2)  # solved in place
            d[:, 0] = 0.0  # V = 0 on the field cages
            d[:, -1] = 0.0
            w, cp, low = self._w, self._cp, self._lower
            d[:, 1].mul_(w[0])
            for i in range(1, nri):  # forward elimination: d'_i = (d_i - a_i d'_{i-1}) w_i
                d[:, i + 1].sub_(d[:, i], alpha=low[i]).mul_(w[i])
            for i in range(nri - 2, -1, -1):  # back substitution: x_i = d'_i - c'_i x_{i+1}
                d[:, i + 1].addcmul_(d[:, i + 2], cp[i], value=-1.0)
            # z modes -> z nodes on the phi modes (the two transforms commute).
            vz = torch.matmul(self._inv_z_t, d.view(-1, g.nr, nzi, 2 * nm))  # (B, nr, nz, nm*2)
            vh = torch.view_as_complex(vz.view(-1, g.nr, g.nz, nm, 2))  # (B, nr, nz, nm)
            v = torch.fft.irfft(vh, n=g.nphi, dim=-1)  # (B, nr, nz, nphi)
            out = v.permute(0, 3, 1, 2)  # (B, nphi, nr, nz)
        return out.reshape(*batch, g.nphi, g.nr, g.nz).contiguous()

    __call__ = solve

    # -- field ----------------------------------------------------------------------------
    def field(self, V: torch.Tensor | np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Electric field ``E = -grad V`` (V/cm) as ``(Er, Ephi, Ez)``, each ``(..., nphi, nr, nz)``.

        Second-order central differences inside; second-order one-sided differences
        ``(-3 V0 + 4 V1 - V2) / (2 h)`` on the r and z boundary nodes; periodic central
        differences in phi with ``Ephi = -(1/r) dV/dphi``.
        """
        g = self.grid
        v = _to_tensor(V, g, argument="V", dtype=self.dtype, device=self.device, check_finite=False)
        return (
            -_derivative(v, g.dr, dim=-2),
            -(torch.roll(v, -1, dims=-3) - torch.roll(v, 1, dims=-3)) * (self._inv_r / (2.0 * g.dphi)),
            -_derivative(v, g.dz, dim=-1),
        )


def _derivative(v: torch.Tensor, h: float, *, dim: int) -> torch.Tensor:
    """Second-order first derivative along ``dim`` (central inside, one-sided at both ends)."""
    n = v.shape[dim]
    out = torch.empty_like(v)
    inner = (v.narrow(dim, 2, n - 2) - v.narrow(dim, 0, n - 2)) / (2.0 * h)
    out.narrow(dim, 1, n - 2).copy_(inner)
    v0, v1, v2 = (v.narrow(dim, k, 1) for k in (0, 1, 2))
    out.narrow(dim, 0, 1).copy_((-3.0 * v0 + 4.0 * v1 - v2) / (2.0 * h))
    w0, w1, w2 = (v.narrow(dim, n - 1 - k, 1) for k in (0, 1, 2))
    out.narrow(dim, n - 1, 1).copy_((3.0 * w0 - 4.0 * w1 + w2) / (2.0 * h))
    return out


def solve_poisson(
    rho: torch.Tensor | np.ndarray, grid: Grid | str | tuple[int, int, int], **kw: Any
) -> torch.Tensor:
    """One-shot ``PoissonSolver(grid, **kw).solve(rho)``; ``dtype`` defaults to that of ``rho``
    when it is a float32/float64 tensor or array, and ``device`` to that of a tensor ``rho``."""
    if "dtype" not in kw and getattr(rho, "dtype", None) in (
        torch.float32, torch.float64, np.float32, np.float64,
    ):
        kw["dtype"] = torch.float32 if rho.dtype in (torch.float32, np.float32) else torch.float64
    if "device" not in kw and isinstance(rho, torch.Tensor):
        kw["device"] = rho.device
    return PoissonSolver(grid, **kw).solve(rho)


def laplacian_matrix(grid: Grid | str | tuple[int, int, int]) -> scipy.sparse.csr_matrix:
    """The discrete Laplacian of :class:`PoissonSolver` on the interior unknowns, as scipy CSR.

    Unknowns are ``V[:, 1:-1, 1:-1]`` flattened in C order (phi, r, z), shape
    ``nphi * (nr-2) * (nz-2)`` squared; boundary values are zero, so
    ``laplacian_matrix(grid) @ V[:, 1:-1, 1:-1].ravel() == -rho[:, 1:-1, 1:-1].ravel()``.
    """
    import scipy.sparse as sp

    g = parse_grid(grid, argument="grid")
    nri, nzi = g.nr - 2, g.nz - 2
    h, r = g.dr, g.r[1:-1]
    d2r = sp.diags(
        [1.0 / h**2 - 1.0 / (2 * h * r[1:]), np.full(nri, -2.0 / h**2), 1.0 / h**2 + 1.0 / (2 * h * r[:-1])],
        [-1, 0, 1], shape=(nri, nri),
    )
    d2z = sp.diags([np.ones(nzi - 1), np.full(nzi, -2.0), np.ones(nzi - 1)], [-1, 0, 1]) / g.dz**2
    circ = sp.diags([np.ones(g.nphi - 1), np.full(g.nphi, -2.0), np.ones(g.nphi - 1)], [-1, 0, 1]).tolil()
    circ[0, g.nphi - 1] = 1.0
    circ[g.nphi - 1, 0] = 1.0
    d2phi = circ.tocsr() / g.dphi**2
    eye_p, eye_r, eye_z = sp.identity(g.nphi), sp.identity(nri), sp.identity(nzi)
    lap = (
        sp.kron(eye_p, sp.kron(d2r, eye_z))
        + sp.kron(d2phi, sp.kron(sp.diags(1.0 / r**2), eye_z))
        + sp.kron(eye_p, sp.kron(eye_r, d2z))
    )
    return lap.tocsr()


def closed_form_solution(
    grid: Grid | str | tuple[int, int, int], *, m: int = 0, amplitude: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Exact solution of the continuous problem on the grounded finite hollow cylinder.

    With ``k = pi / L`` and ``I_m``, ``K_m`` the modified Bessel functions:

        rho/eps0 = A (1 + m^2 / (k r)^2) cos(m phi) sin(k z)
        V        = (A / k^2) [1 - a I_m(k r) - b K_m(k r)] cos(m phi) sin(k z)

    with ``a``, ``b`` fixed by ``V(r_min) = V(r_max) = 0``. Since
    ``f'' + f'/r - (m^2/r^2 + k^2) f = 0`` for ``f = I_m(k r), K_m(k r)``, ``laplace(V) = -rho``.
    ``m = 0`` is the classic case ``rho/eps0 = A sin(pi z / L)``.

    Returns:
        ``(rho, V)`` as float64 arrays of shape (nphi, nr, nz).
    """
    from scipy.special import iv, kv

    g = parse_grid(grid, argument="grid")
    if not isinstance(m, (int, np.integer)) or m < 0 or m > g.nphi // 2:
        raise ValueError(f"m must be an integer in [0, nphi/2 = {g.nphi // 2}], got {m!r}")
    k = math.pi / g.length
    x1, x2 = k * g.r_min, k * g.r_max
    a, b = np.linalg.solve([[iv(m, x1), kv(m, x1)], [iv(m, x2), kv(m, x2)]], [1.0, 1.0])
    r = g.r[None, :, None]  # (1, nr, 1)
    angular = np.cos(m * g.phi)[:, None, None] * np.sin(k * g.z)[None, None, :]  # (nphi, 1, nz)
    rho = amplitude * (1.0 + m**2 / (k * r) ** 2) * angular  # (nphi, nr, nz)
    v = amplitude / k**2 * (1.0 - a * iv(m, k * r) - b * kv(m, k * r)) * angular
    # Exact zeros on the Dirichlet nodes (sin(k L) is 1e-16, not 0, in floating point).
    v[:, [0, -1], :] = 0.0
    v[:, :, [0, -1]] = 0.0
    return rho, v


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def solver_check(
    grids: Sequence[Grid | str | tuple[int, int, int]] = STANDARD_GRIDS,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float64,
    *,
    repeats: int = 5,
    m: int = 2,
) -> dict[str, Any]:
    """Accuracy against the closed forms and timing of :class:`PoissonSolver`, per grid.

    For each grid: the relative error ``max|V - V_exact| / max|V_exact|`` for the axisymmetric
    case (``m = 0``) and the phi-dependent case (mode ``m``) of :func:`closed_form_solution`,
    the solver set-up time and the median over ``repeats`` of the solve time (after one warm-up).

    Returns:
        ``{"device": str, "dtype": str, "grids": [{"grid": "90x17x17", "rel_error_m0": float,
        "rel_error_m": float, "m": int, "setup_ms": float, "solve_ms": float}, ...]}``.
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    dev = torch.device(device)
    dt = _as_dtype(dtype)
    results = []
    for spec in grids:
        g = parse_grid(spec, argument="grids")
        t0 = time.perf_counter()
        solver = PoissonSolver(g, dtype=dt, device=dev)
        _sync(dev)
        setup = time.perf_counter() - t0
        errors = []
        for mode in (0, m):
            rho, exact = closed_form_solution(g, m=mode)
            v = solver.solve(rho).double().cpu().numpy()
            errors.append(float(np.abs(v - exact).max() / np.abs(exact).max()))
        rho_t = torch.as_tensor(closed_form_solution(g, m=m)[0], dtype=dt, device=dev)
        solver.solve(rho_t, check_finite=False)  # warm-up
        times = []
        for _ in range(repeats):
            _sync(dev)
            t0 = time.perf_counter()
            solver.solve(rho_t, check_finite=False)
            _sync(dev)
            times.append(time.perf_counter() - t0)
        results.append({
            "grid": str(g), "rel_error_m0": errors[0], "rel_error_m": errors[1], "m": m,
            "setup_ms": 1e3 * setup, "solve_ms": 1e3 * float(np.median(times)),
        })
    return {"device": str(dev), "dtype": str(dt).removeprefix("torch."), "grids": results}
