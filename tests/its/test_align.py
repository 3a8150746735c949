"""ITS alignment steps against independent computations: input rejection in ``pack_tracks``, the
weighted synchronisation against a hand computation and the full-data step, the linearised
normal equations against differences of the closed-form gradient, the sparse reference solution
against the injected misalignment (whitened residuals with its own covariance), SGD and the block
Gauss-Newton optimiser against the reference minimum, and the weak modes of the chi^2.

Geometry: a compact five-layer barrel (the three ITS2 inner-barrel layers and two more
inner-barrel-like layers at 46 and 54 mm), two chips per stave, 200 chips. Tracks: |eta| < 0.4,
beam spot 15 um x 10 mm, no multiple scattering, the true vertex (so the hit weights are the
exact resolutions and the covariance of the solution is known in closed form). Everything runs
on CPU in float64 (a few thousand tracks)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch
from scipy import linalg as sla
from scipy import stats

from streamcal.detectors.its.align import (
    Constraints,
    OptimizerConfig,
    RejectCounts,
    ThetaOptimizer,
    batch_weights,
    constrained_stiffness,
    full_gradient,
    hessian_blocks,
    local_basis,
    measurement_residuals,
    noise_factors,
    normal_equations,
    pack_tracks,
    read_tracks,
    write_tracks,
    reference_solution,
    run_epoch,
    sgd_rates,
    theta_gradient,
    total_cost,
    weak_mode_analysis,
    weighted_average,
)
from streamcal.detectors.its.geometry import ITSGeometryConfig, build_geometry
from streamcal.detectors.its.misalignment import MisalignmentConfig, apply_alignment, compose, misalign, weak_mode
from streamcal.detectors.its.simulation import SimulationConfig, simulate_batch
from streamcal.models.its_alignment import ITSAlignmentModel, TrackBatch
from tests.its.barrel import COST, MISALIGN, SIM

LOCAL = ("rot_u", "rot_v", "rot_w", "du", "dv", "dw")
SCALE = np.array([1e6] * 3 + [1e3] * 3)  # rad -> urad, mm -> um


def _simulate(geom, theta: np.ndarray, n_events: int, seed: int) -> pa.RecordBatch:
    return simulate_batch(geom, SimulationConfig(seed=seed, **SIM), n_events, placement=apply_alignment(geom, theta))


def _partitions(hits: pa.RecordBatch, geom, edges: list[int]):
    """Pack the events [edges[i], edges[i+1]) separately (data partitions / mini-batches)."""
    ev = hits.column("event").to_numpy()
    out = []
    for lo, hi in zip(edges, edges[1:]):
        rows = np.nonzero((ev >= lo) & (ev < hi))[0]
        out.append(pack_tracks(hits.take(pa.array(rows)), geom)[0])
    return out


def _to_local(model, theta: np.ndarray) -> np.ndarray:
    """Linearised local deltas (N, 6) of a global Theta (difference)."""
    return np.einsum("nij,nj->ni", torch.linalg.inv(local_basis(model)).numpy(), theta)


def _whitened(cov: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``L^-1 d`` with ``cov = L L^T`` (positive definite): N(0, 1) components if ``d`` is
    distributed with ``cov``."""
    return sla.solve_triangular(np.linalg.cholesky(cov), d, lower=True)


# ------------------------------------------------------------------------------------------------
# Main sample: layers 0 and 4 are the reference (fixed) sensors; the others misaligned


@pytest.fixture(scope="module")
def fixed(geom):
    return np.nonzero((geom.layer == 0) | (geom.layer == geom.n_layers - 1))[0]


@pytest.fixture(scope="module")
def truth(geom, fixed):
    theta = misalign(geom, MISALIGN)
    theta[fixed] = 0.0
    return theta


@pytest.fixture(scope="module")
def sample(geom, truth):
    """500 events (~3800 tracks) in 4 unequal partitions."""
    hits = _simulate(geom, truth, 500, seed=11)
    return _partitions(hits, geom, [0, 80, 200, 330, 500])


@pytest.fixture(scope="module")
def blocks(geom, sample):
    """Per-sensor Gauss-Newton blocks at the ideal geometry."""
    return hessian_blocks(ITSAlignmentModel.from_geometry(geom, COST), sample)


@pytest.fixture(scope="module")
def reference(geom, sample, fixed):
    model = ITSAlignmentModel.from_geometry(geom, COST)
    cons = Constraints.build(geom, fixed=fixed)
    ref = reference_solution(model, sample, cons, n_iter=2)  # a third changes it by < 1e-4 sigma
    return model, ref


# ------------------------------------------------------------------------------------------------
# pack_tracks


@pytest.fixture(scope="module")
def clean_hits(geom):
    return _simulate(geom, np.zeros((geom.n_sensors, 6)), 40, seed=3)


def _append(hits: pa.RecordBatch, rows: list[dict]) -> pa.Table:
    extra = pa.Table.from_pylist(rows, schema=hits.schema)
    return pa.concat_tables([pa.Table.from_batches([hits]), extra])


def _row(hits: pa.RecordBatch, i: int, **change) -> dict:
    row = {name: hits.column(name)[i].as_py() for name in hits.schema.names}
    row.update(change)
    return row


def _same_batch(a, b) -> None:
    for name in ("sensor", "local", "mask", "event", "vertex"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.n_events == b.n_events


def test_pack_tracks_rejects_bad_hits_and_never_uses_them(geom, clean_hits):
    """Bad hits attached to real tracks are rejected one by one and counted; the packed batch
    (and so the cost) is exactly that of the clean hits."""
    clean, cnt0 = pack_tracks(clean_hits, geom)
    assert cnt0.hits_rejected == 0 and cnt0.tracks_rejected == cnt0.tracks_too_few_hits  # short tracks only
    assert cnt0.tracks_used == cnt0.tracks_in - cnt0.tracks_too_few_hits == clean.n_tracks
    assert cnt0.hits_used == int(clean.mask.sum())
    n = geom.n_sensors
    bad = [
        _row(clean_hits, 0, sensor=-1),  # unknown sensor ids
        _row(clean_hits, 5, sensor=n),
        _row(clean_hits, 9, sensor=n + 1000),
        _row(clean_hits, 1, sensor=None),  # null id
        _row(clean_hits, 2, u=math.nan),  # NaN / inf / null local coordinates
        _row(clean_hits, 3, v=math.inf),
        _row(clean_hits, 4, u=None),
        _row(clean_hits, 6, u=geom.half_u + 0.2),  # outside the active area
        _row(clean_hits, 7, v=-geom.half_v - 1.0),
        _row(clean_hits, 8, u=0.123),  # a second hit on the same sensor
    ]
    dirty = _append(clean_hits, bad)
    batch, cnt = pack_tracks(dirty, geom)
    assert (cnt.hits_unknown_sensor, cnt.hits_nan, cnt.hits_outside_sensor, cnt.hits_duplicate_sensor) == (4, 3, 2, 1)
    assert cnt.hits_in == clean_hits.num_rows + len(bad)
    assert cnt.hits_rejected == len(bad) and cnt.tracks_rejected == cnt0.tracks_rejected
    assert cnt.tracks_used == cnt0.tracks_used and cnt.hits_used == cnt0.hits_used
    _same_batch(batch, clean)
    model = ITSAlignmentModel.from_geometry(geom, COST)
    with torch.no_grad():
        assert float(model(batch).cost) == float(model(clean).cost)


def test_pack_tracks_drops_tracks_with_too_few_or_too_many_hits(geom, clean_hits):
    ev = clean_hits.column("event").to_numpy()
    tr = clean_hits.column("track").to_numpy()
    key = ev * 8 + tr
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    # a track with >= 5 hits loses all but 3 (invalid local coordinates): too few
    t_few = int(np.nonzero(counts >= 5)[0][0])
    rows_few = np.arange(first[t_few], first[t_few] + counts[t_few])
    u = clean_hits.column("u").to_numpy().copy()
    u[rows_few[3:]] = math.nan
    hits = clean_hits.set_column(clean_hits.schema.get_field_index("u"), "u", pa.array(u))
    # a track with an event vertex that is not finite
    t_vtx = int(np.nonzero(counts >= 4)[0][-1])
    vx = clean_hits.column("vx").to_numpy().copy()
    vx[ev == ev[first[t_vtx]]] = math.nan
    hits = hits.set_column(hits.schema.get_field_index("vx"), "vx", pa.array(vx))
    in_vtx_event = np.unique(key[ev == ev[first[t_vtx]]])
    n_vtx_tracks = int(np.isin(key[first], in_vtx_event)[counts >= 4].sum())
    _, cnt0 = pack_tracks(clean_hits, geom)
    batch, cnt = pack_tracks(hits, geom)
    assert cnt.hits_nan == counts[t_few] - 3
    assert cnt.tracks_too_few_hits == cnt0.tracks_too_few_hits + 1 == int((counts < 4).sum()) + 1
    assert cnt.tracks_bad_vertex == n_vtx_tracks > 0
    assert cnt.tracks_used == cnt0.tracks_used - 1 - n_vtx_tracks
    # the same as packing the hits without those tracks
    drop = (key == key[first[t_few]]) | (ev == ev[first[t_vtx]])
    expected, _ = pack_tracks(clean_hits.filter(pa.array(~drop)), geom)
    _same_batch(batch, expected)
    # too many: a limit below the longest track
    longest = int(counts.max())
    _, cnt_many = pack_tracks(clean_hits, geom, max_hits=longest - 1)
    assert cnt_many.tracks_too_many_hits == int((counts > longest - 1).sum())
    # min_hits applies after the hit checks; counts add up
    _, cnt_min = pack_tracks(clean_hits, geom, min_hits=6)
    assert cnt_min.tracks_too_few_hits == int((counts < 6).sum())
    total = cnt_min + cnt_many
    assert isinstance(total, RejectCounts) and total.tracks_in == 2 * cnt.tracks_in


def test_packed_track_records_round_trip_and_a_damaged_tail_is_named(geom, clean_hits, tmp_path):
    """``write_tracks`` / ``read_tracks``: the batch back bit for bit (with and without the
    vertex, and an empty one), records skipped without decoding, the real hits only on disk
    (20 bytes per hit plus 5 per track and 24 per event), and a file cut inside a record or not
    holding records raises ValueError naming the byte offset."""
    with_vtx, _ = pack_tracks(clean_hits, geom, min_hits=3)
    no_vtx, _ = pack_tracks(clean_hits, geom, min_hits=3, with_vertex=False)
    empty, _ = pack_tracks(clean_hits, geom, min_hits=16)
    assert empty.n_tracks == 0 and with_vtx.n_tracks > 100
    path = tmp_path / "t.tracks"
    sizes = []
    with open(path, "wb") as f:
        for b in (with_vtx, no_vtx, empty, with_vtx):
            sizes.append(write_tracks(f, b))
    h, t, e = int(with_vtx.mask.sum()), with_vtx.n_tracks, with_vtx.n_events
    assert sizes[0] == 28 + 20 * h + 5 * t + 24 * e and sizes[1] == sizes[0] - 24 * e
    assert path.stat().st_size == sum(sizes)
    with open(path, "rb") as f:
        back = [read_tracks(f), read_tracks(f), read_tracks(f, skip=True), read_tracks(f), read_tracks(f)]
    assert back[-1] is None and back[2].n_tracks == 0
    for got, want in ((back[0], with_vtx), (back[1], no_vtx), (back[3], with_vtx)):
        for name in ("sensor", "local", "mask", "event"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert got.n_events == want.n_events
        assert (got.vertex is None) == (want.vertex is None)
        if want.vertex is not None:
            assert torch.equal(got.vertex, want.vertex)
    with open(path, "rb") as f:
        read_tracks(f, skip=True)
        assert read_tracks(f).vertex is None
    # a writer that died inside the second record
    cut = tmp_path / "cut.tracks"
    cut.write_bytes(path.read_bytes()[: sizes[0] + 100])
    for skip in (False, True):
        with open(cut, "rb") as f:
            assert read_tracks(f).n_tracks == t
            with pytest.raises(ValueError, match=f"record at byte {sizes[0]} is cut short"):
                read_tracks(f, skip=skip)
    cut.write_bytes(path.read_bytes()[: sizes[0] + 10])
    with open(cut, "rb") as f, pytest.raises(ValueError, match=f"header cut short at byte {sizes[0]}"):
        read_tracks(f, skip=True) and read_tracks(f)
    foreign = tmp_path / "foreign.tracks"
    foreign.write_bytes(b"PAR1" + bytes(100))
    with open(foreign, "rb") as f, pytest.raises(ValueError, match="no track record at byte 0"):
        read_tracks(f)
    shuffled = TrackBatch(with_vtx.sensor.flip(1), with_vtx.local.flip(1), with_vtx.mask.flip(1), with_vtx.event,
                          with_vtx.n_events, with_vtx.vertex)
    with open(tmp_path / "bad.tracks", "wb") as f, pytest.raises(ValueError, match="real hits must come first"):
        write_tracks(f, shuffled)


@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_a_stored_layout_is_attached_and_used_as_built(geom, clean_hits, tmp_path, precision):
    """The model's layout stored with the tracks (``plan_tensors`` -> ``write_tracks`` ->
    ``read_tracks(model=...)``) is the batch's cached layout after reading (not built again) and
    gives the same cost and gradient as the layout built from the hits; a layout of other
    tracks is refused with the part that does not fit."""
    model = ITSAlignmentModel.from_geometry(geom, replace(COST, precision=precision))
    model.set_theta(torch.from_numpy(np.random.default_rng(2).normal(0, 1e-3, (geom.n_sensors, 6))))
    batch, _ = pack_tracks(clean_hits, geom, min_hits=3)
    other, _ = pack_tracks(clean_hits, geom, min_hits=4)
    path = tmp_path / "t.tracks"
    with open(path, "wb") as f:
        write_tracks(f, batch, model.plan_tensors(batch))
        write_tracks(f, other, model.plan_tensors(other))
    c_built, g_built = theta_gradient(model, batch)
    with open(path, "rb") as f:
        back = read_tracks(f, model=model)
        second = read_tracks(f)  # without a model the layout is passed over
        assert second.n_tracks == other.n_tracks and "_fast_plan" not in second.__dict__
        assert read_tracks(f) is None
    plan = back.__dict__["_fast_plan"]
    c_read, g_read = theta_gradient(model, back)
    assert back.__dict__["_fast_plan"] is plan  # used as attached
    assert c_read == c_built and torch.equal(g_read, g_built)
    with pytest.raises(ValueError, match="attach_plan: .*hits|attach_plan: ndf"):
        model.attach_plan(back, model.plan_tensors(other))


def test_pack_tracks_input_errors_name_the_problem(geom, clean_hits):
    with pytest.raises(ValueError, match="'sensor'"):
        pack_tracks(clean_hits.drop_columns(["sensor"]), geom)
    with pytest.raises(ValueError, match="min_hits"):
        pack_tracks(clean_hits, geom, min_hits=2)
    with pytest.raises(ValueError, match="max_hits"):
        pack_tracks(clean_hits, geom, min_hits=5, max_hits=4)
    with pytest.raises(ValueError, match="tolerance"):
        pack_tracks(clean_hits, geom, tolerance=-1.0)
    cols = {name: clean_hits.column(name).to_numpy() for name in clean_hits.schema.names}
    cols["u"] = cols["u"][:-1]
    with pytest.raises(ValueError, match="'u' has"):
        pack_tracks(cols, geom)
    ev = clean_hits.column("event").to_numpy()
    vz = clean_hits.column("vz").to_numpy().copy()
    vz[np.nonzero(ev == ev[0])[0][-1]] += 1.0  # one row of event 0 disagrees
    with pytest.raises(ValueError, match="event 0"):
        pack_tracks(clean_hits.set_column(clean_hits.schema.get_field_index("vz"), "vz", pa.array(vz)), geom)
    # without vertex columns
    batch, _ = pack_tracks(clean_hits.drop_columns(["vx", "vy", "vz"]), geom, with_vertex=False)
    assert batch.vertex is None


# ------------------------------------------------------------------------------------------------
# Synchronisation


def test_weighted_average_against_hand_computation():
    a = torch.tensor([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]], dtype=torch.float64)
    b = torch.full((1, 6), -2.0, dtype=torch.float64)
    c = torch.zeros(1, 6, dtype=torch.float64)
    got = weighted_average([a, b, c], [100, 300, 600])  # unequal partitions
    hand = torch.tensor([[(100 * x - 600) / 1000 for x in (1, 2, 3, 4, 5, 6)]], dtype=torch.float64)
    assert torch.allclose(got, hand, atol=1e-15, rtol=0)
    # a zero weight ignores its worker; equal weights are the plain mean
    assert torch.equal(weighted_average([a, b], [1.0, 0.0]), a)
    assert torch.allclose(weighted_average([a, b], [2, 2]), (a + b) / 2)
    for thetas, weights, match in [
        ([], [], "at least one"),
        ([a, b], [1.0], "2 thetas but 1 weights"),
        ([a, b], [1.0, -1.0], ">= 0"),
        ([a, b], [0.0, 0.0], "positive sum"),
        ([a, b], [1.0, math.nan], "finite"),
        ([a, torch.zeros(2, 6, dtype=torch.float64)], [1, 1], r"thetas\[1\] has shape"),
        ([a, torch.zeros(1, 5, dtype=torch.float64)], [1, 1], r"thetas\[1\] has shape"),
        ([a, torch.full((1, 6), math.inf, dtype=torch.float64)], [1, 1], "finite"),
    ]:
        with pytest.raises(ValueError, match=match):
            weighted_average(thetas, weights)


def test_weighted_average_of_worker_steps_is_the_full_data_step(geom, sample):
    """Seed, "Scalable Training via Parallelization" with tau = 1: workers on unequal partitions
    each take an SGD step from the same Theta; averaging with mu_m = partition size reproduces
    the step on all data exactly (C = sum_m (N_m / N) C_m); the plain mean does not."""
    model = ITSAlignmentModel.from_geometry(geom, COST)
    cons = Constraints.build(geom)
    cfg = OptimizerConfig("sgd", lr_rot=1e-7, lr_trans=1e-3)
    theta0 = model.theta()
    steps = [ThetaOptimizer(cfg, cons).step(theta0, theta_gradient(model, b)[1]) for b in sample]
    mu = [b.n_events for b in sample]
    assert len(set(mu)) > 1
    np.testing.assert_allclose(batch_weights(model, sample), np.asarray(mu) / sum(mu))
    full = ThetaOptimizer(cfg, cons).step(theta0, full_gradient(model, sample)[1])
    avg = weighted_average(steps, mu)
    assert float((avg - full).abs().max()) < 1e-12 * float(full.abs().max())
    plain = weighted_average(steps, [1.0] * len(steps))
    assert float((plain - full).abs().max()) > 1e-3 * float(full.abs().max())


# ------------------------------------------------------------------------------------------------
# Normal equations and the reference solution


def test_normal_equations_match_the_model(geom, sample, blocks):
    """Gradient = the model's fast gradient; cost = the event-weighted cost of all partitions;
    H d = grad(Theta + d) - grad(Theta) to second order; the per-sensor blocks bound H."""
    model = ITSAlignmentModel.from_geometry(geom, COST)
    ne = normal_equations(model, sample, covariance=False)
    assert ne.grad_cov.nnz == 0
    cost, grad = full_gradient(model, sample)
    assert abs(ne.cost - cost) < 1e-12 * cost
    assert np.abs(ne.grad - grad.reshape(-1).numpy()).max() < 1e-9 * np.abs(ne.grad).max()
    assert abs(total_cost(model, sample) - cost) < 1e-12 * cost
    rng = np.random.default_rng(1)
    d = rng.standard_normal((geom.n_sensors, 6)) * np.array([1e-5] * 3 + [1e-3] * 3)
    model.set_theta(torch.from_numpy(d))
    _, grad_d = full_gradient(model, sample)
    diff = (grad_d - grad).reshape(-1).numpy()
    assert np.linalg.norm(ne.hessian @ d.reshape(-1) - diff) < 1e-3 * np.linalg.norm(diff)
    assert abs(ne.hessian - ne.hessian.T).max() < 1e-9 * abs(ne.hessian).max()
    # H <= D = blockdiag(A^T W A) (the GN step with eta < 2 converges; H = A^T P A >= 0 by
    # construction): D - H is positive semi-definite (Cholesky of the unit-diagonal scaled
    # matrix plus 1e-9)
    dmat = sla.block_diag(*blocks.numpy())
    s = 1.0 / np.sqrt(np.diag(dmat))
    hd = ne.hessian.toarray() * s[:, None] * s[None, :]
    dd = dmat * s[:, None] * s[None, :]
    eye = 1e-9 * np.eye(hd.shape[0])
    np.linalg.cholesky(dd - hd + eye)
    with pytest.raises(np.linalg.LinAlgError):  # and the bound is tight
        np.linalg.cholesky(0.9 * dd - hd + eye)
    # a vertex measured with its resolution adds gradient noise to the exact-vertex covariance
    v_exact = normal_equations(model, sample[:1]).grad_cov
    v_noisy = normal_equations(model, sample[:1], vertex_noise=True).grad_cov
    x = rng.standard_normal((hd.shape[0], 64)) * s[:, None]
    added = np.einsum("ik,ik->k", x, (v_noisy - v_exact) @ x)
    assert added.min() > 0 and np.all(added > 1e-3 * np.einsum("ik,ik->k", x, v_exact @ x))


@pytest.mark.parametrize("vertex_noise", [True, False])
def test_noise_factors_are_the_scattering_covariance_along_the_track(geom, vertex_noise):
    """``noise_factors``: ``S = F F^T`` of a track's residuals is the intrinsic variance on the
    diagonal plus, for every pair of hits, the covariance of the Highland kicks at the layers
    inside both, ``sum_{l < min(layer_i, layer_j)} theta0_l^2 (r_i - r_l) (r_j - r_l)`` times
    ``sec^2 lambda`` (xy) or ``sec^4 lambda`` (z), written out here pair by pair; its diagonal is
    the cost's own ``1 / w`` (the model's cumulative sums); the vertex row holds the vertex's
    resolution (nothing for an exact vertex) and no kick; without scattering ``S = W^-1``."""
    hits = simulate_batch(geom, SimulationConfig(seed=4, **dict(SIM, multiple_scattering=True)), 40)
    batch = pack_tracks(hits, geom)[0]
    model = ITSAlignmentModel.from_geometry(geom, replace(COST, multiple_scattering=True))
    res = model._evaluate(batch, model.phi.detach(), need_grad=False)
    fxy, fz = noise_factors(model, res, vertex_noise=vertex_noise)
    t, k = res["w_xy"].shape
    n_layers = geom.n_layers
    assert fxy.shape == fz.shape == (t, k + 1, k + 1 + n_layers)
    rad = model.layer_radius.numpy()
    th2 = res["noise_ms_theta2"].numpy()
    lay, r, sec2 = res["noise_ms_layer"].numpy(), res["noise_ms_r"].numpy(), res["noise_sec2"].numpy()
    mask = batch.mask.numpy()
    checked = 0
    for f, w, wv, var_int, power in ((fxy, res["w_xy"], res["wv_xy"], res["noise_var_int_xy"], 1),
                                     (fz, res["w_z"], res["wv_z"], res["noise_var_int_z"], 2)):
        s = (f @ f.transpose(1, 2)).numpy()
        for tr in range(t):
            for i in range(k):
                for j in range(k):
                    if not (mask[tr, i] and mask[tr, j]):
                        assert s[tr, i, j] == 0.0
                        continue
                    inside = min(lay[tr, i], lay[tr, j])
                    want = sec2[tr] ** power * sum(th2[tr, q] * (r[tr, i] - rad[q]) * (r[tr, j] - rad[q])
                                                   for q in range(inside))
                    if i == j:
                        want += float(var_int[tr, i])
                        assert s[tr, i, i] == pytest.approx(1.0 / float(w[tr, i]), rel=1e-12)
                    assert s[tr, i, j] == pytest.approx(want, rel=1e-12, abs=1e-18)
                    checked += i != j and inside > 0
            vertex = 1.0 / float(wv[tr]) if vertex_noise else 0.0
            assert s[tr, k, k] == pytest.approx(vertex, rel=1e-12)
            assert np.all(s[tr, k, :k] == 0.0)
    assert checked > 1000  # pairs of hits that share kicks
    plain = ITSAlignmentModel.from_geometry(geom, replace(COST, multiple_scattering=False))
    res = plain._evaluate(batch, plain.phi.detach(), need_grad=False)
    fxy, fz = noise_factors(plain, res, vertex_noise=vertex_noise)
    assert fxy.shape == (t, k + 1, k + 1)
    for f, w in ((fxy, res["w_xy"]), (fz, res["w_z"])):
        var = torch.where(w > 0, 1.0 / w.clamp_min(1e-300), torch.zeros_like(w)).double()
        torch.testing.assert_close(f[:, :k, :k], torch.diag_embed(var.sqrt()), rtol=1e-12, atol=0.0)


def test_reference_solution_recovers_the_truth_within_its_errors(geom, truth, sample, reference, fixed):
    """Linearised global least squares (track parameters profiled out), sparse KKT solve with
    layers 0 and 4 fixed (3870 tracks, ~106 hits per free chip). The fit minus the truth,
    whitened with the solution's own covariance (sandwich K V K), is N(0, 1) over all 720 free
    parameters (measured mean 0.02, std 1.06, chi2/ndf 1.13, KS p = 0.24; 0.99, 0.91, 1.07 with
    three other seeds); per local DoF the pulls have unit width (0.97 .. 1.10). Measured fit - truth rms over the 120 free chips (injected 19-20 um,
    90-110 urad): du 0.81, dv 0.74, dw 3.6 um, rot_w 81, rot_u 350, rot_v 630 urad; reported
    errors (median) 0.73, 0.72, 3.2 um, 77, 325, 604 urad: the in-plane shifts are measured to
    better than a micron, the normal shift to ~3 um, the in-plane rotation to ~80 urad, the
    out-of-plane rotations (tracks almost normal to the chips) not at the 0.1 mrad level."""
    model, ref = reference
    assert ref.n_iter == 2
    free = np.ones(geom.n_sensors, dtype=bool)
    free[fixed] = False
    fit = ref.theta.numpy()
    assert np.abs(fit[fixed]).max() < 1e-12
    # the truth lies in the constrained subspace: the noise-free fit is the truth
    np.testing.assert_allclose(ref.expected(truth), truth, rtol=0, atol=1e-8)
    cov = ref.covariance()
    pfree = np.repeat(free, 6)
    z = _whitened(cov[np.ix_(pfree, pfree)], (fit - truth).reshape(-1)[pfree])
    assert z.size == 6 * int(free.sum())
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert abs(z.std() - 1.0) < 4 / math.sqrt(2 * z.size)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    err = ref.errors(model)[free]
    resid = _to_local(model, fit - truth)[free]
    pulls = resid / err
    for i, name in enumerate(LOCAL):
        assert abs(pulls[:, i].mean()) < 0.4, name
        assert 0.75 < pulls[:, i].std() < 1.25, name
    # the in-plane shifts: bound from the resolution and the hits per chip (the 5-parameter
    # track fit through >= 4 hits and the vertex takes at most half of each hit's information)
    hits = np.zeros(geom.n_sensors)
    for b in sample:
        hits += np.bincount(b.sensor[b.mask].numpy(), minlength=geom.n_sensors)
    bound = 2.0 * COST.sigma_u / np.sqrt(hits[free] / 2.0)
    for i in (3, 4):
        assert np.sqrt(np.mean((resid[:, i] / bound) ** 2)) < 1.0, LOCAL[i]
    true_local = _to_local(model, truth)[free]
    assert np.all(resid[:, 3:5].std(0) < 0.1 * true_local[:, 3:5].std(0))
    # measurement_residuals (exact local frame) agrees with the linearised residuals to second
    # order (the out-of-plane rotations are uncertain by ~0.5 mrad)
    mr = measurement_residuals(geom, fit, truth)
    for i, name in enumerate(LOCAL):
        assert np.all(np.abs(mr[name][free] - resid[:, i]) < 0.05 * err[:, i]), name


def test_reference_solution_rejects_sensors_without_hits(geom, sample, fixed):
    model = ITSAlignmentModel.from_geometry(geom, COST)
    b = sample[0]
    few = TrackBatch(b.sensor[:60], b.local[:60], b.mask[:60], b.event[:60], b.n_events, b.vertex)
    used = np.bincount(few.sensor[few.mask].numpy(), minlength=geom.n_sensors) > 0
    assert not used.all()
    with pytest.raises(ValueError, match="no hits"):
        reference_solution(model, [few], Constraints.build(geom, fixed=fixed))
    # with them fixed, chips with one or two hits still leave directions without curvature
    cons = Constraints.build(geom, fixed=np.unique(np.r_[fixed, np.nonzero(~used)[0]]))
    with pytest.raises(ValueError, match="singular"):
        reference_solution(model, [few], cons, n_iter=1)
    with pytest.raises(ValueError, match="constraints"):
        reference_solution(model, [few], Constraints.build(build_geometry(ITSGeometryConfig.small(n_layers=1))))


# ------------------------------------------------------------------------------------------------
# Optimisers


def _epochs_to(model, opt, batches, target: float, epochs: int, full_batch: bool) -> tuple[int | None, list[float]]:
    """Cost after each epoch (the first entry: at the start) and the first epoch at ``target``.
    A full-batch epoch returns the cost before its step, which is the previous epoch's result."""
    costs = [] if full_batch else [total_cost(model, batches)]
    for _ in range(epochs):
        c = run_epoch(model, opt, batches, full_batch=full_batch)
        if full_batch:
            costs.append(c)
        else:
            costs.append(total_cost(model, batches))
    if full_batch:
        costs.append(total_cost(model, batches))
    hit = next((e for e, c in enumerate(costs) if c <= target), None)
    return hit, costs


def test_sgd_and_block_gauss_newton_against_the_reference(geom, sample, reference, blocks):
    """Both optimisers start from the ideal geometry with the reference's constraints. The
    block Gauss-Newton step (full-batch, eta = 1) reaches the reference cost within 1 % after 6
    epochs and the reference minimum within 0.2 sigma after 13 (du 0.12 um, the slowest; 0.1
    sigma after 15, 0.02 after 20). The seed's SGD (a step per partition, 4 per epoch, the
    largest stable rates from ``sgd_rates``) reduces the cost monotonically but is 18 % above
    the reference after 5 epochs, 5 % after 20, 2.1 % after 50 and levels off at ~1.6 % (the
    mini-batch noise; du 0.5 sigma away); full-batch SGD needs 800 epochs to reach 1 %. Theta
    is badly conditioned for SGD: a rotation about the beam axis and an r-phi shift move a
    chip almost identically. Adam (per-parameter rates) reduces the cost as well."""
    model_ref, ref = reference
    cons = ref.constraints
    target = 1.01 * ref.cost
    err = ref.errors(model_ref)
    free = cons.free[:, 0].numpy() > 0
    model = ITSAlignmentModel.from_geometry(geom, COST)

    gn = ThetaOptimizer(OptimizerConfig("gn", lr=1.0), cons)
    gn.set_blocks(blocks)
    gn_epochs, gn_costs = _epochs_to(model, gn, sample, target, 13, full_batch=True)
    assert gn_epochs is not None and gn_epochs <= 8
    assert all(b < a for a, b in zip(gn_costs[:8], gn_costs[1:9]))
    diff = _to_local(model, model.theta().numpy() - ref.theta.numpy())[free]
    assert np.all(np.sqrt(np.mean((diff / err[free]) ** 2, 0)) < 0.25)
    assert np.all(diff[:, 3:].std(0) < 0.02 * MISALIGN.sigma_trans[0])  # < 2 % of the misalignment
    assert np.abs(model.theta().numpy()[~free]).max() < 1e-12
    assert abs(gn_costs[-1] / ref.cost - 1) < 1e-4

    model.set_theta(torch.zeros(geom.n_sensors, 6, dtype=torch.float64))
    lr_rot, lr_trans = sgd_rates(blocks)
    sgd = ThetaOptimizer(OptimizerConfig("sgd", lr_rot=lr_rot, lr_trans=lr_trans), cons)
    sgd_epochs, sgd_costs = _epochs_to(model, sgd, sample, target, 5, full_batch=False)
    assert sgd_costs[-1] < 0.1 * sgd_costs[0]
    assert all(b < a for a, b in zip(sgd_costs, sgd_costs[1:]))
    assert sgd_epochs is None  # slower than GN
    assert np.abs(model.theta().numpy()[~free]).max() < 1e-12

    model.set_theta(torch.zeros(geom.n_sensors, 6, dtype=torch.float64))
    adam = ThetaOptimizer(OptimizerConfig("adam", lr_rot=2e-5, lr_trans=2e-3), cons)
    _, adam_costs = _epochs_to(model, adam, sample, target, 2, full_batch=False)
    assert adam_costs[-1] < 0.5 * adam_costs[0]
    assert np.abs(model.theta().numpy()[~free]).max() < 1e-12


def _generator_derivatives(model, b, res):
    """Per hit d(e)/dTheta, d(rz)/dTheta (T, K, 6) from the Euler matrices' derivatives
    (``dg/dangle = (d a_R/d angle) a_R^T (g - a_T)``, ``euler_derivatives``), independent of the
    closed-form rotation axes that ``_hit_theta_derivatives`` and ``hessian_blocks`` use; the
    residuals' derivatives by the hit position are ``_hit_theta_derivatives``' translation part."""
    from streamcal.detectors.its.align import _hit_theta_derivatives
    from streamcal.models.its_alignment import euler_derivatives, euler_to_matrix

    theta = model.theta()
    a_r = euler_to_matrix(theta[:, :3])
    gen = euler_derivatives(theta[:, :3]) @ a_r[:, None].transpose(-1, -2)  # (N, 3, 3, 3)
    rel = model.global_positions(b, model.phi.detach()) - theta[b.sensor][..., 3:]
    dg = torch.einsum("tkaij,tkj->tkai", gen[b.sensor], rel)
    ve, vz = _hit_theta_derivatives(model, b, res)
    de, dz = ve[..., 3:], vz[..., 3:]
    return (torch.cat([torch.einsum("tkai,tki->tka", dg, de), de], -1),
            torch.cat([torch.einsum("tkai,tki->tka", dg, dz), dz], -1))


def test_hessian_blocks_equal_the_per_hit_derivatives_at_a_misaligned_geometry(geom, sample, truth):
    """The factored blocks (per sensor the products of ``((g - a_T) x d, d)``, rotated once by
    the sensor's rotation axes) equal ``sum 2 c w v v^T`` with ``v`` the per-hit derivatives of
    the residuals w.r.t. Theta from the Euler matrices' derivatives (``_generator_derivatives``),
    at Theta = the misalignment (rotations of 1e-4 rad: the axes are not the coordinate axes
    there) and for several batches; ``_hit_theta_derivatives`` (the derivatives of
    ``normal_equations`` and ``refine``, by the same axes) equals them to rounding."""
    from streamcal.detectors.its.align import _hit_theta_derivatives, _track_weight

    model = ITSAlignmentModel.from_geometry(geom, COST)
    model.set_theta(torch.from_numpy(truth))
    expected = torch.zeros(geom.n_sensors, 36, dtype=torch.float64)
    for wb, b in zip(batch_weights(model, sample), sample):
        res = model._evaluate(b, model.phi.detach(), need_grad=False)
        ve, vz = _generator_derivatives(model, b, res)
        fast = _hit_theta_derivatives(model, b, res)
        torch.testing.assert_close(fast[0], ve, rtol=1e-12, atol=1e-12 * float(ve.abs().max()))
        torch.testing.assert_close(fast[1], vz, rtol=1e-12, atol=1e-12 * float(vz.abs().max()))
        a = 2.0 * _track_weight(model, b, res, float(wb))[:, None]
        outer = ((a * res["w_xy"])[..., None, None] * ve[..., :, None] * ve[..., None, :]
                 + (a * res["w_z"])[..., None, None] * vz[..., :, None] * vz[..., None, :])
        expected.index_add_(0, b.sensor.reshape(-1), outer.reshape(-1, 36))
    expected = expected.reshape(-1, 6, 6)
    got = hessian_blocks(model, sample)
    assert float(np.abs(truth[:, :3]).max()) > 1e-4
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12 * float(expected.abs().max()))
    torch.testing.assert_close(got, got.transpose(1, 2), rtol=0, atol=0)


def test_sgd_rates_are_the_stability_limit(blocks):
    lr_rot, lr_trans = sgd_rates(blocks)
    lr = torch.tensor([lr_rot] * 3 + [lr_trans] * 3, dtype=torch.float64).sqrt()
    lam = torch.linalg.eigvalsh(lr[:, None] * blocks * lr[None, :])
    assert abs(float(lam.max()) - 1.0) < 1e-9 and float(lam.min()) > -1e-9
    with pytest.raises(ValueError, match="blocks"):
        sgd_rates(blocks[:, :3])


def test_theta_gradient_maps_only_the_touched_sensors(geom, sample):
    """``theta_gradient`` maps dC/dPhi to Theta on the sensors with hits only: equal, to rounding,
    to the full Jacobian product over all sensors, and zero elsewhere."""
    model = ITSAlignmentModel.from_geometry(geom, COST)
    model.set_theta(torch.from_numpy(np.random.default_rng(3).standard_normal((geom.n_sensors, 6)) * 1e-4))
    full_batch = sample[1]
    sel = full_batch.event < 4  # a few events: most sensors without hits
    batch = TrackBatch(full_batch.sensor[sel], full_batch.local[sel], full_batch.mask[sel], full_batch.event[sel], 4,
                       full_batch.vertex[:4] if full_batch.vertex is not None else None)
    cost, grad = theta_gradient(model, batch)
    model.zero_grad(set_to_none=True)
    out = model(batch)
    out.cost.backward()
    full = torch.einsum("npk,np->nk", model.jacobian(), model.phi.grad)
    assert cost == float(out.cost.detach())
    torch.testing.assert_close(grad, full, rtol=1e-12, atol=1e-12 * float(full.abs().max()))
    hit = torch.zeros(geom.n_sensors, dtype=torch.bool)
    hit[batch.sensor[batch.mask]] = True
    assert not bool(hit.all()) and float(grad[~hit].abs().max()) == 0.0


def test_constraint_projection_is_the_constrained_minimiser(geom):
    """For a step -M^-1 g, ``project`` returns argmin g.d + d^T M d / 2 subject to the
    constraints (checked against a dense KKT solve), for a block metric and a diagonal one."""
    rng = np.random.default_rng(4)
    n = geom.n_sensors
    fixed = np.array([0, 7, 150])
    cons = Constraints.build(geom, ("rz", "tx", "curl"), fixed=fixed)
    assert cons.n_constraints == 3 + 18
    a = rng.standard_normal((n, 6, 6))
    metric = torch.from_numpy(a @ a.transpose(0, 2, 1) + 6 * np.eye(6))
    g = torch.from_numpy(rng.standard_normal((n, 6)))
    for minv in (torch.linalg.inv(metric), torch.tensor([2.0] * 3 + [0.5] * 3, dtype=torch.float64)):
        d = cons.project(-(minv @ g[..., None])[..., 0] if minv.ndim == 3 else -minv * g, minv)
        mfull = sla.block_diag(*metric.numpy()) if minv.ndim == 3 else np.diag(np.tile(1 / minv.numpy(), n))
        c = cons.matrix()
        kkt = np.block([[mfull, c], [c.T, np.zeros((c.shape[1], c.shape[1]))]])
        sol = np.linalg.solve(kkt, np.r_[-g.reshape(-1).numpy(), np.zeros(c.shape[1])])[: 6 * n]
        np.testing.assert_allclose(d.reshape(-1).numpy(), sol, atol=1e-10 * np.abs(sol).max())
        assert np.abs(c.T @ d.reshape(-1).numpy()).max() < 1e-10
    # the projection built once per metric is what project computes, and what the optimisers apply
    for minv in (torch.linalg.inv(metric), torch.tensor([2.0] * 3 + [0.5] * 3, dtype=torch.float64), None):
        proj = cons.projection(minv)
        for seed in (1, 2):
            d = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, 6)))
            torch.testing.assert_close(proj(d), cons.project(d, minv), rtol=0, atol=0)
    opt = ThetaOptimizer(OptimizerConfig("gn", lr=0.7), cons, blocks=metric)
    theta = torch.from_numpy(rng.standard_normal((n, 6))) * 1e-3
    for _ in range(2):  # the cached projection, step after step
        expected = theta + cons.project(-0.7 * (opt._inv @ g[..., None])[..., 0], opt._inv)
        torch.testing.assert_close(opt.step(theta, g), expected, rtol=0, atol=0)
    sgd = ThetaOptimizer(OptimizerConfig("sgd", lr_rot=2.0, lr_trans=0.5), cons)
    rates = torch.tensor([2.0] * 3 + [0.5] * 3, dtype=torch.float64)
    torch.testing.assert_close(sgd.step(theta, g), theta + cons.project(-rates * g, rates), rtol=0, atol=0)
    sgd.config = OptimizerConfig("sgd", lr_rot=1.0, lr_trans=0.25)  # new rates: a new projection
    torch.testing.assert_close(sgd.step(theta, g), theta + cons.project(-0.5 * rates * g, 0.5 * rates), rtol=0, atol=0)
    # a dependent direction before an independent one: Q spans exactly the constrained directions
    raw = np.stack([weak_mode(geom, m, 1.0).reshape(-1) for m in ("radial", "elliptical")], axis=1)
    q = Constraints.build(geom, ("radial",), vectors=raw * [2.0, 1.0]).q.numpy()
    assert q.shape[1] == 2
    np.testing.assert_allclose(q @ (q.T @ raw), raw, atol=1e-9 * np.abs(raw).max())
    with pytest.raises(ValueError, match="metric_inv"):
        cons.projection(torch.ones(n, 3))
    with pytest.raises(ValueError, match="unknown mode"):
        Constraints.build(geom, ("wobble",))
    with pytest.raises(ValueError, match="fixed"):
        Constraints.build(geom, fixed=[n])
    with pytest.raises(ValueError, match="vectors"):
        Constraints.build(geom, vectors=np.zeros((5, 1)))
    with pytest.raises(RuntimeError, match="set_blocks"):
        ThetaOptimizer(OptimizerConfig("gn"), cons).step(torch.zeros(n, 6, dtype=torch.float64), g)
    with pytest.raises(ValueError, match="lr"):
        OptimizerConfig("gn", lr=2.0)
    with pytest.raises(ValueError, match="method"):
        OptimizerConfig("newton")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="grad"):
        ThetaOptimizer(OptimizerConfig("sgd"), cons).step(torch.zeros(n, 6, dtype=torch.float64), g[:-1])


# ------------------------------------------------------------------------------------------------
# Weak modes: all chips free, a blind rotation about the beam axis injected


ROT_Z = 3e-4  # rad: 7 um at the innermost layer, 16 um at the outermost


@pytest.fixture(scope="module")
def weak_sample(geom):
    theta = misalign(geom, MisalignmentConfig(sigma_rot=(1e-4,) * 3, sigma_trans=(0.02,) * 3, seed=8,
                                              modes=(("rz", ROT_Z),)))
    hits = _simulate(geom, theta, 300, seed=12)
    batch, _ = pack_tracks(hits, geom)
    model = ITSAlignmentModel.from_geometry(geom, COST)
    ne = normal_equations(model, [batch], covariance=False)
    return theta, batch, model, ne


def test_weak_modes_of_the_chi2(geom, weak_sample, fixed):
    """The scaled normal matrix has one near-null eigenvalue (1e-9 of a single-parameter
    curvature), a rotation about the beam axis (overlap with ``rz`` > 0.99); the next eigenvalue
    is 1e-5. Relative stiffness of the named modes: rz ~1e-9 (blind), curl ~2e-5, telescope
    ~2e-5, rx, ry ~4e-4 (weak), translations ~7e-3 and 1e-2 (the vertex term), the rest > 1e-2.
    With rz constrained, or with reference layers fixed, the constrained normal matrix is full
    rank."""
    _, _, model, ne = weak_sample
    x, y = geom.trans[:, 0], geom.trans[:, 1]
    r = np.hypot(x, y)
    shear = {}  # a transverse displacement proportional to the radius, in a fixed direction
    for name, direction in (("shear_x", (1.0, 0.0)), ("shear_y", (0.0, 1.0))):
        th = np.zeros((geom.n_sensors, 6))
        th[:, 3], th[:, 4] = r * direction[0], r * direction[1]
        shear[name] = th
    rep = weak_mode_analysis(model, geom, ne, extra=shear, n_eig=8, threshold=1e-4)
    assert rep.eigenvalues[0] < 1e-7 < 1e-6 < rep.eigenvalues[1]  # one blind direction
    assert rep.n_null == 4 and rep.eigenvalues[4] > 1e-4  # three more below 1e-4
    assert rep.stiffness["rz"] < 1e-7
    assert set(rep.weak(1e-3)) == {"rz", "curl", "telescope", "rx", "ry", "shear_x", "shear_y"}
    assert min(s for m, s in rep.stiffness.items() if m not in rep.weak(1e-3)) > 3e-3
    for m in ("curl", "telescope", "shear_x", "shear_y"):
        assert 1e-6 < rep.stiffness[m] < 1e-4, m
    # the four near-null eigenvectors: rz (and curl, mostly rz on this compact barrel, R = 22 ..
    # 55 mm), the two shears and the telescope
    assert all(rep.overlap[m] > 0.9 for m in ("rz", "curl", "telescope", "shear_x", "shear_y"))
    # (a uniform translation resembles the shears on a compact barrel, overlap 0.93, but the
    # rest of it is stiff: the vertex; the stiffness decides, not the overlap)
    assert rep.overlap["tx"] > 0.5 and rep.stiffness["tx"] > 3e-3
    # the near-null eigenvector is the rotation about z
    q = Constraints.build(geom, ("rz",)).q.numpy()[:, 0]
    assert abs(q @ rep.eigenvectors[:, 0]) > 0.99
    # uniqueness: with the blind mode constrained the constrained matrix is positive definite
    for cons in (Constraints.build(geom, ("rz",)), Constraints.build(geom, vectors=rep.eigenvectors[:, :1])):
        assert 1e-6 < constrained_stiffness(model, ne, cons) < 1e-4  # curl, telescope remain weak
    assert constrained_stiffness(model, ne, Constraints.build(geom, fixed=fixed)) > 1e-2


def test_injected_blind_mode_is_projected_out(geom, weak_sample):
    """Data simulated with a 0.3 mrad rotation of everything about the beam axis on top of the
    random misalignment; the fit with ``Q^T Theta = 0`` (Q = rz) satisfies it exactly, and its
    noise-free value is the truth with the rz component removed (Theta_true - Q Q^T Theta_true):
    the chi^2 cannot tell the two apart."""
    theta, batch, model, _ = weak_sample
    cons = Constraints.build(geom, ("rz",))
    q = cons.q.numpy()
    ref = reference_solution(model, [batch], cons, n_iter=1, covariance=False)
    fit = ref.theta.numpy().reshape(-1)
    t = theta.reshape(-1)
    amp = float(q[:, 0] @ t)
    assert abs(amp) > 0.5 * ROT_Z * np.linalg.norm(weak_mode(geom, "rz", 1.0))
    assert abs(q[:, 0] @ fit) < 1e-9 * abs(amp)
    projected = t - q @ (q.T @ t)
    # the noise-free constrained fit is the projected truth: what is left of the removed
    # rotation (3.2 um rms along u, 0.3 mrad) is < 1 % (measured 0.3 %)
    removed = _to_local(model, (t - projected).reshape(theta.shape))
    left = _to_local(model, ref.expected(theta) - projected.reshape(theta.shape))
    assert removed[:, 3].std() > 3e-3 and np.allclose(removed[:, 1], removed[0, 1])
    rms = np.sqrt(np.mean(left**2, 0))
    assert np.all(rms[3:] < 0.01 * removed[:, 3].std()) and np.all(rms[:3] < 0.01 * abs(removed[0, 1]))
    # the blind mode costs (almost) nothing, a random shift of the same size does: remove the
    # rotation exactly (composition; the linear Theta - Q Q^T Theta differs from it by ~10 nm,
    # already visible in C at the 1e-5 level)
    probe = ITSAlignmentModel.from_geometry(geom, COST)
    probe.set_theta(torch.from_numpy(theta))
    c_true = total_cost(probe, [batch])
    gamma = amp / math.sqrt(geom.n_sensors)  # mean rotation about z of the truth
    probe.set_theta(torch.from_numpy(compose(weak_mode(geom, "rz", -gamma), theta)))
    c_proj = total_cost(probe, [batch])
    rng = np.random.default_rng(0)
    shift = rng.standard_normal(t.shape) * np.tile([0, 0, 0, 1, 1, 1], geom.n_sensors)
    shift *= np.linalg.norm(removed) / np.linalg.norm(shift)
    probe.set_theta(torch.from_numpy((t + shift).reshape(theta.shape)))
    c_shift = total_cost(probe, [batch])
    assert abs(c_proj - c_true) < 1e-2 * (c_shift - c_true)
