"""The stage protocol (DESIGN.md section 5).

A stage kind is a :class:`Stage` subclass registered under a name with :func:`register_stage`.
It has a typed frozen config (``Config``), declares its input and output ports with their schema
names, and implements :meth:`Stage.process` (one batch), optionally :meth:`Stage.on_timer`
(event-time timers) and :meth:`Stage.finish` (end of stream). Sources implement
:meth:`Source.generate`.

The base class does the bookkeeping, so stages never see bytes or sockets: :meth:`Stage.receive`
decodes and checks a message, counts rejects with their reason, tracks link sequence numbers
(gaps, duplicates), lineage (which source messages reached this stage), event-time watermarks and
timers, and end-of-stream; :meth:`Stage.emit` stamps headers and hands the message to the runtime.
The same stage object runs in-process (:mod:`streamcal.testing`) and inside a Ray actor
(:mod:`streamcal.runtime`).
"""

from __future__ import annotations

import importlib
import logging
import math
import pkgutil
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterator

import pyarrow as pa

from streamcal import wire
from streamcal.config import Config
from streamcal.errors import StreamcalError, WireError
from streamcal.metrics import RangeSet, StageMetrics
from streamcal.schemas import ANY, REGISTRY, SchemaInfo
from streamcal.wire import Header

__all__ = [
    "Stage",
    "Source",
    "Sink",
    "InputWiring",
    "StageContext",
    "register_stage",
    "get_stage_class",
    "stage_kinds",
]

log = logging.getLogger("streamcal.stage")

# event times within this window before the receive time (and this much clock skew after it) are
# taken as wall-clock times, for the event-to-receive latency
_EVENT_CLOCK_WINDOW_NS = 24 * 3600 * 10**9
_RESERVED_HEADER_KEYS = {"v", "stream", "seq", "producer", "kind", "t0_ns", "t1_ns", "sent_ns", "schema", "fp",
                         "lseq", "src", "origins", "inc", "part"}
_EVENT_CLOCK_SKEW_NS = 60 * 10**9
_UNSET = object()

SendFn = Callable[[str, Header, "pa.RecordBatch | None"], int]


@dataclass(frozen=True)
class InputWiring:
    """What an input port is connected to: the stream, its writers' producer ids, and options."""

    stream: str
    producers: tuple[str, ...]
    latest_only: bool = False


@dataclass
class StageContext:
    """Everything a stage instance knows about its place in the graph. Built by the runtime."""

    stage: str
    kind: str = ""
    replica: int = 0
    replicas: int = 1
    incarnation: int = 0
    inputs: dict[str, InputWiring] = field(default_factory=dict)
    outputs: dict[str, str] = field(default_factory=dict)  # port -> stream
    seed: int = 0
    max_message_bytes: int = wire.DEFAULT_MAX_MESSAGE_BYTES
    send: SendFn | None = None
    send_raw: Callable[[str, list], None] | None = None
    #: ``"host:port"`` of the rendezvous store of this stage's process group (kinds with
    #: ``PROCESS_GROUP``, on Ray; see :mod:`streamcal.group`), else None
    group_store: str | None = None

    @property
    def producer(self) -> str:
        return f"{self.stage}/{self.replica}"


_STAGES: dict[str, type["Stage"]] = {}
_BUILTINS_LOADED = False


def register_stage(cls: type["Stage"]) -> type["Stage"]:
    """Class decorator: register a stage kind under ``cls.kind``."""
    if not cls.kind:
        raise StreamcalError(f"stage class {cls.__name__} has no 'kind'")
    old = _STAGES.get(cls.kind)
    if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
        raise StreamcalError(f"stage kind '{cls.kind}' is already registered by {old.__module__}.{old.__qualname__}")
    _STAGES[cls.kind] = cls
    return cls


def _load_builtins() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    import streamcal.actors as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"streamcal.actors.{mod.name}")
    _BUILTINS_LOADED = True


def get_stage_class(kind: str) -> type["Stage"]:
    """The class of a stage kind: a registered name, or ``package.module:ClassName`` for your own."""
    if ":" in kind:
        mod_name, _, attr = kind.partition(":")
        try:
            cls = getattr(importlib.import_module(mod_name), attr)
        except (ImportError, AttributeError) as exc:
            raise StreamcalError(f"cannot import stage kind '{kind}': {exc}") from None
        if not (isinstance(cls, type) and issubclass(cls, Stage)):
            raise StreamcalError(f"'{kind}' is not a Stage subclass")
        return cls
    _load_builtins()
    try:
        return _STAGES[kind]
    except KeyError:
        raise StreamcalError(f"unknown stage kind '{kind}' (known: {', '.join(sorted(_STAGES))})") from None


def stage_kinds() -> list[str]:
    _load_builtins()
    return sorted(_STAGES)


class Stage:
    """Base class of every stage kind. Subclasses set ``kind`` and ``Config`` and override
    :meth:`inputs`, :meth:`outputs`, :meth:`process` and optionally :meth:`setup`,
    :meth:`timer_period_ns`, :meth:`on_timer`, :meth:`finish`, :meth:`summary`."""

    kind: ClassVar[str] = ""
    Config: ClassVar[type[Config]] = Config
    #: log the first N rejects per reason with their message, then every 1000th
    LOG_FIRST_REJECTS: ClassVar[int] = 5
    #: the replicas form a ``torch.distributed`` process group (:mod:`streamcal.group`): the
    #: runtime serves them a rendezvous store (``ctx.group_store``)
    PROCESS_GROUP: ClassVar[bool] = False

    # ------------------------------------------------------------------ declaration
    @classmethod
    def inputs(cls, config: Any) -> dict[str, str]:
        """Input ports -> schema name (``"*"`` accepts any registered schema)."""
        return {}

    @classmethod
    def outputs(cls, config: Any) -> dict[str, str]:
        """Output ports -> schema name."""
        return {}

    # ------------------------------------------------------------------ lifecycle
    def __init__(self, config: Any, context: StageContext) -> None:
        self.config = config
        self.ctx = context
        self.log = logging.getLogger(f"streamcal.stage.{context.stage}")
        self.metrics = StageMetrics(context.stage, context.replica, context.incarnation)
        in_decl = type(self).inputs(config)
        out_decl = type(self).outputs(config)
        self._in_schema: dict[str, str] = {p: in_decl[p] for p in context.inputs}
        self._out_info: dict[str, SchemaInfo] = {p: REGISTRY.get(out_decl[p]) for p in context.outputs}
        self._seq: dict[str, int] = defaultdict(int)
        self._link_next: dict[tuple[str, str, int], int] = {}
        self._eos_from: dict[str, set[str]] = {p: set() for p in context.inputs}
        self._marks: dict[tuple[str, str], int] = {}
        self._pending_src: dict[str, dict[str, RangeSet]] = {p: defaultdict(RangeSet) for p in context.outputs}
        self.reached: dict[str, RangeSet] = defaultdict(RangeSet)
        self.origins: dict[str, int] = {}
        self.errors = 0
        self._next_timer: int | None = None
        self._timer_period: Any = _UNSET  # timer_period_ns(), read at first use (_period)
        self._producer = context.producer
        self._max_t1 = 0
        self._reject_logged: dict[str, int] = defaultdict(int)
        self.done = False
        #: units of work done besides messages (steps of a long computation after the end of
        #: stream): the runtime counts them as progress, so a busy stage is not taken as stuck
        self.work = 0
        for p, w in context.inputs.items():
            self.metrics.input(p, w.stream)
        for p, s in context.outputs.items():
            self.metrics.output(p, s)

    def setup(self) -> None:
        """Called once before the first message (load a model, open a file)."""

    def process(self, port: str, batch: pa.RecordBatch, header: Header) -> None:
        """Handle one data batch received on ``port``. Call :meth:`emit` to send results."""
        raise StreamcalError(f"stage kind '{self.kind}' has inputs but does not implement process()")

    def timer_period_ns(self) -> int | None:
        """Event-time period of :meth:`on_timer`, or ``None`` for no timer. Read once, when the
        first message arrives (after :meth:`setup`)."""
        return None

    def on_timer(self, t_ns: int) -> None:
        """Called for every multiple of :meth:`timer_period_ns` that the input watermark passes."""

    def finish(self) -> None:
        """Called once after end-of-stream on every input (may still emit)."""

    def summary(self) -> dict[str, Any]:
        """JSON-able result shown at the end of a run (sinks: what they collected)."""
        return {}

    # ------------------------------------------------------------------ emission
    def emit(self, port: str, batch: pa.RecordBatch, t0_ns: int, t1_ns: int,
             extra: dict[str, Any] | None = None, partition: int | None = None) -> None:
        """Send ``batch`` on output ``port`` with the event-time window [t0_ns, t1_ns].
        ``extra``: additional header keys (msgpack scalars; names must not clash with the
        format's keys), e.g. ``trigger_sent_ns`` for end-to-end latency. ``partition``: the
        message goes to replica ``partition % replicas`` of each reader stage (header ``part``)
        instead of the next replica with room; it waits for that replica's queue."""
        info = self._out_info.get(port)
        if info is None:
            raise StreamcalError(
                f"stage '{self.ctx.stage}': emit on unknown or unwired port '{port}' "
                f"(wired: {', '.join(self.ctx.outputs) or 'none'})"
            )
        if not batch.schema.equals(info.schema):
            raise StreamcalError(
                f"stage '{self.ctx.stage}': batch emitted on '{port}' does not match schema '{info.name}':\n"
                f"{batch.schema}\nexpected:\n{info.schema}"
            )
        seq = self._seq[port]
        self._seq[port] = seq + 1
        h = Header(self.ctx.outputs[port], seq, self._producer, "data", int(t0_ns), int(t1_ns), 0,
                   info.name, info.fingerprint, wire.FORMAT_VERSION, {})
        if extra:
            clash = set(extra) & _RESERVED_HEADER_KEYS
            if clash:
                raise StreamcalError(f"stage '{self.ctx.stage}': header keys {sorted(clash)} are reserved by the wire format")
            h.extra.update(extra)
        if self.ctx.incarnation:
            h.extra["inc"] = self.ctx.incarnation
        if partition is not None:
            if isinstance(partition, bool) or not isinstance(partition, int) or partition < 0:
                raise StreamcalError(f"stage '{self.ctx.stage}': partition must be an integer >= 0, got {partition!r}")
            h.extra["part"] = partition
        src = self._take_lineage(port, seq)
        if src:
            h.extra["src"] = src
        self._send(port, h, batch)

    def emit_raw(self, port: str, frames: list[bytes]) -> None:
        """Send pre-built frames on ``port``, routed like data (relays and fault injection)."""
        if self.ctx.send_raw is None:
            raise StreamcalError(f"stage '{self.ctx.stage}' is not attached to a runtime")
        self.ctx.send_raw(port, frames)

    def watermark(self, t_ns: int) -> None:
        """Tell every reader that no data with event time before ``t_ns`` will follow."""
        for port, stream in self.ctx.outputs.items():
            h = Header(stream=stream, seq=self._seq[port], producer=self.ctx.producer, kind="watermark",
                       t0_ns=int(t_ns), t1_ns=int(t_ns), schema=self._out_info[port].name,
                       fp=self._out_info[port].fingerprint)
            if self.ctx.incarnation:  # like data and eos: link sequences count per incarnation
                h.extra["inc"] = self.ctx.incarnation
            self._send(port, h, None)

    def _take_lineage(self, port: str, seq: int) -> dict[str, list[list[int]]]:
        if not self.ctx.inputs:  # a source: every message is an origin
            return {self._producer: [[seq, seq]]}
        pend = self._pending_src[port]
        if not pend:
            return {}
        out = {o: r.to_list() for o, r in pend.items()}
        pend.clear()
        return out

    def _send(self, port: str, header: Header, batch: pa.RecordBatch | None) -> None:
        if self.ctx.send is None:
            raise StreamcalError(f"stage '{self.ctx.stage}' is not attached to a runtime")
        nbytes = self.ctx.send(port, header, batch)
        if header.kind == "data":
            c = self.metrics.outputs[port]
            c.messages += 1
            c.bytes += nbytes

    def _send_eos(self) -> None:
        for port, stream in self.ctx.outputs.items():
            info = self._out_info[port]
            h = Header(stream=stream, seq=self._seq[port], producer=self.ctx.producer, kind="eos",
                       t0_ns=self._max_t1, t1_ns=self._max_t1, schema=info.name, fp=info.fingerprint)
            origins = dict(self.origins) if self.ctx.inputs else {self.ctx.producer: self._seq[port]}
            h.extra["origins"] = origins
            if self.ctx.incarnation:
                h.extra["inc"] = self.ctx.incarnation
            src = self._take_lineage(port, -1) if self.ctx.inputs else {}
            if src:
                h.extra["src"] = src
            self._send(port, h, None)

    # ------------------------------------------------------------------ reception
    def receive(self, port: str, frames: list, recv_ns: int | None = None, *, process: bool = True,
                shm: Callable[[Any], pa.Buffer] | None = None) -> None:
        """Decode one message from ``port``, account for it, and dispatch it. Never raises on bad input.

        ``process=False`` accounts for a data message without processing it (a latest-only input
        superseded by a newer message). ``shm`` resolves shared-memory payloads of the link."""
        recv_ns = recv_ns or time.time_ns()
        wiring = self.ctx.inputs[port]
        c = self.metrics.inputs[port]
        try:
            header, batch = wire.decode(
                frames, max_bytes=self.ctx.max_message_bytes, expect_schema=self._in_schema[port], shm=shm
            )
            if header.stream != wiring.stream:
                raise WireError("stream", f"message of stream '{header.stream}' on a port wired to '{wiring.stream}'")
        except WireError as exc:
            self._reject(port, exc.reason, str(exc))
            return
        c.bytes += len(frames[0]) + len(frames[1])  # decode checked: exactly two frames
        slot = header.producer
        extra = header.extra
        if extra:
            inc = extra.get("inc", 0)
            if type(inc) is not int:
                try:
                    inc = int(inc or 0)
                except (TypeError, ValueError):  # not a number: taken as absent
                    inc = 0
            lseq = extra.get("lseq")
            if isinstance(lseq, int):
                key = (port, slot, inc)
                expected = self._link_next.get(key)
                if expected is None:
                    expected = 0 if (self.ctx.incarnation == 0 and inc == 0) else lseq
                if lseq > expected:
                    c.gaps += lseq - expected
                elif lseq < expected:
                    c.duplicates += 1
                self._link_next[key] = max(expected, lseq + 1)
            src = extra.get("src")
            if isinstance(src, dict):
                self._merge_lineage(src)
        kind = header.kind
        if kind == "data":
            c.messages += 1
            c.latency.add(recv_ns - header.sent_ns)
            t1 = header.t1_ns
            if recv_ns - _EVENT_CLOCK_WINDOW_NS < t1 <= recv_ns + _EVENT_CLOCK_SKEW_NS:
                # event time on the wall clock (live data): how long after the event it arrived.
                # Simulated streams with event time from 0 have no such latency.
                c.event_latency.add(recv_ns - t1)
            if t1 > self._max_t1:
                self._max_t1 = t1
            if not process:
                self._advance(port, slot, t1)
                return
            t_start = time.perf_counter_ns()
            try:
                self.process(port, batch, header)
            except Exception as exc:  # a stage bug or data it cannot handle: counted, logged, not fatal
                self.errors += 1
                c.rejects["process"] += 1
                # the first errors with their traceback, then one line per power of ten
                if self.errors <= 3:
                    self.log.exception("stage '%s' failed to process a batch from %s seq %d: %s",
                                       self.ctx.stage, slot, header.seq, exc)
                elif math.log10(self.errors).is_integer():
                    self.log.error("stage '%s': %d batches failed so far; latest from %s seq %d: %s",
                                   self.ctx.stage, self.errors, slot, header.seq, exc)
            self.metrics.process_ns += time.perf_counter_ns() - t_start
            self._advance(port, slot, t1)
        elif kind == "watermark":
            self._max_t1 = max(self._max_t1, header.t1_ns)
            self._advance(port, slot, header.t1_ns)
        elif kind == "eos":
            origins = extra.get("origins")
            if isinstance(origins, dict):
                for o, n in origins.items():
                    if isinstance(o, str) and isinstance(n, int):
                        self.origins[o] = max(self.origins.get(o, 0), n)
            self._eos_from[port].add(slot)
            self._marks[(port, slot)] = 1 << 62
            if self._inputs_complete():
                self._complete()
            else:
                self._fire_timers()

    def _reject(self, port: str, reason: str, message: str) -> None:
        c = self.metrics.inputs[port]
        c.rejects[reason] += 1
        n = self._reject_logged[reason] = self._reject_logged[reason] + 1
        if n <= self.LOG_FIRST_REJECTS or n % 1000 == 0:
            self.log.warning("stage '%s' port '%s' rejected a message (%d so far for this reason): %s",
                             self.ctx.stage, port, c.rejects[reason], message)

    def _merge_lineage(self, src: dict[str, Any]) -> None:
        if len(src) == 1:
            # fast path: one origin with one range, what a source puts on every message
            for origin, ranges in src.items():
                pass
            if type(origin) is str and type(ranges) is list and len(ranges) == 1:
                r = ranges[0]
                if type(r) is list and len(r) == 2:
                    lo, hi = r
                    if type(lo) is int and type(hi) is int:
                        self.reached[origin].add(lo, hi)
                        for pend in self._pending_src.values():
                            pend[origin].add(lo, hi)
                        return
        for origin, ranges in src.items():
            if not isinstance(origin, str) or not isinstance(ranges, list):
                continue
            for r in ranges:
                if isinstance(r, list) and len(r) == 2 and all(isinstance(x, int) for x in r):
                    self.reached[origin].add(r[0], r[1])
                    for pend in self._pending_src.values():
                        pend[origin].add(r[0], r[1])

    def _inputs_complete(self) -> bool:
        return all(
            set(w.producers) <= self._eos_from[p] for p, w in self.ctx.inputs.items()
        )

    # ------------------------------------------------------------------ event time
    def _advance(self, port: str, slot: str, t_ns: int) -> None:
        key = (port, slot)
        if t_ns > self._marks.get(key, -1):
            self._marks[key] = t_ns
        if self._timer_period is None:  # no timer (the common case): nothing to fire
            return
        self._fire_timers()

    def _period(self) -> int | None:
        """:meth:`timer_period_ns`, read once (at the first message, after :meth:`setup`)."""
        period = self._timer_period
        if period is _UNSET:
            period = self._timer_period = self.timer_period_ns()
        return period

    def input_watermark(self) -> int | None:
        """Event time up to which every expected producer has sent (``None`` before all have)."""
        marks = []
        for p, w in self.ctx.inputs.items():
            if w.latest_only:
                continue
            for slot in w.producers:
                m = self._marks.get((p, slot))
                if m is None:
                    return None
                marks.append(m)
        return min(marks) if marks else None

    def _fire_timers(self, upto: int | None = None) -> None:
        period = self._period()
        if not period:
            return
        wm = self.input_watermark() if upto is None else upto
        if wm is None:
            return
        wm = min(wm, self._max_t1)  # never beyond the data seen (EOS marks are +inf)
        if self._next_timer is None:
            first = min((m for m in self._marks.values() if m < (1 << 62)), default=None)
            if first is None:
                return
            self._next_timer = (first // period + 1) * period
        while self._next_timer <= wm:
            t = self._next_timer
            self._next_timer += period
            self.on_timer(t)

    def _complete(self) -> None:
        if self.done:
            return
        self._fire_timers(upto=self._max_t1)
        self.finish()
        self._send_eos()
        self.done = True
        self.metrics.end = time.monotonic()

    # ------------------------------------------------------------------ reports
    @property
    def is_terminal(self) -> bool:
        return bool(self.ctx.inputs) and not self.ctx.outputs

    def report(self) -> dict[str, Any]:
        """Final metrics, lineage and summary of this replica (JSON-able)."""
        return {
            "kind": self.kind,
            "metrics": self.metrics.snapshot(),
            # end-to-end accounting is done where streams end (stages without outputs): what an
            # intermediate replica saw dies with it when it crashes, what reaches a sink does not
            "lineage": {o: r.to_list() for o, r in self.reached.items()} if self.is_terminal else {},
            "origins": dict(self.origins) if self.is_terminal else {},
            "errors": self.errors,
            "summary": self.summary(),
        }


class Source(Stage):
    """A stage with no inputs. Implement :meth:`generate`, calling :meth:`emit` and yielding
    between messages (each ``yield`` is where the runtime may stop the source)."""

    def generate(self) -> Iterator[None]:
        raise StreamcalError(f"source kind '{self.kind}' does not implement generate()")

    def pace(self, event_t_ns: int, speed: float) -> None:
        """Sleep so that event time advances at ``speed`` x wall-clock time (0: no pacing)."""
        if speed <= 0:
            return
        now = time.monotonic_ns()
        if not hasattr(self, "_pace0"):
            self._pace0 = (event_t_ns, now)
        e0, w0 = self._pace0
        target = w0 + int((event_t_ns - e0) / speed)
        if target > now:
            time.sleep((target - now) / 1e9)

    def run_source(self, should_stop: Callable[[], bool] = lambda: False) -> None:
        """Drive :meth:`generate` to the end (or until ``should_stop``), then end the stream."""
        for _ in self.generate():
            if should_stop():
                break
        self._complete()


class Sink(Stage):
    """A stage with inputs and no outputs."""
