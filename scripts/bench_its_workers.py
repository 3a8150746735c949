"""Benchmark: the distributed ITS alignment graph with M = 1, 2, 4 workers, printed as JSON.

    python scripts/bench_its_workers.py                         # ITS2 inner barrel, 20k events, M = 1 2 4
    python scripts/bench_its_workers.py --geometry full --events 50000 --workers 1 2 --out bench.json
    python scripts/bench_its_workers.py --workers 1 2 4 --taus 1 5 20 --keep runs/its_scan   # then
    streamcal evaluate align --run runs/its_scan/m1_tau5 --compare runs/its_scan/m*_tau* --report runs/eval_scan

Each case runs the real graph on a local Ray (``its_tracks`` -> ``its_align`` x M -> ``calib_store``,
the structure of ``configs/its_align.yaml``) with equal partitions and ``--epochs`` epochs. Epoch 1
runs while the source simulates (it measures the simulation as much as the alignment); epochs 2..
replay each worker's spool and are the alignment's own throughput: per case the figures are

* ``tracks_per_s``: tracks optimised per second over the replayed epochs, all workers together
  (the wall time of the epochs, from the workers' metrics, synchronisations included);
* ``speedup``: over M = 1; ``syncs`` and the all-reduce count per epoch;
* ``peak_rss_mb``: the largest peak resident memory of a worker process (the issue's limit:
  4 GB per worker) and of the source;
* ``epoch1_tracks_per_s``: epoch 1's own rate, the tracks of epoch 1 over the busiest worker's time
  in its steps (packing the hits, spooling the packed tracks, the Gauss-Newton blocks, the
  steps), without the wait for the simulated stream (the seed's data is recorded: it would not
  wait);
* ``seed_workload_h``: the seed's training (5M events x 8 tracks, 45 epochs; ~2 weeks on an
  Intel i7 in the seed) extrapolated from these rates: epoch 1 at ``epoch1_tracks_per_s``, the
  other 44 at ``tracks_per_s``, beside the seed's 336 h. This assumes every replayed track is
  cached, as it is here (``cache_mb`` holds the benchmark's sample);
* ``seed_workload_h_seed_scale``: the same at the seed's scale, where each worker's cache of
  packed tracks (``--cache-mb``, the workers' ``cache_mb``) holds only part of its partition and
  the rest is read from the packed spool in every replayed epoch. Every case is run a second time
  with ``cache_mb: 0`` (``tracks_per_s_uncached``: every replayed batch read from the spool), the
  cache's size per track is measured (``cache_bytes_per_track``, the workers' own accounting),
  and::

      f = min(1, M * cache_mb / cache_bytes_per_track / (5M * 8))   # cached share of an epoch
      seed_workload_h_seed_scale = 5M * 8 * (1 / epoch1_tracks_per_s
                                   + 44 * (f / tracks_per_s + (1 - f) / tracks_per_s_uncached)) / 3600

  The packed spool is ~160 bytes per track (6.4 GB for the seed's 40M tracks): the page cache
  holds it on a machine with that much free memory, as here; ``spool_mb_per_s`` is the rate at
  which the spool was read back in the uncached run, for comparison with the disk's.

On a 2-core machine M = 4 shares two cores between four workers: it shows the synchronisation
overhead, not a speed-up. The machine's load average is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import textwrap
import time
from pathlib import Path

SEED_EVENTS = 5_000_000
SEED_TRACKS_PER_EVENT = 8
SEED_EPOCHS = 45
SEED_HOURS = 14 * 24.0  # "~2 weeks" on an i7-14700K

GEOMETRIES = {
    "ib": "{layers: 3, chips_u: [1, 1, 1], chips_v: [9, 9, 9]}",  # the ITS2 inner barrel, 432 chips
    "full": "{}",  # the full ITS2, 24,120 chips
}


def graph(run_dir: Path, geometry: str, workers: int, events: int, epochs: int, tau: int, per_message: int,
          threads: int, min_hits: int, cache_mb: float, precision: str = "float64") -> str:
    parts = ", ".join(["1.0"] * workers)
    return textwrap.dedent(f"""
    settings: {{interface: 127.0.0.1, stall_timeout_s: 600}}
    stages:
      - name: tracks
        kind: its_tracks
        config:
          geometry: {geometry}
          misalignment: {{sigma_trans: [0.02, 0.02, 0.02], seed: 5}}
          simulation: {{seed: 1}}
          events: {events}
          events_per_message: {per_message}
          partitions: [{parts}]
          run_dir: {run_dir}
        outputs: {{out: hits}}
      - name: align
        kind: its_align
        replicas: {workers}
        config:
          geometry: {geometry}
          tau: {tau}
          epochs: {epochs}
          threads: {threads}
          min_hits: {min_hits}
          model: {{precision: {precision}}}
          cache_mb: {cache_mb}
          publish_every: 1000000
          run_dir: {run_dir}
        inputs: {{hits: hits}}
        outputs: {{out: constants}}
      - name: store
        kind: calib_store
        config: {{db: {run_dir}/calib.sqlite, name: its/alignment, validity: open}}
        inputs: {{in: constants}}
    streams:
      hits: {{queue: 8}}
      constants: {{queue: 4, latest_only: true}}
    """)


def run_graph_case(args: argparse.Namespace, workers: int, tau: int, run_dir: Path, cache_mb: float) -> dict:
    """One run of the graph; the figures of its replayed epochs."""
    from streamcal.graph import parse_graph
    from streamcal.runtime import run_graph

    spec = parse_graph(graph(run_dir, GEOMETRIES[args.geometry], workers, args.events, args.epochs, tau,
                             args.events_per_message, args.threads,
                             args.min_hits or (3 if args.geometry == "ib" else 4), cache_mb, args.precision))
    t0 = time.monotonic()
    res = run_graph(spec, print_summary=False, progress=False)
    wall = time.monotonic() - t0
    if res.status != "completed":
        raise SystemExit(f"M={workers}, cache_mb={cache_mb}: the run did not complete: {res.problems}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in rows if "epoch_cost" in r]
    syncs = [r for r in rows if "sync" in r]
    t_end = {r["epoch"]: r["time_s"] for r in epochs}
    replay = [e for e in t_end if e >= 2]
    tracks = {e: sum(r["tracks"] for r in syncs if r["epoch"] == e) for e in t_end}
    replay_s = t_end[max(replay)] - t_end[1] if replay else float("nan")
    workers_rep = [r for r in res.reports if r["metrics"]["stage"] == "align"]
    source = [r for r in res.reports if r["metrics"]["stage"] == "tracks"][0]
    caches = [r["summary"]["cache"] for r in workers_rep]
    cached_tracks = sum(c["tracks"] for c in caches)
    # epoch 1's own work (packing, spooling, the Gauss-Newton blocks, the steps; not the wait for
    # the simulated stream): the busiest worker's time in its steps
    busy1 = max(r["summary"]["busy_s"][0] for r in workers_rep)
    spool_mb = sum(p.stat().st_size for p in (run_dir / "spool").glob("*.tracks")) / 2**20
    return {
        "wall_s": round(wall, 2),
        "epoch_end_s": t_end,
        "replay_epochs": len(replay),
        "tracks_per_epoch": tracks[1],
        "tracks_per_event_selected": round(tracks[1] / max(epochs[0]["events"], 1), 3),
        "tracks_per_s": round(sum(tracks[e] for e in replay) / replay_s, 1) if replay_s > 0 else float("nan"),
        "syncs": len(syncs),
        "epoch_cost": [round(e["epoch_cost"], 5) for e in epochs],
        "peak_rss_mb_worker_max": round(max(r["peak_rss_mb"] for r in workers_rep), 1),
        "peak_rss_mb_source": round(source["peak_rss_mb"], 1),
        "cached_tracks": cached_tracks,
        "cache_bytes_per_track": round(sum(c["mb"] for c in caches) * 2**20 / cached_tracks, 1) if cached_tracks else None,
        "spool_batches": sum(c["spool_batches"] for c in caches),
        "epoch1_busy_s": busy1,
        "spool_mb": round(spool_mb, 1),
        "spool_mb_per_s": round(spool_mb * len(replay) / replay_s, 1) if replay_s > 0 else float("nan"),
        "epoch1_tracks_per_s": round(tracks[1] / busy1, 1) if busy1 > 0 else float("nan"),
    }


def run_case(args: argparse.Namespace, workers: int, tau: int, base: Path) -> dict:
    """M workers at one tau: with the cache (``--cache-mb``) and without it, and both
    extrapolations of the seed's workload (module docstring)."""
    cached = run_graph_case(args, workers, tau, base / f"m{workers}_tau{tau}", args.cache_mb)
    uncached = run_graph_case(args, workers, tau, base / f"m{workers}_tau{tau}_nocache", 0.0)
    seed_tracks = SEED_EVENTS * SEED_TRACKS_PER_EVENT
    tps, tps0 = cached["tracks_per_s"], uncached["tracks_per_s"]
    per_track = cached["cache_bytes_per_track"]
    frac = min(1.0, workers * args.cache_mb * 2**20 / per_track / seed_tracks) if per_track else 0.0
    ep1 = cached["epoch1_tracks_per_s"]
    case = {"workers": workers, "tau": tau, "cache_mb": args.cache_mb,
            "run_dir": str(base / f"m{workers}_tau{tau}") if args.keep else None, **cached}
    case.update({
        "tracks_per_s_uncached": tps0,
        "wall_s_uncached": uncached["wall_s"],
        "peak_rss_mb_worker_max_uncached": uncached["peak_rss_mb_worker_max"],
        "seed_cached_fraction": round(frac, 4),
        "seed_workload_h": round(seed_tracks * (1 / ep1 + (SEED_EPOCHS - 1) / tps) / 3600.0, 2)
        if tps == tps and ep1 == ep1 else None,
        "seed_workload_h_seed_scale": round(seed_tracks * (1 / ep1 + (SEED_EPOCHS - 1) * (frac / tps + (1 - frac) / tps0))
                                            / 3600.0, 2) if tps == tps and tps0 == tps0 and ep1 == ep1 else None,
        "seed_workload_formula": "5e6 * 8 * (1 / epoch1_tracks_per_s + 44 * (f / tracks_per_s + (1 - f) / "
                                 "tracks_per_s_uncached)) / 3600, "
                                 "f = min(1, M * cache_mb * 2**20 / cache_bytes_per_track / (5e6 * 8))",
        "seed_workload_h_seed": SEED_HOURS,
    })
    return case


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), default="ib")
    ap.add_argument("--events", type=int, default=20_000)
    ap.add_argument("--events-per-message", type=int, default=1000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--taus", type=int, nargs="+", default=[5], help="steps between synchronisations (one case per value)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--min-hits", type=int, default=None, help="hits per track (default: 3 for ib, 4 for full)")
    ap.add_argument("--cache-mb", type=float, default=1024.0,
                    help="the workers' cache of packed tracks (cache_mb); every case also runs with 0")
    ap.add_argument("--precision", choices=("float64", "float32"), default="float64",
                    help="the workers' per-hit arithmetic (model.precision)")
    ap.add_argument("--keep", type=Path, help="keep the runs' directories here (default: a temporary one)")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, namespace="streamcal", log_to_driver=False,
             configure_logging=False)
    result = {"benchmark": "its_align workers", "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "load_before": os.getloadavg(), "args": {k: str(v) for k, v in vars(args).items()},
              "cases": []}
    try:
        with tempfile.TemporaryDirectory(prefix="streamcal-bench-its-") as tmp:
            for tau in args.taus:
                for m in args.workers:
                    case = run_case(args, m, tau, args.keep or Path(tmp))
                    result["cases"].append(case)
                    print(f"M={m}, tau={tau}: {case['tracks_per_s']:.0f} tracks/s over the replayed epochs "
                          f"({case['tracks_per_s_uncached']:.0f} reading every batch from the packed spool; "
                          f"epoch 1 {case['epoch1_tracks_per_s']:.0f}), "
                          f"peak worker RSS {case['peak_rss_mb_worker_max']:.0f} MB, epoch cost {case['epoch_cost']}, "
                          f"seed workload {case['seed_workload_h']} h cached, "
                          f"{case['seed_workload_h_seed_scale']} h at the seed's scale", flush=True)
    finally:
        ray.shutdown()
    for c in result["cases"]:  # over M = the first worker count, same tau
        base = next(b["tracks_per_s"] for b in result["cases"] if b["tau"] == c["tau"])
        c["speedup_vs_first"] = round(c["tracks_per_s"] / base, 3) if base else None
    result["load_after"] = os.getloadavg()
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
