"""Millepede-II export of the ITS2 alignment cost against independent computations: pede's normal
equations rebuilt from the records read back (local parameters eliminated per record, as
Millepede does) against ``align.normal_equations``, the objective against the cost under both
normalisations, fitted-residual pulls at the true geometry, labels and local indices per
measurement, the steering file parsed back (fixed sensors, constraint blocks) and a pede-like
constrained solve of the file against ``align.reference_solution``, and ``streamcal its
export-mille`` on a run directory written here.

Geometry: three ITS2 inner-barrel layers, one chip across and two along each stave (96 chips).
Tracks: |eta| < 0.4, pT 0.3-5 GeV/c, beam spot 15 um x 10 mm, no multiple scattering (so the
weights are the exact resolutions). CPU, float64, a few thousand tracks."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from streamcal.actors.its_tracks import ITS_HITS, GeometrySpec, hits_for_alignment
from streamcal.cli import main
from streamcal.detectors.its.align import (
    Constraints,
    normal_equations,
    pack_tracks,
    reference_solution,
    total_cost,
)
from streamcal.detectors.its.evaluation import ConstraintSpec, RunConfig, write_run_json
from streamcal.detectors.its.mille import its_label, its_unlabel, read_mille
from streamcal.detectors.its.mille_export import (
    LOCAL_PARAMETERS,
    MILLE_FILE,
    STEERING_FILE,
    SUMMARY_FILE,
    THETA0_FILE,
    export_mille,
)
from streamcal.detectors.its.misalignment import apply_alignment, misalign
from streamcal.detectors.its.simulation import SimulationConfig, simulate_batch
from streamcal.models.its_alignment import ITSAlignmentConfig, ITSAlignmentModel
from tests.its.barrel import COST, MISALIGN, SIM

GEOM_SPEC = GeometrySpec(layers=3, chips_u=(1, 1, 1), chips_v=(2, 2, 2))


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def geom():
    return GEOM_SPEC.build()


@pytest.fixture(scope="module")
def truth(geom):
    return misalign(geom, MISALIGN)


def _hits(geom, truth, n_events: int, tracks: int, seed: int, smear_vertex: bool = False) -> pa.RecordBatch:
    """Simulated ``its.hits`` on the misaligned geometry; with ``smear_vertex`` the event vertex
    is measured with the cost's vertex resolution (so every weight is the true variance)."""
    sim = SimulationConfig(seed=seed, tracks_per_event=tracks, **SIM)
    hits = hits_for_alignment(simulate_batch(geom, sim, n_events, placement=apply_alignment(geom, truth)))
    if not smear_vertex:
        return hits
    ev = hits.column("event").to_numpy()
    rng = np.random.default_rng(seed)
    noise = rng.normal(size=(ev.max() + 1, 3)) * [COST.sigma_vertex_xy, COST.sigma_vertex_xy, COST.sigma_vertex_z]
    cols = {name: hits.column(name) for name in hits.schema.names}
    for i, name in enumerate(("vx", "vy", "vz")):
        cols[name] = pa.array(cols[name].to_numpy() + noise[ev, i])
    return pa.RecordBatch.from_arrays(list(cols.values()), schema=hits.schema)


@pytest.fixture(scope="module")
def batches(geom, truth):
    """Two batches whose events differ in degrees of freedom (8 and 3 tracks per event)."""
    return [pack_tracks(_hits(geom, truth, 150, 8, seed=1), geom, min_hits=3)[0],
            pack_tracks(_hits(geom, truth, 100, 3, seed=2), geom, min_hits=3)[0]]


def _model(geom, theta: np.ndarray | None = None, config: ITSAlignmentConfig = COST) -> ITSAlignmentModel:
    model = ITSAlignmentModel.from_geometry(geom, config)
    if theta is not None:
        model.set_theta(torch.from_numpy(theta))
    return model


def _layer_sensors(geom, *layers: int) -> np.ndarray:
    return np.flatnonzero(np.isin(geom.layer, layers))


def _record_arrays(rec):
    """One record as arrays: values r, sigmas, local matrix L (M, 5), the global labels and G."""
    labels = sorted({lab for m in rec for lab in m.global_})
    col = {lab: i for i, lab in enumerate(labels)}
    loc = np.zeros((len(rec), len(LOCAL_PARAMETERS)))
    glo = np.zeros((len(rec), len(labels)))
    for i, m in enumerate(rec):
        for j, v in m.local.items():
            loc[i, j - 1] = v
        for lab, v in m.global_.items():
            glo[i, col[lab]] = v
    r = np.array([m.measurement for m in rec])
    sig = np.array([m.sigma for m in rec])
    return r, sig, loc, np.asarray(labels, dtype=np.int64), glo


def _pede_normal_equations(records, n_sensors: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Millepede's global normal equations from the records: per record the local parameters are
    eliminated, ``H += G^T W G - G^T W L (L^T W L)^-1 L^T W G`` and ``b`` likewise with ``r``;
    also the objective ``sum (r / sigma)^2`` at the records' point."""
    n6 = 6 * n_sensors
    hess, rhs, obj = np.zeros((n6, n6)), np.zeros(n6), 0.0
    for rec in records:
        r, sig, loc, labels, glo = _record_arrays(rec)
        w = sig**-2
        sens, dof = its_unlabel(labels)
        idx = 6 * sens + dof
        wl, wg = w[:, None] * loc, w[:, None] * glo
        cinv = np.linalg.inv(loc.T @ wl)
        hess[np.ix_(idx, idx)] += glo.T @ wg - wg.T @ loc @ cinv @ wl.T @ glo
        rhs[idx] += wg.T @ r - wg.T @ loc @ cinv @ (wl.T @ r)
        obj += float(w @ (r * r))
    return hess, rhs, obj


def _parse_steering(text: str) -> dict:
    """The steering file's commands: files, {label: (value, presigma)}, [(value, {label: factor})]."""
    out: dict = {"files": [], "parameters": {}, "constraints": [], "method": None, "entries": None}
    keywords = {"cfiles", "parameter", "constraint", "method", "entries", "end"}
    mode = None
    for raw in text.splitlines():
        line = raw.split("!")[0].strip()
        if not line:
            continue
        tok = line.split()
        key = tok[0].lower()
        if key in keywords:
            mode = key
            if key == "constraint":
                out["constraints"].append((float(tok[1]), {}))
            elif key == "method":
                out["method"] = (tok[1], int(tok[2]), float(tok[3]))
            elif key == "entries":
                out["entries"] = int(tok[1])
            continue
        if mode == "cfiles":
            out["files"].append(line)
        elif mode == "parameter":
            out["parameters"][int(tok[0])] = (float(tok[1]), float(tok[2]))
        elif mode == "constraint":
            out["constraints"][-1][1][int(tok[0])] = float(tok[1])
        else:
            raise AssertionError(f"unexpected steering line {raw!r}")
    return out


@pytest.fixture(scope="module")
def constraints(geom):
    return Constraints.build(geom, modes=("rz", "radial"), fixed=_layer_sensors(geom, 0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, geom, truth, batches, constraints):
    """Double-precision export linearised at half the true misalignment, cost normalisation."""
    out = tmp_path_factory.mktemp("mille")
    model = _model(geom, 0.5 * truth)
    summary = export_mille(model, batches, out, constraints=constraints, double_precision=True)
    return model, out, summary, read_mille(out / MILLE_FILE)


# ------------------------------------------------------------------------------------------------
# Records


def test_normal_equations_from_the_file_match_the_model(exported, geom, batches):
    model, out, summary, records = exported
    n_tracks = sum(b.n_tracks for b in batches)
    assert summary["tracks"] == summary["records"] == len(records) == n_tracks
    assert summary["measurements"] == sum(len(r) for r in records)
    assert summary["hit_measurements"] == 2 * sum(int(b.mask.sum()) for b in batches)
    assert summary["vertex_measurements"] == 2 * n_tracks
    assert all(r.double_precision for r in records)
    ne = normal_equations(model, batches, covariance=False)
    hess, rhs, obj = _pede_normal_equations(records, geom.n_sensors)
    # "cost" normalisation: pede's objective is nu_sum * C, so H_pede = nu_sum / 2 * H and
    # b_pede = -nu_sum / 2 * dC/dTheta (pede's right-hand side is G^T W r for derivatives -A)
    nu_sum = summary["objective_scale"]
    assert nu_sum == summary["ndf"] == pytest.approx(sum(float((2 * b.mask.sum(1) - 3).sum()) for b in batches))
    h_model = 0.5 * nu_sum * ne.hessian.toarray()
    b_model = -0.5 * nu_sum * ne.grad
    assert np.abs(hess - h_model).max() <= 1e-6 * np.abs(h_model).max()
    assert np.abs(rhs - b_model).max() <= 1e-6 * np.abs(b_model).max()
    assert obj == pytest.approx(nu_sum * ne.cost, rel=1e-9)
    assert summary["cost"] == pytest.approx(ne.cost, rel=1e-12)
    np.testing.assert_array_equal(np.load(out / THETA0_FILE), model.theta().numpy())


@pytest.mark.parametrize("vertex", ["none", "fit"])
def test_normal_equations_for_the_other_vertex_modes(tmp_path, geom, truth, batches, vertex):
    model = _model(geom, 0.5 * truth, ITSAlignmentConfig(multiple_scattering=False, vertex=vertex))
    summary = export_mille(model, batches, tmp_path, double_precision=True, chunk_tracks=300)
    records = read_mille(tmp_path / MILLE_FILE)
    n_vertex = 0 if vertex == "none" else 2 * summary["tracks"]
    assert summary["vertex_measurements"] == n_vertex == sum(len(r) for r in records) - summary["hit_measurements"]
    ne = normal_equations(model, batches, covariance=False)  # one chunk per batch: same fitted vertices
    hess, rhs, _ = _pede_normal_equations(records, geom.n_sensors)
    h_model = 0.5 * summary["objective_scale"] * ne.hessian.toarray()
    b_model = -0.5 * summary["objective_scale"] * ne.grad
    assert np.abs(hess - h_model).max() <= 1e-6 * np.abs(h_model).max()
    assert np.abs(rhs - b_model).max() <= 1e-6 * np.abs(b_model).max()


def test_labels_and_local_indices_per_measurement(exported, batches):
    _, _, _, records = exported
    dofs = np.arange(6)
    it = iter(records)
    for b in batches:
        for t in range(b.n_tracks):
            rec = next(it)
            nh = int(b.mask[t].sum())
            assert len(rec) == 2 * nh + 2
            for k in range(nh):
                labels = its_label(int(b.sensor[t, k]), dofs)
                xy, z = rec[2 * k], rec[2 * k + 1]
                assert sorted(xy.global_) == labels[:5].tolist()  # d e / d tau3 = 0 is not stored
                assert sorted(z.global_) == labels.tolist()
                assert sorted(xy.local) == [1, 2, 3] and sorted(z.local) == [4, 5]
                assert z.local[4] == 1.0  # -d rz / d z0
            vxy, vz = rec[2 * nh], rec[2 * nh + 1]
            assert not vxy.global_ and not vz.global_
            assert vxy.local == {3: -1.0} and vz.local == {4: 1.0}


def test_objective_under_both_normalisations(tmp_path, geom, truth, batches):
    """cost: sum (r / sigma)^2 = nu_sum C and sigmas stretched by sqrt(nu_event / nu_mean);
    chi2: the plain sigmas, the un-normalised chi2 sum."""
    model = _model(geom, 0.5 * truth)
    s_cost = export_mille(model, batches, tmp_path / "cost", double_precision=True)
    s_chi2 = export_mille(model, batches, tmp_path / "chi2", double_precision=True, normalisation="chi2")
    rec_cost, rec_chi2 = read_mille(tmp_path / "cost" / MILLE_FILE), read_mille(tmp_path / "chi2" / MILLE_FILE)
    obj = [sum((m.measurement / m.sigma) ** 2 for r in recs for m in r) for recs in (rec_cost, rec_chi2)]
    chi2_sum = sum(float(model(b).chi2.sum()) for b in batches)
    cost = total_cost(model, batches)
    assert s_chi2["objective_scale"] is None and s_chi2["chi2"] == pytest.approx(chi2_sum, rel=1e-12)
    assert obj[0] == pytest.approx(s_cost["ndf"] * cost, rel=1e-9)
    assert obj[1] == pytest.approx(chi2_sum, rel=1e-9)
    # per record the sigma ratio is sqrt(nu_event / nu_mean)
    nu_mean = s_cost["ndf"] / s_cost["events"]
    ratios, expected = [], []
    it_cost, it_chi2 = iter(rec_cost), iter(rec_chi2)
    for b in batches:
        ndf = 2.0 * b.mask.sum(1).double() - 3.0
        ev_ndf = torch.zeros(b.n_events, dtype=torch.float64).index_add_(0, b.event, ndf)
        for t in range(b.n_tracks):
            rc, r2 = next(it_cost), next(it_chi2)
            ratios.append([mc.sigma / m2.sigma for mc, m2 in zip(rc, r2)])
            expected.append(np.sqrt(float(ev_ndf[b.event[t]]) / nu_mean))
    for got, exp in zip(ratios, expected):
        np.testing.assert_allclose(got, exp, rtol=1e-12)
    assert np.ptp(expected) > 0.5  # events of 8 and of 3 tracks: the normalisation matters


def test_residuals_at_the_truth_have_unit_pulls(tmp_path, geom, truth):
    """At Theta = truth, with the vertex measured with its resolution, the fitted residuals of
    each record divided by their standard deviation from the record's own sigmas and local
    derivatives, ``sqrt(sigma^2 - (L (L^T W L)^-1 L^T)_ii)``, are standard normal."""
    batch = pack_tracks(_hits(geom, truth, 400, 8, seed=7, smear_vertex=True), geom, min_hits=3)[0]
    model = _model(geom, truth)
    export_mille(model, batch, tmp_path, double_precision=True, normalisation="chi2")
    pulls: dict[str, list[float]] = {"xy": [], "z": [], "vertex": []}
    chi2_ndf = []
    for rec in read_mille(tmp_path / MILLE_FILE):
        r, sig, loc, _, _ = _record_arrays(rec)
        w = sig**-2
        lev = np.einsum("ij,jk,ik->i", loc, np.linalg.inv(loc.T @ (w[:, None] * loc)), loc)
        p = r / np.sqrt(sig**2 - lev)
        nh = (len(rec) - 2) // 2
        pulls["xy"] += p[0 : 2 * nh : 2].tolist()
        pulls["z"] += p[1 : 2 * nh : 2].tolist()
        pulls["vertex"] += p[2 * nh :].tolist()
        chi2_ndf.append(float(w @ (r * r)) / (len(rec) - len(LOCAL_PARAMETERS)))
    for kind, vals in [*pulls.items(), ("all", sum(pulls.values(), []))]:
        v = np.asarray(vals)
        n = v.size
        assert abs(v.mean()) < 4 / np.sqrt(n), (kind, v.mean())
        assert abs(v.std() - 1) < 4 / np.sqrt(2 * n), (kind, v.std())
    assert np.mean(chi2_ndf) == pytest.approx(1.0, abs=4 * np.sqrt(2 / 5 / len(chi2_ndf)))


def test_float32_records_are_the_double_records_rounded(tmp_path, exported, batches, constraints):
    model, _, _, rec64 = exported
    export_mille(model, batches, tmp_path, constraints=constraints)
    rec32 = read_mille(tmp_path / MILLE_FILE)
    assert len(rec32) == len(rec64) and not any(r.double_precision for r in rec32)
    for a, b in zip(rec32[:200], rec64[:200]):
        assert [m.measurement for m in a] == [float(np.float32(m.measurement)) for m in b]
        assert [m.sigma for m in a] == [float(np.float32(m.sigma)) for m in b]
        assert [sorted(m.global_) for m in a] == [sorted(m.global_) for m in b]


# ------------------------------------------------------------------------------------------------
# Steering file


def test_steering_fixed_sensors_and_constraint_blocks(exported, geom, constraints):
    model, out, summary, _ = exported
    st = _parse_steering((out / STEERING_FILE).read_text())
    assert st["files"] == [MILLE_FILE]
    assert st["entries"] == 1 and st["method"][0] == summary["method"] == "inversion"
    fixed = _layer_sensors(geom, 0)
    assert set(st["parameters"]) == set(its_label(fixed[:, None], np.arange(6)).ravel().tolist())
    assert all(v == (0.0, -1.0) for v in st["parameters"].values())
    q = constraints.q.numpy()
    assert len(st["constraints"]) == q.shape[1] == summary["constraints"]["written"] == 2
    theta0 = model.theta().numpy().reshape(-1)
    for (value, factors), col in zip(st["constraints"], q.T):
        vec = np.zeros(6 * geom.n_sensors)
        sens, dof = its_unlabel(np.array(list(factors)))
        vec[6 * sens + dof] = list(factors.values())
        np.testing.assert_allclose(vec, col, rtol=0, atol=1e-12 * np.abs(col).max())
        assert not set(factors) & set(st["parameters"])  # nothing on fixed parameters
        assert value == pytest.approx(-col @ theta0, rel=1e-12, abs=1e-300)
    assert any(abs(v) > 0 for v, _ in st["constraints"])  # theta0 != 0 moves the constraint value


def test_pede_like_solution_matches_the_reference_solution(tmp_path, geom, truth, batches):
    """Solve the file's normal equations with the steering file's fixed parameters and
    constraints (Lagrange multipliers, as pede) and compare with one Gauss-Newton step of
    ``align.reference_solution`` from Theta = 0 on the same data."""
    cons = Constraints.build(geom, modes=("rz",), fixed=_layer_sensors(geom, 0, 2))
    export_mille(_model(geom), batches, tmp_path, constraints=cons, fixed_layers=(2,), double_precision=True)
    st = _parse_steering((tmp_path / STEERING_FILE).read_text())
    hess, rhs, _ = _pede_normal_equations(read_mille(tmp_path / MILLE_FILE), geom.n_sensors)
    n6 = 6 * geom.n_sensors
    fixed_idx = [6 * s + d for s, d in zip(*its_unlabel(np.array(list(st["parameters"]))))]
    free = np.setdiff1d(np.arange(n6), fixed_idx)
    assert free.size == 6 * _layer_sensors(geom, 1).size
    rows = []
    for _, factors in st["constraints"]:
        vec = np.zeros(n6)
        sens, dof = its_unlabel(np.array(list(factors)))
        vec[6 * sens + dof] = list(factors.values())
        rows.append(vec[free])
    c = np.array(rows)
    kkt = np.block([[hess[np.ix_(free, free)], c.T], [c, np.zeros((len(rows), len(rows)))]])
    sol = np.linalg.solve(kkt, np.concatenate([rhs[free], [v for v, _ in st["constraints"]]]))
    dp = np.zeros(n6)
    dp[free] = sol[: free.size]
    ref = reference_solution(_model(geom), batches, cons, n_iter=1, covariance=False)
    expected = ref.theta.numpy().reshape(-1)
    assert np.abs(dp - expected).max() <= 1e-6 * np.abs(expected).max()


def test_invalid_options_name_the_argument(tmp_path, geom, batches, constraints):
    model = _model(geom)
    with pytest.raises(ValueError, match="fixed_layers"):
        export_mille(model, batches, tmp_path, constraints=constraints, fixed_layers=(2,))
    with pytest.raises(ValueError, match="fixed_layers"):
        export_mille(model, batches, tmp_path, fixed_layers=(3,))
    with pytest.raises(ValueError, match="normalisation"):
        export_mille(model, batches, tmp_path, normalisation="events")
    with pytest.raises(ValueError, match="constraints"):
        export_mille(model, batches, tmp_path, constraints=Constraints.build(GeometrySpec(layers=1, chips_u=(1,),
                                                                                          chips_v=(1,)).build()))
    with pytest.raises(ValueError, match="batches"):
        export_mille(model, [], tmp_path)


# ------------------------------------------------------------------------------------------------
# streamcal its export-mille


def _write_spool(path, batches: list[pa.RecordBatch]) -> None:
    with pa.ipc.new_stream(str(path), ITS_HITS.schema) as writer:
        for b in batches:
            writer.write_batch(b)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, geom, truth):
    """A run directory as the workers leave it: run.json, theta.npy, two workers' spool files
    (one with a bad hit) and a third cut short by a killed worker."""
    rd = tmp_path_factory.mktemp("run")
    cfg = RunConfig(geometry=GEOM_SPEC.config(), misalignment=MISALIGN, simulation=SimulationConfig(seed=1, **SIM),
                    model=COST, constraints=ConstraintSpec(modes=("rz",), fixed_layers=(0,)), workers=2)
    write_run_json(rd, cfg)
    np.save(rd / "theta.npy", 0.9 * truth)
    h = [_hits(geom, truth, 60, 8, seed=s) for s in (11, 12, 13)]
    u = h[1].column("u").to_numpy().copy()
    u[5] = np.nan
    h[1] = h[1].set_column(h[1].schema.get_field_index("u"), "u", pa.array(u))
    (rd / "spool").mkdir()
    _write_spool(rd / "spool" / "its_align-0.0.arrows", [h[0], h[1]])
    _write_spool(rd / "spool" / "its_align-1.0.arrows", [h[2]])
    # incarnation 1 of worker 1 was killed while writing its second batch
    _write_spool(rd / "spool" / "its_align-1.1.arrows", [h[0]])
    first = len((rd / "spool" / "its_align-1.1.arrows").read_bytes()) - 8  # without the end-of-stream marker
    _write_spool(rd / "spool" / "its_align-1.1.arrows", [h[0], h[2]])
    both = (rd / "spool" / "its_align-1.1.arrows").read_bytes()
    (rd / "spool" / "its_align-1.1.arrows").write_bytes(both[: first + (len(both) - first) // 2])
    return rd, cfg, h


def test_cli_export_mille(tmp_path, capsys, geom, run_dir):
    rd, cfg, h = run_dir
    rc = main(["its", "export-mille", "--run", str(rd), "--out", str(tmp_path / "zero"), "--min-hits", "3",
               "--double"])
    assert rc == 0, capsys.readouterr().err
    assert "pede steer.txt" in capsys.readouterr().out
    summary = json.loads((tmp_path / "zero" / SUMMARY_FILE).read_text())
    # what the workers would pack: the intact file of worker 0, worker 1's two incarnations up to
    # the damaged tail (its first batch survives)
    packed = [pack_tracks(b, geom, min_hits=3) for b in (h[0], h[1], h[2], h[0])]
    assert summary["run"]["spool"]["damaged"] == ["its_align-1.1.arrows"]
    assert summary["run"]["spool"]["batches"] == 4 and summary["run"]["at"] == "zero"
    assert summary["tracks"] == summary["records"] == sum(tb.n_tracks for tb, _ in packed)
    assert summary["rejects"]["hits_nan"] == 1 and summary["rejects"]["tracks_zero_ndf"] == 0
    records = read_mille(tmp_path / "zero" / MILLE_FILE)
    assert len(records) == summary["records"] and summary["measurements"] == sum(len(r) for r in records)
    # the same bytes as export_mille on the same batches with the run's constraints
    export_mille(_model(geom), [tb for tb, _ in packed], tmp_path / "direct",
                 constraints=cfg.constraints.build(geom), double_precision=True)
    assert (tmp_path / "zero" / MILLE_FILE).read_bytes() == (tmp_path / "direct" / MILLE_FILE).read_bytes()
    assert (tmp_path / "zero" / STEERING_FILE).read_text() == (tmp_path / "direct" / STEERING_FILE).read_text()
    st = _parse_steering((tmp_path / "zero" / STEERING_FILE).read_text())
    assert len(st["constraints"]) == 1 and len(st["parameters"]) == 6 * _layer_sensors(geom, 0).size

    rc = main(["its", "export-mille", "--run", str(rd), "--out", str(tmp_path / "fitted"), "--at", "fitted"])
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "fitted" / SUMMARY_FILE).read_text())
    assert summary["run"]["at"] == "fitted" and summary["run"]["min_hits"] == 4 and not summary["double_precision"]
    np.testing.assert_allclose(np.load(tmp_path / "fitted" / THETA0_FILE), np.load(rd / "theta.npy"),
                               rtol=0, atol=1e-12)
    assert summary["tracks"] < sum(tb.n_tracks for tb, _ in packed)  # min_hits 4 rejects 3-hit tracks
    assert summary["rejects"]["tracks_too_few_hits"] > 0


def test_cli_export_mille_errors_name_the_path(tmp_path, capsys, run_dir):
    rd, cfg, _ = run_dir
    missing = tmp_path / "missing"
    assert main(["its", "export-mille", "--run", str(missing), "--out", str(tmp_path / "o")]) == 1
    assert str(missing) in capsys.readouterr().err
    bare = tmp_path / "bare"
    write_run_json(bare, cfg)
    assert main(["its", "export-mille", "--run", str(bare), "--out", str(tmp_path / "o")]) == 1
    assert str(bare / "spool") in capsys.readouterr().err
    (bare / "spool").mkdir()
    assert main(["its", "export-mille", "--run", str(bare), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(bare / "spool") in err and "no spool files" in err
    assert main(["its", "export-mille", "--run", str(bare), "--out", str(tmp_path / "o"), "--at", "fitted"]) == 1
    assert str(bare / "theta.npy") in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
