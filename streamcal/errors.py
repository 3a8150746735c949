"""Exceptions raised by streamcal. Every error names what was wrong and where."""

from __future__ import annotations

__all__ = ["StreamcalError", "ConfigError", "GraphError", "WireError", "ResourceError"]


class StreamcalError(Exception):
    """Base class of every streamcal error."""


class ConfigError(StreamcalError, ValueError):
    """A stage or model config field is invalid. ``field`` names it."""

    def __init__(self, owner: str, field: str, message: str) -> None:
        self.owner = owner
        self.field = field
        super().__init__(f"{owner}: field '{field}': {message}")


class GraphError(StreamcalError, ValueError):
    """The graph spec is invalid. Carries every problem found, each naming a stage and a field."""

    def __init__(self, problems: list[str], source: str | None = None) -> None:
        self.problems = list(problems)
        head = f"invalid graph{f' {source}' if source else ''}: {len(self.problems)} problem(s)"
        super().__init__(head + "".join(f"\n  - {p}" for p in self.problems))


class ResourceError(GraphError):
    """The cluster cannot satisfy a stage's resource request."""


class WireError(StreamcalError, ValueError):
    """A message on the data plane was rejected. ``reason`` is a short stable code used in counters."""

    REASONS = (
        "frames",
        "header",
        "version",
        "kind",
        "oversize",
        "schema_unknown",
        "schema_fingerprint",
        "schema_mismatch",
        "shape",
        "payload",
        "nan",
        "stream",
        "shm",
    )

    def __init__(self, reason: str, message: str) -> None:
        assert reason in self.REASONS, reason
        self.reason = reason
        super().__init__(f"[{reason}] {message}")
