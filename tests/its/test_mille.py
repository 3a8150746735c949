"""Millepede-II export: byte layout of ``Mille`` records against hand-packed bytes, round trips,
input validation, error reporting of the reader, the pede steering file and the ITS labels."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from streamcal.detectors.its.mille import (
    ITS_DOFS,
    MAX_LABEL,
    MilleFormatError,
    MilleWriter,
    iter_mille,
    its_label,
    its_unlabel,
    read_mille,
    write_steering,
)


def _record(pairs: list[tuple[float, int]], *, double: bool = False) -> bytes:
    """A record packed by hand with ``struct``: word count, floats, ints (little-endian)."""
    n = len(pairs)
    count = -2 * n if double else 2 * n
    fchar = "d" if double else "f"
    return (
        struct.pack("<i", count)
        + struct.pack(f"<{n}{fchar}", *(f for f, _ in pairs))
        + struct.pack(f"<{n}i", *(i for _, i in pairs))
    )


# Two measurements written with mille(): the zero local/global derivatives must disappear.
MEAS_1 = {
    "local": [0.5, 0.0, -2.0],
    "glob": [1.5, 0.0, 3.0],
    "labels": [11, 12, 13],
    "meas": 0.25,
    "sigma": 0.01,
}
MEAS_2 = {
    "local": [0.0, 0.0, 1.0],
    "glob": [0.0, -0.75],
    "labels": [21, 26],
    "meas": -0.125,
    "sigma": 0.02,
}
EXPECTED_PAIRS = [
    (0.0, 0),  # pair 0 of every record
    (0.25, 0),  # rMeas
    (0.5, 1),  # local derivative 1
    (-2.0, 3),  # local derivative 3 (2 is zero)
    (0.01, 0),  # sigma
    (1.5, 11),  # global derivative, label 11
    (3.0, 13),  # label 12 has a zero derivative
    (-0.125, 0),
    (1.0, 3),
    (0.02, 0),
    (-0.75, 26),
]


def _mille(mw: MilleWriter, m: dict) -> None:
    mw.mille(m["local"], m["glob"], m["labels"], m["meas"], m["sigma"])


@pytest.mark.parametrize("double", [False, True], ids=["float32", "float64"])
def test_record_bytes_match_hand_packed_layout(tmp_path, double):
    path = tmp_path / "hand.bin"
    with MilleWriter(path, double_precision=double) as mw:
        mw.end()  # empty record: nothing written
        _mille(mw, MEAS_1)
        _mille(mw, MEAS_2)
        mw.end()
        _mille(mw, MEAS_2)
        mw.kill()  # discarded
        _mille(mw, MEAS_2)
        mw.end()
        assert mw.records_written == 2
    second = [(0.0, 0), (-0.125, 0), (1.0, 3), (0.02, 0), (-0.75, 26)]
    expected = _record(EXPECTED_PAIRS, double=double) + _record(second, double=double)
    data = path.read_bytes()
    assert data == expected
    # The word count is 2 n, negative for float64 records.
    (count,) = struct.unpack_from("<i", data)
    assert count == (-22 if double else 22)
    assert len(data) == len(expected)


def test_write_track_equals_mille_calls(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    rng = np.random.default_rng(1)
    loc = rng.normal(size=(5, 4)) * (rng.random((5, 4)) > 0.3)
    glo = rng.normal(size=(5, 6)) * (rng.random((5, 6)) > 0.3)
    lab = its_label(rng.integers(0, 24_120, size=(5, 1)), np.arange(6)[None, :])
    res, sig = rng.normal(size=5), rng.uniform(0.001, 0.01, size=5)
    with MilleWriter(a) as mw:
        mw.write_track(loc, glo, lab, res, sig)
        mw.write_track(np.zeros((0, 4)), np.zeros((0, 6)), np.zeros((0, 6), int), [], [])  # empty
    with MilleWriter(b) as mw:
        for i in range(5):
            mw.mille(loc[i], glo[i], lab[i], res[i], sig[i])
        mw.end()
    assert a.read_bytes() == b.read_bytes()
    assert len(read_mille(a)) == 1


def test_special_data_layout_and_read_back(tmp_path):
    path = tmp_path / "special.bin"
    with MilleWriter(path) as mw:
        mw.special([2.5, -1.0, 0.0], [7, 0, -3])
        _mille(mw, MEAS_2)
        mw.end()
    expected = _record(
        [(0.0, 0), (0.0, 0), (-3.0, 0), (2.5, 7), (-1.0, 0), (0.0, -3)]
        + [(-0.125, 0), (1.0, 3), (0.02, 0), (-0.75, 26)]
    )
    assert path.read_bytes() == expected
    (rec,) = read_mille(path)
    assert rec.special == ((2.5, 7), (-1.0, 0), (0.0, -3))
    assert len(rec) == 1 and rec[0].global_ == {26: -0.75}
    with MilleWriter(tmp_path / "twice.bin") as mw:
        mw.special([1.0], [1])
        with pytest.raises(RuntimeError, match="special data already stored"):
            mw.special([1.0], [1])
        mw.kill()


def test_zero_derivatives_are_dropped(tmp_path):
    path = tmp_path / "zeros.bin"
    with MilleWriter(path) as mw:
        # -0.0 is zero too; the label of a zero derivative is not even checked (as in Mille).
        mw.write_track(
            np.array([[0.0, -0.0, 2.0], [0.0, 0.0, 0.0]]),
            np.array([[0.0, 4.0], [0.0, 0.0]]),
            np.array([[0, 7], [-5, MAX_LABEL + 10]]),
            [1.0, 2.0],
            [0.5, 0.25],
        )
    data = path.read_bytes()
    # pairs: 0, (1,0), (2,3), (0.5,0), (4,7), (2,0), (0.25,0)
    assert struct.unpack_from("<i", data)[0] == 2 * 7
    assert data == _record([(0.0, 0), (1.0, 0), (2.0, 3), (0.5, 0), (4.0, 7), (2.0, 0), (0.25, 0)])
    (rec,) = read_mille(path)
    assert rec[0].local == {3: 2.0} and rec[0].global_ == {7: 4.0}
    assert rec[1].local == {} and rec[1].global_ == {}
    # A value that is non-zero in float64 but underflows float32 is dropped as well.
    with MilleWriter(path) as mw:
        mw.mille([1e-50, 1.0], [1e-50], [3], 0.0, 1.0)
        mw.end()
    assert read_mille(path)[0][0].as_dict() == {
        "measurement": 0.0,
        "sigma": 1.0,
        "local": {2: 1.0},
        "global": {},
    }


# ----------------------------------------------------------------------------- round trip


@st.composite
def tracks(draw):
    n_local = draw(st.integers(0, 5))
    n_global = draw(st.integers(0, 7))
    n_meas = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    loc = rng.normal(size=(n_meas, n_local)) * (rng.random((n_meas, n_local)) > 0.3)
    glo = rng.normal(size=(n_meas, n_global)) * 10.0 ** rng.integers(-4, 4, (n_meas, n_global))
    glo *= rng.random((n_meas, n_global)) > 0.3
    lab = rng.integers(1, MAX_LABEL, size=(n_meas, n_global), endpoint=True)
    res = rng.normal(size=n_meas) * 0.1
    sig = rng.uniform(1e-4, 1.0, size=n_meas)
    return loc, glo, lab, res, sig


def _expected(track, dtype):
    loc, glo, lab, res, sig = (np.asarray(x) for x in track)
    out = []
    for i in range(res.shape[0]):
        local, glob = {}, {}
        for j, v in enumerate(loc[i].astype(dtype)):
            if v != 0:
                local[j + 1] = float(v)
        for k, v in zip(lab[i], glo[i].astype(dtype), strict=True):
            if v != 0:
                glob[int(k)] = glob.get(int(k), 0.0) + float(v)
        out.append((float(dtype(res[i])), float(dtype(sig[i])), local, glob))
    return out


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(tracks(), min_size=1, max_size=4), st.booleans())
def test_round_trip_random_tracks(tmp_path, track_list, double):
    path = tmp_path / "rt.bin"
    with MilleWriter(path, double_precision=double) as mw:
        for t in track_list:
            mw.write_track(*t)
    dtype = np.float64 if double else np.float32
    records = read_mille(path)
    assert len(records) == len(track_list)
    offset = 0
    for rec, t in zip(records, track_list, strict=True):
        assert rec.double_precision is double and rec.offset == offset and rec.special is None
        got = [(m.measurement, m.sigma, m.local, m.global_) for m in rec]
        assert got == _expected(t, dtype)
        n_pairs = 1 + 2 * len(rec) + sum(len(m.local) + len(m.global_) for m in rec)
        offset += 4 + n_pairs * ((8 if double else 4) + 4)
    assert offset == path.stat().st_size


def test_reader_detects_width_per_record_and_can_force_it(tmp_path):
    path = tmp_path / "mixed.bin"
    pairs = [(0.0, 0), (0.5, 0), (0.25, 0), (2.0, 9)]
    path.write_bytes(_record(pairs) + _record(pairs, double=True))
    recs = read_mille(path)
    assert [r.double_precision for r in recs] == [False, True]
    assert recs[0][0] == recs[1][0]
    assert recs[1].offset == 4 + 4 * 8
    # Forcing float64 on a float32 file misreads the sizes and reports the truncation.
    only32 = tmp_path / "f32.bin"
    only32.write_bytes(_record(pairs))
    with pytest.raises(MilleFormatError, match="truncated Mille record at byte offset 0"):
        read_mille(only32, double_precision=True)
    assert len(list(iter_mille(only32, double_precision=False))) == 1


# ----------------------------------------------------------------------------- bad input

GOOD = {"local": [1.0, 0.5], "glob": [1.0, 2.0], "labels": [1, 2], "meas": 0.1, "sigma": 0.01}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sigma": 0.0}, r"sigmas must be > 0"),
        ({"sigma": -0.5}, r"sigmas must be > 0"),
        ({"sigma": 1e-60}, r"sigmas must be > 0 .*0 after conversion to float32"),
        ({"sigma": math.nan}, r"sigmas must be finite"),
        ({"sigma": math.inf}, r"sigmas must be finite"),
        ({"meas": math.nan}, r"measurements must be finite"),
        ({"meas": 1e39}, r"measurements must be finite.*float32 range"),
        ({"labels": [1, 0]}, r"labels must be in \[1, 2147483647\].*got 0"),
        ({"labels": [-4, 2]}, r"labels must be in \[1, 2147483647\].*got -4"),
        ({"labels": [1, 2**31]}, r"labels must be in \[1, 2147483647\].*got 2147483648"),
        ({"labels": [1.0, 2.0]}, r"labels must be an integer array, got dtype float64"),
        ({"labels": [1, 2, 3]}, r"labels must have the shape of global_derivs"),
        ({"local": [math.nan, 1.0]}, r"local_derivs must be finite, got nan at index \(0, 0\)"),
        ({"glob": [1.0, math.nan]}, r"global_derivs must be finite, got nan at index \(0, 1\)"),
        ({"glob": [[1.0, 2.0]]}, r"global_derivs must be one-dimensional"),
        ({"local": ["a", "b"]}, r"local_derivs must be numeric"),
    ],
)
def test_mille_rejects_bad_input(tmp_path, change, message):
    args = {**GOOD, **change}
    path = tmp_path / "bad.bin"
    with MilleWriter(path) as mw:
        with pytest.raises(ValueError, match=message):
            mw.mille(args["local"], args["glob"], args["labels"], args["meas"], args["sigma"])
        assert mw.pending == 0  # nothing half-appended
        mw.end()
    assert path.read_bytes() == b""


def _track(n=3, nl=2, ng=4):
    return {
        "local_derivs": np.ones((n, nl)),
        "global_derivs": np.ones((n, ng)),
        "labels": np.arange(1, n * ng + 1).reshape(n, ng),
        "measurements": np.zeros(n),
        "sigmas": np.full(n, 0.01),
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"local_derivs": np.ones((2, 2))},
            r"local_derivs must have one row per measurement \(3\)",
        ),
        ({"global_derivs": np.ones((4, 4))}, r"global_derivs must have one row per measurement"),
        ({"labels": np.ones((3, 3), int)}, r"labels must have the shape of global_derivs \(3, 4\)"),
        ({"sigmas": np.ones(2)}, r"sigmas must have shape \(3,\)"),
        ({"measurements": np.zeros((3, 1))}, r"measurements must have 1 dimension"),
        ({"local_derivs": np.ones(3)}, r"local_derivs must have 2 dimension"),
        ({"sigmas": np.array([0.01, 0.0, 0.01])}, r"sigmas must be > 0.*at measurement 1"),
        (
            {"labels": np.array([[1, 2, 3, 4], [5, 6, 0, 8], [9, 10, 11, 12]])},
            r"got 0 at index \(1, 2\)",
        ),
        (
            {"global_derivs": np.array([[1.0] * 4, [1.0] * 4, [1.0, np.inf, 1.0, 1.0]])},
            r"global_derivs must be finite, got inf at index \(2, 1\)",
        ),
    ],
)
def test_write_track_rejects_bad_input(tmp_path, change, message):
    path = tmp_path / "bad.bin"
    with MilleWriter(path) as mw, pytest.raises(ValueError, match=message):
        mw.write_track(**{**_track(), **change})
    assert path.read_bytes() == b""


def test_writer_state_errors(tmp_path):
    mw = MilleWriter(tmp_path / "state.bin")
    _mille(mw, MEAS_1)
    with pytest.raises(RuntimeError, match="call end\\(\\) or kill\\(\\) first"):
        mw.write_track(**_track())
    with pytest.warns(RuntimeWarning, match="discarding an unfinished record"):
        mw.close()
    mw.close()  # twice is fine
    with pytest.raises(ValueError, match="is closed"):
        _mille(mw, MEAS_1)
    assert (tmp_path / "state.bin").read_bytes() == b""
    # An exception inside the context manager discards the open record without a warning.
    with pytest.raises(KeyError), MilleWriter(tmp_path / "exc.bin") as mw:
        _mille(mw, MEAS_1)
        raise KeyError("boom")
    assert (tmp_path / "exc.bin").read_bytes() == b""


# ----------------------------------------------------------------------------- reader errors


def _two_records(tmp_path):
    path = tmp_path / "two.bin"
    with MilleWriter(path) as mw:
        _mille(mw, MEAS_1)
        _mille(mw, MEAS_2)
        mw.end()
        _mille(mw, MEAS_2)
        mw.end()
    return path, 4 + 11 * 8  # second record starts after 4 + 11 pairs of 8 bytes


def test_reader_reports_truncation_with_offset(tmp_path):
    path, second = _two_records(tmp_path)
    data = path.read_bytes()
    assert len(read_mille(path)) == 2
    path.write_bytes(data[:-3])
    gen = iter_mille(path)
    assert len(next(gen)) == 2  # the first record is intact
    with pytest.raises(
        MilleFormatError, match=f"truncated Mille record at byte offset {second}"
    ) as err:
        next(gen)
    assert err.value.offset == second
    assert "announces 40 bytes, only 37 left" in str(err.value)
    path.write_bytes(data[: second + 2])
    with pytest.raises(MilleFormatError, match=f"2 stray byte\\(s\\) at byte offset {second}"):
        read_mille(path)


@pytest.mark.parametrize(
    ("pairs", "message"),
    [
        ([(0.0, 0), (1.0, 5), (0.1, 0)], r"expected a measurement marker \(integer 0\) at pair 1"),
        ([(0.0, 0), (1.0, 0), (2.0, 3)], r"measurement at pair 1 has no sigma marker"),
        ([(0.0, 0), (1.0, 0), (0.0, 0)], r"sigma 0.0 <= 0"),
        ([(0.0, 0), (1.0, 0), (2.0, -1), (0.1, 0)], r"local index -1 <= 0"),
        ([(0.0, 0), (1.0, 0), (0.1, 0), (2.0, -7)], r"global label -7 <= 0"),
        ([(0.0, 0), (0.0, 0), (-5.0, 0), (1.0, 1)], r"announce 5 pairs beyond the record end"),
    ],
)
def test_reader_reports_corrupt_records_with_offset(tmp_path, pairs, message):
    path, second = _two_records(tmp_path)
    path.write_bytes(path.read_bytes() + _record(pairs))
    offset = second + 4 + 5 * 8  # after the two valid records (92 and 44 bytes)
    with pytest.raises(
        MilleFormatError, match=f"corrupt Mille record at byte offset {offset}: .*{message}"
    ):
        read_mille(path)
    path.write_bytes(struct.pack("<i", 7) + b"\0" * 28)
    with pytest.raises(MilleFormatError, match="word count 7 is not a positive even number"):
        read_mille(path)


# ----------------------------------------------------------------------------- steering


def test_steering_file_content(tmp_path):
    out = write_steering(
        tmp_path / "steer.txt",
        binary_files=["its_a.bin", tmp_path / "its_b.dat"],
        parameters={its_label(2, 5): (0.0, -1.0), its_label(0, 0): (0.001, 0.01), 7: (1.5, 0.0)},
        constraints=[(0.0, {1: 1.0, 11: 1.0}), (0.25, {3: -0.5})],
        method="inversion",
        iterations=5,
        epsilon=1e-4,
        extra_lines=["entries 10", "outlierdownweighting 3"],
    )
    assert out == tmp_path / "steer.txt"
    expected = f"""! pede steering file (Millepede-II); generated by streamcal
Cfiles
its_a.bin
{tmp_path / "its_b.dat"}

Parameter
1 0.001 0.01
7 1.5 0.0
26 0.0 -1.0

Constraint 0.0
1 1.0
11 1.0

Constraint 0.25
3 -0.5

method inversion 5 0.0001
entries 10
outlierdownweighting 3
end
"""
    assert out.read_text() == expected


def test_steering_minimal_and_errors(tmp_path):
    p = tmp_path / "s.txt"
    text = write_steering(p, binary_files=["m.bin"]).read_text()
    assert text.splitlines()[1:] == ["Cfiles", "m.bin", "", "method inversion 3 0.001", "end"]
    bad = [
        ({"binary_files": []}, "at least one Mille file"),
        ({"binary_files": ["data.txt"]}, "extension contains 'tx' or 'xt'"),
        ({"binary_files": ["my file.bin"]}, "without blanks"),
        ({"parameters": {0: (0.0, 1.0)}}, r"parameter label must be in \[1, 2147483647\], got 0"),
        ({"parameters": {5: (math.nan, 1.0)}}, "parameter 5 initial value must be finite"),
        ({"parameters": {5: 1.0}}, r"parameter 5 must map to \(initial value, presigma\)"),
        ({"constraints": [(0.0, {})]}, "constraint 0 needs a non-empty"),
        ({"constraints": [(0.0, {-1: 1.0})]}, r"constraint 0 label must be in \[1, "),
        ({"constraints": [(0.0, {1: math.inf})]}, "constraint 0 factor of label 1 must be finite"),
        ({"method": "sparse MINRES"}, "single pede method name"),
        ({"iterations": -1}, "iterations must be an integer >= 0"),
        ({"epsilon": 0.0}, "epsilon must be > 0"),
        ({"extra_lines": ["a\nb"]}, "single line"),
    ]
    for change, message in bad:
        kwargs = {"binary_files": ["m.bin"], **change}
        with pytest.raises(ValueError, match=message):
            write_steering(p, **kwargs)


# ----------------------------------------------------------------------------- ITS labels


def test_its_labels():
    assert its_label(0, 0) == 1
    assert its_label(123, 2) == 1233
    assert its_label(24_119, 5) == 241_196
    assert isinstance(its_label(np.int32(4), np.int64(1)), int)
    assert its_unlabel(1233) == (123, 2)
    assert its_label(MAX_LABEL // 10, 5) == MAX_LABEL - 1  # the largest sensor still fits
    sensors = np.arange(24_120)[:, None]
    dofs = np.arange(ITS_DOFS)[None, :]
    labels = its_label(sensors, dofs)
    assert labels.shape == (24_120, 6) and labels.min() == 1
    assert np.unique(labels).size == labels.size
    s, d = its_unlabel(labels)
    np.testing.assert_array_equal(s, np.broadcast_to(sensors, labels.shape))
    np.testing.assert_array_equal(d, np.broadcast_to(dofs, labels.shape))
    for args, message in [
        ((0, 6), "dof must be in 0..5"),
        ((-1, 0), "sensor must be >= 0"),
        ((1.0, 0), "sensor must be integer"),
        ((MAX_LABEL // 10 + 1, 0), "beyond 2147483647"),
    ]:
        with pytest.raises(ValueError, match=message):
            its_label(*args)
    for label, message in [
        (0, "labels must be >= 1"),
        (17, "not an ITS alignment label"),
        (np.array([1, 20]), "label 20"),
    ]:
        with pytest.raises(ValueError, match=message):
            its_unlabel(label)
