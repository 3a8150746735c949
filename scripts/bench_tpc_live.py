#!/usr/bin/env python
"""Live TPC correction benchmark: IDC intervals at the real rate (1 kHz) through the Ray graph,
corrections published every 10 ms frame; a subscriber process (the reconstruction client) measures the latency from the send time
of a frame's last IDC interval to the arrival of the frame's published correction.

Side by side: the numerical ground truth's time for the same frame (Poisson solve + Langevin
distortions + corrections on the same grid), the reason to use a learned correction at all.

    python scripts/bench_tpc_live.py --json bench-tpc-live.json
    python scripts/bench_tpc_live.py --grids 90x17x17 --seconds 2 --method model --checkpoint ckpt.pt
    python scripts/bench_tpc_live.py --payload full     # the (3, nphi, nr, nz) map instead of (3, nr, nz)
    python scripts/bench_tpc_live.py --status-intervals 0.1,1.0   # the driver's status requests, both rates
    python scripts/bench_tpc_live.py --setups default,pinned,poll,pinned+poll

Setups (``--setups``, README "CPU placement"), each on a Ray started for it, side by side:
``default`` the shipped graphs' resources (niceness 0); ``pinned`` the latency path (IDC source,
1D stage, client) on the machine's last CPU (``resources.cpus``), Ray's processes, the driver and
the rest kept off it; ``poll`` the stages hold ``resources.wakeup_latency_us: 0`` (idle CPUs poll
instead of halting: needs root or write access to /dev/cpu_dma_latency); ``pinned+poll`` both.

Prints one JSON document; the target is p99 <= 2 ms for the 1D correction on CPU.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import socket
import sys
import tempfile
import textwrap
import time

import numpy as np

TARGET_P99_MS = 2.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _graph(grid: str, intervals: int, port: int, method: str, checkpoint: str, source: str, recording: str,
           payload: str, status_interval: float, pin: list[int] | None = None, poll: bool = False) -> str:
    from streamcal.detectors.tpc.constants import parse_grid

    ckpt = f", checkpoint: {checkpoint}" if checkpoint else ""
    g = parse_grid(grid)
    res = "{niceness: 0" + (f", cpus: {pin}" if pin else "") + (", wakeup_latency_us: 0" if poll else "") + "}"
    if source == "live":
        src = f"""
      - name: idc
        kind: tpc_idc
        resources: {res}
        config: {{grid: {grid}, intervals: {intervals}, speed: 1.0, clock: wall, seed: 1}}
        outputs: {{out: idc}}"""
    else:
        src = f"""
      - name: idc
        kind: replay
        resources: {res}
        config: {{path: {recording}, schema: tpc.idc/{g.nphi}x{g.nr}, speed: 1.0}}
        outputs: {{out: idc}}"""
    return textwrap.dedent(f"""
    name: bench-tpc-{grid}
    settings: {{status_interval_s: {status_interval}}}
    stages:{src}
      - name: sc1d
        kind: tpc_sc1d
        resources: {res}
        config: {{grid: {grid}, method: {method}, payload: {payload}{ckpt}}}
        inputs: {{idc: idc}}
        outputs: {{out: corrections}}
    streams:
      corrections: {{publish: "tcp://127.0.0.1:{port}"}}
    """)


def _record(grid: str, intervals: int, path: str) -> None:
    """The same IDC stream as the live source, simulated as fast as possible and recorded."""
    from streamcal.graph import parse_graph
    from streamcal.runtime import run_graph

    res = run_graph(parse_graph(textwrap.dedent(f"""
    name: bench-tpc-record-{grid}
    stages:
      - name: idc
        kind: tpc_idc
        config: {{grid: {grid}, intervals: {intervals}, speed: 0, clock: zero, seed: 1}}
        outputs: {{out: idc}}
      - name: rec
        kind: record
        config: {{path: {path}}}
        inputs: {{in: idc}}
    """)), print_summary=False, progress=False)
    if res.status != "completed":
        raise RuntimeError(f"recording the IDC stream ended {res.status}: {res.problems}")


def _subscribe(endpoint: str, grid: str, pin: list[int] | None, ready, stop, results) -> None:
    """The reconstruction client: a process of its own (as a C++ reconstruction would be), so the
    Ray driver's threads do not share its interpreter; on the latency path's CPUs when pinned. Per
    frame: the receive time minus the send time of the frame's last IDC interval (end to end), split
    at the correction's send time into the stage part (transport in + windowing + inference +
    encoding) and the delivery part."""
    try:
        if pin:
            from streamcal.cpus import pin_process

            pin_process(pin)
        _receive(endpoint, grid, ready, stop, results)
    except BaseException as exc:  # reported to the parent, which would otherwise wait for nothing
        results.put({"error": f"subscriber: {type(exc).__name__}: {exc}"})
        raise


def _receive(endpoint: str, grid: str, ready, stop, results) -> None:
    import zmq

    import pyarrow as pa

    from streamcal import wire
    from streamcal.detectors.tpc.streams import correction_rz_schema, correction_schema
    from streamcal.schemas import tensor_column

    # the schemas the frames carry (full, compact) registered, and the decoding path warmed up on one
    # message of each: the first decode in a process sets up ~50 ms of lazy state, which would hold
    # up the first frames (a reconstruction client runs for hours)
    for info in (correction_schema(grid), correction_rz_schema(grid)):
        shape = info.schema.field("correction").type.shape
        example = pa.RecordBatch.from_arrays(
            [pa.array([0], pa.int64()), tensor_column(np.zeros((1, *shape), np.float32)), pa.array([0], pa.int32()),
             pa.array([0], pa.int32()), pa.array([False]), pa.array(["warm-up"])], schema=info.schema)
        head = wire.Header(stream="corrections", seq=0, producer="sc1d/0", t0_ns=0, t1_ns=0, schema=info.name,
                           fp=info.fingerprint, extra={"trigger_sent_ns": 0})
        _, batch = wire.decode(wire.encode(head, example))
        batch.column("degraded")[0].as_py()
    zctx = zmq.Context()
    sock = zctx.socket(zmq.SUB)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.connect(endpoint)
    ready.set()
    total, stage, delivery, degraded, nbytes = [], [], [], 0, []
    while not stop.is_set():
        if not sock.poll(100, zmq.POLLIN):
            continue
        frames = sock.recv_multipart(copy=False)
        now = time.time_ns()
        header, batch = wire.decode([memoryview(f.buffer) for f in frames])
        if header.kind != "data":
            continue
        trigger = int(header.extra["trigger_sent_ns"])
        total.append(now - trigger)
        stage.append(header.sent_ns - trigger)
        delivery.append(now - header.sent_ns)
        degraded += int(batch.column("degraded")[0].as_py())
        nbytes.append(len(frames[1].buffer))
    sock.close(0)
    zctx.term()
    results.put({"total_ns": total, "stage_ns": stage, "delivery_ns": delivery, "degraded": degraded,
                 "payload_bytes": int(np.median(nbytes)) if nbytes else None})


def _percentiles(ns: list[int], skip: int = 5) -> dict | None:
    a = np.asarray(ns[skip:], dtype=np.float64) / 1e6  # the first frames include start-up
    if not a.size:
        return None
    return {"p50": round(float(np.percentile(a, 50)), 3), "p99": round(float(np.percentile(a, 99)), 3),
            "max": round(float(a.max()), 3)}


def _ground_truth_ms(grid: str, repeat: int = 5) -> dict:
    import torch

    from streamcal.detectors.tpc.density import simulate_density
    from streamcal.detectors.tpc.langevin import space_charge_distortions

    rho = torch.as_tensor(simulate_density(grid, seed=1)[0], dtype=torch.float64)
    space_charge_distortions(rho, grid, corrections=True)  # warm (solver set-up, caches)
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        space_charge_distortions(rho, grid, corrections=True)
        times.append((time.perf_counter() - t) * 1e3)
    return {"median_ms": round(float(np.median(times)), 2), "min_ms": round(min(times), 2), "repeat": repeat}


def bench(grid: str, seconds: float, method: str, checkpoint: str, source: str, workdir: str,
          payload: str = "compact", status_interval: float = 1.0, pin: list[int] | None = None,
          poll: bool = False) -> dict:
    from streamcal.graph import parse_graph
    from streamcal.runtime import run_graph

    port = _free_port()
    mp = multiprocessing.get_context("spawn")
    ready, stop, results = mp.Event(), mp.Event(), mp.Queue()
    sub = mp.Process(target=_subscribe, args=(f"tcp://127.0.0.1:{port}", grid, pin, ready, stop, results), daemon=True)
    sub.start()
    if not ready.wait(60):
        raise RuntimeError("the subscriber process did not start within 60 s")
    intervals = int(seconds * 1000)
    recording = os.path.join(workdir, f"idc-{grid}.arrow")
    if source == "replay" and not os.path.exists(recording):
        _record(grid, intervals, recording)
    load = os.getloadavg()[0]
    res = run_graph(parse_graph(_graph(grid, intervals, port, method, checkpoint, source, recording, payload,
                                       status_interval, pin, poll)), print_summary=False, progress=False)
    time.sleep(0.3)
    stop.set()
    got = results.get(timeout=30)
    sub.join(5)
    if "error" in got:
        raise RuntimeError(got["error"])
    lat = np.asarray(got["total_ns"][5:], dtype=np.float64) / 1e6  # the first frames include start-up
    rows = {r["stage"]: r for r in res.merged["stages"]}
    sc = rows["sc1d"]["summary"][0]
    return {
        "grid": grid,
        "method": method,
        "source": source,
        "payload": payload,
        "payload_bytes": got["payload_bytes"],
        "status_interval_s": status_interval,
        "pinned_cpus": pin,
        "wakeup_latency_us": 0 if poll else None,
        "stage_cpus": {r["replica"]: r.get("cpus") for r in res.reports},
        "load_1min_before": round(load, 2),
        "status": res.status,
        "idc_intervals": intervals,
        "frames_published": rows["sc1d"]["out_msgs"],
        "frames_received": len(got["total_ns"]),
        "degraded_frames": got["degraded"],
        "latency_ms": _percentiles(got["total_ns"]),
        "latency_split_ms": {"stage": _percentiles(got["stage_ns"]), "delivery": _percentiles(got["delivery_ns"])},
        "compute_ms": {"p50": sc["compute_p50_ms"], "p99": sc["compute_p99_ms"]},
        "target_p99_ms": TARGET_P99_MS,
        "target_met": bool(lat.size and np.percentile(lat, 99) <= TARGET_P99_MS),
    }


SETUPS = ("default", "pinned", "poll", "pinned+poll")


def _setup(name: str, online: frozenset[int]) -> tuple[str, list[int] | None, bool]:
    """``--setups`` value -> (name, the latency path's CPU ids or None, idle polling)."""
    if name not in SETUPS:
        raise SystemExit(f"--setups: unknown setup '{name}' (known: {', '.join(SETUPS)})")
    pin = None
    if "pinned" in name:
        if len(online) < 2:
            raise SystemExit(f"--setups {name}: pinning needs 2 CPUs or more (online: {sorted(online)})")
        pin = [max(online)]
    return name, pin, "poll" in name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--grids", default="90x17x17,180x33x33")
    p.add_argument("--seconds", type=float, default=20.0,
                   help="event time per run (at 1 kHz: 100 frames per second; p99 wants 1,000 frames or more)")
    p.add_argument("--method", choices=("linear", "model"), default="linear")
    p.add_argument("--checkpoint", default="")
    p.add_argument("--sources", default="live,replay",
                   help="IDC source: live (simulated in the graph, ~0.3 ms of CPU per interval) and/or replay "
                        "(the same stream recorded first, as IDCs arrive from the detector in production)")
    p.add_argument("--payload", choices=("compact", "full"), default="compact",
                   help="the correction as published: compact (3, nr, nz), the same at every phi, or the full "
                        "(3, nphi, nr, nz) map")
    p.add_argument("--status-intervals", default="1.0",
                   help="settings.status_interval_s of the graph, one run per value (the shipped TPC graphs: 1.0; "
                        "the framework's default: 0.1)")
    p.add_argument("--setups", default="default,pinned+poll",
                   help=f"comma-separated, one set of runs each, on a Ray started for it ({', '.join(SETUPS)}; "
                        "module doc)")
    p.add_argument("--json", help="also write the JSON here")
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    from tqdm import tqdm

    from streamcal.cpus import keep_off, online_cpus

    setups = [_setup(v, online_cpus()) for v in args.setups.split(",")]
    cases = [(g, s, float(i)) for g in args.grids.split(",") for s in args.sources.split(",")
             for i in args.status_intervals.split(",")]
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-tpc-") as workdir, \
            tqdm(total=len(setups) * len(cases), desc="runs", file=sys.stderr) as bar:
        for setup, pin, poll in setups:
            # the driver, and the Ray it starts (GCS, raylet, workers inherit it), off the pinned CPUs
            with keep_off(pin or ()):
                ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                         configure_logging=False)
                try:
                    for g, src, interval in cases:
                        run = bench(g, args.seconds, args.method, args.checkpoint, src, workdir, args.payload,
                                    interval, pin, poll)
                        runs.append({"setup": setup, **run})
                        bar.update()
                finally:
                    ray.shutdown()
    # the numerical ground truth of one frame, side by side; timed here, on every CPU (inside a
    # setup that pins, this process keeps off the pinned CPU, its torch threads crowded on the rest)
    truth = {g: _ground_truth_ms(g) for g in args.grids.split(",")}
    out = {"benchmark": "tpc_live_1d", "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                                   "python": platform.python_version()},
           "numerical_ground_truth_per_frame": truth, "runs": runs}
    text = json.dumps(out, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
