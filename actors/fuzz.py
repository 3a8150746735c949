"""``fuzz``: a source of ``demo.samples`` messages interleaved with malformed ones, for drills of
the receiving edge. Every ``bad_every``-th message is malformed, cycling through the kinds in
``MALFORMED`` (each named by the rejection reason a receiver must count). Its summary reports
how many of each kind it sent, so a test can compare with the receiver's reject counters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import msgpack
import numpy as np
import pyarrow as pa

from streamcal import wire
from streamcal.config import Config
from streamcal.stage import Source, register_stage
from streamcal.wire import Header

from streamcal.actors.synthetic import SAMPLES, SyntheticConfig, synthetic_batch

__all__ = ["FuzzConfig", "Fuzz", "MALFORMED"]

#: malformed kind -> the rejection reason a receiver counts
MALFORMED = {
    "garbage": "header",
    "one_frame": "frames",
    "version": "version",
    "unknown_schema": "schema_unknown",
    "fingerprint": "schema_fingerprint",
    "truncated": "payload",
    "nan": "nan",
    "oversize": "oversize",
}


@dataclass(frozen=True)
class FuzzConfig(Config):
    messages: int = 200  # valid messages
    bad_every: int = 3
    rows: int = 16
    seed: int = 0
    oversize_bytes: int = 2_000_000  # size of the oversize message (set the graph's max_message_bytes below it)

    def validate(self) -> None:
        if self.messages < 0:
            self.fail("messages", f"must be >= 0, got {self.messages}")
        if self.bad_every < 1:
            self.fail("bad_every", f"must be >= 1, got {self.bad_every}")
        if self.rows < 1:
            self.fail("rows", f"must be >= 1, got {self.rows}")


@register_stage
class Fuzz(Source):
    kind = "fuzz"
    Config = FuzzConfig

    @classmethod
    def outputs(cls, config: FuzzConfig) -> dict[str, str]:
        return {"out": SAMPLES.name}

    def setup(self) -> None:
        self.sent_bad = {k: 0 for k in MALFORMED}

    def _malformed(self, kind: str, rng: np.random.Generator, k: int) -> list[bytes]:
        h = Header(stream=self.ctx.outputs["out"], seq=0, producer=self.ctx.producer, t0_ns=k, t1_ns=k + 1,
                   schema=SAMPLES.name, fp=SAMPLES.fingerprint, sent_ns=wire.now_ns())
        good = synthetic_batch(SyntheticConfig(rows=self.config.rows), k, rng)
        payload = wire.encode_payload(good).to_pybytes()
        d = h.to_dict()
        if kind == "garbage":
            return [rng.bytes(37), rng.bytes(50)]
        if kind == "one_frame":
            return [msgpack.packb(d)]
        if kind == "version":
            return [msgpack.packb({**d, "v": 99}), payload]
        if kind == "unknown_schema":
            return [msgpack.packb({**d, "schema": "no.such.schema"}), payload]
        if kind == "fingerprint":
            return [msgpack.packb({**d, "fp": "0123456789abcdef"}), payload]
        if kind == "truncated":
            return [msgpack.packb(d), payload[: len(payload) // 2]]
        if kind == "nan":
            vals = good.column("value").to_numpy().copy()
            vals[0] = np.nan
            bad = pa.RecordBatch.from_arrays([good.column(0), good.column(1), pa.array(vals)], schema=SAMPLES.schema)
            return [msgpack.packb(d), wire.encode_payload(bad).to_pybytes()]
        if kind == "oversize":
            return [msgpack.packb(d), payload + b"\0" * self.config.oversize_bytes]
        raise AssertionError(kind)

    def generate(self) -> Iterator[None]:
        cfg: FuzzConfig = self.config
        rng = np.random.default_rng(cfg.seed)
        kinds = list(MALFORMED)
        bad = 0
        for k in range(cfg.messages):
            if k % cfg.bad_every == cfg.bad_every - 1:
                kind = kinds[bad % len(kinds)]
                bad += 1
                self.sent_bad[kind] += 1
                self.emit_raw("out", self._malformed(kind, rng, k))
            self.emit("out", synthetic_batch(SyntheticConfig(rows=cfg.rows), k, rng), k * 1000, (k + 1) * 1000)
            yield

    def summary(self) -> dict:
        return {"sent_bad": dict(self.sent_bad), "expected_rejects": {MALFORMED[k]: n for k, n in self.sent_bad.items()}}
