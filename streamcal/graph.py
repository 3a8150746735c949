"""The graph spec: YAML -> frozen :class:`GraphSpec`, validated before any actor starts.

Every problem found is reported at once, each naming the stage (and its line in the file), the
field, and what is allowed. See ``configs/demo.yaml`` for a complete example.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from streamcal.errors import ConfigError, GraphError, ResourceError, StreamcalError
from streamcal.schemas import ANY, REGISTRY

__all__ = [
    "Resources",
    "InputSpec",
    "StreamSpec",
    "StageSpec",
    "Settings",
    "GraphSpec",
    "ClusterResources",
    "load_graph",
    "parse_graph",
    "validate_graph",
    "render_text",
    "render_mermaid",
]

_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_ENDPOINT = re.compile(r"^(tcp://[^:]+:\d+|ipc://.+)$")


class _LineLoader(yaml.SafeLoader):
    """SafeLoader whose mappings remember their line (1-based) under the key ``__line__``."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict:
    m = yaml.SafeLoader.construct_mapping(loader, node, deep=True)
    m["__line__"] = node.start_mark.line + 1
    return m


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _strip_lines(v) for k, v in x.items() if k != "__line__"}
    if isinstance(x, list):
        return [_strip_lines(v) for v in x]
    return x


@dataclass(frozen=True)
class Resources:
    """What a stage asks of its node. ``niceness``: the Unix nice value of the stage's process (0 =
    the priority of everything else on the node; Ray's own default for its workers, used when
    None, is 15, which lets any other process on the node preempt the stage, e.g. a training: give
    stages on a latency path 0). ``cpus``: the CPU ids (as the node's kernel numbers them) that
    every thread of the stage's process runs on; the graph's other stages, and the Ray processes
    of a local Ray that ``streamcal run`` starts, are kept off every id any stage names, so a
    latency path can have cores to itself (Linux only; README, "CPU pinning").
    ``wakeup_latency_us``: while the stage runs, the node's CPUs wake from idle within this many
    microseconds (a PM QoS request on ``/dev/cpu_dma_latency``; 0: an idle CPU polls instead of
    halting, which on a virtual machine saves the hypervisor's wake-up); needs root or write
    access to that file."""

    num_cpus: float | None = None
    num_gpus: float = 0.0
    custom: Mapping[str, float] = field(default_factory=dict)
    niceness: int | None = None
    cpus: tuple[int, ...] | None = None
    wakeup_latency_us: int | None = None

    def request(self) -> dict[str, float]:
        req = {"CPU": self.num_cpus if self.num_cpus is not None else 0.0, "GPU": self.num_gpus}
        req.update(self.custom)
        return {k: v for k, v in req.items() if v}


@dataclass(frozen=True)
class InputSpec:
    port: str
    stream: str
    latest_only: bool = False
    queue: int | None = None


@dataclass(frozen=True)
class StreamSpec:
    name: str
    queue: int = 64
    latest_only: bool = False
    publish: str | None = None  # endpoint of the latest-only publishing (XPUB) socket for external subscribers


@dataclass(frozen=True)
class StageSpec:
    name: str
    kind: str
    config: Mapping[str, Any]
    inputs: tuple[InputSpec, ...] = ()
    outputs: Mapping[str, str] = field(default_factory=dict)
    replicas: int = 1
    resources: Resources = Resources()
    restarts: int = 3
    line: int | None = None

    def where(self) -> str:
        return f"stage '{self.name}'" + (f" (line {self.line})" if self.line else "")


@dataclass(frozen=True)
class Settings:
    interface: str = "127.0.0.1"
    stall_timeout_s: float = 30.0
    max_message_bytes: int = 256 * 1024 * 1024
    seed: int = 0
    shared_memory: bool = True  # same-node links carry large payloads in /dev/shm segments
    shared_memory_mb: int = 1024  # per output stream of each replica
    # how often the driver asks every replica for its status (progress, end, stalls, queue depths);
    # each request runs in the stage's process, so a latency-critical graph asks less often
    status_interval_s: float = 0.1


@dataclass(frozen=True)
class GraphSpec:
    name: str
    stages: tuple[StageSpec, ...]
    streams: Mapping[str, StreamSpec]
    settings: Settings = Settings()
    source: str | None = None

    def stage(self, name: str) -> StageSpec:
        for s in self.stages:
            if s.name == name:
                return s
        raise StreamcalError(f"no stage named '{name}' in graph '{self.name}'")

    def writers(self, stream: str) -> list[tuple[StageSpec, str]]:
        return [(s, p) for s in self.stages for p, st in s.outputs.items() if st == stream]

    def readers(self, stream: str) -> list[tuple[StageSpec, InputSpec]]:
        return [(s, i) for s in self.stages for i in s.inputs if i.stream == stream]

    def stream_names(self) -> list[str]:
        names: list[str] = []
        for s in self.stages:
            for st in list(s.outputs.values()) + [i.stream for i in s.inputs]:
                if st not in names:
                    names.append(st)
        return names

    def queue(self, stream: str, reader: InputSpec | None = None) -> int:
        if reader is not None and reader.queue is not None:
            return reader.queue
        return self.streams.get(stream, StreamSpec(stream)).queue

    @property
    def reserved_cpus(self) -> frozenset[int]:
        """The CPU ids that stages pin themselves to (``resources.cpus``), kept free of the rest."""
        return frozenset(c for s in self.stages for c in (s.resources.cpus or ()))


# ---------------------------------------------------------------------------------- parsing
_STAGE_KEYS = {"name", "kind", "config", "inputs", "outputs", "replicas", "resources", "restarts"}
_STREAM_KEYS = {"queue", "latest_only", "publish"}
_SETTINGS_KEYS = {"interface", "stall_timeout_s", "max_message_bytes", "seed", "shared_memory", "shared_memory_mb",
                  "status_interval_s"}


def load_graph(path: str | os.PathLike) -> GraphSpec:
    """Read and parse a graph YAML file (structure only; call :func:`validate_graph` next)."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise GraphError([f"cannot read graph file: {exc}"], str(p)) from None
    return parse_graph(text, source=str(p))


def parse_graph(text: str, source: str | None = None) -> GraphSpec:
    try:
        raw = yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as exc:
        raise GraphError([f"not valid YAML: {exc}"], source) from None
    if not isinstance(raw, dict):
        raise GraphError(["the file must be a mapping with 'stages' (and optionally 'streams', 'settings')"], source)
    problems: list[str] = []
    # keys starting with "x-" are free: YAML anchors shared by several stages (x-geometry: &geometry ...)
    unknown = {k for k in raw if not str(k).startswith("x-")} - {"name", "stages", "streams", "settings", "__line__"}
    for k in sorted(unknown):
        problems.append(f"top level: unknown key '{k}' (allowed: name, stages, streams, settings, and x-... for anchors)")
    name = str(raw.get("name") or (Path(source).stem if source else "graph"))

    settings = Settings()
    sraw = raw.get("settings") or {}
    if not isinstance(sraw, dict):
        problems.append("settings: must be a mapping")
    else:
        for k in sorted(set(sraw) - _SETTINGS_KEYS - {"__line__"}):
            problems.append(f"settings: unknown key '{k}' (allowed: {', '.join(sorted(_SETTINGS_KEYS))})")
        try:
            settings = Settings(
                interface=str(sraw.get("interface", "127.0.0.1")),
                stall_timeout_s=float(sraw.get("stall_timeout_s", 30.0)),
                max_message_bytes=int(sraw.get("max_message_bytes", 256 * 1024 * 1024)),
                seed=int(sraw.get("seed", 0)),
                shared_memory=sraw.get("shared_memory", True),
                shared_memory_mb=int(sraw.get("shared_memory_mb", 1024)),
                status_interval_s=float(sraw.get("status_interval_s", 0.1)),
            )
            if not isinstance(settings.shared_memory, bool):
                problems.append(f"settings: field 'shared_memory': must be true or false, got {settings.shared_memory!r}")
            if settings.shared_memory_mb < 1:
                problems.append(f"settings: field 'shared_memory_mb': must be >= 1, got {settings.shared_memory_mb}")
            if not 0.01 <= settings.status_interval_s <= 10.0:
                problems.append("settings: field 'status_interval_s': must be between 0.01 and 10 seconds, "
                                f"got {settings.status_interval_s}")
            elif settings.status_interval_s >= settings.stall_timeout_s:
                problems.append(f"settings: field 'status_interval_s' ({settings.status_interval_s} s) must be shorter "
                                f"than 'stall_timeout_s' ({settings.stall_timeout_s} s)")
        except (TypeError, ValueError) as exc:
            problems.append(f"settings: {exc}")
        if settings.interface != "node":
            try:
                ipaddress.ip_address(settings.interface)
            except ValueError:
                problems.append(
                    f"settings: field 'interface': '{settings.interface}' is not an IP address "
                    "(use 127.0.0.1 for one machine, 'node' for the node's own IP on a multi-machine cluster)"
                )

    streams: dict[str, StreamSpec] = {}
    straw = raw.get("streams") or {}
    if not isinstance(straw, dict):
        problems.append("streams: must be a mapping of stream name -> options")
        straw = {}
    for sname, opts in straw.items():
        if sname == "__line__":
            continue
        opts = opts or {}
        where = f"stream '{sname}'" + (f" (line {opts.get('__line__')})" if isinstance(opts, dict) and opts.get("__line__") else "")
        if not isinstance(opts, dict):
            problems.append(f"{where}: options must be a mapping")
            continue
        for k in sorted(set(opts) - _STREAM_KEYS - {"__line__"}):
            problems.append(f"{where}: unknown field '{k}' (allowed: {', '.join(sorted(_STREAM_KEYS))})")
        queue = opts.get("queue", 64)
        if not isinstance(queue, int) or isinstance(queue, bool) or queue < 1:
            problems.append(f"{where}: field 'queue' must be an integer >= 1, got {queue!r}")
            queue = 64
        publish = opts.get("publish")
        if publish is not None and (not isinstance(publish, str) or not _ENDPOINT.match(publish)):
            problems.append(f"{where}: field 'publish' must be an endpoint like tcp://127.0.0.1:5601, got {publish!r}")
            publish = None
        lo = opts.get("latest_only", False)
        if not isinstance(lo, bool):
            problems.append(f"{where}: field 'latest_only' must be true or false, got {lo!r}")
            lo = False
        streams[sname] = StreamSpec(sname, queue, lo, publish)

    stages: list[StageSpec] = []
    rstages = raw.get("stages")
    if not isinstance(rstages, list) or not rstages:
        problems.append("stages: must be a non-empty list of stages")
        rstages = []
    for idx, st in enumerate(rstages):
        if not isinstance(st, dict):
            problems.append(f"stages[{idx}]: must be a mapping with 'name' and 'kind'")
            continue
        line = st.get("__line__")
        sname = st.get("name")
        where = f"stage '{sname}'" + (f" (line {line})" if line else "") if sname else f"stages[{idx}] (line {line})"
        for k in sorted(set(st) - _STAGE_KEYS - {"__line__"}):
            problems.append(f"{where}: unknown field '{k}' (allowed: {', '.join(sorted(_STAGE_KEYS))})")
        if not isinstance(sname, str) or not _NAME.match(sname):
            problems.append(f"{where}: field 'name' must match {_NAME.pattern}, got {sname!r}")
            continue
        kind = st.get("kind")
        if not isinstance(kind, str) or not kind:
            problems.append(f"{where}: field 'kind' is required (a registered stage kind)")
            kind = ""
        cfg = st.get("config") or {}
        if not isinstance(cfg, dict):
            problems.append(f"{where}: field 'config' must be a mapping")
            cfg = {}
        inputs: list[InputSpec] = []
        rin = st.get("inputs") or {}
        if not isinstance(rin, dict):
            problems.append(f"{where}: field 'inputs' must map port -> stream")
            rin = {}
        for port, val in rin.items():
            if port == "__line__":
                continue
            if isinstance(val, str):
                inputs.append(InputSpec(port, val))
            elif isinstance(val, dict) and isinstance(val.get("stream"), str):
                bad = set(val) - {"stream", "latest_only", "queue", "__line__"}
                if bad:
                    problems.append(f"{where}: inputs.{port}: unknown field(s) {sorted(bad)} (allowed: stream, latest_only, queue)")
                q = val.get("queue")
                if q is not None and (not isinstance(q, int) or q < 1):
                    problems.append(f"{where}: inputs.{port}.queue must be an integer >= 1, got {q!r}")
                    q = None
                inputs.append(InputSpec(port, val["stream"], bool(val.get("latest_only", False)), q))
            else:
                problems.append(f"{where}: inputs.{port} must be a stream name or {{stream: NAME, latest_only: ..., queue: ...}}")
        rout = st.get("outputs") or {}
        outputs: dict[str, str] = {}
        if not isinstance(rout, dict):
            problems.append(f"{where}: field 'outputs' must map port -> stream")
        else:
            for port, val in rout.items():
                if port == "__line__":
                    continue
                if not isinstance(val, str):
                    problems.append(f"{where}: outputs.{port} must be a stream name, got {val!r}")
                    continue
                outputs[port] = val
        replicas = st.get("replicas", 1)
        if not isinstance(replicas, int) or isinstance(replicas, bool) or replicas < 1:
            problems.append(f"{where}: field 'replicas' must be an integer >= 1, got {replicas!r}")
            replicas = 1
        restarts = st.get("restarts", 3)
        if not isinstance(restarts, int) or isinstance(restarts, bool) or restarts < -1:
            problems.append(f"{where}: field 'restarts' must be an integer >= -1 (-1: unlimited), got {restarts!r}")
            restarts = 3
        res = Resources()
        rres = st.get("resources") or {}
        if not isinstance(rres, dict):
            problems.append(f"{where}: field 'resources' must be a mapping")
        else:
            allowed = ("num_cpus", "num_gpus", "custom", "niceness", "cpus", "wakeup_latency_us")
            for k in sorted(set(rres) - {*allowed, "__line__"}):
                problems.append(f"{where}: resources: unknown field '{k}' (allowed: {', '.join(allowed)})")
            wake = rres.get("wakeup_latency_us")
            if wake is not None and (not isinstance(wake, int) or isinstance(wake, bool) or wake < 0):
                problems.append(f"{where}: resources.wakeup_latency_us must be an integer >= 0 (microseconds), "
                                f"got {wake!r}")
                wake = None
            cpus = rres.get("cpus")
            if cpus is not None:
                if (not isinstance(cpus, list) or not cpus or len(set(cpus)) != len(cpus)
                        or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus)):
                    problems.append(f"{where}: resources.cpus must be a non-empty list of distinct CPU ids "
                                    f"(integers >= 0, e.g. [1]), got {cpus!r}")
                    cpus = None
                else:
                    cpus = tuple(sorted(cpus))
            nice = rres.get("niceness")
            if nice is not None and (not isinstance(nice, int) or isinstance(nice, bool) or not 0 <= nice <= 19):
                problems.append(f"{where}: resources.niceness must be an integer in [0, 19] (0: normal priority; "
                                f"lowering it below 0 needs privileges), got {nice!r}")
                nice = None
            ncpu, ngpu, custom = rres.get("num_cpus"), rres.get("num_gpus", 0), rres.get("custom") or {}
            if ncpu is not None and (not isinstance(ncpu, (int, float)) or isinstance(ncpu, bool) or ncpu < 0):
                problems.append(f"{where}: resources.num_cpus must be a number >= 0, got {ncpu!r}")
                ncpu = None
            if not isinstance(ngpu, (int, float)) or isinstance(ngpu, bool) or ngpu < 0:
                problems.append(f"{where}: resources.num_gpus must be a number >= 0, got {ngpu!r}")
                ngpu = 0
            if not isinstance(custom, dict) or not all(
                isinstance(v, (int, float)) and v >= 0 for k, v in custom.items() if k != "__line__"
            ):
                problems.append(f"{where}: resources.custom must map resource name -> amount >= 0")
                custom = {}
            res = Resources(ncpu, float(ngpu), {k: float(v) for k, v in custom.items() if k != "__line__"}, nice, cpus, wake)
        stages.append(
            StageSpec(sname, kind, _strip_lines(cfg), tuple(inputs), outputs, replicas, res, restarts, line)
        )
    if problems:
        raise GraphError(problems, source)
    return GraphSpec(name, tuple(stages), streams, settings, source)


# ---------------------------------------------------------------------------------- cluster
@dataclass(frozen=True)
class ClusterResources:
    """Total resources per node, e.g. ``[{"CPU": 2, "GPU": 0}]``."""

    nodes: tuple[Mapping[str, float], ...]
    description: str = "the cluster"

    @classmethod
    def local(cls) -> "ClusterResources":
        """This machine as a local Ray would see it (CPUs, and GPUs from nvidia-smi)."""
        gpus = 0
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            gpus = len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
        elif shutil.which("nvidia-smi"):
            try:
                out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10).stdout
                gpus = sum(1 for line in out.splitlines() if line.startswith("GPU "))
            except (OSError, subprocess.SubprocessError):
                gpus = 0
        return cls(({"CPU": float(os.cpu_count() or 1), "GPU": float(gpus)},), "this machine")

    @classmethod
    def from_ray(cls) -> "ClusterResources":
        """The resources of the connected Ray cluster (alive nodes)."""
        import ray

        nodes = tuple(dict(n["Resources"]) for n in ray.nodes() if n.get("Alive"))
        return cls(nodes, f"the Ray cluster of {len(nodes)} node(s)")

    def total(self, key: str) -> float:
        return sum(n.get(key, 0.0) for n in self.nodes)


# ---------------------------------------------------------------------------------- validation
def validate_graph(spec: GraphSpec, cluster: ClusterResources | None = None) -> dict[str, Any]:
    """Check the whole graph; raise :class:`GraphError` listing every problem.

    Returns the resolved plan: per stage its class, config object and port schemas.
    """
    from streamcal.stage import get_stage_class

    problems: list[str] = []
    plan: dict[str, Any] = {}
    seen: dict[str, StageSpec] = {}
    for st in spec.stages:
        if st.name in seen:
            problems.append(f"{st.where()}: duplicate stage name '{st.name}' (first defined at line {seen[st.name].line})")
            continue
        seen[st.name] = st
        try:
            cls = get_stage_class(st.kind)
        except StreamcalError as exc:
            problems.append(f"{st.where()}: field 'kind': {exc}")
            continue
        try:
            cfg = cls.Config.from_dict(dict(st.config), owner=f"{st.where()} config")
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        try:
            ins, outs = cls.inputs(cfg), cls.outputs(cfg)
        except Exception as exc:
            problems.append(f"{st.where()}: cannot determine its ports: {exc}")
            continue
        for i in st.inputs:
            if i.port not in ins:
                problems.append(
                    f"{st.where()}: field 'inputs': unknown port '{i.port}' for kind '{st.kind}' "
                    f"(ports: {', '.join(ins) or 'none'})"
                )
        wired_in = {i.port for i in st.inputs}
        for p in ins:
            if p not in wired_in:
                problems.append(f"{st.where()}: field 'inputs': port '{p}' is not connected to a stream")
        for p in st.outputs:
            if p not in outs:
                problems.append(
                    f"{st.where()}: field 'outputs': unknown port '{p}' for kind '{st.kind}' "
                    f"(ports: {', '.join(outs) or 'none'})"
                )
        if st.replicas > 1 and getattr(cls, "SINGLE_REPLICA", False):
            problems.append(f"{st.where()}: field 'replicas': kind '{st.kind}' supports only one replica")
        plan[st.name] = {"cls": cls, "config": cfg, "inputs": ins, "outputs": outs}

    # streams: dangling, unread, schema agreement
    for stream in spec.stream_names():
        writers = spec.writers(stream)
        readers = spec.readers(stream)
        sspec = spec.streams.get(stream)
        if not writers:
            for st, i in readers:
                problems.append(f"{st.where()}: field 'inputs.{i.port}': stream '{stream}' is read but no stage writes it")
        if not readers and not (sspec and sspec.publish):
            for st, p in writers:
                problems.append(
                    f"{st.where()}: field 'outputs.{p}': stream '{stream}' is written but never read "
                    f"(connect a reader, or publish it under streams.{stream}.publish)"
                )
        w_schemas = {}
        for st, p in writers:
            if st.name in plan and p in plan[st.name]["outputs"]:
                w_schemas[f"{st.name}.{p}"] = plan[st.name]["outputs"][p]
        for name, sch in w_schemas.items():
            if sch not in REGISTRY:
                problems.append(f"stage '{name.split('.')[0]}': output '{name.split('.', 1)[1]}' declares unregistered schema '{sch}'")
        if len(set(w_schemas.values())) > 1:
            problems.append(
                f"stream '{stream}': writers disagree on the schema: "
                + ", ".join(f"{k} writes '{v}'" for k, v in w_schemas.items())
            )
        if w_schemas:
            wname, wsch = next(iter(w_schemas.items()))
            for st, i in readers:
                if st.name not in plan or i.port not in plan[st.name]["inputs"]:
                    continue
                rsch = plan[st.name]["inputs"][i.port]
                if rsch != ANY and rsch != wsch:
                    fp_w = REGISTRY.get(wsch).fingerprint if wsch in REGISTRY else "?"
                    fp_r = REGISTRY.get(rsch).fingerprint if rsch in REGISTRY else "?"
                    problems.append(
                        f"{st.where()}: field 'inputs.{i.port}': schema mismatch on stream '{stream}': "
                        f"{wname} writes '{wsch}' ({fp_w}) but this port reads '{rsch}' ({fp_r})"
                    )
    for sname in spec.streams:
        if sname not in spec.stream_names():
            problems.append(f"stream '{sname}': declared under 'streams' but no stage writes or reads it")
    problems.extend(_cycles(spec))
    problems.extend(_publish_problems(spec))

    res_problems = _check_resources(spec, cluster) if cluster is not None else []
    if problems or res_problems:
        raise (GraphError if problems else ResourceError)(problems + res_problems, spec.source)
    return plan


def publish_endpoint(base: str, replica: int) -> str:
    """The endpoint replica ``replica`` of a stream's writer binds its publishing socket on: the
    ``publish`` endpoint with the port increased by ``replica`` (tcp://). A non-tcp endpoint
    (ipc://) is used as given, so graph validation allows it only for a one-replica writer."""
    if replica == 0:
        return base
    if not base.startswith("tcp://"):
        raise StreamcalError(
            f"publish endpoint {base} is not tcp://: only a stage with one replica can publish on it"
        )
    host, _, port = base[len("tcp://"):].rpartition(":")
    return f"tcp://{host}:{int(port) + replica}"


def _publish_problems(spec: GraphSpec) -> list[str]:
    """Every PUB socket of the run binds its own endpoint: a non-tcp ``publish`` endpoint takes
    one writer replica only, and no two replicas (of any stream) get the same endpoint."""
    problems: list[str] = []
    bound: dict[str, tuple[str, str]] = {}  # endpoint -> (stream, replica key)
    for sname, s in spec.streams.items():
        if not s.publish:
            continue
        writers = spec.writers(sname)
        if not s.publish.startswith("tcp://"):
            for st, _ in writers:
                if st.replicas > 1:
                    problems.append(
                        f"stream '{sname}': field 'publish': endpoint {s.publish} is not tcp://, so only one "
                        f"replica can bind it, but {st.where()} writes the stream with {st.replicas} replicas "
                        "(use a tcp:// endpoint: replica r publishes on its port + r)"
                    )
        for st, _ in writers:
            for r in range(st.replicas if s.publish.startswith("tcp://") else 1):
                ep = publish_endpoint(s.publish, r)
                key = f"{st.name}/{r}"
                if ep in bound:
                    other_stream, other_key = bound[ep]
                    problems.append(
                        f"stream '{sname}': field 'publish': endpoint {ep} (writer {key}) is also bound by "
                        + (f"stream '{other_stream}' (writer {other_key})" if other_stream != sname
                           else f"writer {other_key} of this stream (a published stream can have one writer stage)")
                    )
                    continue
                bound[ep] = (sname, key)
    return problems


def _cycles(spec: GraphSpec) -> list[str]:
    """A stage that (through other stages) reads its own output would never see end-of-stream:
    such loops are refused, naming the stages and streams on the loop."""
    succ: dict[str, list[tuple[str, str]]] = {st.name: [] for st in spec.stages}
    for stream in spec.stream_names():
        for w, _ in spec.writers(stream):
            for r, _ in spec.readers(stream):
                succ.setdefault(w.name, []).append((stream, r.name))
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    found: list[str] = []
    nodes: list[str] = []
    via: list[str] = []  # via[i]: the stream from nodes[i] to nodes[i + 1]

    def visit(node: str) -> None:
        state[node] = 1
        nodes.append(node)
        for stream, nxt in succ.get(node, []):
            if state.get(nxt) == 1:
                i = nodes.index(nxt)
                loop = nodes[i:] + [nxt]
                streams = via[i:] + [stream]
                text = loop[0] + "".join(f" -[{s}]-> {n}" for s, n in zip(streams, loop[1:]))
                found.append(f"stage '{nxt}': streams form a loop {text} (end-of-stream could never propagate)")
            elif nxt not in state:
                via.append(stream)
                visit(nxt)
                via.pop()
        nodes.pop()
        state[node] = 2

    for st in spec.stages:
        if st.name not in state:
            visit(st.name)
    return found


def _check_resources(spec: GraphSpec, cluster: ClusterResources) -> list[str]:
    problems = []
    free = [dict(n) for n in cluster.nodes]
    for st in spec.stages:
        req = st.resources.request()
        if st.resources.num_gpus > 0 and cluster.total("GPU") == 0:
            problems.append(
                f"{st.where()}: field 'resources.num_gpus': asks for {st.resources.num_gpus:g} GPU(s) but "
                f"{cluster.description} has no GPU resource (set num_gpus: 0 and device: cpu, or run on a GPU node)"
            )
            continue
        fits_one = [n for n in cluster.nodes if all(n.get(k, 0.0) >= v for k, v in req.items())]
        if not fits_one:
            missing = {k: v for k, v in req.items() if max((n.get(k, 0.0) for n in cluster.nodes), default=0) < v}
            problems.append(
                f"{st.where()}: field 'resources': no node of {cluster.description} has "
                + ", ".join(f"{v:g} {k}" for k, v in missing.items())
                + " (largest node: "
                + ", ".join(f"{k}={max((n.get(k, 0.0) for n in cluster.nodes), default=0):g}" for k in missing)
                + "); the resource request cannot be satisfied"
            )
            continue
        for r in range(st.replicas):
            for n in free:
                if all(n.get(k, 0.0) >= v for k, v in req.items()):
                    for k, v in req.items():
                        n[k] -= v
                    break
            else:
                problems.append(
                    f"{st.where()}: field 'replicas': replica {r} of {st.replicas} does not fit: "
                    f"{cluster.description} has too few resources left for "
                    + ", ".join(f"{v:g} {k}" for k, v in req.items())
                    + " after placing the stages before it"
                )
                break
    return problems


# ---------------------------------------------------------------------------------- rendering
def render_text(spec: GraphSpec) -> str:
    lines = [f"graph {spec.name}"]
    for st in spec.stages:
        res = st.resources.request()
        lines.append(
            f"  [{st.name}] kind={st.kind} replicas={st.replicas}"
            + (f" resources={res}" if res else "")
        )
        for i in st.inputs:
            opt = []
            if i.latest_only or spec.streams.get(i.stream, StreamSpec(i.stream)).latest_only:
                opt.append("latest-only")
            opt.append(f"queue={spec.queue(i.stream, i)}")
            lines.append(f"      <- {i.port}: {i.stream} ({', '.join(opt)})")
        for p, s in st.outputs.items():
            pub = spec.streams.get(s, StreamSpec(s)).publish
            lines.append(f"      -> {p}: {s}" + (f" (published at {pub})" if pub else ""))
    return "\n".join(lines)


def render_mermaid(spec: GraphSpec) -> str:
    out = ["flowchart LR"]
    for st in spec.stages:
        label = f"{st.name}<br/>{st.kind}" + (f" x{st.replicas}" if st.replicas > 1 else "")
        if st.resources.num_gpus:
            label += f"<br/>{st.resources.num_gpus:g} GPU"
        out.append(f'    {st.name.replace("-", "_").replace(".", "_")}["{label}"]')
    ident = lambda n: n.replace("-", "_").replace(".", "_")  # noqa: E731
    for stream in spec.stream_names():
        for w, _ in spec.writers(stream):
            for r, i in spec.readers(stream):
                arrow = "-.->" if (i.latest_only or spec.streams.get(stream, StreamSpec(stream)).latest_only) else "-->"
                out.append(f"    {ident(w.name)} {arrow}|{stream}| {ident(r.name)}")
            pub = spec.streams.get(stream, StreamSpec(stream)).publish
            if pub:
                out.append(f'    {ident(w.name)} -.->|{stream}| pub_{ident(stream)}(("{pub}"))')
    return "\n".join(out)
