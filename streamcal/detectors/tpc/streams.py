"""Stream schemas of the live TPC correction graph, one per grid (tensor shapes are part of a
schema), and the numerical pieces the stages share.

* ``tpc.idc/{nphi}x{nr}``: one IDC interval (1 ms): ``interval`` (index since the start of the
  run), ``idc1d`` (relative 1D IDC), ``idc2d`` (relative 2D IDC map on the grid's (phi, r)
  cells, float32 [nphi, nr]).
* ``tpc.correction/{nphi}x{nr}x{nz}``: the correction of one time frame (10 ms): ``frame``,
  ``correction`` (float32 [3, nphi, nr, nz], cm: dr, drphi, dz, the correction *fluctuation*
  to add to the average correction), ``slices`` (IDC intervals of the frame that arrived),
  ``missing`` (intervals missing in the whole window the correction used), ``degraded`` (true
  when any interval of the frame or of its window was missing: computed from what arrived, the
  gaps filled with the last value), ``method``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from streamcal.detectors.tpc.constants import Grid, parse_grid
from streamcal.schemas import SchemaInfo, register_schema, tensor_type

__all__ = ["idc_schema", "correction_schema", "average_correction", "IntervalRing"]


def idc_schema(grid: Grid | str) -> SchemaInfo:
    g = parse_grid(grid)
    return register_schema(
        f"tpc.idc/{g.nphi}x{g.nr}",
        pa.schema([
            pa.field("interval", pa.int64(), nullable=False),
            pa.field("idc1d", pa.float64(), nullable=False),
            pa.field("idc2d", tensor_type(pa.float32(), (g.nphi, g.nr)), nullable=False),
        ]),
        doc="One 1 ms IDC interval: relative 1D IDC and 2D map on the grid's (phi, r) cells.",
        finite=("idc1d", "idc2d"),
    )


def correction_schema(grid: Grid | str) -> SchemaInfo:
    g = parse_grid(grid)
    return register_schema(
        f"tpc.correction/{g}",
        pa.schema([
            pa.field("frame", pa.int64(), nullable=False),
            pa.field("correction", tensor_type(pa.float32(), (3, g.nphi, g.nr, g.nz)), nullable=False),
            pa.field("slices", pa.int32(), nullable=False),
            pa.field("missing", pa.int32(), nullable=False),
            pa.field("degraded", pa.bool_(), nullable=False),
            pa.field("method", pa.utf8(), nullable=False),
        ]),
        doc="Space-charge correction fluctuation (dr, drphi, dz in cm) of one 10 ms time frame.",
        finite=("correction",),
    )


def average_correction(grid: Grid | str, density_config=None) -> np.ndarray:
    """Correction (3, nphi, nr, nz) in cm of the nominal average density (the numerical solution)."""
    import torch

    from streamcal.detectors.tpc.density import average_density
    from streamcal.detectors.tpc.langevin import space_charge_distortions

    g = parse_grid(grid)
    rho = torch.as_tensor(average_density(g, density_config), dtype=torch.float64)
    return space_charge_distortions(rho, g, corrections=True).correction.numpy()


class IntervalRing:
    """The values of the last ``length`` IDC intervals, indexed by interval number, as the
    correction stages keep them: newer intervals only, gaps filled with the last value received
    and remembered as missing.

    ``put(k, value)`` returns the number of intervals missing before ``k`` (0 normally), or -1 when
    ``k`` is not newer than the last interval (out of order: nothing is stored).
    """

    def __init__(self, length: int, shape: tuple[int, ...] = (), fill: float = 0.0) -> None:
        self.length = int(length)
        self.values = np.full((self.length, *shape), fill, dtype=np.float64)
        self.present = np.zeros(self.length, dtype=bool)
        self.last: int | None = None

    def put(self, k: int, value: Any) -> int:
        if self.last is not None and k <= self.last:
            return -1
        gap = 0
        if self.last is not None and k > self.last + 1:
            gap = k - self.last - 1
            held = self.values[self.last % self.length].copy()
            for j in range(self.last + 1, min(k, self.last + 1 + self.length)):
                self.values[j % self.length] = held
                self.present[j % self.length] = False
        self.values[k % self.length] = value
        self.present[k % self.length] = True
        self.last = k
        return gap

    @property
    def seen(self) -> int:
        """Intervals covered so far, at most ``length``."""
        return 0 if self.last is None else min(self.last + 1, self.length)

    @property
    def missing(self) -> int:
        """Intervals in the window that never arrived (filled)."""
        return int(self.seen - self.present.sum())

    def ordered(self) -> np.ndarray:
        """The covered intervals, oldest first: shape (seen, *shape)."""
        if self.last is None:
            return self.values[:0]
        return np.roll(self.values, -((self.last + 1) % self.length), axis=0)[self.length - self.seen:]
