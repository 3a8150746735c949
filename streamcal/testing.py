"""In-process runner and test helpers: run the same stages without Ray or sockets.

``run_graph_local(spec)`` builds every replica of every stage in this process and moves
messages through in-memory queues, encoded and decoded with the real wire format (so schema
checks, rejects, sequence and lineage accounting are exercised exactly as in a Ray run).
Routing is deterministic: each writer sends to the replicas of a reader stage round-robin (a
message emitted with a ``partition`` goes to replica ``partition % replicas``, as on Ray).
Replicas run one after the other in one thread, so a kind whose replicas form a process group
(``PROCESS_GROUP``) runs here with one replica only.

``run_stage(kind_or_class, config, inputs)`` runs one stage on given batches: the unit test of
a new stage kind is "build, run, assert on the output".
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa

from streamcal import wire
from streamcal.errors import StreamcalError
from streamcal.graph import GraphSpec, load_graph, parse_graph, validate_graph
from streamcal.metrics import merge_reports, summary_table
from streamcal.stage import InputWiring, Source, Stage, StageContext, get_stage_class
from streamcal.wire import Header

__all__ = ["LocalResult", "run_graph_local", "run_stage", "build_local_stages"]


@dataclass
class LocalResult:
    """What an in-process run produced."""

    stages: dict[str, list[Stage]]
    reports: list[dict[str, Any]]
    merged: dict[str, Any]
    published: dict[str, list[tuple[Header, pa.RecordBatch]]] = field(default_factory=dict)

    def summary_table(self) -> str:
        return summary_table(self.merged)

    def stage(self, name: str, replica: int = 0) -> Stage:
        return self.stages[name][replica]


class _Link:
    """One in-memory link writer -> reader replica, with its link sequence counter."""

    __slots__ = ("queue", "port", "lseq")

    def __init__(self, queue: deque, port: str) -> None:
        self.queue = queue
        self.port = port
        self.lseq = 0


def build_local_stages(spec: GraphSpec) -> tuple[dict[str, list[Stage]], dict[str, list[tuple[Stage, deque]]]]:
    plan = validate_graph(spec)
    stages: dict[str, list[Stage]] = {}
    queues: dict[str, list[tuple[Stage, deque]]] = {}
    for st in spec.stages:
        p = plan[st.name]
        if getattr(p["cls"], "PROCESS_GROUP", False) and st.replicas > 1:
            raise StreamcalError(
                f"{st.where()}: kind '{st.kind}' runs its {st.replicas} replicas as a process group, which "
                "needs the Ray runtime (`streamcal run`); in-process, use replicas: 1"
            )
        stages[st.name] = []
        for r in range(st.replicas):
            inputs = {
                i.port: InputWiring(
                    i.stream,
                    tuple(f"{w.name}/{k}" for w, _ in spec.writers(i.stream) for k in range(w.replicas)),
                    i.latest_only or spec.streams.get(i.stream) is not None and spec.streams[i.stream].latest_only,
                )
                for i in st.inputs
            }
            ctx = StageContext(
                stage=st.name, kind=st.kind, replica=r, replicas=st.replicas, inputs=inputs,
                outputs=dict(st.outputs), seed=spec.settings.seed,
                max_message_bytes=spec.settings.max_message_bytes,
            )
            stage = p["cls"](p["config"], ctx)
            stages[st.name].append(stage)
            queues.setdefault(st.name, []).append((stage, deque()))
    return stages, queues


def run_graph_local(spec: GraphSpec | str | Path, *, max_steps: int | None = None) -> LocalResult:
    """Run a whole graph in this process until every stage has seen end-of-stream."""
    if isinstance(spec, (str, Path)):
        spec = load_graph(spec) if Path(str(spec)).suffix in (".yaml", ".yml") else parse_graph(str(spec))
    stages, queues = build_local_stages(spec)
    published: dict[str, list[tuple[Header, pa.RecordBatch]]] = {}
    # routing tables: (writer stage, port) -> list of (reader stage name, [links per replica])
    rr: dict[tuple[str, str, str], int] = {}
    for st in spec.stages:
        for stream_port, stream in st.outputs.items():
            readers = spec.readers(stream)
            for w in stages[st.name]:
                links = {
                    r.name: [_Link(q, i.port) for _, q in queues[r.name]] for r, i in readers
                }
                w.ctx.send = _make_send(w, stream, links, rr, published, spec)
                w.ctx.send_raw = _make_send_raw(w, links, rr)
    for group in stages.values():
        for s in group:
            s.setup()

    def drain() -> None:
        progress = True
        while progress:
            progress = False
            for st in spec.stages:
                for stage, q in queues[st.name]:
                    while q:
                        port, frames = q.popleft()
                        stage.receive(port, frames)
                        progress = True

    sources = [(s, s.generate()) for st in spec.stages if not st.inputs for s in stages[st.name]]
    steps = 0
    while sources:
        for item in list(sources):
            stage, gen = item
            try:
                next(gen)
            except StopIteration:
                stage._complete()
                sources.remove(item)
            drain()
        steps += 1
        if max_steps is not None and steps >= max_steps:
            for stage, _ in sources:
                stage._complete()
            drain()
            break
    not_done = [f"{n}/{s.ctx.replica}" for n, g in stages.items() for s in g if not s.done]
    if not_done:
        raise StreamcalError(f"in-process run ended with stages that never saw end-of-stream: {not_done}")
    reports = [dict(s.report(), restarts=0) for g in stages.values() for s in g]
    return LocalResult(stages, reports, merge_reports(reports), published)


def _make_send(writer: Stage, stream: str, links: dict[str, list[_Link]], rr: dict, published: dict, spec: GraphSpec):
    publish = spec.streams.get(stream)

    def send(port: str, header: Header, batch: pa.RecordBatch | None) -> int:
        payload = wire.encode_payload(batch) if batch is not None else b""
        nbytes = 0
        for reader, reps in links.items():
            if header.kind == "data" and header.extra.get("part") is not None:
                targets = [reps[int(header.extra["part"]) % len(reps)]]  # partitioned: a fixed replica
            elif header.kind == "data":
                key = (writer.ctx.producer, port, reader)
                i = rr.get(key, 0)
                rr[key] = (i + 1) % len(reps)
                targets = [reps[i]]
            else:
                targets = reps
            for link in targets:
                header.extra["lseq"] = link.lseq
                link.lseq += 1
                if header.sent_ns == 0:
                    header.sent_ns = wire.now_ns()
                frames = [wire.encode_header(header), payload]
                link.queue.append((link.port, frames))
                nbytes = len(frames[0]) + len(payload)
        header.extra.pop("lseq", None)
        if publish is not None and publish.publish and batch is not None:
            published.setdefault(stream, []).append((header, batch))
        return nbytes or len(payload)

    return send


def _make_send_raw(writer: Stage, links: dict[str, list[_Link]], rr: dict):
    def send_raw(port: str, frames: list) -> None:
        for reader, reps in links.items():
            key = (writer.ctx.producer, port, reader)
            i = rr.get(key, 0)
            rr[key] = (i + 1) % len(reps)
            reps[i].queue.append((reps[i].port, list(frames)))

    return send_raw


def run_stage(
    kind: str | type[Stage],
    config: Mapping[str, Any] | Any = None,
    inputs: Mapping[str, Iterable[tuple[pa.RecordBatch, int, int]]] | None = None,
    *,
    stage_name: str = "stage",
) -> tuple[Stage, dict[str, list[tuple[Header, pa.RecordBatch]]]]:
    """Run one stage on ``inputs`` (port -> [(batch, t0_ns, t1_ns), ...]); return it and its outputs.

    Each input port is fed by one producer ``"test/0"`` in order, then end-of-stream. Outputs
    are decoded from the wire, so what you assert on is what a reader would receive.
    """
    cls = get_stage_class(kind) if isinstance(kind, str) else kind
    cfg = config if isinstance(config, cls.Config) else cls.Config.from_dict(dict(config or {}))
    in_decl, out_decl = cls.inputs(cfg), cls.outputs(cfg)
    inputs = dict(inputs or {})
    ctx = StageContext(
        stage=stage_name, kind=cls.kind,
        inputs={p: InputWiring(f"in.{p}", ("test/0",)) for p in in_decl},
        outputs={p: f"out.{p}" for p in out_decl},
    )
    stage = cls(cfg, ctx)
    outputs: dict[str, list[tuple[Header, pa.RecordBatch]]] = {p: [] for p in out_decl}

    def send(port: str, header: Header, batch: pa.RecordBatch | None) -> int:
        frames = wire.encode(header, batch)
        if header.kind == "data":
            h, b = wire.decode(frames)
            outputs[port].append((h, b))
        return sum(len(f) for f in frames)

    ctx.send = send
    stage.setup()
    if isinstance(stage, Source):
        stage.run_source()
        return stage, outputs
    for port in in_decl:
        if port not in inputs:
            inputs[port] = []
    seqs = {p: 0 for p in in_decl}
    for port, items in inputs.items():
        if port not in in_decl:
            raise StreamcalError(f"run_stage: '{cls.kind}' has no input port '{port}' (ports: {list(in_decl)})")
        for batch, t0, t1 in items:
            schema_name = in_decl[port] if in_decl[port] != "*" else None
            info = wire.REGISTRY.get(schema_name) if schema_name else _find_schema(batch.schema)
            h = Header(stream=f"in.{port}", seq=seqs[port], producer="test/0", t0_ns=t0, t1_ns=t1,
                       schema=info.name, fp=info.fingerprint, extra={"lseq": seqs[port], "src": {"test/0": [[seqs[port], seqs[port]]]}})
            seqs[port] += 1
            stage.receive(port, wire.encode(h, batch))
    for port in in_decl:
        h = Header(stream=f"in.{port}", seq=seqs[port], producer="test/0", kind="eos",
                   extra={"lseq": seqs[port], "origins": {"test/0": seqs[port]}})
        stage.receive(port, wire.encode(h, None))
    return stage, outputs


def _find_schema(schema: pa.Schema):
    for info in wire.REGISTRY:
        if info.schema.equals(schema):
            return info
    raise StreamcalError("run_stage: the batch's schema is not registered; register it with register_schema()")
