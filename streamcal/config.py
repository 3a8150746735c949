"""Typed, frozen, self-validating configs loaded from YAML mappings.

A config is a frozen dataclass deriving from :class:`Config`. ``from_dict`` checks unknown keys,
coerces YAML scalars to the annotated types (``int`` -> ``float``, lists -> tuples), checks
``Literal`` choices, then the dataclass's own ``validate()`` runs. Every error names the owner
(e.g. ``stage 'norm' (running_stats)``) and the field.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, ClassVar, Literal, TypeVar, get_args, get_origin, get_type_hints

from streamcal.errors import ConfigError

__all__ = ["Config", "check"]

C = TypeVar("C", bound="Config")


def check(cond: bool, owner: str, field: str, message: str) -> None:
    """Raise :class:`ConfigError` naming ``field`` unless ``cond``."""
    if not cond:
        raise ConfigError(owner, field, message)


def _coerce(value: Any, tp: Any, owner: str, field: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(owner, field, f"must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, owner, field)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(owner, field, f"{value!r} does not match {tp}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(owner, field, f"must be a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], owner, f"{field}[{i}]") for i, v in enumerate(value))
        if len(args) != len(value):
            raise ConfigError(owner, field, f"must have {len(args)} elements, got {len(value)}")
        return tuple(_coerce(v, a, owner, f"{field}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(owner, field, f"must be a mapping, got {type(value).__name__}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, owner, field): _coerce(v, vt, owner, f"{field}.{k}") for k, v in value.items()}
    if isinstance(tp, type) and issubclass(tp, Config):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(owner, field, f"must be a mapping, got {type(value).__name__}")
        return tp.from_dict(value, owner=f"{owner}.{field}")
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(owner, field, f"must be a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(owner, field, f"must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(owner, field, f"must be true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(owner, field, f"must be a string, got {type(value).__name__} {value!r}")
        return value
    return value


@dataclasses.dataclass(frozen=True)
class Config:
    """Base of every typed config: frozen, validated on construction."""

    owner: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Override to check values; raise with :func:`check` / :class:`ConfigError`."""

    def _owner(self) -> str:
        return self.owner or type(self).__name__

    def fail(self, field: str, message: str) -> typing.NoReturn:
        raise ConfigError(self._owner(), field, message)

    @classmethod
    def from_dict(cls: type[C], data: dict[str, Any] | None, *, owner: str | None = None) -> C:
        owner = owner or cls.owner or cls.__name__
        data = dict(data or {})
        hints = get_type_hints(cls)
        fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(owner, unknown[0], f"unknown field (known: {', '.join(sorted(fields)) or 'none'})")
        kwargs = {}
        for name, value in data.items():
            kwargs[name] = _coerce(value, hints[name], owner, name)
        try:
            obj = cls(**kwargs)
        except ConfigError as exc:
            if exc.owner != owner:
                raise ConfigError(owner, exc.field, str(exc).split(": ", 2)[-1]) from None
            raise
        except TypeError as exc:
            raise ConfigError(owner, "(missing)", str(exc)) from None
        return obj

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
