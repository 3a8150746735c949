"""The ``tpc`` command: ``simulate``, ``dataset`` and ``solver-check`` (argparse).

``add_subparser(subparsers)`` is called by the main ``streamcal`` CLI; every subcommand sets
``func`` (``args -> exit code``) with ``set_defaults``. Malformed arguments are reported by
argparse; invalid combinations make the function print the reason and return 2. The functions
return 0 on success and never call ``sys.exit``.

    streamcal tpc simulate --grid 90x17x17 --rate 50000 --maps 10 --out maps.npz
    streamcal tpc dataset --out DIR --grid 90x17x17 --samples 270 --seed 1 --split train --shard-size 100
    streamcal tpc solver-check --grids 90x17x17 180x33x33
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from streamcal.argtypes import non_negative_float, non_negative_int, positive_float, positive_int
from streamcal.detectors.tpc.constants import STANDARD_GRIDS, Grid, parse_grid

__all__ = ["add_subparser", "cmd_simulate", "cmd_dataset", "cmd_solver_check"]


def _grid(text: str) -> Grid:
    try:
        return parse_grid(text, argument="--grid")
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _fail(message: str) -> int:
    print(f"streamcal tpc: error: {message}", file=sys.stderr)
    return 2


def _density_config(args: argparse.Namespace) -> Any:
    from streamcal.detectors.tpc.density import DensityConfig

    return DensityConfig(rate_hz=args.rate, epsilon=args.epsilon)


def add_subparser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``tpc`` with its subcommands to an argparse ``subparsers`` object; returns its parser."""
    tpc = subparsers.add_parser("tpc", help="TPC space-charge simulation, training sets, solver checks")
    sub = tpc.add_subparsers(dest="tpc_command", required=True, metavar="{simulate,dataset,solver-check}")
    grids = ", ".join("x".join(map(str, g)) for g in STANDARD_GRIDS)

    sim = sub.add_parser("simulate", help="simulate random density maps and their 1D IDC series")
    sim.add_argument("--grid", type=_grid, default=Grid(90, 17, 17), help=f"PHIxRxZ (standard: {grids})")
    sim.add_argument("--rate", type=non_negative_float, default=50_000.0, help="interaction rate in Hz (>= 0)")
    sim.add_argument("--epsilon", type=positive_float, default=10.0, help="gain x IBF (> 0)")
    sim.add_argument("--maps", type=positive_int, default=4, help="number of maps (>= 1)")
    sim.add_argument("--seed", type=non_negative_int, default=0, help="integer >= 0")
    sim.add_argument("--out", type=Path, default=None, help="write .npz, .arrow or .parquet")
    sim.set_defaults(func=cmd_simulate)

    ds = sub.add_parser("dataset", help="write the augmented training set as Parquet/Arrow shards")
    ds.add_argument("--out", type=Path, required=True, help="output directory")
    ds.add_argument("--grid", type=_grid, default=Grid(90, 17, 17), help=f"PHIxRxZ (standard: {grids})")
    ds.add_argument("--samples", type=positive_int, default=None,
                    help="number of samples (default: all, random-maps x 27)")  # fmt: skip
    ds.add_argument("--random-maps", type=positive_int, default=1000, help="K random maps")
    ds.add_argument("--seed", type=non_negative_int, default=0, help="integer >= 0")
    ds.add_argument("--split", choices=("train", "eval"), default="train", help="train (biased) or eval (unbiased)")
    ds.add_argument("--bias", type=non_negative_float, default=0.05, help="training bias half-width, [0, 1)")
    ds.add_argument("--shard-size", type=positive_int, default=1000, help="rows per shard")
    ds.add_argument("--format", choices=("parquet", "arrow"), default="parquet", help="shard file format")
    ds.add_argument("--rate", type=non_negative_float, default=50_000.0, help="interaction rate in Hz")
    ds.add_argument("--epsilon", type=positive_float, default=10.0, help="gain x IBF (> 0)")
    ds.add_argument("--no-progress", action="store_true", help="no progress bar")
    ds.set_defaults(func=cmd_dataset)

    chk = sub.add_parser("solver-check", help="Poisson solver accuracy vs closed forms and timing")
    chk.add_argument("--grids", type=_grid, nargs="+", default=[Grid(*g) for g in STANDARD_GRIDS], help="grids to check")
    chk.add_argument("--device", default="cpu", help="cpu or cuda")
    chk.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    chk.add_argument("--repeats", type=positive_int, default=5)
    chk.set_defaults(func=cmd_solver_check)
    return tpc


def cmd_simulate(args: argparse.Namespace) -> int:
    """Simulate ``--maps`` density maps (and their relative 1D IDC series); print a summary."""
    from streamcal.detectors.tpc.density import DensitySimulator, eq1_relative_fluctuation, eta_acceptance

    try:
        config = _density_config(args)
    except (TypeError, ValueError) as exc:
        return _fail(str(exc))
    grid: Grid = args.grid
    t0 = time.perf_counter()
    sample = DensitySimulator(grid, config).sample(args.seed, n=args.maps)
    elapsed = time.perf_counter() - t0
    idc1d = sample.idc1d()  # (maps, n_t)
    avg = DensitySimulator(grid, config).average()
    totals = sample.density.sum(axis=(1, 2, 3))
    mu_m, var_m = config.multiplicity.track_moments(eta_acceptance(grid.r_min, grid.length))
    summary = {
        "grid": str(grid),
        "rate_hz": config.rate_hz,
        "epsilon": config.epsilon,
        "pile_up": config.pile_up,
        "maps": args.maps,
        "seconds_per_map": elapsed / args.maps,
        "density_ifc_mean_V_per_cm2": float(sample.density[:, :, 0, :].mean()),
        "density_ofc_mean_V_per_cm2": float(sample.density[:, :, -1, :].mean()),
        "average_density_ifc_V_per_cm2": float(avg[:, 0, :].mean()),
        "relative_fluctuation_local_rms": float(np.std(sample.density / np.where(avg > 0, avg, 1.0)) if config.rate_hz > 0 else 0.0),
        "eq1_full_volume": float(eq1_relative_fluctuation(max(config.pile_up, 1e-300), mult_relative_rms=math.sqrt(var_m) / mu_m, mean_tracks=mu_m)) if config.rate_hz > 0 else None,
        "sum_density_per_map": totals.tolist(),
        "idc1d_mean": float(idc1d.mean()),
        "idc1d_rms": float(idc1d.std()),
    }  # fmt: skip
    if args.out is not None:
        out: Path = args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            np.savez_compressed(out, density=sample.density.astype(np.float32), average=avg.astype(np.float32), idc1d=idc1d.astype(np.float32))
        elif out.suffix in (".arrow", ".parquet"):
            import pyarrow as pa
            import pyarrow.feather as feather
            import pyarrow.parquet as pq

            table = pa.table({
                "density": pa.FixedShapeTensorArray.from_numpy_ndarray(sample.density.astype(np.float32)),
                "idc1d": pa.FixedShapeTensorArray.from_numpy_ndarray(idc1d.astype(np.float32)),
            }).replace_schema_metadata({"streamcal.tpc.simulate": json.dumps({k: v for k, v in summary.items() if k != "sum_density_per_map"})})  # fmt: skip
            (pq.write_table if out.suffix == ".parquet" else feather.write_feather)(table, out)
        else:
            return _fail(f"--out must end in .npz, .arrow or .parquet, got {str(out)!r}")
        summary["out"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_dataset(args: argparse.Namespace) -> int:
    """Write the augmented training set (:func:`~streamcal.detectors.tpc.dataset.write_shards`)."""
    from streamcal.detectors.tpc.dataset import DatasetConfig, write_shards

    try:
        config = DatasetConfig(grid=args.grid, n_random=args.random_maps, bias=args.bias, split=args.split, seed=args.seed, density=_density_config(args))
    except (TypeError, ValueError) as exc:
        return _fail(str(exc))
    n = config.n_samples if args.samples is None else args.samples
    if n > config.n_samples:
        return _fail(f"--samples must be <= random-maps x 27 = {config.n_samples}, got {n}")
    t0 = time.perf_counter()
    paths = write_shards(config, args.out, n_samples=n, shard_size=args.shard_size, file_format=args.format, progress=not args.no_progress)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"out": str(args.out), "split": args.split, "samples": n, "shards": [p.name for p in paths],
                      "seconds": elapsed, "samples_per_s": n / elapsed}, indent=2))  # fmt: skip
    return 0


def cmd_solver_check(args: argparse.Namespace) -> int:
    """Run :func:`~streamcal.detectors.tpc.poisson.solver_check` and print its report as JSON."""
    from streamcal.detectors.tpc.poisson import solver_check

    report = solver_check(args.grids, device=args.device, dtype=args.dtype, repeats=args.repeats)
    print(json.dumps(report, indent=2, default=str))
    return 0
