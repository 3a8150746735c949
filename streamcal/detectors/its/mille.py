"""Export of alignment data to Millepede-II: ``Mille`` binary records, ``pede`` steering files.

Millepede-II (V. Blobel, C. Kleinwort, DESY) splits a global alignment fit in two programs:
the experiment's code writes, track by track, the residuals and their derivatives with respect
to the *local* (track) parameters and the *global* (alignment) parameters into binary files
with the small ``Mille`` class; the stand-alone solver ``pede`` reads those files together
with a text steering file and solves for the global parameters. This module writes exactly the
records the C++ ``Mille`` class writes, reads them back, writes a steering file, and fixes the
label convention for the ITS2 sensor parameters.

Binary record ("C binary" file; ``Mille.h`` / ``Mille.cc``, ``readc.c`` of Millepede-II)
-----------------------------------------------------------------------------------------
A file is a plain concatenation of records, one record per track (one set of local
parameters); there is no file header. A record holding ``n`` (float, int) pairs is

    int32        word count ``2 n``  (``-2 n`` when the floats are float64, see below)
    float[n]     the float array
    int32[n]     the integer array

Pair 0 is ``(0.0, 0)`` (``Mille::newSet``; the Fortran ``MILLE`` and older C++ versions keep
an error counter in its integer). Every measurement then appends

    (rMeas, 0)                     the measured residual
    (dLocal_i, i)  for i = 1..n    each *non-zero* local derivative with its 1-based index
    (sigma, 0)                     the measurement's standard deviation, > 0
    (dGlobal_k, label_k)           each *non-zero* global derivative with its label, > 0

so the zeros of the integer array mark where a measurement starts and where its global part
begins. ``Mille::mille`` drops zero derivatives, silently drops a whole measurement with
``sigma <= 0`` and drops (with a message on stderr) global derivatives whose label is
``<= 0`` or above ``2**31 - 1`` (``Mille::myMaxLabel``). This module drops zero derivatives
in the same way but *raises* :class:`ValueError` for the two other cases, for NaN (``pede``
stops on records with NaNs, ``pechk``) and for infinite numbers. Values are converted to the
file's float width first, so a derivative that underflows float32 is dropped as a zero and a
sigma that does is rejected.

Optional *special data* (``Mille::special``, Fortran ``MILLSP``) are announced by the two pairs
``(0.0, 0), (-float(nSpecial), 0)`` followed by ``nSpecial`` free (float, int) pairs; ``pede``
recognises them as a "measurement" with no local derivative and a negative sigma
(``isjajb`` in ``pede.f90``) and skips them in the fit. The sign matters: ``pede`` needs the
negative count, which the Fortran ``MILLSP`` and the original C++ ``Mille`` write (a recent
C++ ``Mille.cc`` pushes ``+nSpecial`` although its own comment says ``-float(nSpecial)``).

Double precision: ``Mille`` itself writes float32 only. The double-precision variant (the GBL
package's ``MilleBinary`` with ``doublePrec = true``) writes float64 and flags this with a
*negative* word count, ``-2 n``, still counting one word per float; ``readc.c`` takes a
negative count as "doubles follow" and reads ``n`` float64 and ``n`` int32. Both kinds of
record may be mixed in one file.

Byte order: C++ writes the machine's native order and ``pede`` reads native order, so the files
are only portable between machines of the same endianness. This module always writes and
reads *little-endian* (``<i4``, ``<f4``, ``<f8``), which is what ``Mille`` produces on x86-64
and on little-endian ARM, the machines ``pede`` runs on in practice.

Steering file (Millepede-II manual, "Steering file commands")
-------------------------------------------------------------
A text file of commands, one per line, ``!`` starting a comment. File names come first;
``Cfiles`` declares that the following binary files are C (``Mille``) files. A file whose
extension contains ``tx`` or ``xt`` is read as a text (steering/constraint) file, so binary
files must not be named like that. ``Parameter`` is followed by lines
``label initial_value presigma``: presigma > 0 adds ``1/presigma**2`` to the diagonal,
presigma = 0 means plainly variable, presigma < 0 means *fixed* at the initial value.
``Constraint value`` is followed by ``label factor`` lines and adds the exact linear
constraint ``value = sum(factor * p[label])``. ``method inversion <iterations> <epsilon>``
selects the solution method, the number of iterations and the convergence limit on the
change of the objective function; ``end`` ends the steering.

ITS label convention
--------------------
Global parameter ``dof`` (0..5 for ``alpha, beta, gamma, tau1, tau2, tau3`` as in
:mod:`streamcal.detectors.its.misalignment`) of sensor ``s`` (the dense sensor id of
:mod:`streamcal.detectors.its.geometry`) has the label ``10 * s + dof + 1``. Labels are thus
>= 1 as ``pede`` requires, readable in decimal (sensor 123, gamma -> 1233), and leave the last
digits 7..9 and 0 of every sensor free for further parameters. The full ITS2 (24,120 sensors)
ends at label 241,206, far below the ``2**31 - 1`` limit.
"""

from __future__ import annotations

import math
import os
import struct
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, overload

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = [
    "ITS_DOFS",
    "ITS_DOF_NAMES",
    "MAX_LABEL",
    "MilleFormatError",
    "MilleMeasurement",
    "MilleRecord",
    "MilleWriter",
    "iter_mille",
    "its_label",
    "its_unlabel",
    "read_mille",
    "write_steering",
]

MAX_LABEL = 2**31 - 1
"""Largest global label ``Mille`` accepts (``Mille::myMaxLabel``); labels must be >= 1."""

ITS_DOFS = 6
"""Alignment degrees of freedom per ITS sensor: three Euler angles, three translations."""

ITS_DOF_NAMES = ("alpha", "beta", "gamma", "tau1", "tau2", "tau3")
"""Names of the ITS degrees of freedom in label order (``dof`` 0..5)."""

_LABEL_STRIDE = 10
_MAX_PAIRS = (2**31 - 1) // 2  # the word count 2 n must fit in an int32
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_MAX_STEERING_LINE = 1024  # pede's limit on the length of a steering-file line


class MilleFormatError(ValueError):
    """A Millepede binary file is truncated or does not follow the ``Mille`` record layout.

    Attributes:
        offset: byte offset in the file of the record (its word count) that is broken.
    """

    def __init__(self, message: str, offset: int) -> None:
        super().__init__(message)
        self.offset = offset


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _first_bad(mask: NDArray[np.bool_]) -> tuple[int, ...]:
    """Index (as a tuple) of the first True element of a boolean array."""
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(mask)), mask.shape))


def _as_float_array(value: ArrayLike, name: str, ndim: int, fdtype: np.dtype) -> np.ndarray:
    """Convert to float64, check the rank, cast to the output width and check finiteness."""
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name} must be numeric, got {value!r:.80}") from exc
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    with np.errstate(over="ignore", invalid="ignore"):
        out = arr.astype(fdtype)
    bad = ~np.isfinite(out)
    if bad.any():
        where = _first_bad(bad)
        raise ValueError(
            f"{name} must be finite, got {float(arr[where])!r} at index "
            f"{where if ndim > 1 else where[0]}"
            + (" (outside the float32 range)" if np.isfinite(arr[where]) else "")
        )
    return out


def _as_label_array(value: ArrayLike, name: str, ndim: int) -> np.ndarray:
    arr = np.asarray(value)
    if arr.size == 0:
        arr = arr.astype(np.int64)
    if arr.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {arr.shape}")
    return arr.astype(np.int64)


class MilleWriter:
    """Write Millepede-II C-binary files, record by record, like the C++ ``Mille`` class.

    Use :meth:`mille` once per measurement and :meth:`end` once per track (or :meth:`kill` to
    discard the track), or :meth:`write_track` to write a whole track at once from arrays.
    The file is truncated on opening. Use it as a context manager::

        with MilleWriter("its.bin") as mw:
            for track in tracks:
                mw.write_track(dloc, dglo, labels, residuals, sigmas)

    Args:
        path: output file.
        double_precision: write float64 values and a negative word count (GBL ``MilleBinary``
            double-precision records) instead of ``Mille``'s float32.
    """

    def __init__(self, path: str | os.PathLike[str], *, double_precision: bool = False) -> None:
        self._path = Path(path)
        self._double = bool(double_precision)
        self._fdtype = np.dtype("<f8" if self._double else "<f4")
        self._fh: BinaryIO | None = open(self._path, "wb")  # noqa: SIM115 - closed in close()
        self._floats: list[np.ndarray] = []
        self._ints: list[np.ndarray] = []
        self._n_pairs = 0  # pairs in the open record, without pair 0
        self._has_special = False
        self.records_written = 0
        self.bytes_written = 0

    # -- properties -------------------------------------------------------------------------

    @property
    def path(self) -> Path:
        return self._path

    @property
    def double_precision(self) -> bool:
        return self._double

    @property
    def closed(self) -> bool:
        return self._fh is None

    @property
    def pending(self) -> int:
        """Number of (float, int) pairs collected for the open record (0: none open)."""
        return self._n_pairs

    # -- encoding ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._fh is None:
            raise ValueError(f"MilleWriter for {self._path} is closed")

    def _encode(
        self,
        local_derivs: ArrayLike,
        global_derivs: ArrayLike,
        labels: ArrayLike,
        measurements: ArrayLike,
        sigmas: ArrayLike,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Validate ``n_meas`` measurements and lay them out as the (float, int) pair stream."""
        fd = self._fdtype
        meas = _as_float_array(measurements, "measurements", 1, fd)
        n_meas = meas.shape[0]
        sig = _as_float_array(sigmas, "sigmas", 1, fd)
        if sig.shape != (n_meas,):
            raise ValueError(
                f"sigmas must have shape ({n_meas},) like measurements, got {sig.shape}"
            )
        loc = _as_float_array(local_derivs, "local_derivs", 2, fd)
        glo = _as_float_array(global_derivs, "global_derivs", 2, fd)
        lab = _as_label_array(labels, "labels", 2)
        if loc.shape[0] != n_meas:
            raise ValueError(
                f"local_derivs must have one row per measurement ({n_meas}), got shape {loc.shape}"
            )
        if glo.shape[0] != n_meas:
            raise ValueError(
                f"global_derivs must have one row per measurement ({n_meas}), got shape {glo.shape}"
            )
        if lab.shape != glo.shape:
            raise ValueError(
                f"labels must have the shape of global_derivs {glo.shape}, got {lab.shape}"
            )
        bad = ~(sig > 0)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"sigmas must be > 0 (Mille drops such measurements), got {float(sig[i])!r} at "
                f"measurement {i}" + (" (0 after conversion to float32)" if sig[i] == 0 else "")
            )
        keep_loc = loc != 0
        keep_glo = glo != 0
        bad = keep_glo & ((lab <= 0) | (lab > MAX_LABEL))
        if bad.any():
            where = _first_bad(bad)
            raise ValueError(
                f"labels must be in [1, {MAX_LABEL}] (Millepede label range), got {lab[where]} "
                f"at index {where}"
            )
        n_loc = loc.shape[1]
        width = n_loc + glo.shape[1] + 2
        n_kept = 2 * n_meas + int(keep_loc.sum()) + int(keep_glo.sum())
        if self._n_pairs + n_kept + 1 > _MAX_PAIRS:
            raise ValueError("record too long: its word count would not fit in a 32-bit integer")
        fl = np.empty((n_meas, width), dtype=fd)
        it = np.zeros((n_meas, width), dtype="<i4")
        keep = np.ones((n_meas, width), dtype=bool)
        fl[:, 0] = meas
        fl[:, 1 : n_loc + 1] = loc
        fl[:, n_loc + 1] = sig
        fl[:, n_loc + 2 :] = glo
        it[:, 1 : n_loc + 1] = np.arange(1, n_loc + 1, dtype=np.int32)
        it[:, n_loc + 2 :] = np.where(keep_glo, lab, 0)
        keep[:, 1 : n_loc + 1] = keep_loc
        keep[:, n_loc + 2 :] = keep_glo
        return fl[keep], it[keep]

    def _append(self, floats: np.ndarray, ints: np.ndarray) -> None:
        if floats.size:
            self._floats.append(floats)
            self._ints.append(ints)
            self._n_pairs += floats.size

    def _write_record(self, floats: list[np.ndarray], ints: list[np.ndarray], n_pairs: int) -> None:
        assert self._fh is not None
        n = n_pairs + 1
        count = -2 * n if self._double else 2 * n
        head_f = np.zeros(1, dtype=self._fdtype)
        head_i = np.zeros(1, dtype="<i4")
        blob = b"".join(
            [
                struct.pack("<i", count),
                np.concatenate([head_f, *floats]).tobytes(),
                np.concatenate([head_i, *ints]).tobytes(),
            ]
        )
        self._fh.write(blob)
        self.records_written += 1
        self.bytes_written += len(blob)

    # -- Mille interface --------------------------------------------------------------------

    def mille(
        self,
        local_derivs: ArrayLike,
        global_derivs: ArrayLike,
        labels: ArrayLike,
        measurement: float,
        sigma: float,
    ) -> None:
        """Append one measurement to the open record (``Mille::mille``).

        Args:
            local_derivs: ``(n_local,)`` derivatives of the measurement w.r.t. the local
                (track) parameters; local parameter ``i`` gets the index ``i + 1``.
            global_derivs: ``(n_global,)`` derivatives w.r.t. the global parameters.
            labels: ``(n_global,)`` integer labels of the global parameters, in
                ``[1, MAX_LABEL]`` wherever the derivative is non-zero.
            measurement: the residual (measured minus predicted).
            sigma: its standard deviation, > 0.

        Zero derivatives are not stored (their labels are not checked), as in ``Mille``.

        Raises:
            ValueError: on a non-positive or non-finite sigma, a NaN or infinite number, an
                invalid label or inconsistent shapes; the record is left unchanged.
        """
        self._check_open()
        loc_a, glo_a, lab_a = (
            np.asarray(local_derivs),
            np.asarray(global_derivs),
            np.asarray(labels),
        )
        for name, arr in (("local_derivs", loc_a), ("global_derivs", glo_a), ("labels", lab_a)):
            if arr.ndim != 1:
                raise ValueError(f"{name} must be one-dimensional, got shape {arr.shape}")
        floats, ints = self._encode(
            loc_a[None, :], glo_a[None, :], lab_a[None, :], [measurement], [sigma]
        )
        self._append(floats, ints)

    def special(self, floats: ArrayLike, ints: ArrayLike) -> None:
        """Append special data to the open record (``Mille::special``, Fortran ``MILLSP``).

        Written as ``(0.0, 0), (-len(floats), 0)`` followed by the ``(floats[i], ints[i])``
        pairs; ``pede`` skips them in the fit. At most one block per record.

        Raises:
            ValueError: on shape mismatch, non-finite floats or integers outside int32.
            RuntimeError: if this record already holds special data.
        """
        self._check_open()
        fl = _as_float_array(floats, "special floats", 1, self._fdtype)
        it = _as_label_array(ints, "special ints", 1)
        if it.shape != fl.shape:
            raise ValueError(
                f"special ints must have the shape of the floats {fl.shape}, got {it.shape}"
            )
        if fl.size == 0:
            return
        if self._has_special:
            raise RuntimeError("special data already stored for this record (one block per record)")
        if ((it < _INT32_MIN) | (it > _INT32_MAX)).any():
            raise ValueError("special ints must fit in a 32-bit signed integer")
        if self._n_pairs + fl.size + 3 > _MAX_PAIRS:
            raise ValueError("record too long: its word count would not fit in a 32-bit integer")
        head_f = np.array([0.0, -float(fl.size)], dtype=self._fdtype)
        self._append(
            np.concatenate([head_f, fl]), np.concatenate([np.zeros(2, "<i4"), it.astype("<i4")])
        )
        self._has_special = True

    def end(self) -> None:
        """Write the open record to the file (``Mille::end``); nothing if it is empty."""
        self._check_open()
        if self._n_pairs:
            self._write_record(self._floats, self._ints, self._n_pairs)
        self.kill()

    def kill(self) -> None:
        """Discard the open record (``Mille::kill``)."""
        self._floats = []
        self._ints = []
        self._n_pairs = 0
        self._has_special = False

    def write_track(
        self,
        local_derivs: ArrayLike,
        global_derivs: ArrayLike,
        labels: ArrayLike,
        measurements: ArrayLike,
        sigmas: ArrayLike,
    ) -> None:
        """Write one record holding all measurements of one track, vectorised.

        Equivalent to one :meth:`mille` call per row followed by :meth:`end`, without a Python
        loop. A track without measurements writes nothing.

        Args:
            local_derivs: ``(n_meas, n_local)`` local derivatives.
            global_derivs: ``(n_meas, n_global)`` global derivatives.
            labels: ``(n_meas, n_global)`` integer labels (see :meth:`mille`).
            measurements: ``(n_meas,)`` residuals.
            sigmas: ``(n_meas,)`` standard deviations, > 0.

        Raises:
            ValueError: as :meth:`mille`; nothing is written then.
            RuntimeError: if a record opened with :meth:`mille` or :meth:`special` is pending.
        """
        self._check_open()
        if self._n_pairs:
            raise RuntimeError(
                "write_track() called while a record started with mille()/special() is open; "
                "call end() or kill() first"
            )
        floats, ints = self._encode(local_derivs, global_derivs, labels, measurements, sigmas)
        if floats.size:
            self._write_record([floats], [ints], floats.size)

    # -- file handling ----------------------------------------------------------------------

    def flush(self) -> None:
        self._check_open()
        assert self._fh is not None
        self._fh.flush()

    def close(self) -> None:
        """Close the file. An open record is discarded (as ``Mille``'s destructor does) with a
        :class:`RuntimeWarning`. Closing twice is allowed."""
        if self._fh is None:
            return
        if self._n_pairs:
            warnings.warn(
                f"MilleWriter.close(): discarding an unfinished record of {self._n_pairs} pairs "
                "(call end() to write it)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.kill()
        self._fh.close()
        self._fh = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.kill()
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else f"{self.records_written} records"
        prec = "float64" if self._double else "float32"
        return f"MilleWriter({str(self._path)!r}, {prec}, {state})"


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MilleMeasurement:
    """One measurement of a record.

    Attributes:
        measurement: the residual ``rMeas``.
        sigma: its standard deviation.
        local: ``{1-based local index: derivative}``.
        global_: ``{label: derivative}`` (``global`` is a Python keyword; :meth:`as_dict`
            uses the key ``"global"``).

    Repeated indices or labels within a measurement (allowed by the format) are summed, which
    is what they amount to in the linear model.
    """

    measurement: float
    sigma: float
    local: dict[int, float] = field(default_factory=dict)
    global_: dict[int, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return {
            "measurement": self.measurement,
            "sigma": self.sigma,
            "local": dict(self.local),
            "global": dict(self.global_),
        }


@dataclass(frozen=True)
class MilleRecord(Sequence[MilleMeasurement]):
    """One record (track) read back from a file; a sequence of :class:`MilleMeasurement`.

    Attributes:
        measurements: the measurements in file order.
        special: the special-data pairs ``((float, int), ...)``, or None if there are none.
        double_precision: whether the record stores float64 values.
        offset: byte offset of the record (its word count) in the file.
        error_count: the integer of pair 0 (an error counter in Fortran ``MILLE``; 0 in C++).
    """

    measurements: tuple[MilleMeasurement, ...]
    special: tuple[tuple[float, int], ...] | None = None
    double_precision: bool = False
    offset: int = 0
    error_count: int = 0

    @overload
    def __getitem__(self, index: int) -> MilleMeasurement: ...

    @overload
    def __getitem__(self, index: slice) -> Sequence[MilleMeasurement]: ...

    def __getitem__(self, index: int | slice) -> MilleMeasurement | Sequence[MilleMeasurement]:
        return self.measurements[index]

    def __len__(self) -> int:
        return len(self.measurements)


def _decode_record(floats: np.ndarray, ints: np.ndarray, offset: int, double: bool) -> MilleRecord:
    """Split the pair stream of one record into measurements (the walk of pede's ``isjajb``)."""
    n = ints.shape[0]

    def broken(msg: str) -> MilleFormatError:
        return MilleFormatError(f"corrupt Mille record at byte offset {offset}: {msg}", offset)

    zeros = np.flatnonzero(ints == 0)
    zeros = zeros[zeros > 0]
    fl = floats.astype(np.float64).tolist()
    it = ints.tolist()
    measurements: list[MilleMeasurement] = []
    special: tuple[tuple[float, int], ...] | None = None
    i = 1
    while i < n:
        if it[i] != 0:
            raise broken(f"expected a measurement marker (integer 0) at pair {i}, found {it[i]}")
        ja = i
        k = int(np.searchsorted(zeros, ja, side="right"))
        if k == zeros.shape[0]:
            raise broken(f"measurement at pair {ja} has no sigma marker")
        jb = int(zeros[k])
        if jb == ja + 1 and fl[jb] < 0:
            nsp_f = -fl[jb]
            nsp = round(nsp_f)
            if nsp != nsp_f or fl[ja] != 0:
                raise broken(f"malformed special-data header at pair {ja}")
            if jb + 1 + nsp > n:
                raise broken(
                    f"special data at pair {ja} announce {nsp} pairs beyond the record end"
                )
            if special is not None:
                raise broken(f"second special-data block at pair {ja}")
            special = tuple(zip(fl[jb + 1 : jb + 1 + nsp], it[jb + 1 : jb + 1 + nsp], strict=True))
            i = jb + 1 + nsp
            continue
        sigma = fl[jb]
        if not sigma > 0:
            raise broken(f"measurement at pair {ja} has sigma {sigma!r} <= 0")
        end = int(zeros[k + 1]) if k + 1 < zeros.shape[0] else n
        local: dict[int, float] = {}
        for idx, val in zip(it[ja + 1 : jb], fl[ja + 1 : jb], strict=True):
            if idx <= 0:
                raise broken(f"measurement at pair {ja} has local index {idx} <= 0")
            local[idx] = local.get(idx, 0.0) + val
        glob: dict[int, float] = {}
        for lab, val in zip(it[jb + 1 : end], fl[jb + 1 : end], strict=True):
            if lab <= 0:
                raise broken(f"measurement at pair {ja} has global label {lab} <= 0")
            glob[lab] = glob.get(lab, 0.0) + val
        measurements.append(MilleMeasurement(fl[ja], sigma, local, glob))
        i = end
    return MilleRecord(tuple(measurements), special, double, offset, int(it[0]))


def iter_mille(
    path: str | os.PathLike[str], *, double_precision: bool | None = None
) -> Iterator[MilleRecord]:
    """Iterate over the records of a Millepede-II C-binary file.

    Args:
        path: the file.
        double_precision: None (default) takes the float width of each record from the sign of
            its word count, as ``pede`` does (negative: float64). True or False forces float64
            or float32 for every record, using the magnitude of the count.

    Raises:
        MilleFormatError: (a ValueError) on a truncated or malformed record; the message and
            the ``offset`` attribute give the record's byte offset.
    """
    with open(path, "rb") as fh:
        offset = 0
        while True:
            head = fh.read(4)
            if not head:
                return
            if len(head) < 4:
                raise MilleFormatError(
                    f"truncated Mille file: {len(head)} stray byte(s) at byte offset {offset} "
                    "where a record's word count should start",
                    offset,
                )
            (count,) = struct.unpack("<i", head)
            double = count < 0 if double_precision is None else bool(double_precision)
            words = abs(count)
            if words == 0 or words % 2:
                raise MilleFormatError(
                    f"corrupt Mille record at byte offset {offset}: word count {count} is not a "
                    "positive even number",
                    offset,
                )
            n = words // 2
            fwidth = 8 if double else 4
            size = n * (fwidth + 4)
            body = fh.read(size)
            if len(body) < size:
                raise MilleFormatError(
                    f"truncated Mille record at byte offset {offset}: word count {count} "
                    f"announces {size} bytes, only {len(body)} left in the file",
                    offset,
                )
            floats = np.frombuffer(body, dtype="<f8" if double else "<f4", count=n)
            ints = np.frombuffer(body, dtype="<i4", count=n, offset=n * fwidth)
            yield _decode_record(floats, ints, offset, double)
            offset += 4 + size


def read_mille(
    path: str | os.PathLike[str], *, double_precision: bool | None = None
) -> list[MilleRecord]:
    """Read all records of a Millepede-II C-binary file; see :func:`iter_mille`."""
    return list(iter_mille(path, double_precision=double_precision))


# --------------------------------------------------------------------------------------------
# Steering file
# --------------------------------------------------------------------------------------------


def _check_label(label: object, what: str) -> int:
    if isinstance(label, bool) or not isinstance(label, (int, np.integer)):
        raise ValueError(f"{what} label must be an integer, got {label!r}")  # noqa: TRY004
    lab = int(label)
    if not 1 <= lab <= MAX_LABEL:
        raise ValueError(f"{what} label must be in [1, {MAX_LABEL}], got {lab}")
    return lab


def _num(value: object, what: str) -> str:
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must be a number, got {value!r}") from exc
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x!r}")
    return repr(x)


def _check_line(line: str, what: str) -> str:
    if "\n" in line or "\r" in line:
        raise ValueError(f"{what} must be a single line, got {line!r}")
    if len(line) > _MAX_STEERING_LINE:
        raise ValueError(f"{what} is longer than pede's {_MAX_STEERING_LINE}-character line limit")
    return line


def write_steering(
    path: str | os.PathLike[str],
    *,
    binary_files: Iterable[str | os.PathLike[str]],
    parameters: Mapping[int, tuple[float, float]] | None = None,
    constraints: Iterable[tuple[float, Mapping[int, float]]] = (),
    method: str = "inversion",
    iterations: int = 3,
    epsilon: float = 0.001,
    extra_lines: Iterable[str] = (),
) -> Path:
    """Write a ``pede`` steering file.

    Args:
        path: the steering file to write.
        binary_files: the ``Mille`` files, listed after ``Cfiles``; relative names are resolved
            by ``pede`` against its working directory. Names must not contain blanks or ``!``
            and their extension must not contain ``tx`` or ``xt`` (``pede`` would read them as
            text files).
        parameters: ``{label: (initial value, presigma)}``; presigma < 0 fixes the parameter,
            0 leaves it free, > 0 adds a ``1/presigma**2`` regularisation. Parameters not
            listed are free with initial value 0.
        constraints: ``(value, {label: factor})`` pairs, each the linear equality constraint
            ``value = sum(factor * p[label])``.
        method: ``pede`` solution method (``inversion``, ``diagonalization``, ``fullMINRES``,
            ``sparseMINRES-QLP``, ...).
        iterations: ``pede`` iterations (``method``'s first number), >= 0.
        epsilon: convergence limit on the change of the objective function, > 0.
        extra_lines: further commands written verbatim before ``end`` (e.g. ``"entries 10"``,
            ``"outlierdownweighting 3"``, ``"threads 8 1"``).

    Returns:
        The path written.

    Raises:
        ValueError: on an invalid label, number, file name or option.
    """
    files = [os.fspath(f) for f in binary_files]
    if not files:
        raise ValueError("binary_files must name at least one Mille file")
    lines = ["! pede steering file (Millepede-II); generated by streamcal", "Cfiles"]
    for name in files:
        if not isinstance(name, str) or not name or any(c.isspace() or c == "!" for c in name):
            raise ValueError(f"binary file name must be non-empty, without blanks or '!': {name!r}")
        suffix = Path(name).suffix.lower()
        if "tx" in suffix or "xt" in suffix:
            raise ValueError(
                f"binary file {name!r}: pede reads files whose extension contains 'tx' or 'xt' "
                "as text files; use e.g. '.bin'"
            )
        lines.append(_check_line(name, "binary file name"))

    params = dict(parameters or {})
    if params:
        lines += ["", "Parameter"]
        rows = []
        for label, spec in params.items():
            lab = _check_label(label, "parameter")
            try:
                value, presigma = spec
            except (TypeError, ValueError) as exc:
                raise ValueError(
                    f"parameter {lab} must map to (initial value, presigma), got {spec!r}"
                ) from exc
            v = _num(value, f"parameter {lab} initial value")
            ps = _num(presigma, f"parameter {lab} presigma")
            rows.append((lab, f"{lab} {v} {ps}"))
        lines += [row for _, row in sorted(rows)]

    for ic, item in enumerate(constraints):
        try:
            value, factors = item
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"constraint {ic} must be (value, {{label: factor}}), got {item!r}"
            ) from exc
        if not isinstance(factors, Mapping) or not factors:
            raise ValueError(f"constraint {ic} needs a non-empty {{label: factor}} mapping")
        lines += ["", f"Constraint {_num(value, f'constraint {ic} value')}"]
        for label, factor in factors.items():
            lab = _check_label(label, f"constraint {ic}")
            lines.append(f"{lab} {_num(factor, f'constraint {ic} factor of label {lab}')}")

    if not isinstance(method, str) or not method or any(c.isspace() for c in method):
        raise ValueError(f"method must be a single pede method name, got {method!r}")
    if (
        isinstance(iterations, bool)
        or not isinstance(iterations, (int, np.integer))
        or iterations < 0
    ):
        raise ValueError(f"iterations must be an integer >= 0, got {iterations!r}")
    eps = _num(epsilon, "epsilon")
    if not float(eps) > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon!r}")
    lines += ["", f"method {method} {int(iterations)} {eps}"]
    for extra in extra_lines:
        if not isinstance(extra, str):
            raise ValueError(f"extra_lines must be strings, got {extra!r}")  # noqa: TRY004
        lines.append(_check_line(extra, "extra line"))
    lines.append("end")

    out = Path(path)
    out.write_text("\n".join(lines) + "\n", encoding="ascii")
    return out


# --------------------------------------------------------------------------------------------
# ITS labels
# --------------------------------------------------------------------------------------------


@overload
def its_label(sensor: int, dof: int) -> int: ...


@overload
def its_label(sensor: ArrayLike, dof: ArrayLike) -> int | NDArray[np.int64]: ...


def its_label(sensor: ArrayLike, dof: ArrayLike) -> int | NDArray[np.int64]:
    """Millepede label of degree of freedom ``dof`` of ITS sensor ``sensor``: ``10 s + dof + 1``.

    ``dof`` 0..5 is ``alpha, beta, gamma, tau1, tau2, tau3`` (:data:`ITS_DOF_NAMES`). Arrays
    broadcast; two Python/numpy integer scalars give an ``int``.

    Raises:
        ValueError: for non-integer input, a negative sensor, dof outside 0..5 or a label
            beyond :data:`MAX_LABEL`.
    """
    s = np.asarray(sensor)
    d = np.asarray(dof)
    for name, arr in (("sensor", s), ("dof", d)):
        if arr.dtype.kind not in "iu" and not (arr.size == 0 and arr.dtype.kind == "f"):
            raise ValueError(f"its_label: {name} must be integer, got dtype {arr.dtype}")
    s64, d64 = s.astype(np.int64), d.astype(np.int64)
    if (s64 < 0).any():
        raise ValueError(f"its_label: sensor must be >= 0, got {int(s64.min())}")
    if ((d64 < 0) | (d64 >= ITS_DOFS)).any():
        bad = d64[(d64 < 0) | (d64 >= ITS_DOFS)]
        raise ValueError(f"its_label: dof must be in 0..{ITS_DOFS - 1}, got {int(bad.flat[0])}")
    if (s64 > (MAX_LABEL - ITS_DOFS) // _LABEL_STRIDE).any():
        raise ValueError(f"its_label: sensor {int(s64.max())} gives a label beyond {MAX_LABEL}")
    lab = s64 * _LABEL_STRIDE + d64 + 1
    if lab.ndim == 0:
        return int(lab)
    return lab


@overload
def its_unlabel(label: int) -> tuple[int, int]: ...


@overload
def its_unlabel(
    label: ArrayLike,
) -> tuple[int, int] | tuple[NDArray[np.int64], NDArray[np.int64]]: ...


def its_unlabel(
    label: ArrayLike,
) -> tuple[int, int] | tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Inverse of :func:`its_label`: ``(sensor, dof)`` of a label (or of an array of labels).

    Raises:
        ValueError: for a non-integer label, a label < 1, or one whose last digit is not 1..6
            (not an ITS alignment label).
    """
    lab = np.asarray(label)
    if lab.dtype.kind not in "iu" and not (lab.size == 0 and lab.dtype.kind == "f"):
        raise ValueError(f"its_unlabel: label must be integer, got dtype {lab.dtype}")
    lab = lab.astype(np.int64)
    if (lab < 1).any():
        raise ValueError(f"its_unlabel: labels must be >= 1, got {int(lab.min())}")
    sensor, dof = np.divmod(lab - 1, _LABEL_STRIDE)
    bad = dof >= ITS_DOFS
    if bad.any():
        raise ValueError(
            f"its_unlabel: label {int(lab[bad].flat[0])} is not an ITS alignment label "
            f"(last digit must be 1..{ITS_DOFS})"
        )
    if lab.ndim == 0:
        return int(sensor), int(dof)
    return sensor, dof
