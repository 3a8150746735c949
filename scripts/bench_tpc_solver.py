"""Benchmark: TPC Poisson solver and ground truth per map, side by side with baselines; JSON out.

    python scripts/bench_tpc_solver.py                                # all grids, float32 + float64
    python scripts/bench_tpc_solver.py --spsolve-grids 90x17x17 180x33x33   # ~1 s and ~4 min
    python scripts/bench_tpc_solver.py --ground-truth-grids 90x17x17 180x33x33 --out solver.json

For every grid (default: the four standard grids) and dtype, on the CPU and on CUDA when there is
one, in the same run:

* ``solver``: :class:`~streamcal.detectors.tpc.poisson.PoissonSolver` set-up time and median
  solve time for each radial method (``thomas``, ``eig``; ``auto`` picks thomas on CPU, eig on
  GPUs), with the relative error against the closed-form solutions (m = 0 and m = 2);
* ``numpy_spectral``: the baseline the issue quotes, a vectorised spectral solve of the same
  finite-difference system in plain numpy (real FFT in phi, sine transform in z as a matrix
  product, eigen-decomposition of the radial operator per phi mode);
* ``spsolve``: ``scipy.sparse.linalg.spsolve`` of the same sparse system
  (:func:`~streamcal.detectors.tpc.poisson.laplacian_matrix`, SuperLU, float64), on
  ``--spsolve-grids`` only (default 90x17x17; 180x33x33 takes minutes, larger grids do not fit);
* ``ground_truth``: the whole ground truth per map (solve + field + local distortions + global
  distortions + corrections) for an average 50 kHz density map on ``--ground-truth-grids``.

Timings are medians over repeats after one warm-up (at least ``--repeats`` runs and ``--min-time``
seconds per case); the load average before and after is reported, since a shared machine
inflates them. The dataset generation rate is measured by ``scripts/bench_tpc_dataset.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from streamcal.detectors.tpc.constants import STANDARD_GRIDS, Grid, parse_grid
from streamcal.detectors.tpc.poisson import PoissonSolver, closed_form_solution, laplacian_matrix

# The issue's reference figures on the 2-core machine (ms): plain-numpy spectral solve and
# scipy's sparse direct solve.
ISSUE_NUMPY_MS = {"90x17x17": 1.0, "180x33x33": 9.0, "180x65x65": 26.0, "180x129x129": 110.0}
ISSUE_SPSOLVE_MS = {"90x17x17": 900.0, "180x33x33": 250_000.0}
GPU_TARGET_MS = {"180x129x129": 1.0}


class NumpySpectral:
    """Plain-numpy direct solve of the same discrete system as :class:`PoissonSolver` (baseline).

    phi: ``np.fft.rfft``; z: DST-I of the interior nodes as a matrix product; r: per phi mode the
    symmetrised radial operator ``D^1/2 A_m D^-1/2 = Q diag(nu) Q^T`` (``D = diag(r)``), so that
    ``V_hat = D^-1/2 Q (Q^T D^1/2 rho_hat) / (mu_n - nu)``; all steps vectorised over the modes.
    """

    def __init__(self, grid: Grid, dtype: type = np.float64) -> None:
        g = grid
        self.grid, self.dtype = g, np.dtype(dtype)
        nm, nri, nzi = g.nphi // 2 + 1, g.nr - 2, g.nz - 2
        h, r = g.dr, g.r[1:-1]
        lam = 4.0 * np.sin(0.5 * np.arange(nm) * g.dphi) ** 2 / g.dphi**2  # (nm,)
        n = np.arange(1, nzi + 1)
        mu = 4.0 * np.sin(0.5 * math.pi * n / (g.nz - 1)) ** 2 / g.dz**2  # (nzi,)
        sine = np.sin(math.pi * np.outer(n, n) / (g.nz - 1))  # (nzi, nzi), S^-1 = 2/(nz-1) S
        sq = np.sqrt(r)
        off = (r[:-1] + 0.5 * h) / h**2 / (sq[:-1] * sq[1:])
        fwd = np.empty((nm, nri, nri))
        bwd = np.empty((nm, nri, nri))
        inv = np.empty((nm, nri, nzi))
        for k in range(nm):
            b = np.diag(-2.0 / h**2 - lam[k] / r**2) + np.diag(off, 1) + np.diag(off, -1)
            nu, q = np.linalg.eigh(b)
            fwd[k] = q.T * sq[None, :]
            bwd[k] = q / sq[:, None]
            inv[k] = 1.0 / (mu[None, :] - nu[:, None])  # (A - mu) V = -rho
        cast = self.dtype
        self.sine = sine.astype(cast)
        self.isine = (2.0 / (g.nz - 1) * sine).astype(cast)
        self.fwd, self.bwd, self.inv = fwd.astype(cast), bwd.astype(cast), inv.astype(cast)

    def solve(self, rho: np.ndarray) -> np.ndarray:
        g = self.grid
        f = np.ascontiguousarray(rho[:, 1:-1, 1:-1], dtype=self.dtype)  # (nphi, nri, nzi)
        fh = np.fft.rfft(f, axis=0) @ self.sine  # (nm, nri, nzi) complex
        u = (self.fwd @ fh) * self.inv  # radial modes
        v = (self.bwd @ u) @ self.isine  # (nm, nri, nzi)
        out = np.zeros(g.shape, dtype=self.dtype)
        out[:, 1:-1, 1:-1] = np.fft.irfft(v, n=g.nphi, axis=0)
        return out


def _timed(fn: Callable[[], Any], *, sync: Callable[[], None], repeats: int, min_time: float,
           max_repeats: int = 1000) -> dict[str, float]:
    """Median and minimum wall time (ms) of ``fn`` after one warm-up call."""
    fn()
    sync()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < max_repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return {"median_ms": 1e3 * statistics.median(times), "min_ms": 1e3 * min(times), "runs": len(times)}


def _sync_for(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def _rel_error(v: torch.Tensor | np.ndarray, exact: np.ndarray) -> float:
    got = v.double().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, dtype=np.float64)
    return float(np.abs(got - exact).max() / np.abs(exact).max())


def bench_solver(grid: Grid, device: torch.device, dtype: torch.dtype, method: str, args: argparse.Namespace) -> dict[str, Any]:
    sync = _sync_for(device)
    t0 = time.perf_counter()
    solver = PoissonSolver(grid, dtype=dtype, device=device, r_method=method)  # type: ignore[arg-type]
    sync()
    setup_ms = 1e3 * (time.perf_counter() - t0)
    errors = {}
    for m in (0, 2):
        rho, exact = closed_form_solution(grid, m=m)
        errors[f"rel_error_m{m}"] = _rel_error(solver.solve(rho), exact)
    rho_t = torch.as_tensor(closed_form_solution(grid, m=2)[0], dtype=dtype, device=device)
    timing = _timed(lambda: solver.solve(rho_t, check_finite=False), sync=sync, repeats=args.repeats, min_time=args.min_time)
    return {"grid": str(grid), "device": str(device), "dtype": str(dtype).removeprefix("torch."), "r_method": method,
            "setup_ms": setup_ms, "solve_ms": timing["median_ms"], "solve_min_ms": timing["min_ms"],
            "runs": timing["runs"], **errors}  # fmt: skip


def bench_numpy(grid: Grid, dtype: type, args: argparse.Namespace) -> dict[str, Any]:
    base = NumpySpectral(grid, dtype)
    rho, exact = closed_form_solution(grid, m=2)
    rho = rho.astype(dtype)
    timing = _timed(lambda: base.solve(rho), sync=lambda: None, repeats=args.repeats, min_time=args.min_time)
    ref = PoissonSolver(grid).solve(rho.astype(np.float64)).numpy()
    got = base.solve(rho)
    return {"grid": str(grid), "dtype": np.dtype(dtype).name, "solve_ms": timing["median_ms"],
            "solve_min_ms": timing["min_ms"], "runs": timing["runs"], "rel_error_m2": _rel_error(got, exact),
            "max_rel_diff_vs_torch_float64": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "issue_reference_ms": ISSUE_NUMPY_MS.get(str(grid))}  # fmt: skip


def bench_spsolve(grid: Grid, args: argparse.Namespace) -> dict[str, Any]:
    import scipy.sparse.linalg as spla

    unknowns = grid.nphi * (grid.nr - 2) * (grid.nz - 2)
    row: dict[str, Any] = {"grid": str(grid), "dtype": "float64", "unknowns": unknowns,
                           "issue_reference_ms": ISSUE_SPSOLVE_MS.get(str(grid))}  # fmt: skip
    if unknowns > args.spsolve_max_unknowns:
        return {**row, "skipped": f"{unknowns} unknowns > --spsolve-max-unknowns={args.spsolve_max_unknowns}"}
    rho = np.random.default_rng(0).normal(size=grid.shape)
    t0 = time.perf_counter()
    a = laplacian_matrix(grid).tocsc()
    build_ms = 1e3 * (time.perf_counter() - t0)
    t0 = time.perf_counter()
    x = spla.spsolve(a, -rho[:, 1:-1, 1:-1].ravel())
    solve_ms = 1e3 * (time.perf_counter() - t0)
    v = PoissonSolver(grid).solve(rho).numpy()[:, 1:-1, 1:-1].ravel()
    return {**row, "matrix_build_ms": build_ms, "solve_ms": solve_ms,
            "max_rel_diff_vs_torch_float64": float(np.abs(v - x).max() / np.abs(x).max())}  # fmt: skip


def bench_ground_truth(grid: Grid, device: torch.device, dtype: torch.dtype, method: str, args: argparse.Namespace) -> dict[str, Any]:
    from streamcal.detectors.tpc.density import average_density
    from streamcal.detectors.tpc.langevin import global_corrections, global_distortions, local_distortions

    sync = _sync_for(device)
    solver = PoissonSolver(grid, dtype=dtype, device=device)
    rho = torch.as_tensor(average_density(grid), dtype=dtype, device=device)
    parts: dict[str, list[float]] = {k: [] for k in ("solve", "field", "local", "global", "corrections", "total")}
    dr_max = 0.0
    for i in range(args.ground_truth_repeats + 1):  # the first run is a warm-up
        stamps = [time.perf_counter()]
        v = solver.solve(rho)
        sync()
        stamps.append(time.perf_counter())
        er, ephi, ez = solver.field(v)
        sync()
        stamps.append(time.perf_counter())
        loc = local_distortions(er, ephi, ez, grid)
        sync()
        stamps.append(time.perf_counter())
        dist = global_distortions(loc, grid, method=method)  # type: ignore[arg-type]
        sync()
        stamps.append(time.perf_counter())
        global_corrections(dist, grid)
        sync()
        stamps.append(time.perf_counter())
        if i > 0:
            for k, (a, b) in zip(parts, zip(stamps, stamps[1:])):
                parts[k].append(1e3 * (b - a))
            parts["total"].append(1e3 * (stamps[-1] - stamps[0]))
        dr_max = float(dist[0].abs().max())
    return {"grid": str(grid), "device": str(device), "dtype": str(dtype).removeprefix("torch."), "method": method,
            **{f"{k}_ms": statistics.median(v) for k, v in parts.items()},
            "runs": args.ground_truth_repeats, "dr_max_cm": dr_max}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_grids = ["x".join(map(str, g)) for g in STANDARD_GRIDS]
    parser.add_argument("--grids", nargs="+", default=default_grids, help="solver grids (PHIxRxZ)")
    parser.add_argument("--dtypes", nargs="+", choices=("float32", "float64"), default=["float32", "float64"])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda when available")
    parser.add_argument("--repeats", type=int, default=5, help="minimum timed runs per case")
    parser.add_argument("--min-time", type=float, default=0.5, help="minimum seconds of timed runs per case")
    parser.add_argument("--spsolve-grids", nargs="*", default=["90x17x17"], help="grids for scipy spsolve")
    parser.add_argument("--spsolve-max-unknowns", type=int, default=200_000,
                        help="skip spsolve above this many unknowns (180x33x33 has 172,980)")  # fmt: skip
    parser.add_argument("--ground-truth-grids", nargs="*", default=["90x17x17", "180x33x33"])
    parser.add_argument("--ground-truth-methods", nargs="+", choices=("follow", "recursive"), default=["follow", "recursive"])
    parser.add_argument("--ground-truth-repeats", type=int, default=3)
    parser.add_argument("--no-numpy", action="store_true", help="skip the plain-numpy baseline")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    if args.repeats < 1 or args.ground_truth_repeats < 1:
        parser.error("--repeats and --ground-truth-repeats must be >= 1")

    grids = [parse_grid(g, argument="--grids") for g in args.grids]
    sp_grids = [parse_grid(g, argument="--spsolve-grids") for g in args.spsolve_grids]
    gt_grids = [parse_grid(g, argument="--ground-truth-grids") for g in args.ground_truth_grids]
    devices = [torch.device(d) for d in (args.devices or ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))]
    dtypes = {"float32": torch.float32, "float64": torch.float64}
    np_dtypes = {"float32": np.float32, "float64": np.float64}

    cases: list[tuple[str, Callable[[], dict[str, Any]]]] = []
    for g in grids:
        for dev in devices:
            for dt in args.dtypes:
                for method in ("thomas", "eig"):
                    cases.append(("solver", lambda g=g, dev=dev, dt=dt, m=method: bench_solver(g, dev, dtypes[dt], m, args)))
        if not args.no_numpy:
            for dt in args.dtypes:
                cases.append(("numpy_spectral", lambda g=g, dt=dt: bench_numpy(g, np_dtypes[dt], args)))
    for g in sp_grids:
        cases.append(("spsolve", lambda g=g: bench_spsolve(g, args)))
    for g in gt_grids:
        for dev in devices:
            for dt in args.dtypes:
                for method in args.ground_truth_methods:
                    cases.append(("ground_truth", lambda g=g, dev=dev, dt=dt, m=method: bench_ground_truth(g, dev, dtypes[dt], m, args)))

    result: dict[str, Any] = {
        "environment": {
            "machine": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "load_average_before": list(os.getloadavg()),
        },
        "solver": [], "numpy_spectral": [], "spsolve": [], "ground_truth": [],
    }  # fmt: skip
    with tqdm(cases, desc="tpc solver bench", unit="case", file=sys.stderr) as bar:
        for section, run in bar:
            row = run()
            bar.set_postfix_str(f"{section} {row['grid']}")
            result[section].append(row)
    result["environment"]["load_average_after"] = list(os.getloadavg())
    result["summary"] = _summary(result)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    return 0


def _summary(result: dict[str, Any]) -> dict[str, Any]:
    """Per grid: fastest torch solve per device and dtype, against the baselines and targets."""
    out: dict[str, Any] = {}
    for row in result["solver"]:
        key = f"{row['grid']} {row['device']} {row['dtype']}"
        best = out.get(key)
        if best is None or row["solve_ms"] < best["solve_ms"]:
            out[key] = {"solve_ms": row["solve_ms"], "solve_min_ms": row["solve_min_ms"], "r_method": row["r_method"]}
    for key, best in out.items():
        grid, device, dtype = key.split()
        numpy_row = next((r for r in result["numpy_spectral"] if r["grid"] == grid and r["dtype"] == dtype), None)
        if numpy_row is not None:
            best["numpy_spectral_ms"] = numpy_row["solve_ms"]
            best["speedup_vs_numpy"] = numpy_row["solve_ms"] / best["solve_ms"]
        sp = next((r for r in result["spsolve"] if r["grid"] == grid and "solve_ms" in r), None)
        if sp is not None:
            best["spsolve_ms"] = sp["solve_ms"]
            best["speedup_vs_spsolve"] = sp["solve_ms"] / best["solve_ms"]
        if device == "cpu" and grid in ISSUE_NUMPY_MS:
            best["issue_cpu_target_ms"] = ISSUE_NUMPY_MS[grid]
            best["meets_cpu_target"] = best["solve_ms"] <= ISSUE_NUMPY_MS[grid]
        if device.startswith("cuda") and grid in GPU_TARGET_MS:
            best["gpu_target_ms"] = GPU_TARGET_MS[grid]
            best["meets_gpu_target"] = best["solve_ms"] <= GPU_TARGET_MS[grid]
    return out


if __name__ == "__main__":
    raise SystemExit(main())
