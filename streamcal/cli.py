"""The ``streamcal`` command."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from typing import Any, Iterator, Sequence

from streamcal.errors import GraphError, StreamcalError

__all__ = ["main", "build_parser"]

# detector and tool sub-commands living in their own modules: (module, function adding the parser)
_PLUGINS = ("streamcal.bench", "streamcal.detectors.tpc.cli", "streamcal.train", "streamcal.evaluate", "streamcal.detectors.its.cli", "streamcal.store", "streamcal.export")


def _load_graph(path: str):
    from streamcal.graph import load_graph

    return load_graph(path)


def cmd_validate(args: argparse.Namespace) -> int:
    from streamcal.graph import ClusterResources, validate_graph

    spec = _load_graph(args.graph)
    if args.address:
        import ray

        ray.init(address=args.address, include_dashboard=False, configure_logging=False)
        cluster = ClusterResources.from_ray()
    elif args.no_cluster_check:
        cluster = None
    else:
        cluster = ClusterResources.local()
    validate_graph(spec, cluster)
    n = sum(s.replicas for s in spec.stages)
    where = f" against {cluster.description}" if cluster else ""
    print(f"{args.graph}: valid{where} ({len(spec.stages)} stages, {n} replicas, {len(spec.stream_names())} streams)")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from streamcal.graph import render_mermaid, render_text

    spec = _load_graph(args.graph)
    print(render_mermaid(spec) if args.mermaid else render_text(spec))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from streamcal.runtime import run_graph

    spec = _load_graph(args.graph)

    def started(actors: dict) -> None:
        print(f"running {spec.name}: {len(actors)} replicas started (Ctrl-C stops the sources and drains)", flush=True)

    result = run_graph(spec, address=args.address, metrics_json=args.metrics_json, progress=not args.no_progress,
                       on_started=started)
    if args.metrics_json:
        print(f"metrics written to {args.metrics_json}")
    return 0 if result.status == "completed" else 1


def _published_endpoints(spec, stream: str) -> list[str]:
    from streamcal.runtime import _publish_endpoint

    s = spec.streams.get(stream)
    if s is None or not s.publish:
        published = [n for n, v in spec.streams.items() if v.publish]
        raise StreamcalError(
            f"stream '{stream}' is not published in {spec.source}: add streams.{stream}.publish "
            f"(published streams: {', '.join(published) or 'none'})"
        )
    replicas = sum(w.replicas for w, _ in spec.writers(stream)) or 1
    return [_publish_endpoint(s.publish, r) for r in range(replicas)]


def _stream_endpoints(args: argparse.Namespace) -> tuple[str, list[str]]:
    """(stream, endpoints) from ``[GRAPH] STREAM`` and ``--endpoint``."""
    if len(args.target) > 2:
        raise StreamcalError(f"expected [GRAPH] STREAM, got {len(args.target)} arguments: {' '.join(args.target)}")
    if len(args.target) == 1:
        if not args.endpoint:
            raise StreamcalError(f"give the graph file before '{args.target[0]}', or --endpoint to subscribe to")
        return args.target[0], list(args.endpoint)
    graph, stream = args.target
    return stream, list(args.endpoint or _published_endpoints(_load_graph(graph), stream))


class _Subscription:
    """SUB sockets on a published stream's endpoints: decoded messages of ``stream`` in arrival
    order, counting what was rejected and what the latest-only publisher skipped (sequence gaps)."""

    def __init__(self, stream: str, endpoints: list[str], hwm: int) -> None:
        import zmq

        from streamcal.stage import stage_kinds
        from streamcal.transport import subscriber

        self.stream, self.endpoints = stream, endpoints
        self.zctx = zmq.Context()
        # connect first (a PUB sends only to subscribers already there), then load the stage kinds
        # to register their schemas, which may take seconds (torch)
        self.socks = [subscriber(self.zctx, ep, hwm=hwm) for ep in endpoints]
        stage_kinds()
        self.poller = zmq.Poller()
        for sock in self.socks:
            self.poller.register(sock, zmq.POLLIN)
        self.last_seq: dict[str, int] = {}
        self.skipped = self.rejected = 0
        self.ended: set[str] = set()

    def messages(self, deadline: float | None) -> Iterator[tuple[list, Any, Any]]:
        """(frames, header, batch) until every endpoint's producer ended its stream or ``deadline``."""
        from streamcal import wire
        from streamcal.transport import recv_frames

        while len(self.ended) < len(self.endpoints) and not (deadline and time.monotonic() > deadline):
            for sock, _ in self.poller.poll(200):
                frames = recv_frames(sock)
                try:
                    header, batch = wire.decode(frames)
                except StreamcalError as exc:
                    self.rejected += 1
                    print(f"rejected: {exc}", file=sys.stderr)
                    continue
                if header.stream != self.stream:
                    continue
                last = self.last_seq.get(header.producer)
                if last is not None and header.seq > last + 1:
                    self.skipped += header.seq - last - 1
                self.last_seq[header.producer] = header.seq
                if header.kind == "eos":
                    self.ended.add(header.producer)
                yield frames, header, batch

    def close(self) -> None:
        for sock in self.socks:
            sock.close(0)
        self.zctx.term()


def cmd_tap(args: argparse.Namespace) -> int:
    from streamcal.schemas import tensor_to_numpy

    stream, endpoints = _stream_endpoints(args)
    sub = _Subscription(stream, endpoints, hwm=4)
    n = 0
    try:
        for _, header, batch in sub.messages(time.monotonic() + args.timeout if args.timeout else None):
            if header.kind != "data":
                print(f"{header.stream} {header.producer} {header.kind} seq={header.seq}")
                continue
            n += 1
            if args.json:
                print(json.dumps({**header.to_dict(), "rows": batch.num_rows, "columns": batch.schema.names}))
            else:
                shapes = {f.name: list(tensor_to_numpy(batch.column(f.name)).shape)
                          for f in batch.schema if hasattr(f.type, "shape")}
                print(
                    f"{header.stream} {header.producer} seq={header.seq} t=[{header.t0_ns / 1e9:.6f}, "
                    f"{header.t1_ns / 1e9:.6f}] s rows={batch.num_rows} cols={batch.schema.names}"
                    + (f" tensors={shapes}" if shapes else "")
                )
            if args.count is not None and n >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        sub.close()
    print(f"tap: {n} messages, {sub.skipped} skipped (latest-only), {sub.rejected} rejected", file=sys.stderr)
    return 0


def cmd_record(args: argparse.Namespace) -> int:
    from streamcal.record import Recorder

    stream, endpoints = _stream_endpoints(args)
    sub = _Subscription(stream, endpoints, hwm=100_000)
    rec = None
    try:
        for frames, header, batch in sub.messages(time.monotonic() + args.duration if args.duration else None):
            if header.kind != "data":
                continue
            if rec is None:
                rec = Recorder(args.out, batch.schema)
            rec.write(bytes(frames[0]), batch)
            if args.count is not None and rec.messages >= args.count:
                break
    except KeyboardInterrupt:
        pass
    finally:
        if rec is not None:
            rec.close()
        sub.close()
    print(f"recorded {rec.messages if rec else 0} messages of '{stream}' to {args.out}; "
          f"{sub.skipped} missed (sequence gaps), {sub.rejected} rejected")
    return 0 if rec is not None else 1


def cmd_replay(args: argparse.Namespace) -> int:
    import zmq

    from streamcal import wire
    from streamcal.record import replay_frames

    zctx = zmq.Context()
    sock = zctx.socket(zmq.PUSH if args.push else zmq.PUB)
    sock.setsockopt(zmq.SNDHWM, args.hwm)
    sock.bind(args.publish)
    time.sleep(args.wait)  # let subscribers connect (PUB drops what no one receives)
    n = 0
    last: dict[str, Any] = {}
    try:
        for header, frames in replay_frames(args.file, args.speed):
            sock.send_multipart(frames)
            last[header.producer] = header
            n += 1
        # the recording is over: end every recorded producer's stream, as the live graph would
        for h in last.values():
            eos = wire.Header(stream=h.stream, seq=h.seq + 1, producer=h.producer, kind="eos",
                              t0_ns=h.t1_ns, t1_ns=h.t1_ns, sent_ns=wire.now_ns())
            sock.send_multipart(wire.encode(eos, None))
    except KeyboardInterrupt:
        pass
    finally:
        sock.close(linger=2000)
        zctx.term()
    print(f"replayed {n} messages from {args.file} at speed {args.speed}")
    return 0


def cmd_schemas(args: argparse.Namespace) -> int:
    from streamcal.schemas import REGISTRY, canonical_schema
    from streamcal.stage import stage_kinds

    stage_kinds()
    rows = [
        {"name": i.name, "fingerprint": i.fingerprint, "canonical": canonical_schema(i.name, i.schema),
         "finite": list(i.finite), "doc": i.doc}
        for i in REGISTRY
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(f"{r['name']:32s} {r['fingerprint']}  {r['doc']}\n    {r['canonical']}")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    import dataclasses

    from streamcal.stage import get_stage_class, stage_kinds

    for kind in stage_kinds():
        cls = get_stage_class(kind)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip().splitlines()
        fields = ", ".join(f"{f.name}={f.default!r}" for f in dataclasses.fields(cls.Config) if f.init)
        print(f"{kind:20s} {doc[0] if doc else ''}\n    config: {fields}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="streamcal", description="Streaming ML calibration on Ray + ZeroMQ + Arrow")
    p.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("validate", help="check a graph before anything starts")
    s.add_argument("graph")
    s.add_argument("--address", help="check resources against this Ray cluster (default: this machine)")
    s.add_argument("--no-cluster-check", action="store_true", help="skip the resource check")
    s.set_defaults(func=cmd_validate)

    s = sub.add_parser("show", help="print the graph as text or Mermaid")
    s.add_argument("graph")
    s.add_argument("--mermaid", action="store_true")
    s.set_defaults(func=cmd_show)

    s = sub.add_parser("run", help="run a graph on Ray (local by default)")
    s.add_argument("graph")
    s.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    s.add_argument("--metrics-json", help="write per-stage metrics and the summary as JSON")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("tap", help="print a live published stream")
    s.add_argument("target", nargs="+", metavar="[GRAPH] STREAM",
                   help="the graph file and the published stream (the graph may be left out with --endpoint)")
    s.add_argument("--endpoint", action="append", help="subscribe here instead of the graph's publish endpoint")
    s.add_argument("--count", type=int)
    s.add_argument("--timeout", type=float, help="stop after this many seconds")
    s.add_argument("--json", action="store_true", help="one JSON line per message")
    s.set_defaults(func=cmd_tap)

    s = sub.add_parser("record", help="write a published stream to an Arrow IPC file (headers kept)")
    s.add_argument("target", nargs="+", metavar="[GRAPH] STREAM",
                   help="the graph file and the published stream (the graph may be left out with --endpoint)")
    s.add_argument("--out", required=True)
    s.add_argument("--endpoint", action="append")
    s.add_argument("--count", type=int)
    s.add_argument("--duration", type=float, help="seconds")
    s.set_defaults(func=cmd_record)

    s = sub.add_parser("replay", help="send a recording again, paced by event time")
    s.add_argument("file")
    s.add_argument("--publish", required=True, help="endpoint to bind, e.g. tcp://127.0.0.1:5610")
    s.add_argument("--speed", type=float, default=1.0, help="1.0 real time, 0 as fast as possible")
    s.add_argument("--push", action="store_true", help="PUSH (lossless, blocking) instead of PUB")
    s.add_argument("--hwm", type=int, default=1000)
    s.add_argument("--wait", type=float, default=0.5, help="seconds to wait for subscribers first")
    s.set_defaults(func=cmd_replay)

    s = sub.add_parser("schemas", help="list registered stream schemas with fingerprints")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_schemas)

    s = sub.add_parser("stages", help="list stage kinds and their configs")
    s.set_defaults(func=cmd_stages)

    for mod_name in _PLUGINS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as exc:
            if exc.name != mod_name:
                raise
            continue
        mod.add_subparser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args) or 0)
    except GraphError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StreamcalError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
