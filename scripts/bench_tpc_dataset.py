"""Benchmark: TPC training-set generation rate (samples/s), printed as JSON.

    python scripts/bench_tpc_dataset.py                      # 90x17x17, 4 random maps x 27
    python scripts/bench_tpc_dataset.py --random-maps 8 --write   # also time Parquet shards

Reports the one-off setup (nominal average, 27 average maps and their distortions), the time per
random map (simulation of 200 ms of pile-up, distortions and corrections) and the steady-state
samples/s of the in-memory generator (and of the Parquet writer with ``--write``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import torch

from streamcal.detectors.tpc.constants import parse_grid
from streamcal.detectors.tpc.dataset import N_AVERAGE_MAPS, DatasetConfig, DatasetGenerator, write_shards
from streamcal.detectors.tpc.density import DensitySimulator


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="90x17x17")
    parser.add_argument("--random-maps", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write", action="store_true", help="also time writing Parquet shards")
    args = parser.parse_args()

    grid = parse_grid(args.grid, argument="--grid")
    config = DatasetConfig(grid=grid, n_random=args.random_maps, seed=args.seed)
    t0 = time.perf_counter()
    gen = DatasetGenerator(config, device=args.device)
    gen.average_distortions()
    setup = time.perf_counter() - t0

    sim = DensitySimulator(grid, config.density)
    t0 = time.perf_counter()
    sim.sample(seed=123, n=1)
    t_density = time.perf_counter() - t0

    n = config.n_samples
    t0 = time.perf_counter()
    t_maps = 0.0
    for i in range(n):
        if i % N_AVERAGE_MAPS == 0:
            tm = time.perf_counter()
            gen.random_map(i // N_AVERAGE_MAPS)
            t_maps += time.perf_counter() - tm
        gen.sample(i)
    elapsed = time.perf_counter() - t0
    result = {
        "grid": str(grid),
        "device": args.device,
        "torch_threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "samples": n,
        "random_maps": config.n_random,
        "setup_s": setup,
        "density_map_s": t_density,
        "random_map_with_distortions_s": t_maps / config.n_random,
        "samples_per_s": n / elapsed,
        "load_average": list(os.getloadavg()),
    }
    if args.write:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            write_shards(config, tmp, shard_size=N_AVERAGE_MAPS, progress=False, device=args.device)
            result["parquet_samples_per_s_including_setup"] = n / (time.perf_counter() - t0)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
