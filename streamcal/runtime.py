"""The Ray runtime: one actor per stage replica, wired over the ZeroMQ data plane.

Ray is the control plane only: it places each replica with the resources the graph asks for,
restarts crashed replicas (``restarts`` per stage), and carries small control calls (endpoints,
wiring, status, reports). Messages never travel through Ray.

Lifecycle (driver side, :func:`run_graph`): validate against the cluster's resources -> start a
coordinator and every replica (each binds its output sockets and reports its endpoints) ->
send each replica the endpoints of the writers of its inputs -> start -> watch progress until
every replica has seen end-of-stream -> collect reports -> summary.
A replica that Ray restarts re-binds its previous ports, re-connects from the wiring kept by the
coordinator, and goes on; messages lost with it are counted from lineage and link sequences.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import zmq

from streamcal import cpus as cpu_placement
from streamcal import shm
from streamcal.errors import StreamcalError
from streamcal.graph import ClusterResources, GraphSpec, StreamSpec, publish_endpoint, validate_graph
from streamcal.metrics import merge_reports, summary_table
from streamcal.schemas import REGISTRY
from streamcal.stage import InputWiring, Source, StageContext, get_stage_class
from streamcal.transport import InputEdge, OutputEdge, ReaderGroup, StopRequested, recv_frames

__all__ = ["RunResult", "RunStuckError", "run_graph", "StageActor", "GroupStoreActor", "Coordinator", "NAMESPACE"]

log = logging.getLogger("streamcal.runtime")
NAMESPACE = "streamcal"
_SHUTDOWN_WAIT_S = 3.0  # how long the driver waits for the replicas to close their sockets


class RunStuckError(StreamcalError):
    """No progress for ``stall_timeout_s`` while stages still wait for input: names the edges."""


def _coord_name(run_id: str) -> str:
    return f"streamcal-coordinator-{run_id}"


@ray.remote(num_cpus=0)
class Coordinator:
    """Keeps what a restarted replica needs: its previous ports, its wiring, its incarnation."""

    def __init__(self) -> None:
        self.endpoints: dict[str, dict[str, str]] = {}
        self.wiring: dict[str, dict[str, list[str]]] = {}
        self.incarnations: dict[str, int] = {}

    def next_incarnation(self, key: str) -> int:
        n = self.incarnations.get(key, -1) + 1
        self.incarnations[key] = n
        return n

    def put_endpoints(self, key: str, endpoints: dict[str, str]) -> None:
        self.endpoints[key] = endpoints

    def get_endpoints(self, key: str) -> dict[str, str]:
        return self.endpoints.get(key, {})

    def put_wiring(self, key: str, wiring: dict[str, list[str]]) -> None:
        self.wiring[key] = wiring

    def get_wiring(self, key: str) -> dict[str, list[str]]:
        return self.wiring.get(key, {})


def _schema_payload(names: set[str]) -> dict[str, tuple[bytes, tuple[str, ...], str]]:
    out = {}
    for n in names:
        if n in REGISTRY:
            info = REGISTRY.get(n)
            out[n] = (info.schema.serialize().to_pybytes(), info.finite, info.doc)
    return out


def _publish_endpoint(base: str, replica: int) -> str:
    """The endpoint a writer replica publishes on (tcp://: the port + ``replica``; a non-tcp
    endpoint takes replica 0 only, which graph validation enforces)."""
    return publish_endpoint(base, replica)


class _ActorImpl:
    """Body of :class:`StageActor` (a plain class, so it can be unit-tested without Ray)."""

    def __init__(self, run_id: str, spec: GraphSpec, stage_name: str, replica: int,
                 schemas: dict[str, tuple[bytes, tuple[str, ...], str]], group_store: str | None = None) -> None:
        logging.basicConfig(level=os.environ.get("STREAMCAL_LOG", "WARNING"),
                            format="%(levelname)s %(name)s: %(message)s")
        self.key = f"{stage_name}/{replica}"
        # first, before this process starts threads of its own (they inherit it): where it runs
        st = spec.stage(stage_name)
        cpu_placement.place_stage(st.where(), st.resources.cpus, spec.reserved_cpus)
        self._pm_qos = cpu_placement.hold_wakeup_latency(st.where(), st.resources.wakeup_latency_us)
        self.coord = ray.get_actor(_coord_name(run_id), namespace=NAMESPACE)
        self.incarnation = ray.get(self.coord.next_incarnation.remote(self.key))
        for name, (blob, finite, doc) in schemas.items():
            REGISTRY.register(name, pa.ipc.read_schema(pa.py_buffer(blob)), doc=doc, finite=finite)
        self.spec = spec
        cls = get_stage_class(st.kind)
        cfg = cls.Config.from_dict(dict(st.config), owner=st.where())
        inputs = {
            i.port: InputWiring(
                i.stream,
                tuple(f"{w.name}/{k}" for w, _ in spec.writers(i.stream) for k in range(w.replicas)),
                i.latest_only or spec.streams.get(i.stream, StreamSpec(i.stream)).latest_only,
            )
            for i in st.inputs
        }
        self.ctx = StageContext(
            stage=st.name, kind=st.kind, replica=replica, replicas=st.replicas, incarnation=self.incarnation,
            inputs=inputs, outputs=dict(st.outputs), seed=spec.settings.seed,
            max_message_bytes=spec.settings.max_message_bytes, group_store=group_store,
        )
        self.stage = cls(cfg, self.ctx)
        self.zctx = zmq.Context()
        self._abort = False
        self._stop = False
        self._shutdown = False
        self.state = "created"
        self.error: str | None = None
        prev = ray.get(self.coord.get_endpoints.remote(self.key)) if self.incarnation else {}
        self.node_id = ray.get_runtime_context().get_node_id()
        self.status_requests = 0
        self._last_export = 0.0
        # same Ray node = same /dev/shm: the node id is the token that offers shared memory
        self.shm_token = self.node_id if spec.settings.shared_memory else None
        self.outputs: dict[str, OutputEdge] = {}
        for port, stream in st.outputs.items():
            sspec = spec.streams.get(stream, StreamSpec(stream))
            groups = [
                ReaderGroup(
                    r.name,
                    tuple(f"{r.name}/{k}/{i.port}".encode() for k in range(r.replicas)),
                    i.latest_only or sspec.latest_only,
                )
                for r, i in spec.readers(stream)
            ]
            hwm = min([spec.queue(stream, i) for _, i in spec.readers(stream)] or [sspec.queue])
            prev_port = int(prev[stream].rsplit(":", 1)[1]) if stream in prev else 0
            self.outputs[port] = OutputEdge(
                self.zctx, stream, groups, hwm=hwm, interface=_interface(spec.settings.interface), port=prev_port,
                publish=_publish_endpoint(sspec.publish, replica) if sspec.publish else None,
                stall_timeout_s=spec.settings.stall_timeout_s, counters=self.stage.metrics.outputs[port],
                should_abort=lambda: self._abort, label=f"{self.key}:{port}->{stream}",
                shm_token=self.shm_token, shm_limit_bytes=spec.settings.shared_memory_mb << 20, shm_prefix=run_id,
            )
        self.ctx.send = lambda port, header, batch: self.outputs[port].send(header, batch)
        self.ctx.send_raw = lambda port, frames: self.outputs[port].send_raw(frames)
        self.inputs: dict[str, InputEdge] = {}
        self.stage.setup()
        # what exists now (modules, models, buffers) lives as long as the stage: keep it out of the
        # garbage collector's full passes, whose pauses grow with it (tens of ms with torch loaded)
        gc.collect()
        gc.freeze()
        ray.get(self.coord.put_endpoints.remote(self.key, self.endpoints()))
        if self.incarnation:
            log.warning("replica %s restarted (incarnation %d); re-joining the run", self.key, self.incarnation)
            wiring = ray.get(self.coord.get_wiring.remote(self.key))
            if wiring or not st.inputs:
                self.connect(wiring)
                self.start()

    # ------------------------------------------------------------------ control calls
    def endpoints(self) -> dict[str, str]:
        return {e.stream: e.endpoint for e in self.outputs.values()}

    def connect(self, wiring: dict[str, list[str]]) -> None:
        for port, eps in wiring.items():
            w = self.ctx.inputs[port]
            self.inputs[port] = InputEdge(
                self.zctx, port, f"{self.key}/{port}".encode(), eps, hwm=self.spec.queue(w.stream),
                shm_token=self.shm_token,
            )
        self.state = "connected"

    def start(self) -> None:
        if self.state == "running":
            return
        self.state = "running"
        self.thread = threading.Thread(target=self._loop, name=f"stage-{self.key}", daemon=True)
        self.thread.start()

    def stop(self) -> None:
        """Sources stop producing and end their streams; the graph then drains."""
        self._stop = True

    def abort(self) -> None:
        """Stop everything now, without draining."""
        self._abort = True
        self._stop = True

    def status(self) -> dict[str, Any]:
        self.status_requests += 1
        m = self.stage.metrics
        now = time.monotonic()
        if now - self._last_export >= 1.0:
            # Ray's metrics are recorded here, on the control thread, not in the data loop: setting
            # the gauges takes 0.1-2 ms, which a message waiting in the loop would wait for
            self._last_export = now
            _export_ray_metrics(m)
        waiting = {}
        if not self.stage.done:
            for p, w in self.ctx.inputs.items():
                missing = sorted(set(w.producers) - self.stage._eos_from[p])
                if missing:
                    waiting[p] = {"stream": w.stream, "end_of_stream_from": missing}
        return {
            "key": self.key,
            "state": self.state,
            "done": self.stage.done,
            "incarnation": self.incarnation,
            "in": sum(c.messages + sum(c.rejects.values()) for c in m.inputs.values()),
            "out": sum(c.messages for c in m.outputs.values()),
            "work": self.stage.work,
            "waiting": waiting,
            "error": self.error,
            "node_id": self.node_id,
            "rss_mb": _rss_mb(),
            "stalled_s": round(sum(c.stalled_s for c in m.outputs.values()), 3),
            # for queue depths: data messages sent per output stream, received per input port
            "sent": {c.stream: c.messages for c in m.outputs.values()},
            "received": {p: c.messages + c.gaps + sum(c.rejects.values()) for p, c in m.inputs.items()},
        }

    def report(self) -> dict[str, Any]:
        rep = self.stage.report()
        rep["restarts"] = self.incarnation
        rep["replica"] = self.key
        rep["node_id"] = self.node_id
        rep["status_requests"] = self.status_requests  # the driver's, in this incarnation (settings.status_interval_s)
        rep["endpoints"] = self.endpoints()
        rep["niceness"] = os.nice(0)
        rep["cpus"] = cpu_placement.process_cpus()  # those of all its threads
        rep["wakeup_latency_us"] = cpu_placement.wakeup_latency_us() if self._pm_qos is not None else None
        rep["peak_rss_mb"] = _peak_rss_mb()
        return rep

    def shutdown(self) -> None:
        self._shutdown = True
        self._abort = True
        t = getattr(self, "thread", None)
        if t is not None:
            t.join(timeout=5)
        for e in self.outputs.values():
            e.close()
        for e in self.inputs.values():
            e.close()
        self.zctx.term()
        if self._pm_qos is not None:
            os.close(self._pm_qos)  # the PM QoS request ends with it
            self._pm_qos = None

    # ------------------------------------------------------------------ the loop
    def _loop(self) -> None:
        try:
            if isinstance(self.stage, Source):
                self.stage.run_source(should_stop=lambda: self._stop)
            else:
                self._consume()
            self.state = "done" if self.stage.done else "aborted"
            self._serve_after_done()
        except StopRequested:
            self.state = "aborted"
        except Exception as exc:  # a bug in a stage: report it to the driver, then crash for a restart
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("stage %s failed", self.key)
            os._exit(1)

    def _consume(self) -> None:
        poller = zmq.Poller()
        where: dict[zmq.Socket, tuple[str, bool, Any, InputEdge | None] | OutputEdge] = {}
        for port, edge in self.inputs.items():
            latest = self.ctx.inputs[port].latest_only
            for s in edge.socks:
                poller.register(s, zmq.POLLIN)
                where[s] = (port, latest, edge.resolver(s), edge if edge.readers else None)
        for e in self.outputs.values():
            poller.register(e.sock, zmq.POLLIN)
            where[e.sock] = e
        while not self.stage.done and not self._abort:
            for sock, _ in poller.poll(100):
                info = where[sock]
                if isinstance(info, OutputEdge):
                    info.poll_control()
                    continue
                port, latest, shm, shm_edge = info
                if latest:
                    frames = self._drain_latest(sock, port, shm)
                    if frames is not None:
                        self.stage.receive(port, frames, shm=shm)
                    del frames
                    if shm_edge is not None:
                        shm_edge.flush()
                    continue
                for _ in range(256):
                    try:
                        frames = recv_frames(sock, zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self.stage.receive(port, frames, shm=shm)
                    del frames  # a shared-memory payload is released once nothing refers to it ...
                    if shm_edge is not None:
                        shm_edge.flush()  # ... and the writer told at once
                    if self.stage.done or self._abort:
                        break
        _export_ray_metrics(self.stage.metrics)

    def _drain_latest(self, sock: zmq.Socket, port: str, shm: Any = None) -> list | None:
        """Read everything queued on a latest-only link; account for all, process the newest."""
        newest = None
        while True:
            try:
                frames = recv_frames(sock, zmq.NOBLOCK)
            except zmq.Again:
                return newest
            if newest is not None:
                self.stage.receive(port, newest, process=False, shm=shm)
                self.stage.metrics.inputs[port].dropped += 1
            newest = frames

    def _serve_after_done(self) -> None:
        """After end-of-stream: keep answering hellos of readers that restart, until shut down."""
        poller = zmq.Poller()
        for e in self.outputs.values():
            poller.register(e.sock, zmq.POLLIN)
        while not self._shutdown and not self._abort:
            if not self.outputs:
                time.sleep(0.1)
                continue
            for sock, _ in poller.poll(100):
                for e in self.outputs.values():
                    if e.sock is sock:
                        e.poll_control()


def _interface(setting: str) -> str:
    """The address data-plane sockets bind to: ``node`` means this node's IP as Ray knows it
    (what a multi-machine cluster needs); anything else is taken as an address."""
    return ray.util.get_node_ip_address() if setting == "node" else setting


def _peak_rss_mb() -> float:
    """Peak resident memory of this process in MB (0 where the resource module is absent)."""
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except (ImportError, OSError):  # pragma: no cover - not Linux
        return 0.0


def _rss_mb() -> float:
    """Resident memory of this process in MB (Linux; 0 where /proc is absent)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e6
    except (OSError, ValueError):
        return 0.0


_RAY_GAUGES: dict[str, Any] = {}


def _export_ray_metrics(m) -> None:
    """Per-edge counters as Ray metrics (visible in Ray's Prometheus export)."""
    try:
        from ray.util.metrics import Gauge
    except ImportError:  # pragma: no cover
        return
    if not _RAY_GAUGES:
        keys = ("stage", "replica", "port", "direction")
        for name, desc in (
            ("streamcal_messages", "messages through a stage port"),
            ("streamcal_bytes", "bytes through a stage port"),
            ("streamcal_rejected", "messages rejected at a stage input"),
            ("streamcal_gaps", "messages missing on a link (sequence gaps)"),
            ("streamcal_dropped", "latest-only messages replaced by newer ones"),
        ):
            _RAY_GAUGES[name] = Gauge(name, description=desc, tag_keys=keys)
    for direction, edges in (("in", m.inputs), ("out", m.outputs)):
        for port, c in edges.items():
            tags = {"stage": m.stage, "replica": str(m.replica), "port": port, "direction": direction}
            _RAY_GAUGES["streamcal_messages"].set(c.messages, tags)
            _RAY_GAUGES["streamcal_bytes"].set(c.bytes, tags)
            _RAY_GAUGES["streamcal_rejected"].set(sum(c.rejects.values()), tags)
            _RAY_GAUGES["streamcal_gaps"].set(c.gaps, tags)
            _RAY_GAUGES["streamcal_dropped"].set(c.dropped, tags)


@ray.remote(max_concurrency=8)
class StageActor(_ActorImpl):
    """One stage replica as a Ray actor (threaded: the data loop runs beside control calls)."""


@ray.remote
class GroupStoreActor:
    """Serves the rendezvous store of one stage's process group (:mod:`streamcal.group`) for the
    whole run, so that it outlives any replica (a restarted one rejoins through it)."""

    def __init__(self, interface: str) -> None:
        from streamcal.group import GroupStoreServer

        host = _interface(interface)
        self.server = GroupStoreServer(host, bind_host=host)

    def address(self) -> str:
        return self.server.address


@dataclass
class RunResult:
    """What a run produced: per-replica reports, merged per-stage metrics, and the summary."""

    run_id: str
    reports: list[dict[str, Any]]
    merged: dict[str, Any]
    elapsed_s: float
    status: str = "completed"
    problems: list[str] = field(default_factory=list)

    def summary_table(self) -> str:
        return summary_table(self.merged)

    def to_json(self) -> dict[str, Any]:
        return {"run_id": self.run_id, "status": self.status, "elapsed_s": round(self.elapsed_s, 3),
                "problems": self.problems, "lost": self.merged["lost"], "stages": self.merged["stages"],
                "edges": self.merged.get("edges", []),
                "replicas": self.reports}


def run_graph(
    spec: GraphSpec,
    *,
    address: str | None = None,
    metrics_json: str | os.PathLike | None = None,
    startup_timeout_s: float = 120.0,
    print_summary: bool = True,
    progress: bool = True,
    on_started: Any = None,
) -> RunResult:
    """Run ``spec`` on Ray until every stage has drained. Starts a local Ray unless one is
    initialised or ``address`` names a cluster. Ctrl-C stops the sources and drains; a second
    Ctrl-C aborts. ``on_started(actors)`` is called once the graph runs (tests use it).

    When stages pin themselves to CPUs (``resources.cpus``), the driver keeps off those CPUs for
    the run, and so does the local Ray it starts (:mod:`streamcal.cpus`)."""
    with cpu_placement.keep_off(spec.reserved_cpus):
        return _run_graph(spec, address=address, metrics_json=metrics_json, startup_timeout_s=startup_timeout_s,
                          print_summary=print_summary, progress=progress, on_started=on_started)


def _run_graph(spec: GraphSpec, *, address: str | None, metrics_json: str | os.PathLike | None,
               startup_timeout_s: float, print_summary: bool, progress: bool, on_started: Any) -> RunResult:
    own_ray = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, namespace=NAMESPACE,
                 log_to_driver=True, configure_logging=False)
        own_ray = True
    run_id = uuid.uuid4().hex[:8]
    t_start = time.monotonic()
    actors: dict[str, Any] = {}
    actors_aux: list[Any] = []  # rendezvous stores of process groups
    coord = None
    try:
        validate_graph(spec, ClusterResources.from_ray())
        schema_names = set()
        for st in spec.stages:
            cls = get_stage_class(st.kind)
            cfg = cls.Config.from_dict(dict(st.config))
            schema_names |= set(cls.outputs(cfg).values()) | set(cls.inputs(cfg).values())
        schemas = _schema_payload(schema_names)
        coord = Coordinator.options(name=_coord_name(run_id), namespace=NAMESPACE).remote()
        group_stores: dict[str, str] = {}
        for st in spec.stages:
            if getattr(get_stage_class(st.kind), "PROCESS_GROUP", False) and st.replicas > 1:
                server = GroupStoreActor.options(num_cpus=0).remote(spec.settings.interface)
                actors_aux.append(server)
                group_stores[st.name] = ray.get(server.address.remote(), timeout=startup_timeout_s)
        for st in spec.stages:
            opts: dict[str, Any] = {
                "max_restarts": st.restarts,
                "max_task_retries": -1 if st.restarts else 0,
                "num_gpus": st.resources.num_gpus,
                # a stage with no CPU request is placed freely (Ray would otherwise reserve 1 CPU)
                "num_cpus": st.resources.num_cpus or 0,
            }
            if st.resources.custom:
                opts["resources"] = dict(st.resources.custom)
            if st.resources.niceness is not None:  # Ray applies it when it starts the worker process
                opts["runtime_env"] = {"env_vars": {"RAY_worker_niceness": str(st.resources.niceness)}}
            for r in range(st.replicas):
                actors[f"{st.name}/{r}"] = StageActor.options(**opts).remote(run_id, spec, st.name, r, schemas,
                                                                             group_stores.get(st.name))
        keys = list(actors)
        refs = [actors[k].endpoints.remote() for k in keys]
        ready, pending = ray.wait(refs, num_returns=len(refs), timeout=startup_timeout_s)
        if pending:
            late = [keys[refs.index(p)] for p in pending]
            raise StreamcalError(
                f"stage replica(s) {late} did not start within {startup_timeout_s:.0f} s: the cluster has not "
                "placed them (check their resources against `ray status`)"
            )
        endpoints = dict(zip(keys, ray.get(refs)))
        calls = []
        for st in spec.stages:
            for r in range(st.replicas):
                wiring = {
                    i.port: [endpoints[f"{w.name}/{k}"][i.stream] for w, _ in spec.writers(i.stream) for k in range(w.replicas)]
                    for i in st.inputs
                }
                key = f"{st.name}/{r}"
                calls.append(coord.put_wiring.remote(key, wiring))
                calls.append(actors[key].connect.remote(wiring))
        ray.get(calls)
        # readers first, sources last
        order = sorted(spec.stages, key=lambda s: not s.inputs, reverse=False)
        ray.get([actors[f"{st.name}/{r}"].start.remote() for st in order for r in range(st.replicas)])
        if on_started is not None:
            on_started(actors)
        depth = _QueueDepth(spec)
        status, problems = _watch(spec, actors, progress, depth)
        reports = _collect_reports(actors)
        merged = merge_reports(reports)
        merged["edges"] = depth.rows()
        result = RunResult(run_id, reports, merged, time.monotonic() - t_start, status, problems)
    finally:
        shutdowns = []
        for a in actors.values():
            try:
                shutdowns.append(a.shutdown.remote())
            except Exception:  # noqa: BLE001 - best effort
                pass
        # let the replicas close their sockets (a published stream's last messages, its
        # end-of-stream above all, still go out to subscribers for up to the publishing socket's linger)
        try:
            if shutdowns:
                ray.wait(shutdowns, num_returns=len(shutdowns), timeout=_SHUTDOWN_WAIT_S)
        except Exception:  # noqa: BLE001 - best effort
            time.sleep(0.2)
        for a in actors.values():
            ray.kill(a, no_restart=True)
        for a in actors_aux:
            ray.kill(a)
        if coord is not None:
            ray.kill(coord)
        n = shm.remove_run(run_id)  # segments of replicas that did not close (killed, crashed) on this node
        if n:
            log.info("removed %d shared-memory segment(s) left by run %s", n, run_id)
        if own_ray:
            ray.shutdown()
    if print_summary:
        print(result.summary_table())
        for p in result.problems:
            print(f"problem: {p}")
    if metrics_json:
        Path(metrics_json).write_text(json.dumps(result.to_json(), indent=2, default=str))
    return result


def _collect_reports(actors: dict[str, Any]) -> list[dict[str, Any]]:
    reports = []
    for key, a in actors.items():
        try:
            reports.append(ray.get(a.report.remote(), timeout=30))
        except Exception as exc:  # noqa: BLE001
            log.error("no report from %s: %s", key, exc)
    return reports


class _QueueDepth:
    """Messages in flight on each edge (sent by the writers, not yet received by the reader
    stage), sampled at every status poll of the driver; also exported as a Ray metric."""

    def __init__(self, spec: GraphSpec) -> None:
        self.edges = [
            (stream, r.name, i.port, [f"{w.name}/{k}" for w, _ in spec.writers(stream) for k in range(w.replicas)],
             [f"{r.name}/{k}" for k in range(r.replicas)], bool(i.latest_only or spec.streams.get(stream, StreamSpec(stream)).latest_only))
            for stream in spec.stream_names() for r, i in spec.readers(stream)
        ]
        self.max = {(e[0], e[1]): 0 for e in self.edges}
        self.total = {(e[0], e[1]): 0 for e in self.edges}
        self.samples = 0
        self.gauge = None
        try:
            from ray.util.metrics import Gauge

            self.gauge = Gauge("streamcal_queue_depth", description="messages in flight on an edge",
                               tag_keys=("stream", "reader"))
        except Exception:  # noqa: BLE001 - metrics are optional
            pass

    def sample(self, statuses: dict[str, dict]) -> None:
        self.samples += 1
        for stream, reader, port, writers, readers, _ in self.edges:
            sent = sum(statuses.get(w, {}).get("sent", {}).get(stream, 0) for w in writers)
            got = sum(statuses.get(r, {}).get("received", {}).get(port, 0) for r in readers)
            d = max(0, sent - got)
            self.max[(stream, reader)] = max(self.max[(stream, reader)], d)
            self.total[(stream, reader)] += d
            if self.gauge is not None:
                self.gauge.set(d, {"stream": stream, "reader": reader})

    def rows(self) -> list[dict[str, Any]]:
        n = max(self.samples, 1)
        return [{"stream": s, "reader": r, "latest_only": lo, "queue_depth_max": self.max[(s, r)],
                 "queue_depth_mean": round(self.total[(s, r)] / n, 2)} for s, r, _, _, _, lo in self.edges]


def _watch(spec: GraphSpec, actors: dict[str, Any], progress: bool,
           depth: "_QueueDepth | None" = None) -> tuple[str, list[str]]:
    """Poll replicas until all are done; handle Ctrl-C and SIGTERM (the first drains, the second
    aborts); name stuck edges."""
    stall = max(spec.settings.stall_timeout_s, 1.0)
    last_total, last_change = -1, time.monotonic()
    interrupted = 0
    statuses: dict[str, dict] = {}
    bar = _Progress(progress)
    previous_term = None
    if threading.current_thread() is threading.main_thread():
        def _on_term(signum: int, frame: Any) -> None:  # `kill`, a batch system, a service manager
            raise KeyboardInterrupt

        previous_term = signal.signal(signal.SIGTERM, _on_term)
    try:
        while True:
            try:
                keys = list(actors)
                refs = [actors[k].status.remote() for k in keys]
                ready, _ = ray.wait(refs, num_returns=len(refs), timeout=5.0)
                for k, ref in zip(keys, refs):
                    if ref in ready:
                        try:
                            statuses[k] = ray.get(ref)
                        except ray.exceptions.RayActorError as exc:
                            statuses[k] = {"key": k, "state": "dead", "done": False, "in": 0, "out": 0,
                                           "waiting": {}, "error": str(exc).splitlines()[0]}
                    else:
                        statuses.setdefault(k, {"key": k, "state": "restarting", "done": False, "in": 0,
                                                "out": 0, "waiting": {}})["state"] = "restarting"
                if depth is not None:
                    depth.sample(statuses)
                if statuses and all(s["done"] for s in statuses.values()) and len(statuses) == len(actors):
                    bar.close(statuses)
                    return "completed", []
                dead = [k for k, s in statuses.items() if s["state"] == "dead"]
                total = sum(s["in"] + s["out"] + s.get("work", 0) for s in statuses.values())
                bar.update(statuses)
                now = time.monotonic()
                if total != last_total:
                    last_total, last_change = total, now
                elif now - last_change > stall or (dead and now - last_change > 1.0):
                    problems = _stuck_report(statuses, dead)
                    bar.close(statuses)
                    for a in actors.values():
                        a.abort.remote()
                    return "stuck", problems
                time.sleep(spec.settings.status_interval_s)
            except KeyboardInterrupt:
                interrupted += 1
                if interrupted == 1:
                    print("\nstopping: sources end their streams, the graph drains "
                          "(Ctrl-C or SIGTERM again to abort)")
                    for st in spec.stages:
                        if not st.inputs:
                            for r in range(st.replicas):
                                actors[f"{st.name}/{r}"].stop.remote()
                else:
                    print("\naborting")
                    for a in actors.values():
                        a.abort.remote()
                    bar.close(statuses)
                    return "aborted", ["aborted by the user"]
    finally:
        bar.close(statuses)
        if previous_term is not None:
            signal.signal(signal.SIGTERM, previous_term)


def _stuck_report(statuses: dict[str, dict], dead: list[str]) -> list[str]:
    problems = [f"replica {k} is dead (no restarts left): {statuses[k].get('error')}" for k in dead]
    for k, s in sorted(statuses.items()):
        for port, w in (s.get("waiting") or {}).items():
            problems.append(
                f"stuck edge: {', '.join(w['end_of_stream_from'])} -> {k} (port '{port}', stream "
                f"'{w['stream']}'): no end-of-stream and no progress"
            )
    return problems or ["no progress, but no replica reports a missing input"]


class _Progress:
    """A one-line live view of the run (rich), when progress is on and stdout is a terminal."""

    def __init__(self, enabled: bool) -> None:
        self.live = None
        if enabled and os.isatty(1):
            from rich.live import Live

            self.live = Live(refresh_per_second=4, transient=True)
            self.live.start()

    def update(self, statuses: dict[str, dict]) -> None:
        if self.live is not None:
            done = sum(1 for s in statuses.values() if s["done"])
            msgs = sum(s["out"] for s in statuses.values())
            restarting = [k for k, s in statuses.items() if s["state"] in ("restarting", "dead")]
            self.live.update(
                f"replicas done {done}/{len(statuses)} | messages out {msgs}"
                + (f" | restarting: {', '.join(restarting)}" if restarting else "")
            )

    def close(self, statuses: dict[str, dict]) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None
