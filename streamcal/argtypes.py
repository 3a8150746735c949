"""argparse types for the command line's numeric options, one wording everywhere.

argparse names the option in front of the message: ``argument --rate: expected a finite number
>= 0, got -5.0``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

__all__ = ["number", "positive_int", "non_negative_int", "positive_float", "non_negative_float"]


def number(cast: type, what: str, ok: Callable[[Any], bool]) -> Callable[[str], Any]:
    """An argparse type: ``cast(text)`` that must satisfy ``ok``; errors say ``what`` was expected."""
    def parse(text: str) -> Any:
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = number(int, "an integer >= 1", lambda v: v >= 1)
non_negative_int = number(int, "an integer >= 0", lambda v: v >= 0)
positive_float = number(float, "a finite number > 0", lambda v: 0 < v < math.inf)
non_negative_float = number(float, "a finite number >= 0", lambda v: 0 <= v < math.inf)
