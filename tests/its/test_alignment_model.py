"""ITS alignment model against independent computations: the Phi <-> Theta maps against the
misalignment module (the tested reference for ALICE's convention), the analytic Jacobian against
finite differences and autograd, the fast closed-form gradient against autograd and finite
differences of the cost, the chi^2 at the true geometry against its statistical expectation
(with and without multiple scattering), the dense fast path against its padded predecessor, its
per-batch cache and float32 precision, and input checks.

Everything runs on CPU (float64 unless a test says otherwise; the CUDA comparison only where there
is a GPU) on small geometries (a few thousand tracks)."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch

from streamcal.detectors.its.align import pack_tracks
from streamcal.detectors.its.geometry import ITSGeometryConfig, build_geometry
from streamcal.detectors.its.misalignment import MisalignmentConfig, apply_alignment, misalign
from streamcal.detectors.its.simulation import SimulationConfig, highland_theta0, simulate_batch
from streamcal.models.its_alignment import (
    ITSAlignmentConfig,
    ITSAlignmentModel,
    TrackBatch,
    phi_theta_jacobian,
    phi_theta_vjp,
    phi_to_theta,
    theta_to_phi,
)

# five layers, short staves: 1008 chips; |eta| < 0.25 and a 5 mm beam spot in z keep the tracks
# inside the staves (5 layers, >= 4 hits)
SIM = dict(beam_spot_sigma=(0.015, 0.015, 5.0), eta_max=0.25, pt_min=0.3, pt_max=5.0)
MISALIGN = MisalignmentConfig(sigma_rot=(1e-3, 1e-3, 1e-3), sigma_trans=(0.05, 0.05, 0.05), seed=3)


@pytest.fixture(scope="module")
def geom():
    return build_geometry(ITSGeometryConfig.small(n_layers=5))


@pytest.fixture(scope="module")
def geom_full_active():
    """Same layout with the active matrix covering the whole chip pitch: every chip the track
    crosses (every scatterer) then leaves a hit, so the scatterers are known from the hits."""
    base = ITSGeometryConfig.small(n_layers=5)
    return build_geometry(ITSGeometryConfig(layers=base.layers, pixel_pitch_u=15.0 / 512, pixel_pitch_v=30.0 / 1024))


def _params(geom) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.as_tensor(geom.rot),
        torch.as_tensor(geom.trans),
        torch.tensor([geom.half_u, geom.half_v], dtype=torch.float64),
    )


def _random_theta(n: int, seed: int) -> np.ndarray:
    """Angles log-uniform in 1 urad .. 1 mrad, shifts 1 um .. 1 mm, random signs."""
    rng = np.random.default_rng(seed)
    mag = np.concatenate([10 ** rng.uniform(-6, -3, (n, 3)), 10 ** rng.uniform(-3, 0, (n, 3))], 1)
    return mag * rng.choice([-1.0, 1.0], (n, 6))


def _smear_vertex(batch: TrackBatch, cfg: ITSAlignmentConfig, seed: int) -> TrackBatch:
    """The event vertex as a measurement with the resolution the cost assumes."""
    assert batch.vertex is not None
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch.vertex.shape, generator=g, dtype=torch.float64)
    sig = torch.tensor([cfg.sigma_vertex_xy, cfg.sigma_vertex_xy, cfg.sigma_vertex_z], dtype=torch.float64)
    return TrackBatch(batch.sensor, batch.local, batch.mask, batch.event, batch.n_events, batch.vertex + noise * sig)


def _sample(geom, theta: np.ndarray, n_events: int, ms: bool, seed: int):
    """Simulated hits on the geometry misaligned by ``theta``, packed; also the generated pT per
    packed track."""
    hits = simulate_batch(geom, SimulationConfig(seed=seed, multiple_scattering=ms, **SIM), n_events,
                          placement=apply_alignment(geom, theta))
    batch, _ = pack_tracks(hits, geom)
    key = hits.column("event").to_numpy() * 8 + hits.column("track").to_numpy()
    _, first, counts = np.unique(key, return_index=True, return_counts=True)
    keep = (counts >= 4) & (counts <= 16)  # pack_tracks' defaults (no hit is rejected here)
    pt = hits.column("pt").to_numpy().astype(np.float64)[first][keep]
    assert pt.size == batch.n_tracks
    return batch, torch.from_numpy(pt)


@pytest.fixture(scope="module")
def theta_true(geom):
    return misalign(geom, MISALIGN)


# ------------------------------------------------------------------------------------------------
# Phi <-> Theta


def test_round_trip_theta_phi_theta(geom):
    rot, trans, half = _params(geom)
    theta = torch.from_numpy(_random_theta(geom.n_sensors, 1))
    phi = theta_to_phi(theta, rot, trans, half)
    back = phi_to_theta(phi, rot, trans, half)
    assert float((back - theta).abs().max()) < 1e-12
    # Theta = 0 is Phi = 0 (the ideal geometry)
    zero = torch.zeros(geom.n_sensors, 6, dtype=torch.float64)
    assert float(theta_to_phi(zero, rot, trans, half).abs().max()) < 1e-12
    # the model's own accessors
    model = ITSAlignmentModel.from_geometry(geom)
    model.set_theta(theta)
    assert float((model.theta() - theta).abs().max()) < 1e-12


def test_theta_is_recomputed_when_phi_changes(geom):
    """``model.theta()`` is computed once per Phi: a fresh tensor every call, the Theta given to
    ``set_theta`` after it, recomputed after any in-place change of Phi; pickling drops the cached
    values (the copy maps its Phi back, equal to rounding)."""
    model = ITSAlignmentModel.from_geometry(geom)
    theta = torch.from_numpy(_random_theta(geom.n_sensors, 2))
    model.set_theta(theta)
    t1 = model.theta()
    t1 += 1.0  # the caller's copy
    assert float((model.theta() - theta).abs().max()) < 1e-12
    with torch.no_grad():
        model.phi.mul_(0.5)
    expected = phi_to_theta(model.phi.detach(), model.rot_geom, model.trans_geom, model.half_size)
    torch.testing.assert_close(model.theta(), expected, rtol=0, atol=0)
    model.set_theta(2 * theta)
    torch.testing.assert_close(model.theta(), 2 * theta, rtol=0, atol=0)
    back = pickle.loads(pickle.dumps(model))
    assert "_theta_cache" not in back.__dict__
    assert float((back.theta() - model.theta()).abs().max()) < 1e-12
    # outside the principal range of the Euler angles set_theta's Theta is not kept
    wrapped = theta.clone()
    wrapped[:, 0] += 2 * math.pi
    model.set_theta(wrapped)
    assert float((model.theta() - theta).abs().max()) < 1e-9


@pytest.mark.parametrize("frame", ["local", "global"])
def test_phi_places_hits_like_the_misalignment_module(geom, frame):
    """Physics consistency of the two code paths: the linear layer Phi = theta_to_phi(Theta)
    puts a local point where ``apply_alignment`` (R = a_R R_GEOM, T = a_R T_GEOM + a_T) and the
    geometry's ``to_global`` put it on the misaligned chip (global deltas, rotations about the
    global origin)."""
    cfg = MisalignmentConfig(sigma_rot=(2e-3, 1e-3, 3e-3), sigma_trans=(0.5, 0.2, 1.0), frame=frame, seed=7,
                             modes=(("curl", 1e-5), ("telescope", 1e-4), ("radial", 2e-4)))
    theta = misalign(geom, cfg)
    rng = np.random.default_rng(2)
    t, k = 400, 4
    sensor = rng.integers(0, geom.n_sensors, (t, k))
    uv = np.stack([rng.uniform(-geom.half_u, geom.half_u, (t, k)), rng.uniform(-geom.half_v, geom.half_v, (t, k))], -1)
    batch = TrackBatch(torch.from_numpy(sensor), torch.from_numpy(uv), torch.ones(t, k, dtype=torch.bool),
                       torch.zeros(t, dtype=torch.int64), 1, None)
    model = ITSAlignmentModel.from_geometry(geom)
    phi = theta_to_phi(torch.from_numpy(theta), model.rot_geom, model.trans_geom, model.half_size)
    got = model.global_positions(batch, phi).detach().numpy()
    rot_a, trans_a = apply_alignment(geom, theta)
    ref = geom.to_global(sensor, np.concatenate([uv, np.zeros((t, k, 1))], -1), rot_a, trans_a)
    assert np.abs(got - ref).max() < 1e-10  # mm
    # and the chip really moved: the ideal placement differs by the misalignment
    ideal = model.global_positions(batch).detach().numpy()
    assert np.abs(ideal - ref).max() > 0.1


def test_jacobian_against_finite_differences_and_autograd(geom):
    rot, trans, half = _params(geom)
    theta = torch.from_numpy(_random_theta(geom.n_sensors, 4))
    jac = phi_theta_jacobian(theta, rot, trans, half)  # (N, 9, 6)
    assert jac.shape == (geom.n_sensors, 9, 6)
    # central differences, one Theta component of every sensor at a time (sensors are independent)
    fd = torch.zeros_like(jac)
    for j in range(6):
        h = 1e-6 if j < 3 else 1e-4
        d = torch.zeros_like(theta)
        d[:, j] = h
        fd[:, :, j] = (theta_to_phi(theta + d, rot, trans, half) - theta_to_phi(theta - d, rot, trans, half)) / (2 * h)
    scale = jac.abs().amax(dim=(1, 2), keepdim=True)  # (N, 1, 1), up to |T_GEOM| ~ 250 mm
    assert float(((fd - jac).abs() / scale).max()) < 1e-7
    # autograd of theta_to_phi on a subset of sensors (the full Jacobian is block diagonal)
    sel = torch.tensor([0, 17, 40, 200, geom.n_sensors - 1])
    auto = torch.autograd.functional.jacobian(lambda t: theta_to_phi(t, rot[sel], trans[sel], half), theta[sel])
    idx = torch.arange(sel.numel())
    blocks = auto[idx, :, idx, :]  # (n, 9, 6)
    assert float((blocks - jac[sel]).abs().max()) < 1e-12 * float(scale.max())
    off = auto.clone()
    off[idx, :, idx, :] = 0.0
    assert float(off.abs().max()) == 0.0


def test_vjp_is_the_jacobian_product(geom):
    """``phi_theta_vjp`` (and ``model.theta_grad``, on all sensors or a subset) equals the
    (N, 9, 6) Jacobian applied to a Phi gradient, to rounding."""
    rot, trans, half = _params(geom)
    theta = torch.from_numpy(_random_theta(geom.n_sensors, 5))
    grad = torch.from_numpy(np.random.default_rng(6).standard_normal((geom.n_sensors, 9)))
    ref = torch.einsum("npk,np->nk", phi_theta_jacobian(theta, rot, trans, half), grad)
    scale = ref.abs().amax(1, keepdim=True)
    assert float(((phi_theta_vjp(theta, grad, rot, trans, half) - ref).abs() / scale).max()) < 1e-13
    model = ITSAlignmentModel.from_geometry(geom)
    model.set_theta(theta)
    assert float(((model.theta_grad(grad) - ref).abs() / scale).max()) < 1e-13
    rows = torch.tensor([3, 40, geom.n_sensors - 1])
    part = model.theta_grad(grad, rows)
    assert float(((part[rows] - ref[rows]).abs() / scale[rows]).max()) < 1e-13
    rest = torch.ones(geom.n_sensors, dtype=torch.bool)
    rest[rows] = False
    assert float(part[rest].abs().max()) == 0.0
    with pytest.raises(ValueError, match="grad_phi"):
        phi_theta_vjp(theta, grad[:, :6], rot, trans, half)
    with pytest.raises(ValueError, match="sensors"):
        model.theta_grad(grad, rows.to(torch.int32))


# ------------------------------------------------------------------------------------------------
# Gradient of the cost


@pytest.fixture(scope="module")
def grad_sample(geom, theta_true):
    """150 events (about 1200 tracks) with multiple scattering; the model sits halfway between
    the ideal and the true geometry, where the gradient is large."""
    batch, _ = _sample(geom, theta_true, 150, ms=True, seed=11)
    return batch


def _grads(model: ITSAlignmentModel, batch: TrackBatch) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    model(batch).cost.backward()
    fast = model.phi.grad.clone()
    model.zero_grad(set_to_none=True)
    model.forward_autograd(batch).cost.backward()
    auto = model.phi.grad.clone()
    model.zero_grad(set_to_none=True)
    return fast, auto


def _directional_fd(model: ITSAlignmentModel, batch: TrackBatch, d: torch.Tensor, h: float = 1e-5) -> float:
    phi0 = model.phi.detach().clone()
    with torch.no_grad():
        model.phi.copy_(phi0 + h * d)
        cp = float(model.forward_autograd(batch).cost)
        model.phi.copy_(phi0 - h * d)
        cm = float(model.forward_autograd(batch).cost)
        model.phi.copy_(phi0)
    return (cp - cm) / (2 * h)


@pytest.mark.parametrize("vertex", ["given", "none"])
@pytest.mark.parametrize("ms", [False, True])
def test_fast_gradient_matches_autograd_and_cost_differences(geom, theta_true, grad_sample, vertex, ms):
    """The closed-form (envelope theorem) gradient of ``forward`` against autograd through the
    fits (``forward_autograd``) and against central differences of the cost (whose weights do not
    depend on Phi: the function both gradients differentiate)."""
    batch = grad_sample
    model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(vertex=vertex, multiple_scattering=ms))
    model.set_theta(torch.from_numpy(0.5 * theta_true))
    fast, auto = _grads(model, batch)
    # Only difference: the fast path drops the dependence of the rz residuals on the circle
    # parameters through the arc length (the line fit is not stationary in them). Measured
    # |fast - auto| / |auto| = 2e-5 (MS) .. 8e-4 (no MS, where the rz residuals of the
    # half-aligned geometry are largest in units of sigma); tolerance 2e-3.
    assert float((fast - auto).norm() / auto.norm()) < 2e-3
    gen = torch.Generator().manual_seed(3)
    dirs = [auto / auto.norm()] + [torch.randn(auto.shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    for d in dirs:
        d = d / d.norm()
        fd = _directional_fd(model, batch, d)
        # autograd is exact for this cost: central-difference precision only
        assert abs(float((auto * d).sum()) - fd) < 1e-6 * auto.norm() + 1e-7
        # the fast gradient up to the arc-length term (measured < 3e-5 |grad|)
        assert abs(float((fast * d).sum()) - fd) < 2e-4 * auto.norm()


def test_fast_gradient_against_differences_of_the_full_cost(geom, theta_true, grad_sample):
    """Differences of the cost as evaluated, with (for ``vertex="fit"``) the vertex recomputed at
    every Phi, against the fast gradient, which holds it fixed (as Millepede does with its
    measurements). Directional derivatives along the gradient (relative error) and along random
    unit directions (error in units of |grad|; a random projection is ~|grad| / 95 here).
    Measured on this sample:

    ==========================  ===============  ======================
    case                        along gradient   random, / |grad|
    ==========================  ===============  ======================
    no MS, vertex given         1.9e-5           < 1e-5
    MS, vertex given            1.4e-7           < 5e-7
    MS, no vertex term          4.6e-6           < 3e-6
    no MS, vertex fitted        1.0e-2           < 4e-4
    MS, vertex fitted           1.4e-2           < 1e-4
    ==========================  ===============  ======================

    The weights do not depend on Phi (they come from the hits on the ideal geometry), so
    without a fitted vertex only the fast path's dropped arc-length term separates the two;
    a fitted vertex moves with the tracks."""
    batch = grad_sample
    cases = (("given", False, 2e-4, 1e-4), ("given", True, 1e-5, 1e-5), ("none", True, 1e-4, 5e-5),
             ("fit", True, 3e-2, 5e-3))
    for vertex, ms, tol_along, tol_random in cases:
        model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(vertex=vertex, multiple_scattering=ms))
        model.set_theta(torch.from_numpy(0.5 * theta_true))
        fast, _ = _grads(model, batch)
        norm = float(fast.norm())
        fd = _directional_fd(model, batch, fast / norm)
        assert abs(fd - norm) < tol_along * fd, (vertex, ms)
        gen = torch.Generator().manual_seed(5)
        for _ in range(2):
            d = torch.randn(fast.shape, generator=gen, dtype=torch.float64)
            d = d / d.norm()
            fd = _directional_fd(model, batch, d)
            assert abs(fd - float((fast * d).sum())) < tol_random * norm, (vertex, ms)


def test_chunked_forward_is_the_same_cost_and_gradient(geom, theta_true, grad_sample):
    for vertex in ("given", "fit"):
        model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(vertex=vertex))
        model.set_theta(torch.from_numpy(0.5 * theta_true))
        out1 = model(grad_sample)
        out1.cost.backward()
        g1 = model.phi.grad.clone()
        model.zero_grad(set_to_none=True)
        out2 = model(grad_sample, chunk_tracks=97)
        out2.cost.backward()
        g2 = model.phi.grad.clone()
        model.zero_grad(set_to_none=True)
        assert abs(float(out1.cost.detach()) - float(out2.cost.detach())) < 1e-10 * float(out1.cost.detach())
        assert float((g1 - g2).norm() / g1.norm()) < 1e-10
        torch.testing.assert_close(out1.chi2, out2.chi2, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("vertex, ms", [("given", True), ("fit", True), ("none", True), ("given", False)])
def test_dense_forward_equals_the_padded_path(geom, theta_true, grad_sample, vertex, ms):
    """The dense hit-major fast path (tracks grouped by hit count, Phi-independent part built
    once per batch) against its padded predecessor ``_forward_padded`` (the same envelope-theorem
    gradient computed by ``_evaluate`` on padded (T, K) chunks): same cost, chi2 and gradient to
    rounding, with the default chunk size (these 1189 tracks of 4..8 hits share one chunk, padded
    with zero-weight hits) and with 97 tracks per chunk (every hit-count group split, the
    smallest ones merged)."""
    model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(vertex=vertex, multiple_scattering=ms))
    model.set_theta(torch.from_numpy(0.5 * theta_true))
    ref = model._forward_padded(grad_sample)
    ref.cost.backward()
    g_ref = model.phi.grad.clone()
    for chunk in (8192, 97):
        model.zero_grad(set_to_none=True)
        out = model(grad_sample, chunk_tracks=chunk)
        out.cost.backward()
        assert abs(float(out.cost.detach()) / float(ref.cost.detach()) - 1) < 1e-12
        assert float((model.phi.grad - g_ref).norm() / g_ref.norm()) < 1e-10
        torch.testing.assert_close(out.chi2, ref.chi2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.event_chi2, ref.event_chi2, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.ndf, ref.ndf, rtol=0, atol=0)
        torch.testing.assert_close(out.event_ndf, ref.event_ndf, rtol=0, atol=0)


def test_dense_forward_with_padding_between_hits(geom, theta_true, grad_sample):
    """Hits need not come first in a row: a batch with the padding moved between the hits (and
    the rows' hit order reversed) has the same cost and gradient."""
    b = grad_sample
    t, k = b.sensor.shape
    # per row: padding first, then the hits in reverse order
    key = torch.where(b.mask, torch.arange(k).expand(t, k), torch.full((t, k), k))
    perm = torch.argsort(-key, dim=1, stable=True)
    moved = TrackBatch(b.sensor.gather(1, perm), b.local.gather(1, perm[..., None].expand(-1, -1, 2)),
                       b.mask.gather(1, perm), b.event, b.n_events, b.vertex)
    assert not bool(moved.mask[:, 0].all())
    model = ITSAlignmentModel.from_geometry(geom)
    model.set_theta(torch.from_numpy(0.5 * theta_true))
    out0 = model(b)
    out0.cost.backward()
    g0 = model.phi.grad.clone()
    model.zero_grad(set_to_none=True)
    out1 = model(moved)
    out1.cost.backward()
    assert abs(float(out1.cost.detach()) / float(out0.cost.detach()) - 1) < 1e-12
    assert float((model.phi.grad - g0).norm() / g0.norm()) < 1e-10


def test_per_batch_cache_is_reused_and_invalidated(geom, theta_true, grad_sample):
    """``forward`` caches its Phi-independent per-batch part on the batch: reused while nothing
    changes (also across Phi updates), rebuilt when a tensor of the batch is modified in place or
    replaced, or for another model or precision; ``cache=False`` gives the same result; pickling
    drops it."""
    b = TrackBatch(grad_sample.sensor, grad_sample.local.clone(), grad_sample.mask, grad_sample.event,
                   grad_sample.n_events, grad_sample.vertex)
    model = ITSAlignmentModel.from_geometry(geom)
    model.set_theta(torch.from_numpy(0.5 * theta_true))
    with torch.no_grad():
        c0 = float(model(b).cost)
        plan = b.__dict__["_fast_plan"]
        model.set_theta(torch.from_numpy(0.25 * theta_true))  # Phi changes, the batch does not
        c1 = float(model(b).cost)
        assert b.__dict__["_fast_plan"] is plan
        assert c1 == float(model(b, cache=False).cost)
        assert abs(c1 / float(model.forward_autograd(b).cost) - 1) < 1e-12
        assert c1 != c0
        b.local[0, 0, 0] += 0.01  # in place: the version counter changes
        c2 = float(model(b).cost)
        assert b.__dict__["_fast_plan"] is not plan
        assert c2 == float(model(b, cache=False).cost) and c2 != c1
        plan = b.__dict__["_fast_plan"]
        b.local = b.local.clone()  # replaced
        model(b)
        assert b.__dict__["_fast_plan"] is not plan
        plan = b.__dict__["_fast_plan"]
        m32 = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(precision="float32"))
        m32(b)
        assert b.__dict__["_fast_plan"] is not plan
        model(b, cache=False)
        assert b.__dict__["_fast_plan"].key[4] == torch.float32  # cache=False leaves the cache alone
    back = pickle.loads(pickle.dumps(b))
    assert "_fast_plan" not in back.__dict__
    assert len(pickle.dumps(b)) < 2 * len(pickle.dumps(TrackBatch(b.sensor, b.local, b.mask, b.event, b.n_events,
                                                                  b.vertex)))
    torch.testing.assert_close(back.local, b.local)


@pytest.mark.parametrize("vertex, ms", [("given", True), ("fit", True), ("none", True), ("given", False)])
def test_float32_precision_runs_and_agrees(geom, theta_true, grad_sample, vertex, ms):
    """``precision="float32"``: per-hit arithmetic in float32 (positions relative to the vertex),
    the weights and all per-track solves in float64. Measured against float64 on this
    sample: cost within 2e-6 relative, gradient within 1e-4 of the float64 fast path, and of
    float64 autograd within the fast path's own difference to it (2e-5 .. 8e-4); on the full ITS2
    (default simulation, 160k tracks) 6e-5 .. 1e-4 of the float64 gradient halfway to the truth
    and 1.2e-3 at the truth, where the gradient is statistical noise only. Tolerances: cost 1e-5,
    gradient 1e-3 against float64 fast, 2e-3 against float64 autograd."""
    cfg = dict(vertex=vertex, multiple_scattering=ms)
    m64 = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(**cfg))
    m32 = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(precision="float32", **cfg))
    for m in (m64, m32):
        m.set_theta(torch.from_numpy(0.5 * theta_true))
    g64, auto64 = _grads(m64, grad_sample)
    out32 = m32(grad_sample)
    out32.cost.backward()
    with torch.no_grad():
        assert abs(float(out32.cost) / float(m64(grad_sample).cost) - 1) < 1e-5
    assert out32.chi2.dtype == torch.float64 and m32.phi.grad.dtype == torch.float64
    assert float((m32.phi.grad - g64).norm() / g64.norm()) < 1e-3
    assert float((m32.phi.grad - auto64).norm() / auto64.norm()) < 2e-3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_cuda_forward_matches_cpu(geom, theta_true, grad_sample, precision):
    cfg = ITSAlignmentConfig(precision=precision)
    cpu = ITSAlignmentModel.from_geometry(geom, cfg)
    cpu.set_theta(torch.from_numpy(0.5 * theta_true))
    gpu = ITSAlignmentModel.from_geometry(geom, cfg).cuda()
    gpu.set_theta(torch.from_numpy(0.5 * theta_true).cuda())
    out_cpu, out_gpu = cpu(grad_sample), gpu(grad_sample)
    out_cpu.cost.backward()
    out_gpu.cost.backward()
    tol = 1e-10 if precision == "float64" else 1e-4
    assert abs(float(out_gpu.cost.detach()) / float(out_cpu.cost.detach()) - 1) < tol
    assert float((gpu.phi.grad.cpu() - cpu.phi.grad).norm() / cpu.phi.grad.norm()) < 10 * tol


# ------------------------------------------------------------------------------------------------
# chi^2 at the true geometry


def _expected_chi2(model: ITSAlignmentModel, batch: TrackBatch, res: dict[str, torch.Tensor], pt: torch.Tensor,
                       ms: bool, var_vertex: tuple[float, float]) -> torch.Tensor:
    """Expected chi^2 per track, E = tr(P C), for the fit as the model does it (diagonal weights
    W, linearised residual derivatives J, ``P = W - W J (J^T W J)^-1 J^T W``) and the true
    covariance C of the measurement errors: intrinsic resolution, the vertex resolution
    ``var_vertex = (xy, z)`` (0 for an exact vertex) and, with ``ms``, the full correlated
    multiple-scattering covariance (Highland with the generated momentum, a thin scatterer at
    every hit: ``C_ij += theta0_l^2 (s_i - s_l)(s_j - s_l)``, s the arc length). Independent of
    the model's own multiple-scattering weights."""
    t, k = batch.sensor.shape
    m = batch.mask.to(torch.float64)
    x, y, arc = res["x"], res["y"], res["arc"]
    kap, c, s = res["kappa"][:, None], res["cos"][:, None], res["sin"][:, None]
    tl = res["tanl"]
    sec2 = 1.0 + tl * tl
    gx, gy = 2 * kap * x + s, 2 * kap * y - c  # residual gradient (circle normal)
    gn = torch.sqrt(gx * gx + gy * gy)
    rot = model.rot_geom[batch.sensor]
    eu, ew = rot[..., 0], rot[..., 2]
    cfg = model.config
    var_e = (cfg.sigma_u * (eu[..., 0] * gx + eu[..., 1] * gy)) ** 2
    var_z = cfg.sigma_v**2 + (cfg.sigma_u * tl[:, None] * (eu[..., 1] * gx - eu[..., 0] * gy) / gn) ** 2
    c_xy = torch.diag_embed(var_e * m)
    c_z = torch.diag_embed(var_z * m)
    if ms:
        cos_inc = ((-gy * ew[..., 0] + gx * ew[..., 1]) / gn).abs() / sec2.sqrt()[:, None]
        x0 = torch.from_numpy(np.asarray(model.layer_x0))[model.sensor_layer[batch.sensor]]
        p = (pt * sec2.sqrt())[:, None].expand(t, k)
        th2 = torch.from_numpy(highland_theta0(p.numpy(), (x0 / cos_inc.clamp_min(1e-3)).numpy())) ** 2 * m
        lever = (arc[:, :, None] - arc[:, None, :]).clamp_min(0.0) * m[:, :, None]  # (T, i, l): s_i - s_l
        c_ms = torch.einsum("til,tjl,tl->tij", lever, lever, th2)
        c_xy = c_xy + c_ms * sec2[:, None, None]
        c_z = c_z + c_ms * (sec2 * sec2)[:, None, None]

    def pad(cov: torch.Tensor, var: float) -> torch.Tensor:
        out = torch.zeros(t, k + 1, k + 1, dtype=torch.float64)
        out[:, :k, :k] = cov
        out[:, k, k] = var
        return out

    zero, one = torch.zeros(t, 1, dtype=torch.float64), torch.ones(t, 1, dtype=torch.float64)
    j_xy = torch.stack([torch.cat([(x * x + y * y) * m, zero], 1), torch.cat([(x * c + y * s) * m, zero], 1),
                        torch.cat([m, one], 1)], -1)  # d e / d(kappa, phi, delta), vertex row last
    j_z = torch.stack([torch.cat([m, one], 1), torch.cat([arc * m, zero], 1)], -1)  # d rz / d(z0, tanl)
    # the vertex z residual also sees the xy vertex error along the track: tan(lambda)^2 var_xy
    var_vz = var_vertex[1] + var_vertex[0] * tl * tl
    c_z = pad(c_z, 0.0)
    c_z[:, k, k] = var_vz
    w_xy = torch.cat([res["w_xy"], res["wv_xy"][:, None]], 1)
    w_z = torch.cat([res["w_z"], res["wv_z"][:, None]], 1)

    def trace_pc(j: torch.Tensor, w: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        j = j / j.abs().amax(1, keepdim=True)
        wj = w[..., None] * j
        p = torch.diag_embed(w) - wj @ torch.linalg.solve(j.transpose(1, 2) @ wj, wj.transpose(1, 2))
        return torch.einsum("tij,tji->t", p, cov)

    return trace_pc(j_xy, w_xy, pad(c_xy, var_vertex[0])) + trace_pc(j_z, w_z, c_z)


def _truth_chi2(geom, theta, ms: bool, smear: bool, n_events: int = 400, seed: int = 21):
    cfg = ITSAlignmentConfig(multiple_scattering=ms)
    batch, pt = _sample(geom, theta, n_events, ms=ms, seed=seed)
    if smear:
        batch = _smear_vertex(batch, cfg, seed)
    model = ITSAlignmentModel.from_geometry(geom, cfg)
    model.set_theta(torch.from_numpy(theta))
    with torch.no_grad():
        res = model._evaluate(batch, model.phi, need_grad=False)
    var_v = (cfg.sigma_vertex_xy**2, cfg.sigma_vertex_z**2) if smear else (0.0, 0.0)
    expected = _expected_chi2(model, batch, res, pt, ms, var_v)
    chi2, ndf = res["chi2"], res["ndf"]
    ratio = float(chi2.sum() / ndf.sum())
    # statistical error of the ratio estimator sum(chi2) / sum(ndf) from per-event sums (the
    # tracks of an event share its vertex, so they are not independent)
    ev_chi2 = torch.zeros(batch.n_events, dtype=torch.float64).index_add_(0, batch.event, chi2)
    ev_ndf = torch.zeros(batch.n_events, dtype=torch.float64).index_add_(0, batch.event, ndf)
    err = float(torch.sqrt(((ev_chi2 - ratio * ev_ndf) ** 2).sum()) / ndf.sum())
    return model, batch, float(res["cost"]), ratio, err, float(expected.sum() / ndf.sum())


def test_chi2_per_ndf_is_one_without_multiple_scattering(geom, theta_true):
    """Correctly modelled errors (intrinsic resolution, vertex measured with sigma_vertex): the
    mean chi2/ndf at the true geometry is 1 within its statistical error (measured 0.990 +-
    0.012 on this sample, 1.002 +- 0.002 on 16000 events; 0.998 +- 0.004 on the full ITS2 with
    |eta| < 1). The ideal (wrong) geometry costs ~87."""
    model, batch, cost, ratio, err, expected = _truth_chi2(geom, theta_true, ms=False, smear=True)
    assert abs(expected - 1.0) < 2e-3  # tr(P C) = ndf when W = C^-1
    assert abs(ratio - 1.0) < 3 * err
    assert abs(cost - 1.0) < 4 * err
    ideal = ITSAlignmentModel.from_geometry(geom, model.config)
    with torch.no_grad():
        assert float(ideal(batch).cost) > 20.0 * cost


def test_chi2_with_an_exact_vertex_follows_its_expectation(geom, theta_true):
    """A vertex without error (simulation truth, as ``pack_tracks`` gives it) weighted with
    sigma_vertex contributes less than its degrees of freedom: E = tr(P C) with zero vertex
    variance, 0.775 here; measured 0.777 +- 0.008."""
    _, _, _, ratio, err, expected = _truth_chi2(geom, theta_true, ms=False, smear=False)
    assert 0.7 < expected < 0.85
    assert abs(ratio - expected) < 3 * err


@pytest.mark.parametrize("smear", [True, False])
def test_chi2_with_multiple_scattering_follows_its_expectation(geom_full_active, smear):
    """With multiple scattering the per-hit variances sigma^2 = sigma_int^2 + sigma_MS^2 are
    right on average, but the scattering displacements are correlated along the track (one
    kick moves every later hit) and the 5 track parameters absorb most of that coherent part:
    E[chi2] = tr(P C_true) < ndf. Measured 0.648 +- 0.010 (vertex with its resolution; tr(P C)
    gives 0.652) and 0.569 +- 0.008 (exact vertex; 0.569). On this geometry the active matrix
    fills the chip so that every scatterer is a hit; on the real layout the dead chip edges add
    scatterers without hits and the measured value (0.667, 0.580) is ~5 % above the hits-only
    estimate (0.639, 0.550). The ideal geometry costs ~24."""
    geom = geom_full_active
    theta = misalign(geom, MISALIGN)
    model, batch, cost, ratio, err, expected = _truth_chi2(geom, theta, ms=True, smear=smear)
    assert 0.5 < expected < 0.75
    assert abs(ratio - expected) < 3 * err + 0.02 * expected
    ideal = ITSAlignmentModel.from_geometry(geom, model.config)
    with torch.no_grad():
        assert float(ideal(batch).cost) > 10.0 * cost


def test_the_scattering_step_is_the_fit_with_the_full_covariance():
    """``_gls_step`` (the kicks as parameters under a unit prior) against the generalised
    least-squares step written out with the dense covariance ``S = diag(var) + G G^T``:
    ``-(J^T S^-1 J)^-1 J^T S^-1 r``."""
    gen = torch.Generator().manual_seed(7)
    t, n, p, q = 50, 9, 3, 6
    jac = torch.randn(t, n, p, generator=gen, dtype=torch.float64)
    kicks = torch.randn(t, n, q, generator=gen, dtype=torch.float64) * torch.rand(t, 1, q, generator=gen,
                                                                                   dtype=torch.float64)
    res = torch.randn(t, n, generator=gen, dtype=torch.float64)
    var = 0.1 + torch.rand(t, n, generator=gen, dtype=torch.float64)
    s = torch.diag_embed(var) + kicks @ kicks.transpose(1, 2)
    sj = torch.linalg.solve(s, jac)
    want = -torch.linalg.solve(jac.transpose(1, 2) @ sj, sj.transpose(1, 2) @ res[..., None])[..., 0]
    got = ITSAlignmentModel._gls_step(jac, kicks, res, var)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


def test_the_weights_do_not_depend_on_theta(geom, theta_true, grad_sample):
    """The weights come from the hits on the ideal geometry: the same at every Theta, in the
    padded evaluation and in the fast path's per-batch layout."""
    model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig())
    with torch.no_grad():
        w0 = model._evaluate(grad_sample, model.phi, need_grad=False)
        model.set_theta(torch.from_numpy(theta_true))
        w1 = model._evaluate(grad_sample, model.phi, need_grad=False)
    for key in ("w_xy", "w_z", "wv_xy", "wv_z"):
        assert torch.equal(w0[key], w1[key]), key
    plan = model._plan(grad_sample, 8192, torch.float64, False, "test")
    for ch in plan.chunks:
        n = ch.w_xy.shape[0]
        torch.testing.assert_close(ch.w_xy, w0["w_xy"][ch.idx, :n].t(), rtol=1e-10, atol=0.0)
        torch.testing.assert_close(ch.w_z, w0["w_z"][ch.idx, :n].t(), rtol=1e-10, atol=0.0)


def _signed_mean_residuals(model: ITSAlignmentModel, batch: TrackBatch, n_layers: int) -> tuple[np.ndarray, ...]:
    """Per layer the weighted mean xy residual signed by the track's curvature (um) and its
    statistical error, from the tracks' own scatter: ``sum w e sign(kappa) / sum w``."""
    num, den, var = np.zeros(n_layers), np.zeros(n_layers), np.zeros(n_layers)
    for lo in range(0, batch.n_tracks, 40_000):
        idx = torch.arange(lo, min(batch.n_tracks, lo + 40_000))
        ev, inv = torch.unique(batch.event[idx], return_inverse=True)
        sub = TrackBatch(batch.sensor[idx], batch.local[idx], batch.mask[idx], inv, len(ev), batch.vertex[ev])
        with torch.no_grad():
            res = model._evaluate(sub, model.phi, need_grad=False)
        lay = model.sensor_layer[sub.sensor].numpy()
        w = res["w_xy"].numpy() * sub.mask.numpy()
        we = w * res["e"].numpy() * np.sign(res["kappa"].numpy())[:, None]
        for li in range(n_layers):
            m = lay == li
            num[li] += we[m].sum()
            den[li] += w[m].sum()
            var[li] += (we[m] ** 2).sum()
    return num / den * 1e3, np.sqrt(var) / den * 1e3


def test_the_weights_leave_the_residuals_unbiased_with_multiple_scattering():
    """At the true geometry a hit's residual has mean zero under any weights that do not
    depend on its noise; weights computed from a track's own fitted momentum do (a track bent
    more by its kicks looks softer and gets larger scattering variances), and the weighted
    residuals then lean to one side of the curvature, which a fit of the geometry reads as
    displaced layers. The full ITS2 with multiple scattering, 15,000 events: with the weights'
    momentum and dip from the fit with the full scattering covariance the weighted mean residual
    signed by the curvature is zero within 3.5 of its statistical errors in every layer
    (measured -0.16 / -0.15 / -0.08 / +0.43 um in layers 3-6, errors 0.20-0.48 um, at most 0.9
    of them in any layer); with the first fit's momentum (unit weights and the vertex) it is -5.4
    / -4.3 / +4.9 / +9.5 um there, 19-21 of its errors."""
    from streamcal.detectors.its.evaluation import simulate_eval_sample

    geom = build_geometry()
    batch = simulate_eval_sample(geom, SimulationConfig(seed=11), 15_000, inner_hit=False).batch
    model = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig())
    mean, err = _signed_mean_residuals(model, batch, geom.n_layers)
    assert np.all(np.abs(mean) < 3.5 * err), (mean, err)
    plain = ITSAlignmentModel.from_geometry(geom, ITSAlignmentConfig(multiple_scattering=False))
    model._weight_fit = plain._weight_fit  # the first fit alone: no scattering step
    mean_first, err_first = _signed_mean_residuals(model, batch, geom.n_layers)
    assert np.max(np.abs(mean_first) / err_first) > 5.0, (mean_first, err_first)


# ------------------------------------------------------------------------------------------------
# Bad input


def _tiny_batch(geom) -> TrackBatch:
    t, k = 3, 4
    return TrackBatch(
        sensor=torch.zeros(t, k, dtype=torch.int64) + torch.arange(k) * 40,
        local=torch.zeros(t, k, 2, dtype=torch.float64),
        mask=torch.ones(t, k, dtype=torch.bool),
        event=torch.zeros(t, dtype=torch.int64),
        n_events=1,
        vertex=torch.zeros(1, 3, dtype=torch.float64),
    )


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("local", lambda b: torch.where(torch.arange(b.local.numel()).view(b.local.shape) == 5, math.nan, b.local),
         "local"),
        ("local", lambda b: b.local[..., :1], "local"),
        ("sensor", lambda b: b.sensor + 10_000, "sensor"),
        ("sensor", lambda b: b.sensor[:, :, None], "sensor"),
        ("sensor", lambda b: b.sensor.to(torch.float64), "sensor"),
        ("mask", lambda b: b.mask.to(torch.int64), "mask"),
        ("mask", lambda b: b.mask & torch.tensor([True, True, False, False]), "mask"),
        ("event", lambda b: b.event[:2], "event"),
        ("event", lambda b: b.event + 5, "event"),
        ("vertex", lambda b: torch.zeros(2, 3, dtype=torch.float64), "vertex"),
        ("vertex", lambda b: torch.full((1, 3), float("nan"), dtype=torch.float64), "vertex"),
        ("vertex", lambda b: None, "vertex"),
    ],
)
def test_bad_batch_raises_value_error_naming_the_field(geom, field, value, match):
    model = ITSAlignmentModel.from_geometry(geom)
    batch = _tiny_batch(geom)
    setattr(batch, field, value(batch))
    with pytest.raises(ValueError, match=match):
        model(batch)
    with pytest.raises(ValueError, match=match):
        model.forward_autograd(batch)


def test_bad_parameters_raise_value_error_naming_the_argument(geom):
    model = ITSAlignmentModel.from_geometry(geom)
    rot, trans, half = _params(geom)
    n = geom.n_sensors
    good = torch.zeros(n, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match="theta"):
        model.set_theta(torch.zeros(n, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="theta"):
        model.set_theta(torch.full((n, 6), float("nan"), dtype=torch.float64))
    with pytest.raises(ValueError, match="theta"):
        model.jacobian(torch.zeros(n + 1, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="phi"):
        phi_to_theta(torch.zeros(n, 6, dtype=torch.float64), rot, trans, half)
    with pytest.raises(ValueError, match="phi"):
        phi_to_theta(torch.full((n, 9), float("inf"), dtype=torch.float64), rot, trans, half)
    with pytest.raises(ValueError, match="rot_geom"):
        theta_to_phi(good, rot[:-1], trans, half)
    with pytest.raises(ValueError, match="trans_geom"):
        phi_theta_jacobian(good, rot, trans[:, :2], half)
    with pytest.raises(ValueError, match="half"):
        theta_to_phi(good, rot, trans, torch.tensor([1.0, -1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_tracks"):
        model(_tiny_batch(geom), chunk_tracks=0)
    layer = torch.as_tensor(geom.layer.astype("int64"))
    radius, x0 = torch.as_tensor(geom.layer_radius), torch.as_tensor(geom.layer_x0)
    cfg = ITSAlignmentConfig()
    with pytest.raises(ValueError, match="rot_geom"):
        ITSAlignmentModel(cfg, rot[:, :2], trans, (1.0, 1.0), layer, radius, x0)
    with pytest.raises(ValueError, match="trans_geom"):
        ITSAlignmentModel(cfg, rot, trans[:-1], (1.0, 1.0), layer, radius, x0)
    with pytest.raises(ValueError, match="sensor_layer"):
        ITSAlignmentModel(cfg, rot, trans, (1.0, 1.0), layer + 10, radius, x0)
    with pytest.raises(ValueError, match="layer_x0"):
        ITSAlignmentModel(cfg, rot, trans, (1.0, 1.0), layer, radius, x0[:-1])
    with pytest.raises(ValueError, match="half"):
        ITSAlignmentModel(cfg, rot, trans, (1.0, math.nan), layer, radius, x0)
    with pytest.raises(ValueError, match="trans_geom"):
        ITSAlignmentModel(cfg, rot, trans.clone().fill_(math.nan), (1.0, 1.0), layer, radius, x0)
    with pytest.raises(ValueError, match="sigma_u"):
        ITSAlignmentConfig(sigma_u=0.0)
