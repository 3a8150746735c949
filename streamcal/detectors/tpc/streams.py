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
* ``tpc.correction_rz/{nphi}x{nr}x{nz}``: the same for a correction that does not depend on phi
  (the 1D correction: the 1D IDCs carry no phi information), with the same fields except
  ``correction`` (float32 [3, nr, nz], cm): the map at every phi, to be broadcast over the grid's
  ``nphi`` azimuthal nodes (:func:`broadcast_over_phi`) to get the [3, nphi, nr, nz] map of
  ``tpc.correction``. The name keeps the whole grid, so a writer and a reader of different grids
  disagree at graph validation. The payload holds ``nphi`` times fewer values (one frame,
  90x17x17: 4.6 kB instead of 313 kB; 180x33x33: 14 kB instead of 2.35 MB).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

from streamcal.detectors.tpc.constants import Grid, parse_grid
from streamcal.schemas import SchemaInfo, register_schema, tensor_type

__all__ = ["idc_schema", "correction_schema", "correction_rz_schema", "broadcast_over_phi", "average_correction",
           "IntervalRing"]


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


def correction_rz_schema(grid: Grid | str) -> SchemaInfo:
    """The phi-independent correction of one time frame: ``correction`` (3, nr, nz), the same at every phi."""
    g = parse_grid(grid)
    return register_schema(
        f"tpc.correction_rz/{g}",
        pa.schema([
            pa.field("frame", pa.int64(), nullable=False),
            pa.field("correction", tensor_type(pa.float32(), (3, g.nr, g.nz)), nullable=False),
            pa.field("slices", pa.int32(), nullable=False),
            pa.field("missing", pa.int32(), nullable=False),
            pa.field("degraded", pa.bool_(), nullable=False),
            pa.field("method", pa.utf8(), nullable=False),
        ]),
        doc="Space-charge correction fluctuation (dr, drphi, dz in cm) of one 10 ms time frame, independent of "
            "phi: correction[c, r, z] holds at every phi node (broadcast over phi for the full map).",
        finite=("correction",),
    )


def broadcast_over_phi(correction: np.ndarray, grid: Grid | str) -> np.ndarray:
    """A phi-independent correction (..., 3, nr, nz) as the full map (..., 3, nphi, nr, nz): a read-only
    view, no copy. A full map passes through unchanged; any other shape is a ``ValueError``."""
    g = parse_grid(grid)
    c = np.asarray(correction)
    if c.shape[-4:] == (3, g.nphi, g.nr, g.nz) and c.ndim >= 4:
        return c
    if c.ndim < 3 or c.shape[-3:] != (3, g.nr, g.nz):
        raise ValueError(f"a correction on grid {g} is (..., 3, {g.nr}, {g.nz}) (phi-independent) or "
                         f"(..., 3, {g.nphi}, {g.nr}, {g.nz}), got shape {c.shape}")
    return np.broadcast_to(c[..., None, :, :], (*c.shape[:-2], g.nphi, g.nr, g.nz))


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

    Every value is stored twice, at slot ``k % length`` and ``length`` further, so that the window
    in time order is one contiguous slice (:meth:`ordered` copies and rolls nothing: it runs once
    per 10 ms frame on the latency path), and the count of intervals present is kept as they come.
    """

    def __init__(self, length: int, shape: tuple[int, ...] = (), fill: float = 0.0) -> None:
        self.length = int(length)
        self._buf = np.full((2 * self.length, *shape), fill, dtype=np.float64)  # slot j == slot j + length
        self.present = np.zeros(self.length, dtype=bool)
        self._n_present = 0  # == present.sum()
        self.last: int | None = None

    def _set(self, j: int, value: Any, present: bool) -> None:
        self._buf[j] = value
        self._buf[j + self.length] = value
        self._n_present += int(present) - int(self.present[j])
        self.present[j] = present

    def put(self, k: int, value: Any) -> int:
        if self.last is not None and k <= self.last:
            return -1
        gap = 0
        if self.last is not None and k > self.last + 1:
            gap = k - self.last - 1
            held = self._buf[self.last % self.length].copy()
            for j in range(self.last + 1, min(k, self.last + 1 + self.length)):
                self._set(j % self.length, held, False)
        self._set(k % self.length, value, True)
        self.last = k
        return gap

    @property
    def seen(self) -> int:
        """Intervals covered so far, at most ``length``."""
        return 0 if self.last is None else min(self.last + 1, self.length)

    @property
    def missing(self) -> int:
        """Intervals in the window that never arrived (filled)."""
        return self.seen - self._n_present

    def ordered(self) -> np.ndarray:
        """The covered intervals, oldest first: shape (seen, *shape). A read-only view, valid until the
        next :meth:`put` (copy it to keep it)."""
        if self.last is None:
            return self._buf[:0]
        end = self.last % self.length + 1 + self.length
        window = self._buf[end - self.seen:end]
        window.flags.writeable = False
        return window
