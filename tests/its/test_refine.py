"""Global Gauss-Newton refinement (matrix-free projected preconditioned CG) against the sparse
normal equations and the sparse reference solution of ``align``.

* ``H p`` of :func:`gn_matvec` equals ``normal_equations(...).hessian @ p`` to 1e-10 (listed
  batches, streamed batches, small chunks, float32 cache to 1e-6); the blocks of
  :func:`gn_system` are the sparse matrix's diagonal blocks, its cost and gradient those of
  ``normal_equations`` (also with a track that has two hits on one sensor).
* :func:`refine` reaches ``reference_solution``'s Theta and cost with the same constraints (fixed
  reference layers; weak-mode constraints rz, curl, telescope; rz with a few fixed sensors), from
  Theta = 0 and from a start off the constraint surface; the constraints hold exactly afterwards
  and sensors without hits keep their value.
* The prior (``presigma_rot``, ``presigma_trans``): :func:`refine` reaches the direct solution of
  the cost plus the prior's chi2 over ``sum_i nu_i`` (``normal_equations``' H and g with the
  chi2 of each chip's local deltas, ``misalignment.global_to_local`` linearised, KKT with the
  constraints, solved densely here), equal to that chi2 of the fitted Theta; a chip's translations measured
  with Fisher errors ``s_i`` end at the precision-weighted mean ``theta_hat sigma^2 / (sigma^2 +
  s_i^2)`` per eigen-direction; a direction the tracks do not measure at all (the detector's
  rotation about the beam axis, tracks from a vertex on it) ends where the prior's gradient
  along it vanishes.
* ``streamcal its refine`` on a run directory written here: the output is a run directory that
  ``evaluation.load_run`` reads, with the refined Theta, the cost history and ``refine.json``.

Geometry: the compact five-layer barrel of ``test_align.py`` (200 chips). Tracks: |eta| < 0.4,
beam spot 15 um x 10 mm, no multiple scattering, the true vertex. CPU, float64, one thread."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from streamcal.cli import main
from streamcal.detectors.its.align import Constraints, normal_equations, pack_tracks, reference_solution, total_cost
from streamcal.detectors.its.evaluation import (
    ConstraintSpec,
    RunConfig,
    _training_events,
    load_run,
    write_run_json,
)
from streamcal.detectors.its.geometry import ITSGeometryConfig, build_geometry
from streamcal.detectors.its.misalignment import (
    RIGID_MODES,
    WEAK_MODES,
    apply_alignment,
    global_to_local,
    misalign,
    mode_vectors,
    weak_mode,
)
from streamcal.detectors.its.refine import (
    COARSE_SPACES,
    REFINE_JSON,
    SpoolTracks,
    coarse_basis,
    gn_block_diagonal,
    gn_matvec,
    gn_system,
    refine,
)
from streamcal.detectors.its.simulation import SimulationConfig, simulate_batch
from streamcal.models.its_alignment import ITSAlignmentModel, TrackBatch
from tests.its.barrel import COST, MISALIGN, SIM

# typical Theta sizes: rotations ~1e-4 rad, shifts ~2e-2 mm
THETA_SCALE = np.array([1e-4] * 3 + [2e-2] * 3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def fixed(geom):
    return np.nonzero((geom.layer == 0) | (geom.layer == geom.n_layers - 1))[0]


@pytest.fixture(scope="module")
def truth(geom):
    return misalign(geom, MISALIGN)


def _hits(geom, truth, n_events: int, seed: int) -> pa.RecordBatch:
    return simulate_batch(geom, SimulationConfig(seed=seed, **SIM), n_events, placement=apply_alignment(geom, truth))


@pytest.fixture(scope="module")
def sample(geom, truth):
    """400 events (~3100 tracks) in 3 unequal partitions."""
    hits = _hits(geom, truth, 400, seed=11)
    ev = hits.column("event").to_numpy()
    out = []
    for lo, hi in ((0, 90), (90, 250), (250, 400)):
        out.append(pack_tracks(hits.take(pa.array(np.nonzero((ev >= lo) & (ev < hi))[0])), geom)[0])
    return out


def _model(geom, theta: np.ndarray | None = None) -> ITSAlignmentModel:
    model = ITSAlignmentModel.from_geometry(geom, COST)
    if theta is not None:
        model.set_theta(torch.from_numpy(np.asarray(theta, dtype=np.float64)))
    return model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _diag_blocks(hessian, n: int) -> np.ndarray:
    return hessian.toarray().reshape(n, 6, n, 6)[np.arange(n), :, np.arange(n), :]


def _with_a_second_hit(b: TrackBatch) -> tuple[TrackBatch, int]:
    """``b`` with a second hit of its first track with a free slot on that track's first sensor,
    0.3 / -0.5 mm away (``pack_tracks`` would reject it; the algebra holds), and that track."""
    nh = b.mask.sum(1)
    t = int(torch.nonzero(nh < b.mask.shape[1])[0, 0])
    k = int(nh[t])
    sensor, local, mask = b.sensor.clone(), b.local.clone(), b.mask.clone()
    sensor[t, k], mask[t, k] = sensor[t, 0], True
    local[t, k] = local[t, 0] + torch.tensor([0.3, -0.5], dtype=local.dtype)
    return TrackBatch(sensor, local, mask, b.event, b.n_events, b.vertex), t


# ------------------------------------------------------------------------------------------------
# H p, gradient, diagonal blocks


def test_matvec_equals_the_sparse_normal_matrix(geom, truth, sample):
    """At a misaligned Theta, for random directions with the typical sizes of Theta: listed
    batches (cached linearisation), streamed batches (recomputed every pass), small chunks and a
    flat (6N,) vector all give the sparse matrix's product to 1e-10 relative; a float32 cache to
    1e-6."""
    model = _model(geom, 0.5 * truth)
    ne = normal_equations(model, sample, covariance=False)
    n = geom.n_sensors
    rng = np.random.default_rng(3)
    for _ in range(3):
        p = rng.standard_normal((n, 6)) * THETA_SCALE
        ref = (ne.hessian @ p.reshape(-1)).reshape(n, 6)
        assert _rel(gn_matvec(model, sample, p).numpy(), ref) < 1e-10
    assert _rel(gn_matvec(model, lambda: iter(sample), torch.from_numpy(p), chunk_tracks=300).numpy(), ref) < 1e-10
    assert _rel(gn_matvec(model, sample, p.reshape(-1)).numpy(), ref) < 1e-10
    # the per-sensor rows: every row of H p, not only the largest, matches
    hp = gn_matvec(model, sample[1], p).numpy()
    ref1 = (normal_equations(model, sample[1], covariance=False).hessian @ p.reshape(-1)).reshape(n, 6)
    scale = np.abs(ref1).max(0)
    assert np.all(np.abs(hp - ref1) <= 1e-10 * scale)
    # float32 cache inside refine's source
    from streamcal.detectors.its.refine import _matvec, _Source

    src = _Source(model, sample, "test", chunk_tracks=4096, cache_mb=None, cache_precision="float32")
    _matvec(src, torch.from_numpy(p))  # fills the cache
    assert src.cached_bytes > 0
    assert _rel(_matvec(src, torch.from_numpy(p))[0].numpy(), ref) < 1e-6


def test_system_matches_normal_equations(geom, truth, sample):
    """Cost, gradient and the sensors' diagonal 6 x 6 blocks equal ``normal_equations``' (to
    1e-10 of the largest entry per DoF pair), hits are counted per sensor; a track with a second hit
    on one of its sensors adds the pair's cross terms to that sensor's block."""
    model = _model(geom, 0.3 * truth)
    ne = normal_equations(model, sample, covariance=False)
    n = geom.n_sensors
    sysm = gn_system(model, sample)
    assert abs(sysm.cost - ne.cost) < 1e-12 * ne.cost
    assert _rel(sysm.grad.reshape(-1).numpy(), ne.grad) < 1e-10
    ref = _diag_blocks(ne.hessian, n)
    scale = np.abs(ref).max(0)
    assert np.all(np.abs(sysm.blocks.numpy() - ref) <= 1e-10 * scale)
    assert _rel(gn_block_diagonal(model, sample).numpy(), ref) < 1e-10
    hits = sum(np.bincount(b.sensor[b.mask].numpy(), minlength=n) for b in sample)
    np.testing.assert_array_equal(sysm.hits.numpy(), hits)
    assert sysm.events == sum(b.n_events for b in sample) and sysm.tracks == sum(b.n_tracks for b in sample)
    # a second hit of a track on its first sensor (pack_tracks would reject it; the algebra holds)
    b = sample[0]
    dup, t = _with_a_second_hit(b)
    sensor = dup.sensor
    ne_dup = normal_equations(model, [dup], covariance=False)
    ref_dup = _diag_blocks(ne_dup.hessian, n)
    got = gn_system(model, [dup]).blocks.numpy()
    assert np.all(np.abs(got - ref_dup) <= 1e-10 * np.abs(ref_dup).max(0))
    s = int(sensor[t, 0])
    assert np.abs(ref_dup[s] - _diag_blocks(normal_equations(model, [b], covariance=False).hessian, n)[s]).max() > 0


# ------------------------------------------------------------------------------------------------
# refine against the reference solution


CONSTRAINT_CASES = {
    "fixed_layers": lambda geom, fixed: Constraints.build(geom, fixed=fixed),
    "modes": lambda geom, fixed: Constraints.build(geom, modes=("rz", "curl", "telescope")),
    "rz_and_fixed_sensors": lambda geom, fixed: Constraints.build(geom, modes=("rz",), fixed=fixed[:10]),
}


@pytest.fixture(scope="module")
def references(geom, sample, truth, fixed):
    """Per constraint case and start: the constraints, the start and ``reference_solution``'s
    result from it (three Gauss-Newton iterations, as refine below: the same linearisation
    points, so the two agree to the CG tolerance although three iterations are not the converged
    minimum of this non-linear problem from a perturbed start)."""
    rng = np.random.default_rng(7)
    starts = {"zero": None, "perturbed": truth + rng.standard_normal(truth.shape) * THETA_SCALE}
    out = {}
    for name, build in CONSTRAINT_CASES.items():
        cons = build(geom, fixed)
        for start, theta0 in starts.items():
            ref = reference_solution(_model(geom, theta0), sample, cons, n_iter=3, covariance=False)
            out[name, start] = (cons, theta0, ref)
    return out


@pytest.mark.parametrize("case", list(CONSTRAINT_CASES))
@pytest.mark.parametrize("start", ["zero", "perturbed"])
def test_refine_reaches_the_reference_solution(geom, sample, references, case, start):
    """Three Gauss-Newton iterations with CG to 1e-10 reach the sparse KKT solution: Theta within
    1e-5 of its typical size per DoF (0.2 nm, 1e-9 rad; measured up to 6e-6 where the weak modes
    are least constrained, rz with ten fixed chips), C within 1e-11 relative. The perturbed
    start (the truth plus noise of its own size) is off the constraint surface and is put on it
    first, as ``reference_solution`` does."""
    cons, theta0, ref = references[case, start]
    model = _model(geom, theta0)
    res = refine(model, sample, cons, gn_iterations=3, cg_iterations=1500, tol=1e-10, progress=False)
    fit, want = res.theta.numpy(), ref.theta.numpy()
    assert np.all(np.abs(fit - want).max(0) < 1e-5 * THETA_SCALE), np.abs(fit - want).max(0)
    assert abs(res.cost - ref.cost) < 1e-11 * ref.cost
    assert abs(total_cost(model, sample) - res.cost) < 1e-12 * res.cost  # the model holds the result
    assert res.cost <= res.cost_start
    if start == "perturbed":
        assert res.start_correction > 0
    # the record: one H p pass per CG iteration, predicted changes close to the actual ones
    g1 = res.gn[0]
    assert g1.cg_iterations == len(g1.cg) >= 5 and g1.step_scale == 1.0
    assert abs(g1.cost_after - g1.cost_before - g1.predicted_change) < 0.05 * abs(g1.predicted_change)
    pred = [c.predicted_change for c in g1.cg]
    assert pred[0] < 0 and all(b <= a + 1e-12 * abs(a) for a, b in zip(pred, pred[1:]))
    assert res.passes == sum(1 + len(g.cg) + 1 for g in res.gn)
    json.dumps(res.to_dict(), allow_nan=False)


@pytest.mark.parametrize(("case", "fewer"), [("modes", 0.8), ("fixed_layers", 1.0)])
def test_the_coarse_level_reaches_the_same_minimum_in_fewer_cg_iterations(geom, sample, references, case, fewer):
    """The two-level preconditioner (block Jacobi plus the rigid-body modes of each layer) solves
    the same linearised problems: the same Theta and cost as ``reference_solution``, in fewer CG
    iterations than block Jacobi alone at the same tolerance where only mode constraints hold the
    layers (measured 1087 against 1853), and no more where fixed layers do (63 against 66); the
    coarse columns cost one pass each. With each layer's share of the weak modes as well
    (``rigid+weak``, whose columns are dependent once projected onto the constraints) the same
    Theta and cost."""
    cons, theta0, ref = references[case, "zero"]
    z = coarse_basis(geom, RIGID_MODES)
    assert z.shape == (6 * geom.n_sensors, 6 * geom.n_layers)
    np.testing.assert_allclose(z.T @ z, np.eye(z.shape[1]), atol=1e-12)
    runs = {}
    for name, basis in (("jacobi", None), ("two-level", z)):
        runs[name] = refine(_model(geom, theta0), sample, cons, gn_iterations=3, cg_iterations=1500, tol=1e-10,
                            coarse=basis, progress=False)
    two = runs["two-level"]
    assert np.all(np.abs(two.theta.numpy() - ref.theta.numpy()).max(0) < 1e-5 * THETA_SCALE)
    assert abs(two.cost - ref.cost) < 1e-11 * ref.cost
    its = {k: sum(g.cg_iterations for g in r.gn) for k, r in runs.items()}
    assert its["two-level"] <= fewer * its["jacobi"], its
    assert all(g.coarse_size + g.coarse_dropped <= z.shape[1] and g.coarse_size > 0 for g in two.gn)
    assert two.passes == sum(1 + g.coarse_size + g.coarse_dropped + len(g.cg) + 1 for g in two.gn)
    weak = refine(_model(geom, theta0), sample, cons, gn_iterations=3, cg_iterations=1500, tol=1e-10,
                  coarse=coarse_basis(geom, COARSE_SPACES["rigid+weak"]), progress=False)
    assert np.all(np.abs(weak.theta.numpy() - ref.theta.numpy()).max(0) < 1e-5 * THETA_SCALE)
    assert abs(weak.cost - ref.cost) < 1e-11 * ref.cost
    with pytest.raises(ValueError, match=r"coarse must be a finite \(6N, m\)"):
        refine(_model(geom), sample, cons, coarse=z[:-6], progress=False)


def test_constraints_hold_exactly_and_unhit_sensors_keep_their_value(geom, sample, fixed):
    """After refine: the fixed sensors are exactly 0, ``Q^T Theta`` is 0 to rounding, and sensors
    without hits, or with fewer than ``min_sensor_hits``, keep their (projected) start value when
    only a few tracks reach the detector (the system is then singular along those sensors)."""
    b = sample[0]
    few = TrackBatch(b.sensor[:400], b.local[:400], b.mask[:400], b.event[:400], b.n_events, b.vertex)
    counts = np.bincount(few.sensor[few.mask].numpy(), minlength=geom.n_sensors)
    hit = counts >= 10
    assert ((counts > 0) & ~hit).any() and hit.sum() > 20
    rng = np.random.default_rng(2)
    start = rng.standard_normal((geom.n_sensors, 6)) * THETA_SCALE
    for cons in (Constraints.build(geom, fixed=fixed), Constraints.build(geom, modes=("rz", "curl"), fixed=fixed[:5])):
        model = _model(geom, start)
        res = refine(model, [few], cons, gn_iterations=2, cg_iterations=300, tol=1e-8, progress=False)
        th = res.theta.numpy()
        free = cons.free[:, 0].numpy() > 0
        assert np.all(th[~free] == 0.0)
        q = cons.q.numpy()
        if q.shape[1]:
            assert np.abs(q.T @ th.reshape(-1)).max() < 1e-14 * np.abs(th).max()
        unhit = free & ~hit
        np.testing.assert_array_equal(th[unhit], res.theta_start.numpy()[unhit])
        assert res.cost < res.cost_start
        assert res.gn[0].active_sensors == int((free & hit).sum())


def test_solving_for_some_sensors_holds_the_others(geom, sample, fixed, references):
    """``sensors``: the others keep their value and act as fixed ones: solving for the middle
    layers under the weak-mode constraints equals the reference solution with the outer layers
    fixed and those constraints."""
    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    middle = np.flatnonzero(~np.isin(np.arange(geom.n_sensors), fixed))
    res = refine(_model(geom), sample, cons, sensors=middle, gn_iterations=3, cg_iterations=500, tol=1e-10,
                 progress=False)
    ref = reference_solution(_model(geom), sample, Constraints.build(geom, modes=("rz", "curl", "telescope"),
                                                                     fixed=fixed), n_iter=3, covariance=False)
    assert np.all(res.theta.numpy()[fixed] == 0.0)
    assert np.all(np.abs(res.theta.numpy() - ref.theta.numpy()).max(0) < 1e-5 * THETA_SCALE)
    with pytest.raises(ValueError, match="sensors must be a 1-d array of sensor ids in 0..199"):
        refine(_model(geom), sample, cons, sensors=[0, 200], progress=False)


def test_streamed_data_give_the_listed_result(geom, sample, references):
    """A data callable (one call per pass, nothing kept; or a partial cache) gives the listed
    batches' result; a callable that yields other tracks on a later call is an error."""
    cons = references["fixed_layers", "zero"][0]
    kw = dict(gn_iterations=2, cg_iterations=200, tol=1e-9, progress=False)
    listed = refine(_model(geom), sample, cons, **kw)
    calls = []

    def factory():
        calls.append(1)
        return iter(sample)

    streamed = refine(_model(geom), factory, cons, **kw)
    assert len(calls) == streamed.passes
    np.testing.assert_allclose(streamed.theta.numpy(), listed.theta.numpy(), rtol=0, atol=1e-12)
    partial = refine(_model(geom), factory, cons, cache_mb=1.0, **kw)
    np.testing.assert_allclose(partial.theta.numpy(), listed.theta.numpy(), rtol=0, atol=1e-12)
    assert partial.passes == listed.passes

    state = {"n": 0}

    def shrinking():
        state["n"] += 1
        return iter(sample if state["n"] == 1 else sample[:2])

    with pytest.raises(ValueError, match="data changed between passes"):
        refine(_model(geom), shrinking, cons, **kw)


def test_bad_inputs_name_what_was_wrong(geom, sample, fixed):
    cons = Constraints.build(geom, fixed=fixed)
    model = _model(geom)
    n = geom.n_sensors
    with pytest.raises(ValueError, match="model must be an ITSAlignmentModel"):
        refine(object(), sample, cons)
    f32 = ITSAlignmentModel.from_geometry(geom, replace(COST, precision="float32"))
    with pytest.raises(ValueError, match="precision must be 'float64'"):
        refine(f32, sample, cons)
    small = build_geometry(ITSGeometryConfig.small(n_layers=1))
    with pytest.raises(ValueError, match=f"constraints must be a Constraints for the model's {n} sensors"):
        refine(model, sample, Constraints.build(small))
    for kw, msg in ((dict(gn_iterations=0), "gn_iterations must be an integer >= 1"),
                    (dict(cg_iterations=1.5), "cg_iterations must be an integer >= 1"),
                    (dict(tol=-1.0), "tol must be a number in"),
                    (dict(chunk_tracks=0), "chunk_tracks must be an integer >= 1"),
                    (dict(cache_mb=-1), "cache_mb must be a finite number >= 0"),
                    (dict(cache_precision="float16"), "cache_precision must be 'float64' or 'float32'")):
        with pytest.raises(ValueError, match=msg):
            refine(model, sample, cons, progress=False, **kw)
    with pytest.raises(ValueError, match="at least one TrackBatch"):
        refine(model, [], cons)
    with pytest.raises(ValueError, match=r"data\[1\] must be a TrackBatch, got str"):
        refine(model, [sample[0], "hits"], cons)
    with pytest.raises(ValueError, match="data must be a TrackBatch, a list"):
        refine(model, 42, cons)
    with pytest.raises(ValueError, match="yielded a dict as item 1"):
        refine(model, lambda: iter([sample[0], {}]), cons, progress=False)
    with pytest.raises(ValueError, match="must return an iterable of TrackBatch, got NoneType"):
        refine(model, lambda: None, cons, progress=False)
    b = sample[0]
    bad = TrackBatch(b.sensor.clone(), b.local, b.mask, b.event, b.n_events, b.vertex)
    bad.sensor[0, 0] = n + 3
    with pytest.raises(ValueError, match="sensor ids must be in"):
        refine(model, [bad], cons, progress=False)
    with pytest.raises(ValueError, match=r"p must have shape \(200, 6\) or \(1200,\), got \(200, 5\)"):
        gn_matvec(model, sample, np.zeros((n, 5)))
    with pytest.raises(ValueError, match="p must be finite"):
        gn_matvec(model, sample, np.full((n, 6), np.nan))
    with pytest.raises(ValueError, match="precision must be 'float64'"):
        gn_system(f32, sample)
    no_ndf = TrackBatch(b.sensor[:0], b.local[:0], b.mask[:0], b.event[:0], 1, b.vertex[:1])
    with pytest.raises(ValueError, match="no event with positive degrees of freedom"):
        gn_system(model, [no_ndf])


# ------------------------------------------------------------------------------------------------
# the prior (Millepede's presigma)

PRESIGMA = {"presigma_rot": 1e-4, "presigma_trans": 0.02}  # rad, mm: the misalignment's own scale


def _degrees_of_freedom(batches: list[TrackBatch]) -> float:
    """``sum_i nu_i`` over the events with ``nu_i > 0``: per track two measurements per hit (xy and
    z), two of the vertex, minus the five track parameters."""
    assert COST.vertex == "given"
    total = 0.0
    for b in batches:
        nu_track = 2 * b.mask.sum(1).numpy() + 2 - 5
        nu_event = np.bincount(b.event.numpy(), weights=nu_track, minlength=b.n_events)
        total += float(nu_event[nu_event > 0].sum())
    return total


def _prior_matrix(geom, active: np.ndarray, rot: float | None, trans: float | None, ndf: float,
                  free: np.ndarray | None = None) -> np.ndarray:
    """(6N, 6N) the prior's chi2 in units of C (over ``sum_i nu_i``) as a quadratic form in Theta:
    ``|omega|^2 / rot^2 + |s|^2 / trans^2`` of each active chip's local deltas (rotation about
    its centre, the centre's shift: ``misalignment.global_to_local``), linearised at Theta = 0 by
    central differences. With ``free`` (6N, m): that chi2 of ``theta - M a`` minimised over the
    amplitudes ``a`` of the directions (``M`` their active rows), i.e. ``P - P M (M^T P M)^-1 M^T P``."""
    n, eps = geom.n_sensors, 1e-5
    jac = np.zeros((n, 6, 6))
    for j in range(6):
        d = np.zeros((n, 6))
        d[:, j] = eps
        jac[:, :, j] = (global_to_local(geom, d) - global_to_local(geom, -d)) / (2 * eps)
    w = np.array([0.0 if rot is None else rot**-2] * 3 + [0.0 if trans is None else trans**-2] * 3)
    blocks = np.einsum("nki,k,nkj->nij", jac, w, jac) * active[:, None, None] / ndf
    out = np.zeros((n, 6, n, 6))
    out[np.arange(n), :, np.arange(n), :] = blocks
    out = out.reshape(6 * n, 6 * n)
    if free is not None:
        m = free * np.repeat(active, 6)[:, None]
        pm = out @ m
        out = out - pm @ np.linalg.solve(m.T @ pm, pm.T)
    return out


def _local_prior(geom, theta: np.ndarray, rot: float, trans: float, ndf: float) -> float:
    """The prior's term of ``theta`` from its exact local deltas (every chip)."""
    loc = global_to_local(geom, theta)
    return float(((loc[:, :3] / rot) ** 2).sum() + ((loc[:, 3:] / trans) ** 2).sum()) / ndf


def _solve_with_prior(geom, batches, cons: Constraints, theta0: np.ndarray | None, n_iter: int, rot: float | None,
                      trans: float | None, min_sensor_hits: int = 10,
                      free_dirs: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    """Gauss-Newton on ``C + theta^T P theta`` solved directly each iteration: the sparse ``H``
    and ``g`` of ``normal_equations`` plus the prior's ``2 P`` and ``2 P theta``, the KKT
    system ``[[H_ff, Q_f], [Q_f^T, 0]]`` on the free DoFs of the sensors with enough hits (dense).
    Returns Theta, C there and the prior's term."""
    n = geom.n_sensors
    hits = sum(np.bincount(b.sensor[b.mask].numpy(), minlength=n) for b in batches)
    active = (cons.free[:, 0].numpy() > 0) & (hits >= min_sensor_hits)
    pm = _prior_matrix(geom, active, rot, trans, _degrees_of_freedom(batches), free_dirs)
    free = np.repeat(active, 6)
    q = cons.with_free(active).q.numpy()
    model = _model(geom, theta0)
    th = model.theta().reshape(-1).numpy().copy()
    th[np.repeat(cons.free[:, 0].numpy() == 0, 6)] = 0.0
    th = th - cons.q.numpy() @ (cons.q.numpy().T @ th)  # the start on the constraint surface
    for _ in range(n_iter):
        model.set_theta(torch.from_numpy(th.reshape(n, 6)))
        th = model.theta().reshape(-1).numpy().copy()
        ne = normal_equations(model, batches, covariance=False)
        h = ne.hessian.toarray()[np.ix_(free, free)] + 2.0 * pm[np.ix_(free, free)]
        g = ne.grad[free] + 2.0 * (pm @ th)[free]
        qf = q[free]
        m = qf.shape[1]
        kkt = np.block([[h, qf], [qf.T, np.zeros((m, m))]])
        d = np.linalg.solve(kkt, np.concatenate([-g, np.zeros(m)]))[: free.sum()]
        th[free] += d
    model.set_theta(torch.from_numpy(th.reshape(n, 6)))
    th = model.theta().reshape(-1).numpy()
    return th.reshape(n, 6), total_cost(model, batches), float(th @ (pm @ th))


PRIOR_CASES = dict(CONSTRAINT_CASES, prior_only=lambda geom, fixed: Constraints.build(geom))


@pytest.mark.parametrize("case", list(PRIOR_CASES))
def test_refine_with_a_prior_reaches_the_direct_solution(geom, sample, fixed, references, case):
    """With ``presigma_rot = 1e-4``, ``presigma_trans = 0.02`` (the misalignment's scale) three
    Gauss-Newton iterations with CG to 1e-10 reach the direct solution of C plus the prior's
    chi2 over ``sum_i nu_i`` (``_solve_with_prior``, the same linearisation points): Theta within
    5e-5 of its typical size (measured up to 6e-6 with fixed layers, 2.0e-5 under rz with fixed
    sensors, whose poorly conditioned direction keeps moving by ~2e-6 per further Gauss-Newton
    step at an objective stationary to 1e-13; 1e-9 under mode constraints), the objective ``C +
    prior`` within 1e-11 relative (it is stationary there; C and the prior's term alone are not:
    1e-7 and 1e-6); also without
    any constraint (``prior_only``: the prior alone makes the weak modes, rz included, regular).
    The prior moves the solution far beyond that tolerance (against ``reference_solution``
    without it); the reported C excludes the prior's term and the objective ``C + prior``
    decreased."""
    cons = PRIOR_CASES[case](geom, fixed)
    rot, trans = PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"]
    want, want_cost, want_prior = _solve_with_prior(geom, sample, cons, None, 3, rot, trans)
    res = refine(_model(geom), sample, cons, gn_iterations=3, cg_iterations=1500, tol=1e-10, progress=False,
                 **PRESIGMA)
    fit = res.theta.numpy()
    assert np.all(np.abs(fit - want).max(0) < 5e-5 * THETA_SCALE), np.abs(fit - want).max(0) / THETA_SCALE
    objective = want_cost + want_prior
    assert abs(res.cost + res.prior - objective) < 1e-11 * objective  # stationary: second order in Theta
    # each first order in the poorly conditioned direction (C measured up to 2.6e-8)
    assert abs(res.cost - want_cost) < 1e-7 * want_cost
    assert abs(res.prior - want_prior) < 1e-6 * want_prior
    assert res.ndf == _degrees_of_freedom(sample)
    # the chi2 of the chips' exact local deltas (sensors off the solve stay at 0): the same to
    # the second order the linearisation drops (|omega|^2 |c| against |s|)
    assert abs(_local_prior(geom, fit, rot, trans, res.ndf) - res.prior) < 1e-4 * res.prior
    assert res.prior_start == 0.0 and res.gn[0].prior_before == 0.0 and res.gn[-1].prior_after == res.prior
    assert res.cost + res.prior < res.cost_start + res.prior_start
    assert res.presigma is not None and (res.presigma.rot, res.presigma.trans) == (rot, trans)
    if case in CONSTRAINT_CASES:  # the prior changes the answer
        without = references[case, "zero"][2].theta.numpy()
        assert np.abs(want - without).max(0).min() > 1e-2 * THETA_SCALE.min()
        assert np.any(np.abs(want - without).max(0) > 0.1 * THETA_SCALE)
    d = res.to_dict()
    json.dumps(d, allow_nan=False)
    assert d["presigma"] == {"rot": rot, "trans": trans} and d["prior"] == res.prior


def test_the_prior_reaches_the_same_solution_with_the_coarse_level_and_one_group(geom, sample, fixed):
    """The two-level preconditioner sees the prior (its ``H z`` and the blocks include it): the same
    solution; a prior on the translations alone is the direct solution with that prior."""
    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    want, _, _ = _solve_with_prior(geom, sample, cons, None, 2, 1e-4, 0.02)
    two = refine(_model(geom), sample, cons, gn_iterations=2, cg_iterations=1500, tol=1e-10,
                 coarse=coarse_basis(geom, RIGID_MODES), progress=False, **PRESIGMA)
    assert np.all(np.abs(two.theta.numpy() - want).max(0) < 1e-5 * THETA_SCALE)
    assert all(g.coarse_size > 0 and g.coarse_dropped == 0 for g in two.gn)
    want_t, _, prior_t = _solve_with_prior(geom, sample, cons, None, 2, None, 0.05)
    only = refine(_model(geom), sample, cons, gn_iterations=2, cg_iterations=1500, tol=1e-10, presigma_trans=0.05,
                  progress=False)
    assert np.all(np.abs(only.theta.numpy() - want_t).max(0) < 1e-5 * THETA_SCALE)
    assert abs(only.prior - prior_t) < 1e-8 * prior_t and only.presigma.rot is None


def test_a_prior_gives_the_precision_weighted_mean(geom, sample):
    """One chip's translations alone (its rotations held by constraints, the other chips by
    ``sensors``): a linear problem in three unknowns. Its curvature ``h`` (3 x 3, from
    ``normal_equations``) has eigen-directions ``u_i`` measured with Fisher errors ``s_i^2 = 2 /
    (lambda_i sum nu)`` (chi2 units); the fit without the prior is ``theta_hat = -h^-1 g``, with
    ``presigma_trans = sigma`` each component ends at ``u_i.theta_hat sigma^2 / (sigma^2 + s_i^2)``.
    ``sigma`` is the worst-measured direction's ``s``: that component is halved, the best-measured
    kept to its ``s^2 / sigma^2``."""
    n = geom.n_sensors
    s = int(np.flatnonzero(geom.layer == 2)[3])
    model = _model(geom)
    ne = normal_equations(model, sample, covariance=False)
    t = 6 * s + np.arange(3, 6)
    h = ne.hessian.toarray()[np.ix_(t, t)]
    theta_hat = -np.linalg.solve(h, ne.grad[t])
    lam, u = np.linalg.eigh(h)
    fisher = np.sqrt(2.0 / (lam * _degrees_of_freedom(sample)))  # mm
    sigma = float(fisher.max())
    want = u @ ((u.T @ theta_hat) * sigma**2 / (sigma**2 + fisher**2))
    rot = np.zeros((6 * n, 3))
    rot[6 * s + np.arange(3), np.arange(3)] = 1.0
    cons = Constraints.build(geom, vectors=rot)
    kw = dict(sensors=[s], gn_iterations=1, cg_iterations=50, tol=1e-13, progress=False)
    plain = refine(_model(geom), sample, cons, **kw).theta.numpy()
    np.testing.assert_allclose(plain[s, 3:], theta_hat, rtol=0, atol=1e-9 * np.abs(theta_hat).max())
    with_prior = refine(_model(geom), sample, cons, presigma_trans=sigma, **kw).theta.numpy()
    np.testing.assert_allclose(with_prior[s, 3:], want, rtol=0, atol=1e-9 * np.abs(want).max())
    assert np.all(with_prior[s, :3] == 0.0) and np.all(np.delete(with_prior, s, axis=0) == 0.0)
    weak = u[:, 0]  # eigh: ascending; the worst measured has the smallest eigenvalue
    assert abs(weak @ with_prior[s, 3:] - 0.5 * (weak @ theta_hat)) < 1e-9 * np.abs(theta_hat).max()
    assert fisher.min() < 0.25 * sigma  # a well-measured direction keeps over 94 % of its value
    strong = u[:, -1]
    assert 0.94 < (strong @ with_prior[s, 3:]) / (strong @ theta_hat) < 1.0


def test_a_direction_the_tracks_do_not_measure_ends_at_zero(geom, truth):
    """Tracks from vertices on the beam axis do not see the whole detector turning about it (Theta's
    gamma of every chip by the same angle): C is flat along that direction ``z``. Without
    constraints and with the prior, one Gauss-Newton step from Theta = 0 puts its amplitude in the
    prior's metric at 0: the prior's gradient along it, ``z^T P theta``, must vanish where the
    data's does. Per chip that is its angle plus its centre's shift about the axis, ``sum_s gamma_s
    / rot^2 + (c_s x s_s)_z / trans^2`` (the prior on the local deltas: :func:`_prior_matrix`),
    not 0 for the truth; the chips' terms are not small, they cancel. Flat to the linearisation's relative
    stiffness 3e-10 (the arc-length coupling of the rz residuals that it drops), so 0 to 1e-3 of
    the truth's value."""
    sim = dict(SIM, beam_spot_sigma=(0.0, 0.0, 10.0))
    hits = simulate_batch(geom, SimulationConfig(seed=17, **sim), 300, placement=apply_alignment(geom, truth))
    batch = pack_tracks(hits, geom)[0]
    z = mode_vectors(geom, ("rz",))[:, 0]
    assert np.allclose(z.reshape(-1, 6)[:, [0, 1, 3, 4, 5]], 0.0)  # rz moves gamma alone, equally on every chip
    ne = normal_equations(_model(geom), [batch], covariance=False)
    assert z @ (ne.hessian @ z) < 1e-9 * (z @ (ne.hessian.diagonal() * z))  # measured 2.6e-10
    res = refine(_model(geom), [batch], Constraints.build(geom), gn_iterations=1, cg_iterations=3000, tol=1e-12,
                 progress=False, **PRESIGMA)
    assert res.gn[0].converged and res.gn[0].active_sensors == geom.n_sensors
    rot, trans = PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"]
    pz = z @ _prior_matrix(geom, np.ones(geom.n_sensors, dtype=bool), rot, trans, 1.0)
    fit = res.theta.numpy()
    amplitude = pz @ fit.reshape(-1)
    loc = global_to_local(geom, fit)  # the same amplitude from the chips' local deltas
    shift = np.einsum("nij,nj->ni", geom.rot, loc[:, 3:])  # the centre's shift in global axes
    by_chip = fit[:, 2] / rot**2 + np.cross(geom.trans, shift)[:, 2] / trans**2
    assert abs(by_chip.sum() - amplitude) < 1e-3 * np.abs(by_chip).sum()
    assert abs(amplitude) < 1e-3 * abs(pz @ truth.reshape(-1)), (amplitude, pz @ truth.reshape(-1))  # measured 7.7e-5
    assert abs(amplitude) < 1e-4 * np.abs(by_chip).sum(), (amplitude, np.abs(by_chip).sum())  # measured 1.8e-6
    assert np.abs(fit[:, 2]).max() > 0.2 * THETA_SCALE[2]


FREE_MODES = WEAK_MODES + RIGID_MODES  # every global mode of the table and the rigid-body ones


def test_a_prior_with_free_directions_reaches_the_direct_solution(geom, sample):
    """``presigma_free`` (the 15 global modes of ``FREE_MODES``): the prior is the chi2 of ``theta -
    M a`` minimised over the amplitudes ``a`` (``_prior_matrix`` with ``free``, dense). One
    Gauss-Newton iteration from Theta = 0 by two-level CG, the sparse and the direct solver
    takes the dense KKT step of C plus that prior (Theta within 1e-8 of its typical size); the
    prior's term is that form of the fit; the direct solver's errors are the dense sandwich with
    it (1e-6 of the errors' product); the prior's curvature and its pseudo-measurements' noise
    (the sparse solver's replicas) are exactly ``2 P`` and ``(2 / ndf) 2 P`` of that form. The
    free directions change the answer."""
    from streamcal.detectors.its.refine import Presigma, _PriorTerm

    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    free = mode_vectors(geom, FREE_MODES)
    assert free.shape[1] == 15
    rot, trans = PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"]
    want = _solve_with_prior(geom, sample, cons, None, 1, rot, trans, free_dirs=free)[0]
    held = _solve_with_prior(geom, sample, cons, None, 1, rot, trans)[0]
    assert np.any(np.abs(want - held).max(0) > 0.1 * THETA_SCALE)
    ndf = _degrees_of_freedom(sample)
    n = geom.n_sensors
    for kw in (dict(solver="cg", coarse=coarse_basis(geom, RIGID_MODES), cg_iterations=3000, tol=1e-12),
               dict(solver="sparse", cg_iterations=3000, tol=1e-12), dict(solver="direct")):
        res = refine(_model(geom), sample, cons, gn_iterations=1, presigma_free=free, progress=False, **PRESIGMA, **kw)
        fit = res.theta.numpy()
        assert np.all(np.abs(fit - want).max(0) < 1e-8 * THETA_SCALE), (kw["solver"], np.abs(fit - want).max(0))
        active = res.solved.numpy()
        pm = _prior_matrix(geom, active, rot, trans, ndf, free)
        assert abs(res.prior - fit.reshape(-1) @ pm @ fit.reshape(-1)) < 1e-9 * res.prior
    cov = res.theta_cov.numpy()
    dense = _dense_covariance(geom, sample, cons, rot, trans, free_dirs=free)
    blocks = dense.reshape(n, 6, n, 6)[np.arange(n), :, np.arange(n), :]
    ok = np.isfinite(cov[:, 0, 0])
    scale = np.sqrt(np.diagonal(blocks[ok], axis1=1, axis2=2))
    assert np.abs((cov[ok] - blocks[ok]) / (scale[:, :, None] * scale[:, None, :])).max() < 1e-6
    # the prior term itself, against the finite-difference form
    term = _PriorTerm(Presigma(rot, trans), active, ndf, torch.from_numpy(geom.trans), free)
    assert term.rank == 15
    eye = torch.eye(6 * n, dtype=torch.float64).reshape(6 * n, n, 6)
    curv = torch.stack([term.apply(e) for e in eye]).reshape(6 * n, 6 * n).numpy()
    np.testing.assert_allclose(curv, 2.0 * pm, rtol=0, atol=1e-8 * np.abs(pm).max())
    root = term.pseudo_noise(eye).reshape(6 * n, 6 * n).numpy().T  # column k: the noise of unit draw k
    np.testing.assert_allclose(root @ root.T, 2.0 / ndf * 2.0 * pm, rtol=0, atol=1e-8 * 4.0 / ndf * np.abs(pm).max())


def test_cg_at_the_rounding_floor_takes_the_last_iterate():
    """``_pcg``: when ``r^T y`` comes out <= 0 (for a positive preconditioner only rounding makes it
    so; forced here by a preconditioner that returns zero from its fourth call on, i.e. in the
    third iteration), CG stops there as converged, takes that iterate (the third CG iterate: the
    minimiser over the Krylov space of g, Hg, H^2 g) and records the last measured relative
    residual, not 0."""
    from streamcal.detectors.its.refine import _pcg

    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, 8))
    h = a @ a.T + 8.0 * np.eye(8)
    g = rng.standard_normal(8)
    calls = []

    def precond(r):
        calls.append(1)
        return r.clone() if len(calls) < 4 else torch.zeros_like(r)

    recs = []
    res = _pcg(lambda p, k: torch.from_numpy(h) @ p, precond, torch.from_numpy(g), 50, 1e-14, 1, 0.0, recs.append)
    assert res.converged and "rounding floor at iteration 3" in res.note, res.note
    assert len(recs) == 3 and recs[-1].relative_residual == min(r.relative_residual for r in recs[:2]) > 0
    assert res.relative == recs[-1].relative_residual
    v = np.stack([g, h @ g, h @ h @ g], axis=1)
    x3 = v @ np.linalg.solve(v.T @ h @ v, -v.T @ g)
    np.testing.assert_allclose(res.x.numpy(), x3, rtol=1e-9, atol=1e-12)


def test_the_free_directions_join_the_coarse_space(geom, sample):
    """The prior no longer damps its free directions, so block Jacobi reaches them slowly: they
    join the coarse space. Ten free modes, five of them beyond the span of each layer's rigid
    motions (so dependent columns come before independent ones): the coarse level grows by five
    directions, and CG and the sparse solver converge (to 1e-11: the rounding floor is 3e-13 to
    5e-12) on the dense KKT step. (Orthonormalised
    by a QR that dropped the dependent columns by their diagonal, the coarse space left the
    constraint surface and CG converged to a step 1e-3 of Theta's scale off.)"""
    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    free = mode_vectors(geom, ("elliptical", "clamshell", "skew", "conical", "twist", "tx", "ty", "tz", "rx", "ry"))
    want = _solve_with_prior(geom, sample, cons, None, 1, PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"],
                             free_dirs=free)[0]
    kw = dict(gn_iterations=1, coarse=coarse_basis(geom, RIGID_MODES), progress=False, **PRESIGMA)
    held = refine(_model(geom), sample, cons, cg_iterations=1, **kw).gn[0]
    for solver in ("cg", "sparse"):
        res = refine(_model(geom), sample, cons, presigma_free=free, solver=solver, cg_iterations=3000, tol=1e-11, **kw)
        it = res.gn[0]
        assert it.coarse_size == held.coarse_size + 5, (it.coarse_size, held.coarse_size)
        assert it.converged and it.cg[-1].relative_residual < 1e-11, (solver, it.cg[-1])
        assert np.all(np.abs(res.theta.numpy() - want).max(0) < 1e-8 * THETA_SCALE), solver


def test_a_coherent_deformation_the_prior_leaves_free_is_recovered(geom):
    """An elliptical barrel (``dR = c R cos 2 phi``, c = 4e-4: up to 22 um) and nothing else,
    tracks without hit noise (the cost still weights them by 5 um): the exact minimum of C is the
    truth, and of C plus a prior that leaves the elliptical mode free too (the truth is in the
    free span, so its prior term is 0). A tight per-chip prior (1 um, 10 urad) on every direction
    pulls the coherent mode towards the nominal geometry: the thousands of per-chip
    pseudo-measurements outweigh what the tracks measure of it (its amplitude ends below half
    the truth's; measured 2 %). Leaving it free (alone, or with every mode of ``FREE_MODES``)
    recovers the truth to 1e-4 of Theta's typical size (two direct Gauss-Newton iterations)."""
    truth = weak_mode(geom, "elliptical", 4e-4)
    sim = dict(SIM, sigma_u=1e-8, sigma_v=1e-8)
    hits = simulate_batch(geom, SimulationConfig(seed=21, **sim), 400, placement=apply_alignment(geom, truth))
    batch = pack_tracks(hits, geom)[0]
    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    mode = mode_vectors(geom, ("elliptical",))
    tight = dict(presigma_rot=1e-5, presigma_trans=1e-3)

    def fit(**kw):
        return refine(_model(geom), [batch], cons, gn_iterations=2, solver="direct", progress=False, **kw).theta.numpy()

    def amplitude(theta):
        return float(mode[:, 0] @ theta.reshape(-1)) / float(mode[:, 0] @ truth.reshape(-1))

    held = fit(**tight)
    assert amplitude(held) < 0.5, amplitude(held)
    for free in (mode, mode_vectors(geom, FREE_MODES)):
        got = fit(presigma_free=free, **tight)
        assert np.all(np.abs(got - truth).max(0) < 1e-4 * THETA_SCALE), np.abs(got - truth).max(0) / THETA_SCALE
        assert abs(amplitude(got) - 1.0) < 1e-4


def test_bad_priors_name_the_argument(geom, sample, fixed):
    cons = Constraints.build(geom, fixed=fixed)
    for kw, msg in ((dict(presigma_rot=0.0), r"presigma_rot must be a finite number > 0 \(rad\) or None, got 0.0"),
                    (dict(presigma_rot=-1e-4), "presigma_rot must be a finite number > 0"),
                    (dict(presigma_trans=float("inf")), r"presigma_trans must be a finite number > 0 \(mm\)"),
                    (dict(presigma_trans=float("nan")), "presigma_trans must be a finite number > 0"),
                    (dict(presigma_trans="0.02"), "presigma_trans must be a finite number > 0 .* got '0.02'"),
                    (dict(presigma_rot=True), "presigma_rot must be a finite number > 0 .* got True"),
                    (dict(presigma_free=mode_vectors(geom, ("elliptical",))), "presigma_free names directions the "
                     "prior leaves free, but there is no prior"),
                    (dict(presigma_free=np.zeros((6, 1)), **PRESIGMA), r"presigma_free must be a finite \(6N, m\) = "
                     r"\(1200, m\) array, got shape \(6, 1\)")):
        with pytest.raises(ValueError, match="refine: " + msg):
            refine(_model(geom), sample, cons, progress=False, **kw)


# ------------------------------------------------------------------------------------------------
# streamcal its refine


def _write_spool(path, batches: list[pa.RecordBatch]) -> None:
    with pa.ipc.new_stream(str(path), batches[0].schema) as writer:
        for b in batches:
            writer.write_batch(b)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, geom_config, geom, truth, fixed):
    """A run directory as the workers leave it: two workers' spool files, events in blocks of 100
    alternating between them, and a Theta part of the way to the truth."""
    rd = tmp_path_factory.mktemp("run")
    cfg = RunConfig(geometry=geom_config, misalignment=MISALIGN, simulation=SimulationConfig(seed=1, **SIM),
                    model=COST, constraints=ConstraintSpec(modes=("rz",), fixed_layers=(0,)), workers=2, tau=5,
                    epochs=3)
    write_run_json(rd, cfg)
    th = truth.copy()
    th[geom.layer == 0] = 0.0
    np.save(rd / "theta_true.npy", truth)
    np.save(rd / "theta.npy", 0.7 * th)
    (rd / "metrics.jsonl").write_text(json.dumps({"epoch": 1, "epoch_cost": 1.0, "events": 400, "time_s": 1.0}) + "\n")
    hits = _hits(geom, truth, 400, seed=21)
    ev = hits.column("event").to_numpy()
    blocks = [hits.take(pa.array(np.nonzero((ev >= lo) & (ev < lo + 100))[0])) for lo in range(0, 400, 100)]
    (rd / "spool").mkdir()
    _write_spool(rd / "spool" / "align-0.0.arrows", [blocks[0], blocks[2]])
    _write_spool(rd / "spool" / "align-1.0.arrows", [blocks[1], blocks[3]])
    return rd, cfg, hits


def test_cli_refine_writes_a_run_directory(tmp_path, capsys, geom, run_dir):
    rd, cfg, hits = run_dir
    out = tmp_path / "refined"
    rc = main(["its", "refine", "--run", str(rd), "--out", str(out), "--events", "250", "--gn-iterations", "2",
               "--cg-iterations", "40", "--tol", "1e-8", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "cost " in text and "seconds per pass" in text
    run = load_run(out)
    assert run.config.geometry == cfg.geometry and run.config.constraints == cfg.constraints
    assert run.config.epochs == 2 and run.config.workers == 1
    assert run.config.refined_from == str(rd) and run.label == f"refined (GN-CG) from {rd.name}"
    assert load_run(rd).config.refined_from == "" and load_run(rd).label == f"M={cfg.workers}, tau={cfg.tau}"
    np.testing.assert_array_equal(run.theta_true, np.load(rd / "theta_true.npy"))
    summary = json.loads((out / REFINE_JSON).read_text())
    assert run.theta_cov is None and summary["covariance"] is None  # CG gives no errors
    assert summary["spool"]["events"] == 250 and summary["spool"]["batches"] == 3
    assert summary["events"] == 250 and summary["cost"] < summary["cost_start"]
    # the first 250 events in event order (two blocks of worker 0, one of worker 1), packed
    ev = hits.column("event").to_numpy()
    first = pack_tracks(hits.take(pa.array(np.nonzero(ev < 250)[0])), geom)[0]
    assert summary["tracks"] == first.n_tracks
    # the same result as refine on those tracks from the run's Theta
    model = _model(geom, np.load(rd / "theta.npy"))
    direct = refine(model, [first], cfg.constraints.build(geom), gn_iterations=2, cg_iterations=40, tol=1e-8,
                    progress=False)
    np.testing.assert_allclose(run.theta, direct.theta.numpy(), rtol=0, atol=1e-9 * np.abs(run.theta).max())
    assert abs(summary["cost"] - direct.cost) < 1e-9 * direct.cost
    # the solved sensors (free, >= 10 hits; the rest held at the start) for the evaluation's reference
    hits_per = np.bincount(first.sensor[first.mask].numpy(), minlength=geom.n_sensors)
    want_solved = (hits_per >= 10) & (geom.layer != 0)  # layer 0 fixed by the run's constraints
    np.testing.assert_array_equal(run.solved, want_solved)
    np.testing.assert_array_equal(direct.solved.numpy(), want_solved)
    assert summary["solved_sensors"] == want_solved.sum()
    # metrics: an end-of-epoch record per Gauss-Newton iteration and the start, a sync record per CG iteration
    m = run.metrics
    assert m.epoch.tolist() == [0, 1, 2] and m.epoch_cost[0] == summary["cost_start"]
    assert m.epoch_cost[-1] == summary["cost"]
    assert m.sync_cost.size == sum(g["cg_iterations"] for g in summary["gn"])
    assert _training_events(out) == 250
    # --layers: the other layers keep the run's Theta
    rc = main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "layers"), "--events", "250",
               "--layers", "1", "2", "--cg-iterations", "20", "--coarse", "rigid", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "coarse space of" in capsys.readouterr().err
    layered = json.loads((tmp_path / "layers" / REFINE_JSON).read_text())
    assert layered["options"]["coarse"] == "rigid" and layered["gn"][0]["coarse_size"] > 0
    held = ~np.isin(geom.layer, [1, 2])
    q = cfg.constraints.build(geom).q.numpy()
    start = np.load(rd / "theta.npy").reshape(-1)
    start = (start - q @ (q.T @ start)).reshape(-1, 6)  # the start on the constraint surface (rz)
    start[geom.layer == 0] = 0.0
    part = np.load(tmp_path / "layers" / "theta.npy")
    np.testing.assert_allclose(part[held], start[held], rtol=0, atol=1e-15)
    assert np.abs(part[~held] - start[~held]).max() > 0
    assert not load_run(tmp_path / "layers").solved[held].any()
    assert json.loads((tmp_path / "layers" / REFINE_JSON).read_text())["options"]["layers"] == [1, 2]
    # the output is not the input
    assert main(["its", "refine", "--run", str(rd), "--out", str(rd)]) == 2
    assert "out_dir must differ" in capsys.readouterr().err


def test_cli_refine_with_a_prior_records_it(tmp_path, capsys, geom, run_dir):
    """``--presigma-rot`` and ``--presigma-trans``: the result of :func:`refine` with that prior on the
    same tracks; ``refine.json`` records the options, the prior and its term beside C, the metrics
    the term per Gauss-Newton iteration; a value that is not a finite number > 0 is refused."""
    rd, cfg, hits = run_dir
    out = tmp_path / "prior"
    rc = main(["its", "refine", "--run", str(rd), "--out", str(out), "--events", "250", "--gn-iterations", "2",
               "--cg-iterations", "60", "--tol", "1e-9", "--presigma-rot", "1e-4", "--presigma-trans", "0.02",
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "prior term " in text and "presigma rot 0.0001 rad, trans 0.02 mm" in text
    summary = json.loads((out / REFINE_JSON).read_text())
    assert summary["options"]["presigma_rot"] == 1e-4 and summary["options"]["presigma_trans"] == 0.02
    assert summary["presigma"] == {"rot": 1e-4, "trans": 0.02}
    ev = hits.column("event").to_numpy()
    first = pack_tracks(hits.take(pa.array(np.nonzero(ev < 250)[0])), geom)[0]
    assert summary["ndf"] == _degrees_of_freedom([first])
    direct = refine(_model(geom, np.load(rd / "theta.npy")), [first], cfg.constraints.build(geom), gn_iterations=2,
                    cg_iterations=60, tol=1e-9, progress=False, **PRESIGMA)
    run = load_run(out)
    np.testing.assert_allclose(run.theta, direct.theta.numpy(), rtol=0, atol=1e-9 * np.abs(run.theta).max())
    assert abs(summary["prior"] - direct.prior) < 1e-9 * direct.prior and summary["prior"] > 0
    assert summary["prior_start"] > 0  # the run's Theta is away from the nominal geometry
    assert summary["cost"] + summary["prior"] < summary["cost_start"] + summary["prior_start"]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    ends = [r for r in rows if "epoch_cost" in r]
    assert [r["prior"] for r in ends] == [summary["prior_start"]] + [g["prior_after"] for g in summary["gn"]]
    assert run.metrics.epoch_cost[-1] == summary["cost"]  # C without the prior's term
    # without the options: no prior recorded
    main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "plain"), "--events", "100",
          "--cg-iterations", "5", "--gn-iterations", "1", "--no-progress"])
    plain = json.loads((tmp_path / "plain" / REFINE_JSON).read_text())
    assert plain["presigma"] is None and plain["prior"] == 0.0 and plain["options"]["presigma_rot"] is None
    capsys.readouterr()
    for bad in (["--presigma-rot", "0"], ["--presigma-trans", "-0.02"], ["--presigma-trans", "inf"]):
        with pytest.raises(SystemExit):
            main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "bad"), *bad])
        assert f"argument {bad[0]}: expected a finite number > 0" in capsys.readouterr().err
    # --presigma-free: the modes the prior leaves to the data, recorded; refine's result with their span
    rc = main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "free"), "--events", "250",
               "--gn-iterations", "1", "--cg-iterations", "60", "--tol", "1e-9", "--presigma-rot", "1e-4",
               "--presigma-trans", "0.02", "--presigma-free", "elliptical", "twist", "--no-progress"])
    assert rc == 0 and "the prior leaves free: elliptical, twist" in capsys.readouterr().out
    free = json.loads((tmp_path / "free" / REFINE_JSON).read_text())
    assert free["options"]["presigma_free_modes"] == ["elliptical", "twist"]
    direct = refine(_model(geom, np.load(rd / "theta.npy")), [first], cfg.constraints.build(geom), gn_iterations=1,
                    cg_iterations=60, tol=1e-9, presigma_free=mode_vectors(geom, ("elliptical", "twist")),
                    progress=False, **PRESIGMA)
    np.testing.assert_allclose(load_run(tmp_path / "free").theta, direct.theta.numpy(), rtol=0,
                               atol=1e-9 * np.abs(run.theta).max())
    with pytest.raises(SystemExit):
        main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "bad"), "--presigma-rot", "1e-4",
              "--presigma-free", "wobble"])
    assert "argument --presigma-free: invalid choice: 'wobble'" in capsys.readouterr().err
    assert main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "bad"), "--presigma-free",
                 "elliptical"]) == 2
    assert "presigma_free_modes are modes the prior leaves free, but there is no prior" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_refine_sparse(tmp_path, capsys, geom, run_dir):
    """``--solver sparse``: the result of :func:`refine` with the sparse solver on the same tracks
    in one batch (to 1e-8 of Theta's largest entry; the CG's tolerance 1e-8 is above the second
    Gauss-Newton iteration's rounding floor, 3e-9 of its small gradient), which is the
    matrix-free CG's solution of the same problem when both converge
    (1e-6); two passes per Gauss-Newton iteration whatever the CG iterations, each recorded in
    ``metrics.jsonl``; the method named in ``refine.json``."""
    rd, cfg, hits = run_dir
    out = tmp_path / "sparse"
    args = ["--events", "250", "--gn-iterations", "2", "--cg-iterations", "400", "--tol", "1e-8", "--no-progress"]
    rc = main(["its", "refine", "--run", str(rd), "--out", str(out), "--solver", "sparse", *args])
    assert rc == 0, capsys.readouterr().err
    assert "H assembled sparse:" in capsys.readouterr().err
    summary = json.loads((out / REFINE_JSON).read_text())
    assert summary["method"].endswith("on the sparse assembled normal equations")
    assert summary["passes"] == 4 and all(g["solver"] == "sparse" and g["converged"] for g in summary["gn"])
    ev = hits.column("event").to_numpy()
    first = pack_tracks(hits.take(pa.array(np.nonzero(ev < 250)[0])), geom)[0]
    want = refine(_model(geom, np.load(rd / "theta.npy")), [first], cfg.constraints.build(geom), gn_iterations=2,
                  cg_iterations=400, tol=1e-8, solver="sparse", progress=False)
    run = load_run(out)
    np.testing.assert_allclose(run.theta, want.theta.numpy(), rtol=0, atol=1e-8 * np.abs(run.theta).max())
    assert run.metrics.sync_cost.size == sum(g["cg_iterations"] for g in summary["gn"])
    rc = main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "cg"), *args])
    assert rc == 0, capsys.readouterr().err
    np.testing.assert_allclose(run.theta, np.load(tmp_path / "cg" / "theta.npy"), rtol=0,
                               atol=1e-6 * np.abs(run.theta).max())
    # --error-samples: theta_cov.npy for every solved chip, read by evaluate align's solve_errors
    rc = main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "errors"), "--solver", "sparse",
               "--error-samples", "20", "--error-seed", "3", *args])
    assert rc == 0, capsys.readouterr().err
    assert "errors of" in capsys.readouterr().err
    with_errors = load_run(tmp_path / "errors")
    summary = json.loads((tmp_path / "errors" / REFINE_JSON).read_text())
    assert summary["covariance"]["estimate"] == "mean of x x^T over 20 noise replicas (seed 3)"
    solved = np.isfinite(with_errors.theta_cov[:, 0, 0])
    assert summary["covariance"]["sensors"] == solved.sum() == summary["gn"][-1]["active_sensors"]
    assert np.all(np.linalg.eigvalsh(with_errors.theta_cov[solved]) > 0)
    assert [g["error_samples"] for g in summary["gn"]] == [0, 20]  # the last linearisation only
    np.testing.assert_array_equal(with_errors.theta, run.theta)
    assert main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "x"), "--error-samples", "5",
                 "--no-progress"]) == 2
    assert "error_samples are the sparse solver's errors" in capsys.readouterr().err


def test_cli_refine_direct_with_rigid_staves(tmp_path, capsys, geom, run_dir):
    """``--layers 1 2 --rigid-layers 3 --solver direct``: :func:`refine` with the chips of layers
    1-2 single and the staves of layer 3 as rigid bodies; the two chips of a stave move alike;
    a layer both single and rigid is refused with the reason."""
    rd, cfg, hits = run_dir
    out = tmp_path / "staves"
    rc = main(["its", "refine", "--run", str(rd), "--out", str(out), "--events", "250", "--gn-iterations", "1",
               "--layers", "1", "2", "--rigid-layers", "3", "--solver", "direct", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "(24 rigid bodies)" in capsys.readouterr().err
    summary = json.loads((out / REFINE_JSON).read_text())
    assert summary["options"]["rigid_layers"] == [3] and summary["options"]["layers"] == [1, 2]
    ev = hits.column("event").to_numpy()
    first = pack_tracks(hits.take(pa.array(np.nonzero(ev < 250)[0])), geom)[0]
    staves = [np.flatnonzero((geom.layer == 3) & (geom.stave == s)) for s in np.unique(geom.stave[geom.layer == 3])]
    want = refine(_model(geom, np.load(rd / "theta.npy")), [first], cfg.constraints.build(geom), gn_iterations=1,
                  solver="direct", sensors=np.flatnonzero(np.isin(geom.layer, [1, 2])), bodies=staves,
                  progress=False)
    run = load_run(out)
    np.testing.assert_allclose(run.theta, want.theta.numpy(), rtol=0, atol=1e-9 * np.abs(run.theta).max())
    start = np.load(rd / "theta.npy")
    for b in staves:
        np.testing.assert_allclose(run.theta[b[0]] - start[b[0]], run.theta[b[1]] - start[b[1]], rtol=1e-12)
    assert main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "x"), "--layers", "2", "3",
                 "--rigid-layers", "3", "--solver", "direct", "--no-progress"]) == 2
    assert "in a body and in sensors" in capsys.readouterr().err


def test_cli_refine_direct_for_some_layers_without_the_mode_constraints(tmp_path, capsys, geom, run_dir):
    """``--solver direct --layers ... --no-mode-constraints``: the result of :func:`refine` with the
    direct solver on those layers' sensors and the run's constraints without their modes; the
    held layers keep the run's Theta; ``refine.json`` records the solver and that the modes were
    left out, ``run.json`` keeps the run's constraints (the evaluation's frame); ``theta_cov.npy``
    holds the solved sensors' covariance blocks."""
    rd, cfg, hits = run_dir
    out = tmp_path / "direct"
    rc = main(["its", "refine", "--run", str(rd), "--out", str(out), "--events", "250", "--gn-iterations", "2",
               "--layers", "1", "2", "3", "--solver", "direct", "--no-mode-constraints", "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    cap = capsys.readouterr()
    assert "direct solve of" in cap.err and "GN 1: direct solve (" in cap.out and "cost/gradient/H" in cap.out
    summary = json.loads((out / REFINE_JSON).read_text())
    assert summary["options"]["solver"] == "direct" and summary["options"]["mode_constraints"] is False
    assert summary["constraints"]["modes"] == [] and summary["method"].startswith("Gauss-Newton, dense")
    assert all(g["solver"] == "direct" and g["cg_iterations"] == 0 for g in summary["gn"])
    ev = hits.column("event").to_numpy()
    first = pack_tracks(hits.take(pa.array(np.nonzero(ev < 250)[0])), geom)[0]
    layers = np.flatnonzero(np.isin(geom.layer, [1, 2, 3]))
    spec = replace(cfg.constraints, modes=())
    want = refine(_model(geom, np.load(rd / "theta.npy")), [first], spec.build(geom), gn_iterations=2,
                  solver="direct", sensors=layers, progress=False)
    run = load_run(out)
    np.testing.assert_allclose(run.theta, want.theta.numpy(), rtol=0, atol=1e-9 * np.abs(run.theta).max())
    held = ~np.isin(np.arange(geom.n_sensors), layers)
    np.testing.assert_array_equal(run.theta[held], np.load(rd / "theta.npy")[held])
    assert not np.array_equal(run.theta[layers], np.load(rd / "theta.npy")[layers])
    assert tuple(json.loads((out / "run.json").read_text())["constraints"]["modes"]) == cfg.constraints.modes
    assert run.solved is None  # the fit did not meet the run's mode constraints: no held-sensor frame
    # the solved sensors' covariance blocks, read with the run (the held ones NaN)
    np.testing.assert_allclose(run.theta_cov, want.theta_cov.numpy(), rtol=1e-6, atol=0)  # summation order
    solved = np.isfinite(run.theta_cov[:, 0, 0])
    assert solved.sum() == summary["covariance"]["sensors"] > 0 and not solved[held].any()
    # --start-from: another run directory's Theta is the start (the same truth), the data stay RUN_DIR's
    again = tmp_path / "again"
    rc = main(["its", "refine", "--run", str(rd), "--out", str(again), "--events", "250", "--gn-iterations", "1",
               "--layers", "1", "2", "3", "--solver", "direct", "--no-mode-constraints", "--start-from", str(out),
               "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    cont = refine(_model(geom, run.theta), [first], spec.build(geom), gn_iterations=1, solver="direct", sensors=layers,
                  progress=False)
    np.testing.assert_allclose(load_run(again).theta, cont.theta.numpy(), rtol=0, atol=1e-9 * np.abs(run.theta).max())
    assert json.loads((again / REFINE_JSON).read_text())["options"]["start"] == str(out)
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "theta.npy", run.theta)
    np.save(other / "theta_true.npy", 2.0 * np.load(rd / "theta_true.npy"))
    capsys.readouterr()
    assert main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "x"), "--start-from", str(other)]) == 1
    err = capsys.readouterr().err
    assert str(other / "theta_true.npy") in err and "the same simulated detector" in err
    assert main(["its", "refine", "--run", str(rd), "--out", str(tmp_path / "x"), "--start-from",
                 str(tmp_path / "nowhere")]) == 1
    assert str(tmp_path / "nowhere") in capsys.readouterr().err


def test_cli_refine_errors_name_the_path(tmp_path, capsys, run_dir, geom):
    rd, cfg, _ = run_dir
    missing = tmp_path / "missing"
    assert main(["its", "refine", "--run", str(missing), "--out", str(tmp_path / "o")]) == 1
    assert str(missing) in capsys.readouterr().err
    bare = tmp_path / "bare"
    write_run_json(bare, cfg)
    assert main(["its", "refine", "--run", str(bare), "--out", str(tmp_path / "o")]) == 1
    assert str(bare / "theta.npy") in capsys.readouterr().err
    np.save(bare / "theta.npy", np.zeros((geom.n_sensors, 6)))
    np.save(bare / "theta_true.npy", np.zeros((geom.n_sensors, 5)))
    assert main(["its", "refine", "--run", str(bare), "--out", str(tmp_path / "o")]) == 1
    assert str(bare / "theta_true.npy") in capsys.readouterr().err
    np.save(bare / "theta_true.npy", np.zeros((geom.n_sensors, 6)))
    assert main(["its", "refine", "--run", str(bare), "--out", str(tmp_path / "o")]) == 1
    assert str(bare / "spool") in capsys.readouterr().err
    (bare / "spool").mkdir()
    assert main(["its", "refine", "--run", str(bare), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert str(bare / "spool") in err and "no spool files" in err
    assert not (tmp_path / "o").exists()
    with pytest.raises(ValueError, match="events must be a positive integer"):
        SpoolTracks(rd / "spool", geom, events=0)


# ------------------------------------------------------------------------------------------------
# The direct solver


@pytest.mark.parametrize("case", list(PRIOR_CASES))
def test_the_direct_solver_reaches_the_direct_solution_with_a_prior(geom, sample, fixed, case):
    """``solver="direct"`` (the dense ``H`` of the solved sensors accumulated in the system pass,
    the step solved in the constraints' null space) takes the dense KKT step of
    ``_solve_with_prior`` to rounding in every constraint case (one Gauss-Newton iteration: Theta
    within 1e-8 of its typical size, measured <= 4e-10), and after three iterations reaches its
    solution as CG does (5e-5 of the typical size where fixed sensors leave a poorly conditioned
    direction, the objective within 1e-11); one system pass and one cost pass per Gauss-Newton
    iteration; the predicted change of the first step is the actual one to second order."""
    cons = PRIOR_CASES[case](geom, fixed)
    rot, trans = PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"]
    one = refine(_model(geom), sample, cons, gn_iterations=1, solver="direct", progress=False, **PRESIGMA)
    want1 = _solve_with_prior(geom, sample, cons, None, 1, rot, trans)[0]
    assert np.all(np.abs(one.theta.numpy() - want1).max(0) < 1e-8 * THETA_SCALE)
    want, want_cost, want_prior = _solve_with_prior(geom, sample, cons, None, 3, rot, trans)
    res = refine(_model(geom), sample, cons, gn_iterations=3, solver="direct", progress=False, **PRESIGMA)
    fit = res.theta.numpy()
    assert np.all(np.abs(fit - want).max(0) < 5e-5 * THETA_SCALE), np.abs(fit - want).max(0) / THETA_SCALE
    assert abs(res.cost + res.prior - (want_cost + want_prior)) < 1e-11 * (want_cost + want_prior)
    assert all(g.solver == "direct" and g.cg_iterations == 0 and not g.cg and g.step_scale > 0 for g in res.gn)
    assert res.passes == sum(2 + round(-np.log2(g.step_scale)) for g in res.gn)  # a halving costs a cost pass
    g1 = res.gn[0]
    actual = g1.cost_after + g1.prior_after - g1.cost_before - g1.prior_before
    assert g1.predicted_change < 0 and abs(actual - g1.predicted_change) < 0.05 * abs(g1.predicted_change)
    json.dumps(res.to_dict(), allow_nan=False)


@pytest.mark.parametrize("case", list(CONSTRAINT_CASES))
def test_the_direct_solver_reaches_the_reference_solution(geom, sample, references, case):
    """Without a prior, from a start off the constraint surface: ``reference_solution``'s Theta
    (sparse KKT) within 1e-7 of its typical size and its cost within 1e-11, the constraints exact."""
    cons, theta0, ref = references[case, "perturbed"]
    res = refine(_model(geom, theta0), sample, cons, gn_iterations=3, solver="direct", progress=False)
    fit, want = res.theta.numpy(), ref.theta.numpy()
    assert np.all(np.abs(fit - want).max(0) < 1e-7 * THETA_SCALE), np.abs(fit - want).max(0) / THETA_SCALE
    assert abs(res.cost - ref.cost) < 1e-11 * ref.cost
    q = cons.q.numpy()
    if q.shape[1]:
        assert np.abs(q.T @ fit.reshape(-1)).max() < 1e-14 * np.abs(fit).max()
    assert np.all(fit[cons.free[:, 0].numpy() == 0] == 0.0)


def _dense_covariance(geom, batches, cons: Constraints, rot: float | None, trans: float | None,
                      min_sensor_hits: int = 10, free_dirs: np.ndarray | None = None) -> np.ndarray:
    """The sandwich ``K V K`` at Theta = 0, densely: ``K`` the upper-left block of the inverse KKT
    matrix of ``normal_equations``' H plus the prior's ``2 P`` on the active sensors' DoFs, ``V``
    its gradient covariance (hit and vertex errors as the cost assumes them) plus the prior's
    pseudo-measurements ``(2 / ndf) 2 P``. (6N, 6N), zero off the active DoFs."""
    n = geom.n_sensors
    hits = sum(np.bincount(b.sensor[b.mask].numpy(), minlength=n) for b in batches)
    active = (cons.free[:, 0].numpy() > 0) & (hits >= min_sensor_hits)
    ndf = _degrees_of_freedom(batches)
    pm = _prior_matrix(geom, active, rot, trans, ndf, free_dirs)[np.ix_(np.repeat(active, 6), np.repeat(active, 6))]
    free = np.repeat(active, 6)
    ne = normal_equations(_model(geom), batches, vertex_noise=True)
    h = ne.hessian.toarray()[np.ix_(free, free)] + 2.0 * pm
    v = ne.grad_cov.toarray()[np.ix_(free, free)] + 2.0 / ndf * 2.0 * pm
    qf = cons.with_free(active).q.numpy()[free]
    m = qf.shape[1]
    k = np.linalg.inv(np.block([[h, qf], [qf.T, np.zeros((m, m))]]))[: free.sum(), : free.sum()]
    out = np.zeros((6 * n, 6 * n))
    out[np.ix_(free, free)] = k @ v @ k
    return out


# without a prior or constraints the weak modes have no finite error: that case needs the prior
@pytest.mark.parametrize(("case", "prior"), [(c, p) for c in PRIOR_CASES for p in (False, True)
                                             if p or c != "prior_only"])
def test_the_direct_solvers_errors_are_the_sandwich_covariance(geom, sample, fixed, case, prior):
    """``RefineResult.theta_cov`` (solver ``"direct"``): each solved sensor's 6 x 6 block of ``K V
    K`` at the linearisation point (one Gauss-Newton iteration from Theta = 0), computed densely
    here from ``normal_equations`` and the KKT matrix, with and without the prior (whose
    pseudo-measurements add ``2 / ndf`` times its curvature to ``V``), to 1e-6 of the errors'
    product (rounding: measured <= 1.3e-8, the weak modes without a prior); NaN on the fixed
    sensors; the CG solver gives none."""
    cons = PRIOR_CASES[case](geom, fixed)
    opts = PRESIGMA if prior else {}
    res = refine(_model(geom), sample, cons, gn_iterations=1, solver="direct", progress=False, **opts)
    n = geom.n_sensors
    want = _dense_covariance(geom, sample, cons, opts.get("presigma_rot"), opts.get("presigma_trans"))
    blocks = want.reshape(n, 6, n, 6)[np.arange(n), :, np.arange(n), :]
    got = res.theta_cov.numpy()
    solved = np.isfinite(got[:, 0, 0])
    assert solved.sum() == (blocks[:, 0, 0] > 0).sum() > 100
    assert not solved[cons.free[:, 0].numpy() == 0].any()
    scale = np.sqrt(np.diagonal(blocks[solved], axis1=1, axis2=2))  # errors per DoF
    rel = (got[solved] - blocks[solved]) / (scale[:, :, None] * scale[:, None, :])
    assert np.abs(rel).max() < 1e-6, np.abs(rel).max()
    cg = refine(_model(geom), sample, cons, gn_iterations=1, cg_iterations=5, progress=False, **opts)
    assert cg.theta_cov is None


def test_the_direct_solvers_errors_match_the_spread_over_independent_samples(geom, truth, fixed):
    """Monte Carlo: 30 independent samples (400 events each) of one detector, misaligned except
    the two fixed layers, each solved directly (two Gauss-Newton iterations). The pulls (fitted -
    true) / error of the 120 solved chips' six parameters have unit RMS (0.95..1.05 pooled,
    measured 0.99; 0.9..1.1 per parameter, measured 0.984..0.999) and Gaussian tails (|pull| <
    1.645 for 90 %, measured 90.3 %). Hit errors as the cost assumes them (no multiple
    scattering); the vertex is the true one but weighted by the beam spot, so the errors are a
    little conservative (they count its noise)."""
    p = _direct_pulls(geom, truth, fixed, COST, SIM, range(100, 130))
    rms = np.sqrt((p**2).mean(0))
    assert 0.95 < float(np.sqrt((p**2).mean())) < 1.05, rms
    assert np.all((rms > 0.9) & (rms < 1.1)), rms
    assert 0.87 < float((np.abs(p) < 1.645).mean()) < 0.93


def _direct_pulls(geom, truth, fixed, cost, sim, seeds) -> np.ndarray:
    """(fitted - true) / error of the direct solver's 120 chips, one independent sample of 400
    events per seed (two Gauss-Newton iterations from the nominal geometry)."""
    true = truth.copy()
    true[fixed] = 0.0
    cons = Constraints.build(geom, fixed=fixed)
    pulls = []
    for seed in seeds:
        hits = simulate_batch(geom, SimulationConfig(seed=seed, **sim), 400, placement=apply_alignment(geom, true))
        batch = pack_tracks(hits, geom)[0]
        res = refine(ITSAlignmentModel.from_geometry(geom, cost), [batch], cons, gn_iterations=2, solver="direct",
                     progress=False)
        cov = res.theta_cov.numpy()
        ok = np.isfinite(cov[:, 0, 0])
        assert ok.sum() == 120
        sig = np.sqrt(np.diagonal(cov[ok], axis1=1, axis2=2))
        pulls.append((res.theta.numpy()[ok] - true[ok]) / sig)
    return np.concatenate(pulls)


def test_the_errors_hold_with_multiple_scattering(geom, truth, fixed):
    """As above with multiple scattering (0.35 % X0 per layer, tracks of 0.3-5 GeV/c: the kicks
    are most of the hits' errors beyond the first layer), 20 samples. Each kick moves all later
    hits of a track together: the errors take that correlation (``align.noise_factors``), and
    the first fit pass, whose momentum sets the scattering weights, includes the given vertex.
    Measured: pulls 1.03-1.05 per parameter, 1.036 pooled, 89 % within 1.645. Both were needed:
    the hits' variances alone as their noise gave errors 15 % too large here (pooled 0.87; 1.2-1.7
    with a vertex known to 0.5 um), the correlation alone 24 % too small (1.24 on 24 other
    samples): a track whose own kicks made it look stiffer gets smaller scattering variances and
    has the larger residuals, and the momentum of a fit of the hits alone follows those kicks.
    What remains (a few %) is that: the weights follow the fitted momentum, not the true one
    (with the true momentum the residuals' covariance is ``P S P`` to 1-10 % per hit)."""
    p = _direct_pulls(geom, truth, fixed, replace(COST, multiple_scattering=True),
                      dict(SIM, multiple_scattering=True), range(200, 220))
    rms = np.sqrt((p**2).mean(0))
    assert 0.97 < float(np.sqrt((p**2).mean())) < 1.15, rms
    assert np.all((rms > 0.93) & (rms < 1.17)), rms
    assert 0.83 < float((np.abs(p) < 1.645).mean()) < 0.93


def test_the_direct_solver_with_rigid_bodies_is_the_reduced_dense_solution(geom, sample):
    """``bodies`` (the staves of layers 3 and 4, two chips each, as rigid bodies) beside single
    sensors (layers 1 and 2), layer 0 fixed, with the prior: one Gauss-Newton step equals the
    dense KKT step of the reduced problem ``B^T H B d = -B^T g`` (``B`` copies a body's step to
    each of its sensors; H and g of ``normal_equations`` plus the prior's diagonal) within 1e-8 of
    Theta's typical size; a body's chips take the same step; the bodies' sensors have no error
    block (NaN), the single ones have; bad bodies are refused with the reason."""
    fixed0 = np.flatnonzero(geom.layer == 0)
    cons = Constraints.build(geom, fixed=fixed0)
    singles = np.flatnonzero(np.isin(geom.layer, [1, 2]))
    staves = [np.flatnonzero((geom.layer == lay) & (geom.stave == s)) for lay in (3, 4)
              for s in np.unique(geom.stave[geom.layer == lay])]
    assert len(staves) == 52 and all(b.size == 2 for b in staves)
    res = refine(_model(geom), sample, cons, sensors=singles, bodies=staves, gn_iterations=1, solver="direct",
                 progress=False, **PRESIGMA)
    n = geom.n_sensors
    hits = sum(np.bincount(b.sensor[b.mask].numpy(), minlength=n) for b in sample)
    units = [np.array([s]) for s in singles if hits[s] >= 10] + staves
    expand = np.zeros((6 * n, 6 * len(units)))  # B
    for u, members in enumerate(units):
        for s in members:
            expand[6 * s:6 * s + 6, 6 * u:6 * u + 6] = np.eye(6)
    active = np.zeros(n, dtype=bool)
    active[np.concatenate(units)] = True
    pm = _prior_matrix(geom, active, PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"], _degrees_of_freedom(sample))
    ne = normal_equations(_model(geom), sample, covariance=False)
    h = expand.T @ (ne.hessian.toarray() + 2.0 * pm) @ expand
    d = np.linalg.solve(h, -expand.T @ ne.grad)
    want = (expand @ d).reshape(n, 6)
    fit = res.theta.numpy()
    assert np.all(np.abs(fit - want).max(0) < 1e-8 * THETA_SCALE), np.abs(fit - want).max(0) / THETA_SCALE
    for b in staves:
        assert np.array_equal(fit[b[0]], fit[b[1]]) and np.abs(fit[b[0]]).max() > 0
    cov = res.theta_cov.numpy()
    assert np.isnan(cov[np.concatenate(staves)]).all() and np.isfinite(cov[units[0]]).all()
    with pytest.raises(ValueError, match=r"bodies\[0\] holds fixed sensors"):
        refine(_model(geom), sample, cons, bodies=[fixed0[:2]], solver="direct", progress=False)
    with pytest.raises(ValueError, match="a sensor is in two bodies or in a body and in sensors"):
        refine(_model(geom), sample, cons, sensors=singles, bodies=[singles[:2]], solver="direct", progress=False)
    with pytest.raises(ValueError, match="bodies are solved by solver 'direct' only"):
        refine(_model(geom), sample, cons, bodies=staves, progress=False)


def test_the_direct_solver_for_some_sensors_holds_the_others(geom, sample, fixed):
    """``sensors`` with the direct solver: the middle layers solved with the outer ones held equals
    ``reference_solution`` with those fixed; too many parameters and a coarse space are refused
    with the reason."""
    import streamcal.detectors.its.refine as refine_module

    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    middle = np.flatnonzero(~np.isin(np.arange(geom.n_sensors), fixed))
    res = refine(_model(geom), sample, cons, sensors=middle, gn_iterations=3, solver="direct", progress=False)
    ref = reference_solution(_model(geom), sample, Constraints.build(geom, modes=("rz", "curl", "telescope"),
                                                                     fixed=fixed), n_iter=3, covariance=False)
    assert np.all(res.theta.numpy()[fixed] == 0.0)
    assert np.all(np.abs(res.theta.numpy() - ref.theta.numpy()).max(0) < 1e-7 * THETA_SCALE)
    with pytest.raises(ValueError, match="coarse is the CG solver's preconditioner"):
        refine(_model(geom), sample, cons, solver="direct", coarse=coarse_basis(geom, RIGID_MODES), progress=False)
    with pytest.raises(ValueError, match=r"solver must be one of \['cg', 'direct', 'sparse'\], got 'lu'"):
        refine(_model(geom), sample, cons, solver="lu", progress=False)
    limit = refine_module.DIRECT_MAX_PARAMETERS
    try:
        refine_module.DIRECT_MAX_PARAMETERS = 6 * middle.size - 1
        with pytest.raises(ValueError, match=rf"{middle.size} sensors are {6 * middle.size} parameters .*solve for "
                                             "fewer sensors"):
            refine(_model(geom), sample, cons, sensors=middle, solver="direct", progress=False)
    finally:
        refine_module.DIRECT_MAX_PARAMETERS = limit


# ------------------------------------------------------------------------------------------------
# The sparse solver (Millepede-II's sparse mode)


@pytest.mark.parametrize("merge_at", [200_000, 50])
def test_the_sparse_matrix_is_the_normal_matrix(geom, truth, sample, merge_at):
    """The block-sparse ``H`` that the sparse solver's pass assembles equals ``normal_equations``'
    sparse Hessian to 1e-10 of its largest entry, entry by entry, with the pairs merged at the
    end of the pass or every 50 blocks (the sorted keys then looked up chunk by chunk; chunks of
    300 tracks); with some sensors held their rows and columns are empty and the rest equals the
    Hessian's; a track with a second hit on one of its sensors adds the pair's terms; the
    diagonal blocks are those of :func:`gn_system`."""
    from streamcal.detectors.its.refine import _SparseBlocks, _Source, _system

    model = _model(geom, 0.3 * truth)
    n = geom.n_sensors
    ref = normal_equations(model, sample, covariance=False).hessian.toarray()
    solved = np.ones(n, dtype=bool)
    solved[::3] = False
    for which in (np.ones(n, dtype=bool), solved):
        acc = _SparseBlocks(which)
        acc.merge_at = merge_at
        system = _system(_Source(model, sample, "test", chunk_tracks=300, cache_mb=0), None, acc)
        got = acc.matrix.toarray()
        keep = np.repeat(which, 6)
        want = np.where(keep[:, None] & keep[None, :], ref, 0.0)
        assert np.abs(got - want).max() <= 1e-10 * np.abs(ref).max()
        assert np.abs(got - got.T).max() == 0.0
        np.testing.assert_allclose(system.blocks.numpy()[which], _diag_blocks(acc.matrix, n)[which], rtol=0, atol=0)
        assert acc.matrix.nnz // 36 < 0.5 * n * n  # sparse: only the pairs tracks connect
        p = np.random.default_rng(5).standard_normal((n, 6)) * THETA_SCALE
        np.testing.assert_allclose(acc.matvec(torch.from_numpy(p)).numpy().reshape(-1), want @ p.reshape(-1),
                                   rtol=0, atol=1e-10 * np.abs(want @ p.reshape(-1)).max())
    dup = _with_a_second_hit(sample[0])[0]  # a second hit of a track on its first sensor
    acc = _SparseBlocks(np.ones(n, dtype=bool))
    _system(_Source(model, [dup], "test", chunk_tracks=4096, cache_mb=0), None, acc)
    want = normal_equations(model, [dup], covariance=False).hessian.toarray()
    assert np.abs(acc.matrix.toarray() - want).max() <= 1e-10 * np.abs(want).max()


@pytest.mark.parametrize("case", list(PRIOR_CASES))
def test_the_sparse_solver_reaches_the_direct_solution_with_a_prior(geom, sample, fixed, case):
    """``solver="sparse"`` (``H`` assembled block-sparse in the system pass, CG in memory) takes
    the dense KKT step of ``_solve_with_prior`` (one Gauss-Newton iteration, CG to 1e-12: Theta
    within 1e-8 of its typical size) and after three reaches its solution as the direct solver
    does; one system pass and one cost pass per Gauss-Newton iteration, whatever the CG
    iterations; also with the coarse level."""
    cons = PRIOR_CASES[case](geom, fixed)
    rot, trans = PRESIGMA["presigma_rot"], PRESIGMA["presigma_trans"]
    one = refine(_model(geom), sample, cons, gn_iterations=1, solver="sparse", cg_iterations=3000, tol=1e-12,
                 progress=False, **PRESIGMA)
    want1 = _solve_with_prior(geom, sample, cons, None, 1, rot, trans)[0]
    assert np.all(np.abs(one.theta.numpy() - want1).max(0) < 1e-8 * THETA_SCALE), \
        np.abs(one.theta.numpy() - want1).max(0) / THETA_SCALE
    assert one.gn[0].solver == "sparse" and one.gn[0].cg_iterations > 10 and one.passes == 2
    want, want_cost, want_prior = _solve_with_prior(geom, sample, cons, None, 3, rot, trans)
    res = refine(_model(geom), sample, cons, gn_iterations=3, solver="sparse", cg_iterations=3000, tol=1e-12,
                 coarse=coarse_basis(geom, RIGID_MODES), progress=False, **PRESIGMA)
    fit = res.theta.numpy()
    assert np.all(np.abs(fit - want).max(0) < 5e-5 * THETA_SCALE), np.abs(fit - want).max(0) / THETA_SCALE
    assert abs(res.cost + res.prior - (want_cost + want_prior)) < 1e-11 * (want_cost + want_prior)
    assert res.passes == sum(2 + round(-np.log2(g.step_scale)) for g in res.gn)
    json.dumps(res.to_dict(), allow_nan=False)


def test_the_sparse_solver_for_some_sensors_and_streamed_data(geom, sample, fixed):
    """``sensors`` with the sparse solver and streamed batches: the middle layers solved with the
    outer ones held equals ``reference_solution`` with those fixed (to 1e-7 of Theta's typical
    size); rigid bodies are the direct solver's and refused here."""
    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    middle = np.flatnonzero(~np.isin(np.arange(geom.n_sensors), fixed))
    res = refine(_model(geom), lambda: iter(sample), cons, sensors=middle, gn_iterations=3, solver="sparse",
                 cg_iterations=3000, tol=1e-12, progress=False)
    ref = reference_solution(_model(geom), sample, Constraints.build(geom, modes=("rz", "curl", "telescope"),
                                                                     fixed=fixed), n_iter=3, covariance=False)
    assert np.all(res.theta.numpy()[fixed] == 0.0)
    assert np.all(np.abs(res.theta.numpy() - ref.theta.numpy()).max(0) < 1e-7 * THETA_SCALE)
    with pytest.raises(ValueError, match="bodies are solved by solver 'direct' only, got solver 'sparse'"):
        refine(_model(geom), sample, cons, solver="sparse", bodies=[middle[:2]], progress=False)


def test_the_sparse_solvers_sampled_errors_are_the_sandwich_covariance(geom, sample):
    """``error_samples`` with the sparse solver: the covariance from 100 noise replicas of the
    data solved through ``K`` estimates the direct solver's exact ``K V K`` (same start, one
    Gauss-Newton iteration, the prior and mode constraints): per sensor and DoF the variance
    ratio scatters about 1 as a variance estimate from 100 samples does (RMS deviation within
    0.7-1.3 of ``sqrt(2 / 100)``; measured 0.09-0.11 with 200 samples against 0.10), pooled over
    the 200 sensors within 5 % of 1 per DoF, the correlations' RMS error below 1 / sqrt(100) (at
    most that for a correlation estimated from 100 samples); a fixed seed gives
    the same errors; other solvers refuse ``error_samples``."""
    cons = Constraints.build(geom, modes=("rz", "curl", "telescope"))
    k = 100
    exact = refine(_model(geom), sample, cons, gn_iterations=1, solver="direct", progress=False, **PRESIGMA)
    res = refine(_model(geom), sample, cons, gn_iterations=1, solver="sparse", cg_iterations=3000, tol=1e-10,
                 error_samples=k, error_seed=4, progress=False, **PRESIGMA)
    a, b = exact.theta_cov.numpy(), res.theta_cov.numpy()
    ok = np.isfinite(a[:, 0, 0])
    assert ok.sum() > 150 and np.array_equal(ok, np.isfinite(b[:, 0, 0]))
    va, vb = a[ok][:, range(6), range(6)], b[ok][:, range(6), range(6)]
    ratio = vb / va
    dev = np.sqrt(((ratio - 1) ** 2).mean(0))
    assert np.all((dev > 0.7 * np.sqrt(2 / k)) & (dev < 1.3 * np.sqrt(2 / k))), dev
    assert np.all(np.abs(ratio.mean(0) - 1) < 0.05), ratio.mean(0)
    corr_a = a[ok] / np.sqrt(va[:, :, None] * va[:, None, :])
    corr_b = b[ok] / np.sqrt(vb[:, :, None] * vb[:, None, :])
    off = ~np.eye(6, dtype=bool)
    assert np.sqrt(((corr_a - corr_b)[:, off] ** 2).mean()) < 1 / np.sqrt(k)  # a correlation's error: <= 1/sqrt(k)
    assert res.gn[0].error_samples == k and res.gn[0].error_seconds > 0
    again = refine(_model(geom), sample, cons, gn_iterations=1, solver="sparse", cg_iterations=3000, tol=1e-10,
                   error_samples=3, error_seed=4, progress=False, **PRESIGMA)
    twice = refine(_model(geom), sample, cons, gn_iterations=1, solver="sparse", cg_iterations=3000, tol=1e-10,
                   error_samples=3, error_seed=4, progress=False, **PRESIGMA)
    np.testing.assert_array_equal(again.theta_cov.numpy(), twice.theta_cov.numpy())
    for solver in ("cg", "direct"):
        with pytest.raises(ValueError, match=f"error_samples are the sparse solver's errors .* got solver '{solver}'"):
            refine(_model(geom), sample, cons, solver=solver, error_samples=10, progress=False)
