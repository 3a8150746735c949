"""``replay``: a source that sends a recording again, paced by event time at ``speed``.

Payloads are re-encoded from the recorded batches (identical bytes); the event-time window and
the sequence numbers of every message are the recorded ones (for a complete recording). With
``loops > 1`` event time continues across loops.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from streamcal.config import Config
from streamcal.record import read_recording
from streamcal.schemas import REGISTRY
from streamcal.stage import Source, register_stage

__all__ = ["ReplayConfig", "Replay"]


@dataclass(frozen=True)
class ReplayConfig(Config):
    path: str = ""
    schema: str = ""  # the stream kind recorded in the file (checked against the registry)
    speed: float = 1.0  # 1.0 real time, 0 as fast as possible
    loops: int = 1

    def validate(self) -> None:
        if not self.path:
            self.fail("path", "must name a recording (.arrow) file")
        if not self.schema:
            self.fail("schema", f"must name the recorded stream kind (registered: {', '.join(REGISTRY.names())})")
        if self.speed < 0:
            self.fail("speed", f"must be >= 0 (1.0 real time, 0 as fast as possible), got {self.speed}")
        if self.loops < 1:
            self.fail("loops", f"must be >= 1, got {self.loops}")


@register_stage
class Replay(Source):
    kind = "replay"
    Config = ReplayConfig

    @classmethod
    def outputs(cls, config: ReplayConfig) -> dict[str, str]:
        return {"out": config.schema}

    def setup(self) -> None:
        if not Path(self.config.path).is_file():
            raise FileNotFoundError(f"stage '{self.ctx.stage}': recording not found: {self.config.path}")

    def generate(self) -> Iterator[None]:
        offset = 0
        for _ in range(self.config.loops):
            last = 0
            for header, batch in read_recording(self.config.path):
                self.pace(header.t1_ns + offset, self.config.speed)
                self.emit("out", batch, header.t0_ns + offset, header.t1_ns + offset)
                last = header.t1_ns
                yield
            offset += last
