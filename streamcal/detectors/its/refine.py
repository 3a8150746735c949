"""Global Gauss-Newton refinement of an ITS2 alignment: matrix-free projected preconditioned
conjugate gradients on the normal equations of the cost C, track parameters profiled out.

Why. The workers' block Gauss-Newton step (``align.ThetaOptimizer``, method ``"gn"``)
preconditions the gradient with the per-sensor blocks ``D`` of the cost without the track-fit
projection (``D >= H``). That is Jacobi on ``H``: it converges fast for what one sensor's hits
determine, slowly along directions that couple sensors through the tracks (a chip's shift is seen
only relative to the layers its tracks cross). On the full ITS2 after 8 epochs the outer layers
are at their statistical limit but the inner layers are not; the cost at the constrained truth is
below the fit's. :func:`refine` solves the linearised problem globally instead. (The full-ITS2
figures here were measured before the errors took the scattering's correlation along the track,
``align.noise_factors``, and before the scattering weights came from a fit with that covariance
on the ideal geometry, ``ITSAlignmentModel._weight_fit``; the README has the seed's 5M events
after both.)

The linearised problem (as :func:`~streamcal.detectors.its.align.normal_equations`)::

    C(Theta + d) ~ C + g^T d + d^T H d / 2,   H = sum_tracks 2 c_t V_t^T P_t V_t

with, per track, ``V_t`` the hit residuals' derivatives by the Theta of their own sensor at fixed
track parameters (``align._hit_theta_derivatives``; xy and z residuals), ``P_t = W - W J (J^T W
J)^-1 J^T W`` the track fit's projector (``align._projector_blocks``; the vertex residual takes
part in the fit but has no Theta derivative, so only ``P_t``'s hit block enters) and ``c_t =
dC/dchi2_t = 1 / (N nu_event)`` (``N`` events with ``nu > 0`` over all batches).

Matrix-free. ``H`` couples every pair of sensors a track crosses; it is never formed.
:func:`gn_matvec` computes ``H p`` for a Theta vector ``p`` (N, 6) track by track: per chunk of
tracks ``a = V p[sensor]`` (one number per hit and residual), ``b = 2 c P a`` (a (K, K) product
per track), scattered back as ``V^T b`` with one ``index_add_``. :func:`gn_system` computes in
one pass the cost, the gradient ``g`` and the per-sensor diagonal blocks of ``H`` (the projected
6 x 6 blocks ``B_s``), used as the preconditioner.

Solver. :func:`refine` runs ``gn_iterations`` Gauss-Newton relinearisations; each solves ``H
delta = -g`` within the constraints (``Q^T delta = 0``, fixed sensors 0) by projected
preconditioned CG (Gould, Hribar and Nocedal, SIAM J. Sci. Comput. 23 (2001) 1376): the
preconditioned residual is projected onto the constraint subspace in the preconditioner's metric,
``y = M^-1 r - M^-1 Q (Q^T M^-1 Q)^-1 Q^T M^-1 r`` (``Constraints.project(M^-1 r, M^-1)``, exact
for a block-diagonal ``M``), so every search direction and the solution satisfy the constraints.
Sensors without hits (no curvature, zero gradient), with fewer than ``min_sensor_hits`` or not
among ``sensors`` are held at their value (added to the fixed ones for the solve). The start is
put on the constraint surface first (as ``align.reference_solution``). One CG iteration is one
pass over the data (one ``H p``).

Two-level preconditioner (``coarse``). Block Jacobi damps what one sensor's hits determine; the
collective motion of a whole layer relative to the others (e.g. the inner barrel turning against
the outer one, held only by a global constraint summed over all chips) it reaches only after many
iterations. A coarse space ``Z`` (:func:`coarse_basis`: rigid-body and weak modes restricted to
each layer, :data:`COARSE_SPACES`) is solved exactly in each iteration (``Z^T H Z``: one pass per
column per Gauss-Newton iteration) and combined with Jacobi in the balancing (BNN) form
(``_CoarseLevel``). On the small test barrel under mode constraints: 1087 instead of 1853 CG
iterations to 1e-10 (tests/its/test_refine.py). The prior's free directions (below) join the
coarse space: the prior no longer damps them, so Jacobi alone reaches them slowly. The coarse
directions are orthonormalised by an SVD of their projections onto the constraint surface (a QR
that drops a dependent column by its diagonal keeps an arbitrary direction in its place, which
leaves the surface and makes CG converge to another problem's solution).

Prior (``presigma_rot``, ``presigma_trans``). Millepede-II's presigma on every active sensor as
a local alignable: pseudo-measurements ``0 +- presigma_rot`` of the three angles of its rotation
about its own centre and ``0 +- presigma_trans`` of the three components of its centre's shift
(:class:`Presigma`: per sensor a constant 6 x 6 block on Theta), their chi2 in C's units divided
by the data's degrees of freedom ``sum_i nu_i``. It adds those blocks to ``H`` (so to the
blocks, the preconditioner, the coarse level and the direct solve), ``P Theta`` to the
gradient, and its term to the objective that the step halving compares; C is reported without it
(``prior`` beside it), so it stays comparable with runs without a prior. Directions the tracks
hardly see end near the nominal geometry instead of wherever the noise puts them, and the
problem is regular without constraints. Measured on the full ITS2 run above, with the prior then
on Theta's own components (the shift of the global origin, which counts an outer chip's rotation
about its centre as 20-40 um of translation: see the sparse solver's figures below), ``coarse``
rigid and the misalignment's own scale (``presigma_rot`` 1e-4 rad, ``presigma_trans`` 0.02 mm;
``sum_i nu_i`` = 3.86e7):
55 and 41 CG iterations to 1e-4 (150 and 109 without the prior), 1642 s; the first full step
changes the objective by -0.005594 for -0.005648 predicted and the second is taken whole (without
the prior it was halved). C 0.58037 -> 0.57670 (without: 0.57447, below the truth's 0.57697 by
the fitted noise of the barely measured DoFs), the prior's term 0.00217 -> 0.00025. Inner layers
over the reached chips: du 0.48, 0.61, 0.72 um (without the prior 2.7, 3.5, 4.3), dv 0.26-0.36
(2.6-4.5), dw 0.55-0.90 (1.6-2.6) um, rot_u 24-40 (37-84), rot_v 49-63 (131-141), rot_w 11-21
(14-21) urad, at their lone-chip statistical errors (pulls 0.8-2.1); the inner barrel's rigid
offset against the truth tx, ty 0.11, 0.09 um, rz -17 urad (2.1, -0.9 um, -100 urad without:
the flat direction existed only jointly with the outer chips' free out-of-plane DoFs). The
outer layers stay at the misalignment's scale (du 5.5-16, dv 12-20, dw 17-25 um, rotations
100-116 urad RMS) instead of 0.1-0.6 mm and 1-15 mrad. DCA_xy on fresh tracks is unchanged
(worst |bias| 0.53 um, 1.2 sigma; resolution within 1.6 % of the ideal geometry). A ten times
looser prior (1e-3 rad, 0.2 mm; 113 and 108 CG iterations, 1333 s) lies in between: du 1.6,
2.1, 2.5 um, rot_v 94-107 urad, offset tx 1.5 um, rz -53 urad, outer dw 32-81 um. Only the
outer chips' prior holds that direction, so the inner barrel's result depends on their sigma.

Free directions (``presigma_free``). Per-chip pseudo-measurements towards the nominal geometry
also hold coherent deformations of the whole detector, with the weight of every chip they move:
on the full ITS2 (seed's 5M events, the sparse solve below) an elliptical barrel in the truth
(``dR = c R cos 2 phi``, c = 3e-5: 0.7-1.1 um in the inner barrel, 12 um at 392 mm) was recovered
to 21 %; what was left made the inner barrel's dw residual (0.41 / 0.55 / 0.69 um, 87 % of it that
mode) and, through what the fit did to make up for it (du and rot_v ~ sin 2 phi: 0.3-0.46 um, 34
urad), most of its du and rot_v (pulls 3 and 1.4-2.8). ``presigma_free`` (``--presigma-free``
modes) holds each chip at the nominal geometry up to a combination of the given directions: the
prior's curvature ``B - B M (M^T B M)^+ M^T B`` (:class:`_PriorTerm`), a rank-m correction of
the block prior in ``H p``, the direct solve and the error replicas' noise; the block-Jacobi
preconditioner keeps ``B``. With elliptical, clamshell, skew, conical, twist and the rigid
tx, ty, tz, rx, ry free (one Gauss-Newton iteration from the solution below) the elliptical mode
is recovered to 93 %, the inner du falls to 0.14 / 0.18 / 0.21 um and rot_v to 18 / 18 / 21
urad, both now at their sampled errors (pulls 1.4 and 1.3 / 1.0 / 0.8), dw to 0.14-0.22 um,
rot_u and rot_w stay (6.7 / 8.9 / 13.0, 3.4 / 4.1 / 5.5 urad), the outer layers' pulls are 0.6-1.15
in every DoF (dw 12-23 um from 13-24); 124 CG iterations, to 4.1e-8 and then the rounding floor,
with the free directions in the coarse space (284, stalled at 1.4e-7, without them: the same
step to 6e-10 mm; 130 to 1e-8 without free directions), peak RSS 3.6-3.9 GB with 32 replicas.
The dilations are best left
held: with radial and zexpansion free as well, the step ran the outer barrel 0.1-0.25 mm inwards
(radial and z expansion of -4e-4 together, the inner barrel staying) and C fell four times as
much as the linearised step predicted, far outside the sampled errors. A dilation rescales every
track's fitted momentum, which nothing in the cost measures but the vertex term and the
multiple-scattering weights. On 300k of the events, C of that dilated geometry is lower than
the solution's by 123.8 / N_events; with every track's weights held at their values on the
solution's geometry, by 36.6 / N_events: seven tenths of the pull is the weights themselves (a
smaller outer barrel lowers the fitted momenta, so raises the scattering errors and lowers the
chi2), the remaining pull is not isolated. (Measured when the weights followed each Theta's
fitted momenta; they now come from the ideal geometry and do not depend on Theta.) Intrinsic-only weights are no test: on data with
multiple scattering they move C's minimum along a global dilation off the truth (radial -2.8e-4,
z expansion -6.8e-4, 100k fresh events; with the scattering weights it is within 5e-6 of the
truth). So the prior keeps holding it (the inner dv keeps a z expansion of -3e-6: 0.2-0.3 um,
pulls 2.8-3.8). In the
test (tests/its/test_refine.py) a barrel deformed only elliptically, tracks without hit noise, a
tight prior: 2 % of the mode recovered with the prior on every direction, the truth to 1e-4 with
the mode free.

Direct solver (``solver="direct"``). For a subset of sensors (``sensors``; the others held, as the
reference) the Gauss-Newton matrix restricted to their parameters is formed densely in the system
pass (:class:`_DenseBlock`: per track, every pair ``i <= j`` of its hits on solved sensors, ``2 c_t
P_ij v_i v_j^T``, tracks grouped by their number of such hits so that nothing is padded) and each
step is solved exactly in the constraints' null space (``Z^T H Z`` by eigen-decomposition,
:func:`_direct_step`): one pass per Gauss-Newton iteration instead of one per CG iteration, no
linearisation kept, so the data can be far larger than the CG cache allows (Millepede-II's
"inversion" method). The solve also gives each solved sensor's covariance block
(:attr:`RefineResult.theta_cov`, ``theta_cov.npy`` of ``refine_run``): the sandwich ``K V K`` of
``align.ReferenceSolution`` with ``K = Z (Z^T H Z)^+ Z^T`` and ``V`` the gradient's covariance,
accumulated with ``H`` in the same scatter (each track's term weighted by ``2 c_t`` once more), the
prior's pseudo-measurements included; conditional on the held sensors. On the small test barrel it
equals the dense KKT sandwich to rounding, and Monte Carlo pulls over 30 independent samples have
RMS 0.99. On the full ITS2 the inner barrel (432 chips, 2,592 parameters) costs ~25 % more per pass
than the plain system pass (2.2-2.4 against 1.7-1.9 s per 128k tracks, one thread, H and V) and
seconds for the solve. The held sensors are the frame: with ``mode_constraints`` off
(``refine_run``) the inner barrel's collective motion relative to the outer one is measured rather
than held at its start. Rigid bodies (``bodies``, ``refine_run``'s ``rigid_layers``): groups of
sensors that take one common step, e.g. the outer barrel's 144 staves beside the inner barrel's
chips (576 units, 3,456 parameters); their hits enter the dense matrix through the group's block
(:class:`_DenseBlock` maps each sensor to its unit), their gradient, prior curvature and constraint
rows are summed over the group (Millepede's hierarchy of alignables: staves as well as chips). The
held sensors' errors enter the solved sensors' result: on a 1M-event run, from the workers' Theta
(outer layers' means off by up to 16 um in z and -43 urad in rot_u) the inner barrel ends at du
1.5-2.3 um (pulls 23-45, against 0.27-0.40 um after the global refine): the held sensors must come
from a global solve. From the global refine of 1M events (CG, prior 1e-4 rad / 0.02 mm on Theta's
own components), the inner barrel solved directly on 5M events (the seed's data: 39.9M tracks, one
Gauss-Newton iteration, its predicted change -1.626e-5 against -1.637e-5 actual; 1224 s for the pass
on a shared machine): inner layers rot_w 3.6 / 4.5 / 6.0 urad (1M: 7.0 / 9.1 / 13.7), rot_u 8.3 /
11.4 / 16.1, rot_v 27 / 27 / 30, du 0.24-0.36 um, dv 0.16-0.21 um. The solve's own errors (RMS over
each layer's chips) are rot_w 3.0 / 4.3 / 6.9, rot_u 5.5 / 7.8 / 12.7, rot_v 12 / 16 / 26 urad, du
0.05-0.08 um: rot_w is at that limit (pulls 1.1 / 1.0 / 0.8), rot_u and rot_v 1.1-2.8 times above it
and the translations 6-7 times (the held outer chips' errors, which the covariance, conditional on
them, does not count); with the outer barrel set to the truth (a diagnostic) the same solve gives
pulls 0.8-1.4 for the rotations. Those outer errors are chip by chip: on 1M events, the outer chips'
Theta with their staves' mean error removed (to the truth; rigid staves could do no more) leaves the
inner barrel's rotations as they were (rot_u 14.0 / 18.2 / 25.1 against 14.1 / 18.2 / 25.2 urad).

Sparse solver (``solver="sparse"``). The system pass assembles ``H`` of all solved sensors
block-sparse (:class:`_SparseBlocks`): per track every pair of its hits on solved sensors adds a
6 x 6 block (:func:`_track_pair_blocks`, shared with the direct solver), summed under the sorted
keys of the sensor pairs. The full ITS2's tracks connect 1.24M pairs (2.48M blocks of the
symmetric matrix, 0.68 GB); the CG iterations multiply by it in memory (0.1 s each instead of a
pass over the data), so the whole detector is solved on all events to any tolerance (Millepede-II's
sparse mode, there with MINRES; here the projected CG with block Jacobi and the coarse level).
The errors (``error_samples``): ``k`` noise replicas of the data, residuals drawn with their
noise (``align.noise_factors``: the intrinsic errors, the scattering kicks correlated along the
track, the vertex's resolution), give ``k`` gradients ``g ~ N(0, V)`` in the same pass
(:class:`_NoiseGradients`), each solved through ``K`` in memory; the mean of ``x x^T`` is ``K V
K`` to ``sqrt(2 / k)`` per variance (on the test barrel against the direct solver's exact
sandwich: RMS deviation 0.10 for ``k`` = 200, pooled within 2.5 %).

Measured on the full ITS2 with the seed's 5M events (39.9M tracks) from the global refine of 1M
events (``streamcal its refine --run RUN --start-from REFINED --out OUT --solver sparse
--gn-iterations 1 --cg-iterations 4000 --tol 1e-8 --coarse rigid --min-sensor-hits 100
--presigma-rot 1e-4 --presigma-trans 0.02 --threads 2``, 2 cores): the pass 1,290 s (925 s with the
cores to itself), 19,107 chips solved, 130 CG iterations to 1e-8 in 14 s; ``d(C + prior)`` -2.07e-4
for -1.91e-4 predicted, peak RSS 3.3 GB; a second Gauss-Newton iteration (``--start-from`` its
result) predicts -6.0e-8 (times events -0.3) and moves the inner chips by hundredths of their errors
(converged). With 32 error replicas the pass takes 1,572 s, their solves 447 s, peak RSS 4.7 GB
(3.5 GB in another run of the same options: the assembly's peak varies). Inner layers (0 /
1 / 2; ``evaluate align``, the chips with >= 100 expected hits) rot_u 6.7 / 8.9 / 12.9, rot_w 3.3 /
4.1 / 5.5, rot_v 30 / 30 / 32 urad, du 0.26-0.38, dv 0.20-0.29, dw 0.41-0.69 um; outer layers (3 / 4
/ 5 / 6) du 5.2 / 4.0 / 6.8 / 11.0, dv 9.8 / 9.9 / 12.4 / 15.4, dw 13 / 13 / 20 / 24 um, rotations
83-102 urad (the misalignment: 100 urad; the data hardly measure an outer chip's tilts, its errors
are the prior's). Against the sampled errors the outer layers' pulls are 0.6-1.2 in every DoF, the
inner rot_u and rot_w 0.8-1.2; the inner translations (pulls 2.9-6.0, residuals 0.2-0.7 um against
errors of 0.04-0.18 um) and rot_v (2.8 / 2.1 / 1.4, strongly anticorrelated with du: -0.8) keep a
part that the errors of the cost's hit model do not explain, a few tenths of a micrometre. The
prior's shape matters: with the prior on Theta's components (``presigma_trans`` on the global
origin's translations, which for a chip 200-400 mm out must absorb its rotation about its centre,
20-40 um) the same solve left the outer layers' tilts at 108-112 urad with pulls 1.2-2.6 (du 4.6 /
2.9 / 6.1 / 10.7, dv 10-17, dw 14-26 um) and the inner rot_u at 8.0 / 11.7 / 16.6 urad; widening
that prior to 0.05 mm made the outer dv and dw worse (layers 5-6 dw 44 and 53 um) and the inner
rot_u 8.3 / 13.9 / 20.3. On an ITS2-like test barrel (the seven ITS2 radii and materials, 384 chips,
40k events, multiple scattering, a realistic pT spectrum, direct solve, three samples) the local
prior's pulls are 0.8-1.24 in every layer and DoF, the prior on Theta's components gave 1.1-2.3 in
the outer layers.

Data. A list of :class:`TrackBatch` (held in memory; the linearisation of every chunk is kept
for the CG iterations of a Gauss-Newton iteration unless ``cache_mb`` limits it) or a callable
returning a fresh iterator over TrackBatch on every call (streamed: memory is bounded by one
batch plus ``cache_mb``; the callable must yield the same tracks every time, checked by the
counts of tracks and events per pass).

Measured on the full ITS2 (24,120 chips; a run of M = 2 workers, 8 epochs of block Gauss-Newton
on 400k events, 3.19M tracks, constraints rz, curl, telescope; ``streamcal its refine`` from its
Theta on all its spooled tracks, sensors with >= 100 hits, linearisation cached in float32,
3.1 GB, one torch thread on a shared 2-core machine): a cost/gradient/blocks pass (read, pack,
linearise) 118-138 s, a CG pass (``H p`` from the cache) 3.6 s median. The predicted cost change
(times events) reaches -1833 after 26 CG iterations and -1839 after 51 (150 run); the actual
change of the first Gauss-Newton step is -2356, the second adds -6 (its full step raised the cost
and was halved: the non-linearity of the poorly measured outer-barrel DoFs). C times events on
the training data: 232147 at the run's Theta, 230786 at the constrained truth, 229786 refined
(the run was 1362 above the truth; the refined fit is at the minimum, below the truth by the
fitted noise). Residual misalignment over the reached chips of the three inner layers, du: 3.2,
3.8, 4.3 um -> 1.6, 2.1, 2.5 um, rot_w 118-140 -> 14-21 urad, dw 4.7-7.7 -> 1.6-2.6 um; on fresh
test tracks C 0.5835 -> 0.5785 and chi2/ndf 0.583 -> 0.578. The outer-barrel out-of-plane DoFs,
which the workers' damped steps had left near 0, go to the values the data give them (dv, dw
0.1-0.6 mm, rot_u, rot_v 1-15 mrad RMS, pulls 0.3-2 against the lone-chip errors): the
unregularised least-squares answer where the tracks hardly see a DoF. Solving for the inner
layers only (``sensors``; the others held) gives du 2.0, 2.5, 2.9 um in 52 CG iterations and
leaves the outer layers as they were.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
import scipy.linalg as sla
import torch
from torch import Tensor

from streamcal.detectors.its.align import (
    Constraints,
    RejectCounts,
    _hit_theta_derivatives,
    _projector_blocks,
    noise_factors,
    pack_tracks,
)
from streamcal.detectors.its.geometry import ITSGeometry
from streamcal.detectors.its.misalignment import RIGID_MODES, WEAK_MODES, mode_vectors
from streamcal.models.its_alignment import ITSAlignmentModel, TrackBatch

__all__ = [
    "TrackSource",
    "GNSystem",
    "gn_system",
    "gn_matvec",
    "gn_block_diagonal",
    "CGRecord",
    "GNRecord",
    "RefineResult",
    "Presigma",
    "refine",
    "coarse_basis",
    "COARSE_SPACES",
    "SOLVERS",
    "REFINE_JSON",
    "SpoolTracks",
    "refine_run",
]

TrackSource = Union[Sequence[TrackBatch], TrackBatch, Callable[[], Iterable[TrackBatch]]]


# ------------------------------------------------------------------------------------------------
# Data and its linearisation


@dataclass
class _Chunk:
    """Linearisation of a chunk of tracks at one Theta (everything the ``H p`` product needs).

    ``pxy``, ``pz`` are the hit blocks of the projectors times ``2 c_t`` with ``c_t = 1/nu_event``
    (not yet divided by the number of events ``N``, known only after a full pass)."""

    sensor: Tensor  # (T, K) int64, 0 on padding
    ve: Tensor  # (T, K, 6) de/dTheta, 0 on padding
    vz: Tensor  # (T, K, 6) drz/dTheta, 0 on padding
    pxy: Tensor  # (T, K, K)
    pz: Tensor  # (T, K, K)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.sensor, self.ve, self.vz, self.pxy, self.pz))

    def to(self, dtype: torch.dtype) -> _Chunk:
        """The chunk with its floating-point arrays in ``dtype``."""
        return _Chunk(self.sensor, self.ve.to(dtype), self.vz.to(dtype), self.pxy.to(dtype), self.pz.to(dtype))


@dataclass
class _Pass:
    """What one pass over the data saw."""

    cost_sum: float = 0.0  # sum_events chi2 / nu
    events: int = 0  # events with nu > 0
    ndf: float = 0.0  # sum_events nu over the events with nu > 0
    tracks: int = 0
    chunks: int = 0


Consumer = Callable[[_Chunk, "TrackBatch | None", "Tensor | None", "dict[str, Tensor] | None"], None]
_CACHE_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _Source:
    """The track data of :func:`refine` and the ``gn_*`` functions: iterates over TrackBatch,
    validates each batch, splits it into chunks of tracks and keeps (part of) their linearisation
    for the passes at the same Theta (in ``cache_precision``)."""

    def __init__(self, model: ITSAlignmentModel, data: TrackSource, where: str, *, chunk_tracks: int,
                 cache_mb: float | None, cache_precision: str = "float64") -> None:
        if not (isinstance(chunk_tracks, int) and not isinstance(chunk_tracks, bool) and chunk_tracks >= 1):
            raise ValueError(f"{where}: chunk_tracks must be an integer >= 1, got {chunk_tracks!r}")
        if cache_mb is not None and not (isinstance(cache_mb, (int, float)) and not isinstance(cache_mb, bool)
                                         and cache_mb >= 0 and math.isfinite(cache_mb)):
            raise ValueError(f"{where}: cache_mb must be a finite number >= 0 (MB) or None, got {cache_mb!r}")
        if cache_precision not in _CACHE_DTYPES:
            raise ValueError(f"{where}: cache_precision must be 'float64' or 'float32', got {cache_precision!r}")
        self.where = where
        self.model = model
        self.chunk_tracks = chunk_tracks
        self.cache_dtype = _CACHE_DTYPES[cache_precision]
        if isinstance(data, TrackBatch):
            data = [data]
        self.factory: Callable[[], Iterable[TrackBatch]] | None = None
        self.batches: list[TrackBatch] | None = None
        if isinstance(data, (list, tuple)):
            self.batches = list(data)
            if not self.batches:
                raise ValueError(f"{where}: data must hold at least one TrackBatch")
            for i, b in enumerate(self.batches):
                if not isinstance(b, TrackBatch):
                    raise ValueError(f"{where}: data[{i}] must be a TrackBatch, got {type(b).__name__}")
            default_cache = math.inf
        elif callable(data):
            self.factory = data
            default_cache = 0.0
        else:
            raise ValueError(f"{where}: data must be a TrackBatch, a list of TrackBatch or a callable returning an "
                             f"iterable of TrackBatch, got {type(data).__name__}")
        self.cache_bytes = default_cache if cache_mb is None else float(cache_mb) * 2**20
        self._cache: list[_Chunk | None] = []
        self._cache_key: Any = None
        self._complete = False  # every chunk of the data is in the cache
        self._checked: set[int] = set()
        self.first: _Pass | None = None  # counts of the first complete pass (the data's size)

    @property
    def cached_bytes(self) -> int:
        return sum(c.nbytes for c in self._cache if c is not None)

    def clear(self) -> None:
        """Drop the cached linearisation (Theta changed)."""
        self._cache, self._cache_key, self._complete = [], None, False

    def batches_iter(self) -> Iterator[TrackBatch]:
        """The batches of one pass, validated."""
        if self.batches is not None:
            for b in self.batches:
                if id(b) not in self._checked:
                    self.model._check_batch(b, self.where)
                    self._checked.add(id(b))
                yield b
            return
        assert self.factory is not None
        it = self.factory()
        if not isinstance(it, Iterable):
            raise ValueError(f"{self.where}: the data callable must return an iterable of TrackBatch, got "
                             f"{type(it).__name__}")
        for i, b in enumerate(it):
            if not isinstance(b, TrackBatch):
                raise ValueError(f"{self.where}: the data callable yielded a {type(b).__name__} as item {i}, "
                                 "expected TrackBatch")
            self.model._check_batch(b, self.where)
            yield b

    def _end_pass(self, tally: _Pass) -> None:
        if tally.events == 0:
            raise ValueError(f"{self.where}: no event with positive degrees of freedom in the data")
        if self.first is None:
            self.first = _Pass(tally.cost_sum, tally.events, tally.ndf, tally.tracks, tally.chunks)
        elif (tally.events, tally.tracks) != (self.first.events, self.first.tracks):
            raise ValueError(f"{self.where}: the data changed between passes ({self.first.tracks} tracks and "
                             f"{self.first.events} events in the first pass, {tally.tracks} and {tally.events} "
                             "now); the data callable must yield the same tracks on every call")

    @staticmethod
    def event_scale(model: ITSAlignmentModel, batch: TrackBatch) -> tuple[Tensor, Tensor, int, float]:
        """Hits per track, ``1/nu`` per event (0 for nu <= 0), the number of events with nu > 0 and
        the sum of their nu."""
        nh = batch.mask.sum(1)
        ev_ndf = torch.zeros(batch.n_events, dtype=torch.float64).index_add_(0, batch.event, model._ndf(nh))
        good = ev_ndf > 0
        return (nh, torch.where(good, 1.0 / ev_ndf.clamp_min(1.0), torch.zeros_like(ev_ndf)), int(good.sum()),
                float(ev_ndf[good].sum()))

    def _counted(self, tally: _Pass, bar: Any) -> Iterator[tuple[TrackBatch, Tensor, Tensor, int]]:
        """The batches of one pass with their hits per track, ``1/nu`` per event and events with
        nu > 0, counted into ``tally``; batches without degrees of freedom are counted and skipped."""
        for batch in self.batches_iter():
            nh, scale_ev, n_good, ndf = self.event_scale(self.model, batch)
            tally.events += n_good
            tally.ndf += ndf
            tally.tracks += batch.n_tracks
            if bar is not None:
                bar.update(1)
            if batch.n_tracks and n_good:
                yield batch, nh, scale_ev, n_good

    def run(self, fresh: bool, consume: Consumer, bar: Any = None) -> _Pass:
        """One pass at the model's current Theta. ``fresh``: evaluate every chunk (``consume`` then
        gets the batch, ``1/nu`` per event and the evaluation ``res``; the cache is refilled); else
        cached chunks are used where present (``res`` None; when the cache holds every chunk the
        data are not read at all). The linearisation's ``2 c_t`` is ``2 / nu_event``: the caller
        divides by the pass's ``events``."""
        model = self.model
        key = (id(model.phi), model.phi._version)
        if fresh or self._cache_key != key:
            self.clear()
            self._cache_key = key
        elif self._complete and self.first is not None:
            for ch in self._cache:
                assert ch is not None
                consume(ch, None, None, None)
            if bar is not None:
                bar.update(bar.total or 0)
            return _Pass(math.nan, self.first.events, self.first.ndf, self.first.tracks, len(self._cache))
        used = self.cached_bytes
        table = model.placement_table(model.phi.detach()).to(torch.float64)
        tally = _Pass()
        i_chunk = 0
        all_cached = True
        for batch, nh, scale_ev, _ in self._counted(tally, bar):
            for idx in model._chunks(batch, nh, self.chunk_tracks):
                cached = None if fresh or i_chunk >= len(self._cache) else self._cache[i_chunk]
                if cached is not None:
                    if cached.sensor.shape[0] != idx.numel():
                        raise ValueError(f"{self.where}: the data changed between passes (chunk {i_chunk} had "
                                         f"{cached.sensor.shape[0]} tracks, now {idx.numel()}); the data callable "
                                         "must yield the same tracks on every call")
                    consume(cached, batch, scale_ev, None)
                else:
                    cols = torch.nonzero(batch.mask[idx].any(0))
                    k = int(cols.max()) + 1 if cols.numel() else 1
                    sub = TrackBatch(batch.sensor[idx, :k], batch.local[idx, :k], batch.mask[idx, :k],
                                     batch.event[idx], batch.n_events, batch.vertex)
                    res = model._evaluate(sub, None, need_grad=False, scale_ev=scale_ev, table=table)
                    tally.cost_sum += float(res["cost"])
                    ch = _linearise(model, sub, res, scale_ev)
                    if i_chunk >= len(self._cache):
                        self._cache.append(None)
                    keep = ch if self.cache_dtype == torch.float64 else ch.to(self.cache_dtype)
                    if used + keep.nbytes <= self.cache_bytes:
                        self._cache[i_chunk] = keep
                        used += keep.nbytes
                    else:
                        all_cached = False
                    consume(ch, sub, scale_ev, res)
                tally.chunks += 1
                i_chunk += 1
        self._end_pass(tally)
        self._complete = all_cached and len(self._cache) == i_chunk
        return tally

    @torch.no_grad()
    def cost(self, bar: Any = None) -> tuple[float, _Pass]:
        """C at the model's current Theta (the model's fast forward per batch; no linearisation)."""
        tally = _Pass()
        for batch, _, _, n_good in self._counted(tally, bar):
            out = self.model(batch, self.chunk_tracks, cache=self.batches is not None)
            tally.cost_sum += float(out.cost) * n_good  # the model normalises by the batch's events
        self._end_pass(tally)
        return tally.cost_sum / tally.events, tally


def _projectors(res: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The track fit's projectors of the evaluation ``res`` (``align._projector_blocks``: (T, K+1,
    K+1), vertex last), computed once and kept in ``res`` for the linearisation and the errors'
    noise replicas."""
    if "projector_xy" not in res:
        res["projector_xy"], res["projector_z"] = _projector_blocks(res)
    return res["projector_xy"], res["projector_z"]


def _pair_scale(sub: TrackBatch, scale_ev: Tensor, dtype: torch.dtype) -> Tensor:
    """(T, K, K) the factor of a track's hit-pair blocks: ``2 c_t`` (times ``N``) where both hits
    are real, 0 on padding."""
    m = sub.mask.to(dtype)
    return m[:, :, None] * m[:, None, :] * (2.0 * scale_ev[sub.event]).to(dtype)[:, None, None]


def _projected_noise(model: ITSAlignmentModel, res: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """``P F`` (T, K+1, K+1+L) in float64 for the xy and z residuals: the track fit's projector
    applied to the factor of the residuals' noise (``align.noise_factors``: intrinsic errors,
    multiple scattering correlated along the track, the vertex with its configured resolution),
    so that the residuals' projected noise is ``P F n`` with ``n ~ N(0, 1)`` and its covariance
    ``(P F) (P F)^T``; kept in ``res``."""
    if "noise_pf_xy" not in res:
        fxy, fz = noise_factors(model, res, vertex_noise=True)
        pxy, pz = _projectors(res)
        res["noise_pf_xy"] = torch.bmm(pxy.to(torch.float64), fxy)
        res["noise_pf_z"] = torch.bmm(pz.to(torch.float64), fz)
    return res["noise_pf_xy"], res["noise_pf_z"]


def _noise_blocks(model: ITSAlignmentModel, sub: TrackBatch, res: dict[str, Tensor],
                  scale_ev: Tensor) -> tuple[Tensor, Tensor]:
    """The hit blocks (T, K, K) of ``P S P`` for the xy and z residuals (:func:`_projected_noise`),
    scaled as :func:`_linearise` scales the projectors (``2 c_t`` times ``N``, padding zero)."""
    k = sub.sensor.shape[1]
    mm = _pair_scale(sub, scale_ev, torch.float64)
    out = []
    for pf in _projected_noise(model, res):
        h = pf[:, :k]
        out.append(torch.bmm(h, h.transpose(1, 2)) * mm)
    return out[0], out[1]


def _linearise(model: ITSAlignmentModel, sub: TrackBatch, res: dict[str, Tensor], scale_ev: Tensor) -> _Chunk:
    """The :class:`_Chunk` of the tracks ``sub`` evaluated as ``res``."""
    ve, vz = _hit_theta_derivatives(model, sub, res)  # (T, K, 6)
    pxy, pz = _projectors(res)  # (T, K+1, K+1), vertex last: no Theta derivative
    k = sub.sensor.shape[1]
    m = sub.mask.to(ve.dtype)
    mm = _pair_scale(sub, scale_ev, ve.dtype)
    return _Chunk(torch.where(sub.mask, sub.sensor, torch.zeros_like(sub.sensor)), ve * m[..., None],
                  vz * m[..., None], (pxy[:, :k, :k] * mm).contiguous(), (pz[:, :k, :k] * mm).contiguous())


def _apply(ch: _Chunk, p: Tensor, out: Tensor) -> None:
    """``out += sum_t 2 c_t V_t^T P_t V_t p`` over the chunk's tracks (``p``, ``out``: (N, 6))."""
    ps = p.to(ch.ve.dtype)[ch.sensor]  # (T, K, 6)
    ae = (ch.ve * ps).sum(-1)  # (T, K) change of each residual
    az = (ch.vz * ps).sum(-1)
    be = torch.bmm(ch.pxy, ae[..., None])[..., 0]  # (T, K)
    bz = torch.bmm(ch.pz, az[..., None])[..., 0]
    contrib = be[..., None] * ch.ve + bz[..., None] * ch.vz  # (T, K, 6)
    out.index_add_(0, ch.sensor.reshape(-1), contrib.reshape(-1, 6).to(out.dtype))


def _diag_blocks(ch: _Chunk, out: Tensor) -> None:
    """``out`` (N, 36) += the sensors' diagonal 6 x 6 blocks of the chunk's ``H`` (every pair of
    hits of a track on the same sensor: the hit itself, and a second hit if a batch has one)."""
    de = torch.diagonal(ch.pxy, dim1=1, dim2=2)  # (T, K)
    dz = torch.diagonal(ch.pz, dim1=1, dim2=2)
    outer = (de[..., None, None] * ch.ve[..., :, None] * ch.ve[..., None, :]
             + dz[..., None, None] * ch.vz[..., :, None] * ch.vz[..., None, :])  # (T, K, 6, 6)
    out.index_add_(0, ch.sensor.reshape(-1), outer.reshape(-1, 36))
    k = ch.sensor.shape[1]
    if k < 2:
        return
    off = (ch.sensor[:, :, None] == ch.sensor[:, None, :]) & ~torch.eye(k, dtype=torch.bool)[None]
    off &= (ch.pxy != 0) | (ch.pz != 0)  # real hits only (the padding's rows are zero)
    if bool(off.any()):
        t, i, j = off.nonzero(as_tuple=True)
        blk = (ch.pxy[t, i, j, None, None] * ch.ve[t, i][:, :, None] * ch.ve[t, j][:, None, :]
               + ch.pz[t, i, j, None, None] * ch.vz[t, i][:, :, None] * ch.vz[t, j][:, None, :])
        out.index_add_(0, ch.sensor[t, i], blk.reshape(-1, 36))


def _track_pair_blocks(ch: _Chunk, pos: Tensor, other: tuple[Tensor, Tensor] | None = None
                       ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]]:
    """The 6 x 6 blocks of ``H`` that the chunk's tracks add between their hits on solved
    parameters: ``pos`` (T, K) the solved unit of each hit (-1: held, or padding). Every pair of
    such hits ``i <= j`` of a track once, as ``2 c_t (P_xy,ij v_e,i v_e,j^T + P_z,ij v_z,i v_z,j^T)``
    (``i = j`` at half weight: the matrix is ``U + U^T`` of what is added), oriented so that its
    row unit is the smaller (``pos_i <= pos_j``). Yields per group of tracks with the same number
    of such hits (no padding): the tracks ``t`` (T', 1), the row and column units (T', P) and the
    blocks (T', P * 36) in float64, and the same blocks with the hit matrices ``other`` (xy, z;
    (T, K, K)) in place of the projectors (None without)."""
    diag_xy = torch.diagonal(ch.pxy, dim1=1, dim2=2)
    diag_z = torch.diagonal(ch.pz, dim1=1, dim2=2)
    keep = (pos >= 0) & ((diag_xy != 0) | (diag_z != 0))  # hits on the solved units (padding: zero rows)
    count = keep.sum(1)
    v = torch.stack([ch.ve, ch.vz], dim=2)  # (T, K, 2, 6): a hit's two residuals' derivatives
    p = torch.stack([ch.pxy, ch.pz], dim=-1)  # (T, K, K, 2)
    q = None if other is None else torch.stack([o.to(ch.pxy.dtype) for o in other], dim=-1)
    for ka in torch.unique(count).tolist():
        if ka == 0:
            continue
        t = torch.nonzero(count == ka)[:, 0, None]  # (T, 1)
        order = torch.argsort((~keep[t[:, 0]]).to(torch.int8), dim=1, stable=True)[:, :ka]  # (T, ka) kept hits
        iu, ju = torch.triu_indices(ka, ka)
        half = torch.where(iu == ju, 0.5, 1.0).to(ch.pxy.dtype)
        oi, oj = order[:, iu], order[:, ju]  # (T, P)
        pi, pj = pos[t, oi], pos[t, oj]
        swap = pi > pj  # P is symmetric: the pair (j, i) is the block transposed
        oi, oj = torch.where(swap, oj, oi), torch.where(swap, oi, oj)
        vi, vj = v[t, oi], v[t, oj]  # (T, P, 2, 6)
        blk = torch.einsum("tpki,tpkj->tpij", vi * (p[t, oi, oj] * half[:, None])[..., None], vj)  # (T, P, 6, 6)
        blk2 = None
        if q is not None:
            blk2 = torch.einsum("tpki,tpkj->tpij", vi * (q[t, oi, oj] * half[:, None])[..., None], vj)
            blk2 = blk2.reshape(t.shape[0], -1).to(torch.float64)
        yield t, torch.minimum(pi, pj), torch.maximum(pi, pj), blk.reshape(t.shape[0], -1).to(torch.float64), blk2


# dense Gauss-Newton matrices of the ``direct`` solver: at most this many parameters (6 per sensor;
# 20,000 parameters take 3.2 GB in float64, twice: H and the gradient's covariance): the inner
# barrel (432 chips, 2,592 parameters) fits, the full ITS2 (144,720) does not
DIRECT_MAX_PARAMETERS = 20_000

# :func:`refine`'s solvers and how each solves a Gauss-Newton step (``refine.json``'s ``method``)
SOLVERS: dict[str, str] = {
    "cg": "Gauss-Newton, projected preconditioned conjugate gradients (matrix-free)",
    "direct": "Gauss-Newton, dense constrained solve of the solved sensors' normal equations",
    "sparse": "Gauss-Newton, projected preconditioned conjugate gradients on the sparse assembled normal equations",
}


class _DenseBlock:
    """``H`` restricted to the DoFs of the solved units (the ``direct`` solver: single sensors and
    rigid bodies, ``unit`` (N,) the unit of each sensor, -1 held; a body's sensors share one
    Theta step, so its hits add to one block): a dense (6n, 6n) float64 matrix accumulated chunk
    by chunk from the linearisation, every pair of hits of a track on those units (``2 c_t`` times
    the projector's entry times the two hits' derivatives). Hits on other sensors enter through
    the projector only (the track fit). Beside it, with each track's term weighted by ``2 c_t``
    once more, the covariance of the gradient ``V = sum_t 4 c_t^2 A_t^T P_t S_t P_t A_t`` (``S``
    the residuals' noise, multiple scattering correlated along the track:
    :func:`_noise_blocks`; without scattering ``P W^-1 P = P``), for the sandwich ``H^-1 V H^-1``
    of the parameters' errors."""

    def __init__(self, unit: np.ndarray) -> None:
        self.unit = np.asarray(unit, dtype=np.int64)
        self.n_units = int(self.unit.max(initial=-1)) + 1
        self.index = torch.from_numpy(self.unit)
        self.dim = 6 * self.n_units
        # H in the real part, V in the imaginary one: one scatter of both (two cost twice the time)
        self.flat = torch.zeros(self.dim * self.dim, dtype=torch.complex128)

    def add(self, ch: _Chunk, c2: Tensor, noise: tuple[Tensor, Tensor] | None = None) -> None:
        """Add the chunk's tracks; ``c2`` (T,): their ``2 c_t`` (already in ``ch``'s projectors);
        ``noise``: the hit blocks of ``P S P`` scaled as the projectors (:func:`_noise_blocks`;
        None: ``S = W^-1``)."""
        six = torch.arange(6)
        for t, pi, pj, blk, blk_noise in _track_pair_blocks(ch, self.index[ch.sensor], noise):
            ri = 6 * pi[..., None, None] + six[:, None]  # (T, P, 6, 1)
            rj = 6 * pj[..., None, None] + six[None, :]  # (T, P, 1, 6)
            both = torch.complex(blk, (blk if blk_noise is None else blk_noise) * c2[t].to(torch.float64))
            self.flat.index_add_(0, (ri * self.dim + rj).reshape(-1), both.reshape(-1))

    def scale(self, events: float) -> None:
        """Divide by the pass's events: ``H`` once, ``V`` twice (``c_t = 1 / (N nu_event)``)."""
        self.flat = torch.complex(self.flat.real / events, self.flat.imag / (events * events))

    def matrix(self, which: int = 0) -> np.ndarray:
        """The (6n, 6n) matrix ``H`` (``which`` 0) or ``V`` (1) (after :meth:`scale`): ``U + U^T``
        of the accumulated pairs ``i <= j`` (those ``i = j`` at half weight)."""
        u = (self.flat.real if which == 0 else self.flat.imag).numpy().reshape(self.dim, self.dim)
        return u + u.T


class _NoiseGradients:
    """Gradients of ``k`` noise replicas of the data (the sparse solver's errors): per track, hit
    and vertex residuals ``eps = F n``, ``n ~ N(0, 1)``, with the residuals' true noise ``S = F F^T``
    (``align.noise_factors``: the intrinsic errors, the multiple-scattering kicks correlated along
    the track, the vertex's resolution), whose gradient ``2 c_t V_t^T P_t eps`` at the same
    linearisation has the covariance ``V = sum_t 4 c_t^2 V_t^T P_t S_t P_t V_t`` of the direct
    solver's sandwich. Solved through ``K`` they are samples of the solution's error."""

    def __init__(self, k: int, n: int, seed: int) -> None:
        self.k = k
        self.grad = torch.zeros(n, 6 * k, dtype=torch.float64)
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, model: ITSAlignmentModel, ch: _Chunk, res: dict[str, Tensor], c2: Tensor) -> None:
        """Add the chunk's noise gradients; ``c2`` (T,): the tracks' ``2 c_t`` (times ``N``)."""
        t, kk = ch.sensor.shape
        u = []
        for pf in _projected_noise(model, res):  # (T, K+1, C)
            # float32 draws (half the time of float64; a noise sample needs no more), used in float64
            n = torch.randn(t, pf.shape[2], self.k, generator=self.gen).to(torch.float64)
            u.append(torch.bmm(pf[:, :kk], n))  # (T, K, k): P eps on the hits
        pe = torch.stack(u, dim=-1) * c2.to(torch.float64)[:, None, None, None]  # (T, K, k, 2)
        v = torch.stack([ch.ve, ch.vz], dim=2).to(torch.float64)  # (T, K, 2, 6)
        out = torch.bmm(pe.reshape(t * kk, self.k, 2), v.reshape(t * kk, 2, 6))  # (T K, k, 6)
        self.grad.index_add_(0, ch.sensor.reshape(-1), out.reshape(t * kk, -1))

    def samples(self, events: float) -> Tensor:
        """(k, N, 6) the noise gradients of ``C`` (divided by the pass's events)."""
        return (self.grad / events).reshape(-1, self.k, 6).permute(1, 0, 2).contiguous()


class _SparseBlocks:
    """``H`` of the solved sensors of the ``sparse`` solver (Millepede-II's sparse mode): only the
    6 x 6 blocks of the sensor pairs that tracks connect, accumulated chunk by chunk from the
    linearisation (:func:`_track_pair_blocks`; the full ITS2 on the seed's 5M events: 1.24M sensor
    pairs, 2.48M blocks of the symmetric matrix, 0.68 GB, against 168 GB dense). ``solved`` (N,)
    True for the sensors solved for; hits on the others enter through the track fit only. Blocks are
    kept under the sorted keys ``row * N + col`` (row <= col) of the pairs seen; pairs not seen
    before wait in a pending list merged into the sorted ones when it grows (amortised: the pairs a
    detector's tracks connect are soon all seen)."""

    def __init__(self, solved: np.ndarray) -> None:
        self.n = int(np.asarray(solved).shape[0])
        self.index = torch.from_numpy(np.where(np.asarray(solved, dtype=bool), np.arange(self.n), -1))
        self.keys = torch.zeros(0, dtype=torch.int64)  # sorted
        self.data = torch.zeros(0, 36, dtype=torch.float64)
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_n = 0
        self.merge_at = 200_000  # pending blocks that trigger a merge (at least a quarter of those kept)
        self.matrix: Any = None  # scipy BSR of H after :meth:`finish`

    def add(self, ch: _Chunk, c2: Tensor) -> None:
        """Add the chunk's tracks (``c2``: unused, the signature of :meth:`_DenseBlock.add`)."""
        for _, pi, pj, blk, _ in _track_pair_blocks(ch, self.index[ch.sensor]):
            key = (pi * self.n + pj).reshape(-1)
            blk = blk.reshape(-1, 36)
            if self.keys.numel():
                at = torch.searchsorted(self.keys, key).clamp_max(self.keys.numel() - 1)
                found = self.keys[at] == key
                self.data.index_add_(0, at[found], blk[found])
                key, blk = key[~found], blk[~found]
            if key.numel():
                self._pending.append((key, blk))
                self._pending_n += key.numel()
                if self._pending_n > max(self.merge_at, self.keys.numel() // 4):
                    self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        keys = torch.cat([self.keys] + [k for k, _ in self._pending])
        uniq, inv = torch.unique(keys, sorted=True, return_inverse=True)
        data = torch.zeros(uniq.numel(), 36, dtype=torch.float64)
        start = 0
        for blk in [self.data] + [b for _, b in self._pending]:  # no concatenated copy of the blocks
            data.index_add_(0, inv[start:start + blk.shape[0]], blk)
            start += blk.shape[0]
        self.keys, self.data = uniq, data
        self._pending, self._pending_n = [], 0

    def finish(self, events: float) -> None:
        """Divide by the pass's events and form ``H = U + U^T`` as a block-sparse matrix."""
        import scipy.sparse as sp

        self._merge()
        self.data /= events
        row, col = (self.keys // self.n).numpy(), (self.keys % self.n).numpy()
        blk = self.data.numpy().reshape(-1, 6, 6)
        off = np.flatnonzero(row != col)
        rows = np.concatenate([row, col[off]])  # U's blocks, then U^T's off the diagonal
        cols = np.concatenate([col, row[off]])
        order = np.lexsort((cols, rows))
        slot = np.empty_like(order)
        slot[order] = np.arange(order.size)  # each block's place in the row-sorted matrix
        data = np.empty((order.size, 6, 6))
        data[slot[: row.size]] = blk
        for lo in range(0, off.size, 1 << 18):  # U^T's blocks in slices: no copy of all of them at once
            part = off[lo:lo + (1 << 18)]
            data[slot[row.size + lo: row.size + lo + part.size]] = blk[part].transpose(0, 2, 1)
        diag = np.flatnonzero(row == col)
        data[slot[diag]] += blk[diag].transpose(0, 2, 1)  # a diagonal block is B + B^T
        indptr = np.zeros(self.n + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=self.n), out=indptr[1:])
        self.keys, self.data = torch.zeros(0, dtype=torch.int64), torch.zeros(0, 36, dtype=torch.float64)
        self.matrix = sp.bsr_matrix((data, cols[order], indptr), shape=(6 * self.n, 6 * self.n))

    def diagonal_blocks(self) -> Tensor:
        """(N, 6, 6) the sensors' diagonal blocks of ``H`` (after :meth:`finish`)."""
        m = self.matrix
        out = np.zeros((self.n, 6, 6))
        row = np.repeat(np.arange(self.n), np.diff(m.indptr))
        on = m.indices == row
        out[row[on]] = m.data[on]
        return torch.from_numpy(out)

    def matvec(self, p: Tensor) -> Tensor:
        """``H p`` for ``p`` (N, 6) (after :meth:`finish`)."""
        return torch.from_numpy(self.matrix @ p.reshape(-1).numpy()).reshape(self.n, 6)


@dataclass
class _DirectSolution:
    x: Tensor  # (U, 6) the step per unit, zero off the active units
    predicted: float  # g.x + x.H x / 2
    grad_norm: float  # |Z^T g|: the gradient within the constraints
    dropped: int  # directions without curvature left out (eigenvalue <= rcond times the largest)
    eig_min: float  # the smallest and largest curvature kept (of Z^T H Z)
    eig_max: float
    cov: Tensor  # (U, 6, 6) the diagonal blocks of K V K (``_direct_step``); NaN off the active units and on
    # those the dropped directions move


def _per_unit(unit: np.ndarray, n_units: int, values: np.ndarray) -> np.ndarray:
    """``values`` (N, ...) per sensor summed over each unit's sensors (``unit`` -1: left out)."""
    out = np.zeros((n_units,) + values.shape[1:])
    np.add.at(out, unit[unit >= 0], values[unit >= 0])
    return out


def _add_diagonal_blocks(mat: np.ndarray, blocks: np.ndarray) -> None:
    """``mat`` (6n, 6n, C-contiguous) += the block-diagonal matrix of ``blocks`` (n, 6, 6), in place."""
    n = blocks.shape[0]
    view = mat.view()
    view.shape = (n, 6, n, 6)  # raises rather than copy
    view[np.arange(n), :, np.arange(n), :] += blocks


def _add_low_rank(mat: np.ndarray, low: np.ndarray, inv: np.ndarray, factor: float, rows: int = 2048) -> None:
    """``mat`` (n, n) += ``factor low inv low^T`` (``low`` (n, m)), in place, a block of rows at a time
    (no second matrix of ``mat``'s size); nothing to do for m = 0."""
    if not low.shape[1]:
        return
    right = inv @ low.T
    for i in range(0, mat.shape[0], rows):
        mat[i:i + rows] += factor * (low[i:i + rows] @ right)


def _direct_step(dense: _DenseBlock, active: np.ndarray, g: Tensor, prior: _PriorTerm | None,
                 cons: Constraints, ndf: float, rcond: float = 1e-12) -> _DirectSolution:
    """The constrained Gauss-Newton step ``argmin g^T d + d^T H d / 2`` over the active units'
    DoFs (``active`` (U,); a unit's step moves each of its sensors alike, so its gradient, the
    prior's curvature and the constraints' rows are the sums over its sensors) with ``Q^T d = 0``
    (``cons``: the constraints restricted to the active sensors), solved densely in the
    constraints' null space ``Z``: ``d = -Z (Z^T H Z)^+ Z^T g`` (eigen-decomposition; curvatures
    below ``rcond`` times the largest are dropped and counted). ``prior``: its curvature (the
    blocks and the free directions' low-rank correction, :class:`_PriorTerm`) is added to ``H``;
    as pseudo-measurements with ``c = 1 / ndf`` they add ``2 / ndf`` times it to ``V``. The
    covariance ``K V K`` with ``K = Z (Z^T H Z)^+ Z^T``."""
    n, nu = g.shape[0], dense.n_units
    sel = np.flatnonzero(active)  # the active units
    idx6 = (6 * sel[:, None] + np.arange(6)).reshape(-1)
    h = dense.matrix(0)[np.ix_(idx6, idx6)]
    curv = None if prior is None else _per_unit(dense.unit, nu, prior.blocks.numpy())[sel]
    low = None if prior is None else _per_unit(dense.unit, nu, prior.low.numpy())[sel].reshape(idx6.size, -1)
    if prior is not None:
        _add_diagonal_blocks(h, curv)
        _add_low_rank(h, low, prior.inv.numpy(), -1.0)
    gv = _per_unit(dense.unit, nu, g.numpy())[sel].reshape(-1)
    q = _per_unit(dense.unit, nu, cons.q.numpy().reshape(n, 6, -1))[sel].reshape(idx6.size, -1)
    if q.shape[1]:
        u, s, _ = np.linalg.svd(q, full_matrices=True)
        rank = int((s > 1e-10 * max(float(s.max()), 1e-300)).sum())
        z = u[:, rank:]
    else:
        z = np.eye(idx6.size)
    hz = z.T @ h @ z
    gz = z.T @ gv
    w, v = np.linalg.eigh(0.5 * (hz + hz.T))
    top = float(w.max()) if w.size else 0.0
    keep = w > rcond * top
    zv = z @ v[:, keep]  # the kept curvature directions in parameter space
    d = -(zv @ ((zv.T @ gv) / w[keep]))
    x = torch.zeros(nu, 6, dtype=torch.float64)
    x[torch.from_numpy(sel)] = torch.from_numpy(d.reshape(-1, 6))
    predicted = float(gv @ d + 0.5 * d @ (h @ d))
    # the covariance's diagonal blocks: K V K = Y (zv^T V zv) Y^T with Y = zv / w per unit
    vm = dense.matrix(1)[np.ix_(idx6, idx6)]
    if prior is not None:
        _add_diagonal_blocks(vm, 2.0 / ndf * curv)
        _add_low_rank(vm, low, prior.inv.numpy(), -2.0 / ndf)
    y = zv / w[keep]  # (6n, k)
    e = y @ (zv.T @ vm @ zv)
    k = y.shape[1]
    blocks = np.einsum("sik,sjk->sij", e.reshape(-1, 6, k), y.reshape(-1, 6, k))
    blocks = 0.5 * (blocks + blocks.transpose(0, 2, 1))
    if not keep.all():  # a unit a dropped direction moves has no finite error
        moved = np.abs(z @ v[:, ~keep]).reshape(-1, 6 * int((~keep).sum())).max(1) > 1e-8
        blocks[moved] = np.nan
    cov = torch.full((nu, 6, 6), math.nan, dtype=torch.float64)
    cov[torch.from_numpy(sel)] = torch.from_numpy(blocks)
    return _DirectSolution(x, predicted, float(np.linalg.norm(gz)), int((~keep).sum()),
                           float(w[keep].min()) if keep.any() else math.nan, top, cov)


def _as_theta(value: Any, n: int, name: str, where: str) -> Tensor:
    t = torch.as_tensor(value, dtype=torch.float64)
    if tuple(t.shape) == (6 * n,):
        t = t.reshape(n, 6)
    if tuple(t.shape) != (n, 6):
        raise ValueError(f"{where}: {name} must have shape ({n}, 6) or ({6 * n},), got {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{where}: {name} must be finite (found NaN or inf)")
    return t


# ------------------------------------------------------------------------------------------------
# The linearised system: cost, gradient, diagonal blocks, H p


@dataclass
class GNSystem:
    """Cost, gradient and the per-sensor diagonal blocks of the Gauss-Newton matrix at one Theta.

    Attributes:
        cost: C over all data.
        grad: (N, 6) dC/dTheta.
        blocks: (N, 6, 6) the diagonal 6 x 6 blocks of ``H`` (track fit projected); zero when
            the pass accumulated the direct solver's dense matrix instead.
        hits: (N,) hits per sensor.
        events: events with nu > 0 (the ``N`` of the cost).
        tracks: tracks seen.
        seconds: wall time of the pass.
        ndf: the degrees of freedom of those events, ``sum_i nu_i`` (the prior's chi2 is
            divided by it, :class:`Presigma`).
    """

    cost: float
    grad: Tensor
    blocks: Tensor
    hits: Tensor
    events: int
    tracks: int
    seconds: float
    ndf: float = 0.0


def _system(src: _Source, bar: Any = None, dense: _DenseBlock | _SparseBlocks | None = None,
            noise: _NoiseGradients | None = None) -> GNSystem:
    """One pass: cost, gradient and the diagonal blocks, or with ``dense`` the pairs' blocks of ``H``
    (the direct solver's dense matrix, or the sparse solver's matrix and its diagonal blocks)."""
    model = src.model
    n = model.n_sensors
    t0 = time.perf_counter()
    grad = torch.zeros(n, 6, dtype=torch.float64)
    blocks = torch.zeros(n, 36, dtype=torch.float64)
    hits = torch.zeros(n, dtype=torch.float64)

    def consume(ch: _Chunk, sub: TrackBatch, scale_ev: Tensor, res: dict[str, Tensor] | None) -> None:
        assert res is not None
        c2 = (2.0 * scale_ev[sub.event])[:, None, None]  # 2 c_t (times N)
        gh = c2 * ((res["w_xy"] * res["e"])[..., None] * ch.ve + (res["w_z"] * res["rz"])[..., None] * ch.vz)
        grad.index_add_(0, ch.sensor.reshape(-1), gh.reshape(-1, 6))
        if dense is None:
            _diag_blocks(ch, blocks)
        elif isinstance(dense, _DenseBlock):  # the solved units' blocks of H and of V
            dense.add(ch, c2[:, 0, 0], _noise_blocks(model, sub, res, scale_ev))
        else:  # the pairs' matrix holds the solved sensors' blocks; the others' are not used
            dense.add(ch, c2[:, 0, 0])
        if noise is not None:
            noise.add(model, ch, res, c2[:, 0, 0])
        hits.index_add_(0, sub.sensor[sub.mask], torch.ones(int(sub.mask.sum()), dtype=torch.float64))

    tally = src.run(True, consume, bar)
    ne = float(tally.events)
    diag = (blocks / ne).reshape(n, 6, 6)
    if isinstance(dense, _SparseBlocks):
        dense.finish(ne)
        diag = dense.diagonal_blocks()
    elif dense is not None:
        dense.scale(ne)
    return GNSystem(tally.cost_sum / ne, grad / ne, diag, hits, tally.events,
                    tally.tracks, time.perf_counter() - t0, tally.ndf)


def _matvec(src: _Source, p: Tensor, bar: Any = None) -> tuple[Tensor, _Pass]:
    out = torch.zeros_like(p)
    tally = src.run(False, lambda ch, *_: _apply(ch, p, out), bar)
    return out / float(tally.events), tally


@torch.no_grad()
def gn_system(model: ITSAlignmentModel, data: TrackSource, *, chunk_tracks: int = 4096) -> GNSystem:
    """One pass over ``data`` at the model's Theta (vectorised over tracks, chunked): the cost C,
    its gradient ``g`` (as ``align.normal_equations``) and the diagonal blocks of the Gauss-Newton
    matrix, ``B_s = sum_t 2 c_t sum_{i, j on s} (P_xy,ij v_e,i v_e,j^T + P_z,ij v_z,i v_z,j^T)``
    (the diagonal blocks of ``normal_equations(...).hessian``)."""
    _check_model(model, "gn_system")
    return _system(_Source(model, data, "gn_system", chunk_tracks=chunk_tracks, cache_mb=0))


def gn_block_diagonal(model: ITSAlignmentModel, data: TrackSource, *, chunk_tracks: int = 4096) -> Tensor:
    """The per-sensor diagonal blocks (N, 6, 6) of the Gauss-Newton matrix ``H`` (track fit
    projected; :func:`gn_system`)."""
    _check_model(model, "gn_block_diagonal")
    return _system(_Source(model, data, "gn_block_diagonal", chunk_tracks=chunk_tracks, cache_mb=0)).blocks


@torch.no_grad()
def gn_matvec(model: ITSAlignmentModel, data: TrackSource, p: Tensor | np.ndarray, *,
              chunk_tracks: int = 4096) -> Tensor:
    """``H p`` (N, 6) for a Theta-space vector ``p`` ((N, 6) or (6N,)): the Gauss-Newton matrix of
    C at the model's Theta (``normal_equations(...).hessian @ p``) applied without forming it, one
    pass over ``data`` (per chunk of tracks: ``V p`` per hit, the track's projector, ``V^T``
    scattered back per sensor)."""
    where = "gn_matvec"
    _check_model(model, where)
    pt = _as_theta(p, model.n_sensors, "p", where)
    return _matvec(_Source(model, data, where, chunk_tracks=chunk_tracks, cache_mb=0), pt)[0]


def _check_model(model: ITSAlignmentModel, where: str) -> None:
    if not isinstance(model, ITSAlignmentModel):
        raise ValueError(f"{where}: model must be an ITSAlignmentModel, got {type(model).__name__}")
    if model.config.precision != "float64":
        raise ValueError(f"{where}: the model's precision must be 'float64' (the projected normal equations need "
                         f"it), got {model.config.precision!r}; build the model with "
                         "dataclasses.replace(config, precision='float64')")


# ------------------------------------------------------------------------------------------------
# The prior (Millepede-II's presigma)


@dataclass(frozen=True)
class Presigma:
    """A Gaussian prior towards the nominal geometry, Millepede-II's ``presigma`` on each sensor
    as a local alignable: its rotation about its own centre ``omega`` (three angles, ``0 +- rot``)
    and its centre's shift ``s`` (``0 +- trans`` along each axis), adding ``|omega|^2 / rot^2 +
    |s|^2 / trans^2`` to the chi2. Isotropic, so the same in the global axes and the chip's (u,
    v, w): the spread a local misalignment of those widths has.

    Attributes:
        rot: sigma (rad) of each of the three rotation angles; None: no prior on them.
        trans: sigma (mm) of each component of the centre's shift; None: no prior on it.

    Theta's translations are those of the global origin (``g = a_R g0 + a_T``), the parameters
    Millepede fits in ``streamcal its export-mille``: a rotation ``omega`` of a chip about its
    centre ``c`` is ``a_T = -omega x c`` (20-40 um for 100 urad at the outer barrel's 200-400 mm),
    so a diagonal prior on Theta would hold those chips' rotations with their translations' width
    too. In Theta the prior is ``omega = (alpha, beta, gamma)`` (small angles: the rotation vector)
    and ``s = a_T + omega x c`` (the linearisation of :func:`misalignment.global_to_local` at the
    nominal geometry, exact to ``|omega|^2 |c|``, 4e-6 mm for 100 urad at 400 mm): per sensor the 6
    x 6 block ``T^T W T``, ``T = [[1, 0], [-[c]x, 1]]``, ``W = diag(1 / rot^2, 1 / trans^2)``.

    Units. The cost is ``C = 1/N sum_i chi2_i / nu_i`` (events ``i`` with ``nu_i > 0``); the
    prior's chi2 ``P`` enters it as ``P / sum_i nu_i`` (:class:`_PriorTerm`). This is exact when
    every event has the same ``nu`` (then ``C = chi2 / sum_i nu_i``). In general event ``i``'s
    chi2 enters ``C`` with the factor ``1 / (N nu_i)``; the information an event gives a parameter
    grows with its measurements, i.e. with ``nu_i``, and the factors averaged with those weights
    are ``sum_i nu_i / (N nu_i) / sum_i nu_i = 1 / sum_i nu_i``. With it a parameter that the data
    measure with the Fisher error ``s`` (``s^2 = 2 / (h sum_i nu_i)``, ``h`` the curvature of ``C``
    along it) and put at ``theta_hat`` ends at the precision-weighted mean ``theta_hat sigma^2 /
    (sigma^2 + s^2)``, one the data do not measure at 0.
    """

    rot: float | None = None
    trans: float | None = None

    @classmethod
    def build(cls, rot: Any, trans: Any, where: str) -> Presigma | None:
        """The prior of ``rot`` (rad) and ``trans`` (mm), each a finite number > 0 or None; None
        when both are None. Raises a ValueError naming the bad argument and ``where``."""
        for name, val, unit in (("presigma_rot", rot, "rad"), ("presigma_trans", trans, "mm")):
            if val is not None and not (isinstance(val, (int, float, np.integer, np.floating))
                                        and not isinstance(val, (bool, np.bool_))
                                        and math.isfinite(float(val)) and float(val) > 0):
                raise ValueError(f"{where}: {name} must be a finite number > 0 ({unit}) or None, got {val!r}")
        if rot is None and trans is None:
            return None
        return cls(None if rot is None else float(rot), None if trans is None else float(trans))

    def weights(self) -> Tensor:
        """(6,) ``1 / sigma^2`` of (omega, s) (0 where there is no prior)."""
        w = [0.0 if self.rot is None else self.rot**-2] * 3 + [0.0 if self.trans is None else self.trans**-2] * 3
        return torch.tensor(w, dtype=torch.float64)

    def local_map(self, centres: Tensor) -> Tensor:
        """(N, 6, 6) ``T``: Theta -> (omega, s) of chips centred at ``centres`` (N, 3) (mm)."""
        c = centres.to(torch.float64)
        t = torch.eye(6, dtype=torch.float64).repeat(c.shape[0], 1, 1)
        zero = torch.zeros_like(c[:, 0])
        cross = torch.stack([torch.stack([zero, -c[:, 2], c[:, 1]], 1),  # [c]x
                             torch.stack([c[:, 2], zero, -c[:, 0]], 1),
                             torch.stack([-c[:, 1], c[:, 0], zero], 1)], 1)
        t[:, 3:, :3] = -cross
        return t


class _PriorTerm:
    """The prior's term of the objective on the sensors ``active`` in units of C (:class:`Presigma`):
    ``k sum_s theta_s^T T_s^T W T_s theta_s`` with ``k = 1 / ndf``, its gradient, its curvature
    ``blocks`` (N, 6, 6; ``2 k T^T W T``, zero off ``active``) and ``noise`` (N, 6, 6) with
    ``noise noise^T = 2 k blocks``: the gradient's covariance from its pseudo-measurements.

    ``free`` (6N, m): directions the prior leaves to the data (e.g. the global modes of
    ``misalignment.weak_mode``). The per-sensor pseudo-measurements hold each chip at the nominal
    geometry *up to* a combination of them: the curvature is ``B - B M (M^T B M)^+ M^T B`` (``B``
    the blocks, ``M`` the directions on the active sensors), ``min_a (theta - M a)^T B (theta - M
    a)`` as a quadratic form. The correction is of rank m (``low`` (N, 6, m) ``= B M``, ``inv``
    ``= (M^T B M)^+``); ``blocks`` stays ``B`` (the block-Jacobi preconditioner's, which need not
    be exact)."""

    def __init__(self, presigma: Presigma, active: np.ndarray, ndf: float, centres: Tensor,
                 free: np.ndarray | None = None) -> None:
        self.scale = 1.0 / ndf
        on = torch.from_numpy(active).to(torch.float64)[:, None, None]
        t = presigma.local_map(centres)
        w = presigma.weights()
        self.blocks = 2.0 * self.scale * on * torch.einsum("nki,k,nkj->nij", t, w, t)
        self.noise = 2.0 * self.scale * on * t.transpose(1, 2) * w.sqrt()[None, None, :]
        n = self.blocks.shape[0]
        dirs = np.zeros((6 * n, 0)) if free is None else np.asarray(free, dtype=np.float64)
        self.free = torch.from_numpy(dirs).reshape(n, 6, -1) * on  # m = 0: the plain block prior
        self.low = torch.einsum("nij,njm->nim", self.blocks, self.free)
        s = torch.einsum("nim,nik->mk", self.free, self.low)
        self.inv = torch.linalg.pinv(0.5 * (s + s.T), rtol=1e-10, hermitian=True)

    @property
    def rank(self) -> int:
        """The number of directions the prior leaves free."""
        return int(self.inv.shape[0])

    def apply(self, p: Tensor) -> Tensor:
        """The prior's curvature times ``p`` (N, 6)."""
        out = torch.einsum("nij,nj->ni", self.blocks, p)
        return out - torch.einsum("nim,m->ni", self.low, self.inv @ torch.einsum("nim,ni->m", self.low, p))

    def pseudo_noise(self, xi: Tensor) -> Tensor:
        """The pseudo-measurements' noise in the gradient for standard normal ``xi`` (K, N, 6):
        covariance ``2 k`` times the curvature (``noise xi`` with the free directions' part
        removed: ``(I - B M S^+ M^T) noise xi``)."""
        eta = torch.einsum("nij,knj->kni", self.noise, xi)
        return eta - torch.einsum("nim,km->kni", self.low, torch.einsum("nim,kni->km", self.free, eta) @ self.inv)

    def value(self, theta: Tensor) -> float:
        return 0.5 * float((theta * self.apply(theta)).sum())

    def grad(self, theta: Tensor) -> Tensor:
        return self.apply(theta)


# ------------------------------------------------------------------------------------------------
# The solver


@dataclass
class CGRecord:
    """One conjugate-gradient iteration (one ``H p`` pass).

    Attributes:
        gn: the Gauss-Newton iteration (1-based).
        iteration: the CG iteration within it (1-based).
        predicted_change: ``g^T d + d^T H d / 2`` of the current solution ``d``: the cost change
            the linearised problem predicts (negative).
        residual: ``sqrt(r^T y)``, the projected preconditioned residual norm (``r = H d + g``,
            ``y`` the projected preconditioned residual).
        relative_residual: ``residual`` over its value at ``d = 0``.
        curvature: ``p^T H p`` of the search direction.
        pass_s: seconds of the pass; time_s: seconds since the start of :func:`refine`.
    """

    gn: int
    iteration: int
    predicted_change: float
    residual: float
    relative_residual: float
    curvature: float
    pass_s: float
    time_s: float


@dataclass
class GNRecord:
    """One Gauss-Newton iteration.

    Attributes:
        iteration: 1-based.
        cost_before, cost_after: C at the linearisation point and after the step (the data's
            cost, without the prior: comparable with runs without one).
        predicted_change: the linearised problem's change of the objective (C plus the prior's
            term) for the step taken.
        grad_norm: ``sqrt(g^T y0)`` at the linearisation point (projected, preconditioned).
        cg_iterations: CG iterations done; converged: whether ``tol`` was reached.
        step_scale: the fraction of the CG solution taken (halved while the cost rose).
        max_step: max |dTheta| of the step taken (rad and mm mixed).
        active_sensors: sensors solved for (free, with hits).
        system_s: seconds of the pass for cost, gradient and blocks; time_s: since the start.
        coarse_size, coarse_dropped, coarse_seconds: the two-level preconditioner's coarse
            directions used, those without curvature left out, and the seconds for ``Z^T H Z``.
        solver: ``"cg"``, ``"direct"`` or ``"sparse"``; direct_dropped, direct_seconds: the direct solve's
            directions without curvature left out and its seconds (the dense matrix was
            accumulated in the system pass); error_samples, error_seconds: the sparse solver's
            noise replicas solved for the errors and their seconds.
        prior_before, prior_after: the prior's term (:class:`Presigma`) at the linearisation
            point and after the step, in units of C (0 without a prior); the step halving compares
            ``cost + prior``.
        cg: the CG iterations.
    """

    iteration: int
    cost_before: float
    cost_after: float
    predicted_change: float
    grad_norm: float
    cg_iterations: int
    converged: bool
    step_scale: float
    max_step: float
    active_sensors: int
    system_s: float
    time_s: float
    coarse_size: int = 0
    coarse_dropped: int = 0
    coarse_seconds: float = 0.0
    solver: str = "cg"
    direct_dropped: int = 0
    direct_seconds: float = 0.0
    error_samples: int = 0
    error_seconds: float = 0.0
    prior_before: float = 0.0
    prior_after: float = 0.0
    cg: list[CGRecord] = field(default_factory=list)


@dataclass
class RefineResult:
    """What :func:`refine` returns (the model is left at ``theta``).

    Attributes:
        theta: (N, 6) the refined Theta.
        theta_start: (N, 6) the start, on the constraint surface.
        cost_start, cost: C at the start and at ``theta`` (the data's cost, without the prior).
        start_correction: max |change| that put the given start on the constraint surface.
        events, tracks: the data's events with nu > 0 and tracks.
        passes: passes over the data; seconds: wall time.
        gn: per Gauss-Newton iteration, with its CG iterations.
        presigma: the prior (None: none); prior_start, prior: its term at the start and at
            ``theta`` in units of C (the minimised objective is ``cost + prior``); ndf: the data's
            ``sum_i nu_i`` (the prior's scale is its inverse).
        theta_cov: solver ``"direct"``, or ``"sparse"`` with ``error_samples`` (else None): (N, 6, 6)
            each solved sensor's covariance block of Theta at the last linearisation point, the
            sandwich ``K V K`` of ``align.ReferenceSolution`` (``K = Z (Z^T H Z)^+ Z^T`` with the
            prior's curvature in ``H``, ``V`` the gradient's covariance for the hit errors the cost
            assumes, the held sensors exact): exact for ``"direct"``, the mean of ``x x^T`` over
            ``error_samples`` solutions ``x = K g`` of noise gradients ``g ~ N(0, V)`` for
            ``"sparse"`` (each entry to ``sqrt(2 / k)`` relative, so a layer's RMS is precise);
            NaN for the sensors not solved and those a direction without curvature moves.
        solved: (N,) bool, the sensors a Gauss-Newton iteration solved for (free, asked for, with
            ``min_sensor_hits``); the others kept their start (``solved.npy`` of ``refine_run``,
            which ``evaluate align`` needs for the constrained modes' reference).
    """

    theta: Tensor
    theta_start: Tensor
    cost_start: float
    cost: float
    start_correction: float
    events: int
    tracks: int
    passes: int
    seconds: float
    gn: list[GNRecord] = field(default_factory=list)
    presigma: Presigma | None = None
    prior_start: float = 0.0
    prior: float = 0.0
    ndf: float = 0.0
    theta_cov: Tensor | None = None
    solved: Tensor | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (without the Theta arrays)."""
        return {
            "cost_start": self.cost_start, "cost": self.cost, "cost_change": self.cost - self.cost_start,
            "cost_change_times_events": (self.cost - self.cost_start) * self.events,
            "presigma": None if self.presigma is None else asdict(self.presigma),
            "prior_start": self.prior_start, "prior": self.prior, "ndf": self.ndf,
            "start_correction": self.start_correction, "events": self.events, "tracks": self.tracks,
            "passes": self.passes, "seconds": self.seconds, "gn": [asdict(g) for g in self.gn],
            "solved_sensors": None if self.solved is None else int(self.solved.sum()),
        }


def _preconditioner(blocks: Tensor, active: np.ndarray, damping: float) -> Tensor:
    """Inverse (N, 6, 6) of the diagonal blocks, each scaled to unit diagonal with ``damping`` added
    (a block of a sensor with few hits is singular); identity on the inactive sensors."""
    n = blocks.shape[0]
    diag = blocks.diagonal(dim1=1, dim2=2)
    d = torch.where(diag > 0, diag.clamp_min(1e-300).sqrt(), torch.ones_like(diag))
    unit = blocks / (d[:, :, None] * d[:, None, :]) + damping * torch.eye(6, dtype=blocks.dtype)
    inv = torch.linalg.inv(unit) / (d[:, :, None] * d[:, None, :])
    act = torch.from_numpy(active)
    return torch.where(act[:, None, None], inv, torch.eye(6, dtype=blocks.dtype).expand(n, 6, 6))


def _dot(a: Tensor, b: Tensor) -> float:
    return float((a * b).sum())


COARSE_SPACES: dict[str, tuple[str, ...]] = {
    "none": (),  # block Jacobi alone
    "rigid": RIGID_MODES,  # the rigid-body motions of each layer (6 per layer)
    "rigid+weak": RIGID_MODES + WEAK_MODES,  # and each layer's share of the weak modes
}


def coarse_basis(geom: ITSGeometry, modes: Sequence[str]) -> np.ndarray:
    """The coarse space of the two-level preconditioner: each of ``modes`` (rigid-body or weak
    modes, ``misalignment.mode_vectors``) restricted to each layer in turn, (6N, m) with
    orthonormal columns per layer (modes that move nothing on a layer are dropped)."""
    if not modes:
        return np.zeros((6 * geom.n_sensors, 0))
    whole = mode_vectors(geom, tuple(modes))  # (6N, k): the modes' span over the detector
    rows = np.repeat(np.asarray(geom.layer), 6)
    cols = []
    for lay in range(geom.n_layers):
        part = np.where((rows == lay)[:, None], whole, 0.0)
        cols.append(sla.orth(part, rcond=1e-9))
    return np.concatenate(cols, axis=1)


class _CoarseLevel:
    """The coarse level of a two-level preconditioner: the coarse space ``Z`` put on the
    constraint surface of the active sensors, ``H Z`` (one pass per column) and ``E = Z^T H Z``.
    The block-Jacobi level damps what one sensor's hits determine; the coarse level the collective
    motions of whole layers, which Jacobi alone reaches only after many iterations.
    :meth:`apply` is the balancing (BNN) combination ``P^T J P + Z E^+ Z^T`` with ``P = I - H Z
    E^+ Z^T`` (Mandel, Comm. Numer. Meth. Eng. 9 (1993) 233; Tang et al., J. Sci. Comput. 39
    (2009) 340): symmetric positive, never double-counting the coarse directions as the additive
    sum ``J + Z E^+ Z^T`` does, and with ``H Z`` kept it costs no extra pass per iteration."""

    def __init__(self, z: np.ndarray, cons: Constraints, active: np.ndarray,
                 matvec: Callable[[Tensor], Tensor]) -> None:
        n = cons.n_sensors
        cols = []
        for j in range(z.shape[1]):
            zc = cons.project(torch.from_numpy(z[:, j].reshape(n, 6)) * torch.from_numpy(active)[:, None])
            cols.append(zc.reshape(-1))
        # (6N, m) orthonormal, on the constraint surface: the SVD's range of the columns (a QR that
        # drops a dependent column by its diagonal keeps an arbitrary completion in its place)
        self.z = torch.from_numpy(sla.orth(torch.stack(cols, dim=1).numpy(), rcond=1e-9))
        hz = torch.stack([matvec(self.z[:, j].reshape(n, 6)).reshape(-1) for j in range(self.z.shape[1])], dim=1) \
            if self.z.shape[1] else torch.zeros_like(self.z)
        a = self.z.T @ hz
        a = 0.5 * (a + a.T)
        w, v = torch.linalg.eigh(a) if a.numel() else (torch.zeros(0, dtype=a.dtype), a)
        ok = w > 1e-12 * max(float(w.max()), 0.0) if w.numel() else w > 0
        self.dropped = int((~ok).sum())  # coarse directions without curvature (weak modes the data leave free)
        self.zv = self.z @ v[:, ok]  # H's eigen-directions within the coarse space ...
        self.hzv = hz @ v[:, ok]  # ... times H
        self.inv = 1.0 / w[ok]
        self.size = int(ok.sum())

    def apply(self, r: Tensor, fine: Callable[[Tensor], Tensor]) -> Tensor:
        """``y = P^T fine(P r) + Z E^+ Z^T r`` (class doc), ``fine`` the projected block Jacobi."""
        if not self.size:
            return fine(r)
        shape = r.shape
        c = (self.zv.T @ r.reshape(-1)) * self.inv  # E^+ Z^T r
        t = fine((r.reshape(-1) - self.hzv @ c).reshape(shape)).reshape(-1)  # J (r - H Z E^+ Z^T r)
        t = t - self.zv @ ((self.hzv.T @ t) * self.inv)  # (I - Z E^+ Z^T H) t
        return (t + self.zv @ c).reshape(shape)


@dataclass
class _PCGResult:
    x: Tensor  # the solution taken (the iterate of smallest residual)
    r: Tensor  # its residual H x + g (recurrence)
    predicted: float  # g.x + x.H x / 2
    residual0: float
    relative: float  # its relative residual
    converged: bool
    note: str = ""


def _pcg(matvec: Callable[[Tensor, int], Tensor], precond: Callable[[Tensor], Tensor], g: Tensor, max_iter: int,
         tol: float, gn: int, t_start: float, report: Callable[[CGRecord], None],
         diverge: float = 100.0) -> _PCGResult:
    """Projected preconditioned CG on ``H x = -g`` from ``x = 0`` (``precond``: the projected
    preconditioner). Stops at ``tol`` (relative ``sqrt(r^T y)``), after ``max_iter``, at a direction
    without curvature, or when rounding takes over (``r^T y <= 0``, or the residual grown
    ``diverge`` times above its smallest value: the iterates left the rounding floor of an
    ill-conditioned system); returns the iterate of smallest residual (after ``r^T y <= 0`` the
    last one, with the last measured residual: what it has left is below what rounding resolves)."""
    x = torch.zeros_like(g)
    r = g.clone()
    y = precond(r)
    rho = _dot(r, y)
    res0 = math.sqrt(max(rho, 0.0))
    best = _PCGResult(x, r, 0.0, res0, 1.0, rho <= 0.0)
    if rho <= 0.0:
        best.note = "nothing to do: the projected gradient is zero"
        return best
    p = -y
    for k in range(1, max_iter + 1):
        t0 = time.perf_counter()
        hp = matvec(p, k)
        php = _dot(p, hp)
        if not php > 0.0:
            best.note = f"stopped at iteration {k}: a direction without curvature (p^T H p = {php:.3g})"
            break
        alpha = rho / php
        x = x + alpha * p
        r = r + alpha * hp
        y = precond(r)
        rho_new = _dot(r, y)
        floor = rho_new <= 0.0  # r^T y of a positive preconditioner: only rounding makes it <= 0
        rel = best.relative if floor else math.sqrt(rho_new) / res0  # at the floor: the last measured
        pred = 0.5 * (_dot(g, x) + _dot(r, x))
        now = time.perf_counter()
        report(CGRecord(gn, k, pred, rel * res0, rel, php, now - t0, now - t_start))
        if floor:
            best = _PCGResult(x, r, pred, res0, rel, True)
            best.note = (f"reached the rounding floor at iteration {k} (r^T y <= 0 after a relative residual of "
                         f"{rel:.2e}); this iterate is taken")
            break
        if rel <= best.relative:
            best = _PCGResult(x, r, pred, res0, rel, rel <= tol)
        if rel <= tol:
            break
        if rel > diverge * best.relative:
            best.note = (f"residual grew {diverge:g} times above its smallest value {best.relative:.2e} at iteration "
                         f"{k}: rounding floor; the iterate of smallest residual is taken")
            break
        p = -y + (rho_new / rho) * p
        rho = rho_new
    return best


def _sampled_errors(noise: _NoiseGradients, system: GNSystem, prior: _PriorTerm | None, active: np.ndarray,
                    matvec: Callable[[Tensor, int], Tensor], precond: Callable[[Tensor], Tensor], cons: Constraints,
                    cg_iterations: int, tol: float, seed: int, progress: bool) -> Tensor:
    """(N, 6, 6) the mean of ``x x^T`` over the solutions ``x`` of ``H x = -g`` within the
    constraints for the noise replicas' gradients ``g`` (the prior's pseudo-measurements get
    their noise too: variance ``2 / ndf`` times its curvature, as in :func:`_direct_step`); NaN
    off the active sensors."""
    from tqdm.auto import tqdm

    g = noise.samples(float(system.events))
    if prior is not None:
        gen = torch.Generator().manual_seed(seed + 1)
        g = g + prior.pseudo_noise(torch.randn(g.shape, dtype=torch.float64, generator=gen))
    acc = torch.zeros(g.shape[1], 6, 6, dtype=torch.float64)
    for j in tqdm(range(noise.k), desc="errors: noise replicas", unit="solve", disable=not progress):
        x = cons.project(_pcg(matvec, precond, g[j], cg_iterations, tol, 0, 0.0, lambda _: None).x)
        acc += x[:, :, None] * x[:, None, :]
    cov = acc / noise.k
    cov[~torch.from_numpy(active)] = math.nan
    return cov


@torch.no_grad()
def refine(
    model: ITSAlignmentModel,
    data: TrackSource,
    constraints: Constraints,
    *,
    gn_iterations: int = 2,
    cg_iterations: int = 100,
    tol: float = 1e-4,
    chunk_tracks: int = 4096,
    cache_mb: float | None = None,
    cache_precision: str = "float64",
    damping: float = 1e-6,
    min_sensor_hits: int = 10,
    sensors: Sequence[int] | np.ndarray | None = None,
    bodies: Sequence[Sequence[int] | np.ndarray] = (),
    max_halvings: int = 3,
    coarse: np.ndarray | None = None,
    presigma_rot: float | None = None,
    presigma_trans: float | None = None,
    presigma_free: np.ndarray | None = None,
    solver: str = "cg",
    error_samples: int = 0,
    error_seed: int = 0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    on_iteration: Callable[[CGRecord], None] | None = None,
) -> RefineResult:
    """Minimise C over Theta from the model's current Theta: ``gn_iterations`` Gauss-Newton
    relinearisations, each solving ``H delta = -g`` within ``constraints`` by projected
    preconditioned CG (module docstring), matrix-free.

    Args:
        model: the cost (float64 precision); its Theta is the start (first put on the constraint
            surface: fixed sensors to 0, ``Theta - Q Q^T Theta``) and is set to the result.
        data: a TrackBatch, a list of them, or a callable returning an iterator over TrackBatch
            (the same tracks on every call; one call per pass).
        constraints: ``Q^T Theta = 0`` and the fixed sensors (``Constraints.build``).
        gn_iterations: relinearisations (>= 1).
        cg_iterations: CG iterations per Gauss-Newton iteration at most (>= 1); each is a pass.
        tol: stop CG when the projected preconditioned residual norm falls below ``tol`` times
            its initial value.
        chunk_tracks: tracks per vectorised chunk.
        cache_mb: memory for the linearisation kept between the passes of one Gauss-Newton
            iteration (about 1.5 kB per 7-hit track); None: all of it for a list of batches,
            none for a callable (every pass recomputes it). When it holds all of it, the CG
            passes do not read the data.
        cache_precision: ``"float64"`` or ``"float32"`` (half the memory; ``H p`` to ~1e-7
            relative; cost, gradient and preconditioner stay float64).
        damping: added to the unit-diagonal scaled preconditioner blocks.
        min_sensor_hits: sensors with fewer hits are held at their value (as those without hits:
            a chip with one or two hits has directions without curvature, along which a step is
            set by rounding and the non-linearity).
        sensors: ids of the sensors to solve for (default: all); the others keep their value
            (their tracks still enter; the constraints then act on the solved sensors' steps).
        bodies: solver ``"direct"`` only: groups of sensor ids each solved as one rigid body
            beside ``sensors`` (e.g. the staves of the outer layers: ``refine_run``'s
            ``rigid_layers``). Theta's translations are those of the global origin, so a rigid
            motion of a group is, to first order, the same Theta step for each of its sensors:
            one step of 6 parameters per body, fitted to all its sensors' hits. A body is
            solved when none of its sensors is fixed and its sensors have ``min_sensor_hits``
            hits together; no sensor may be in two bodies or in a body and ``sensors``.
        max_halvings: the step is halved while the cost rises, at most this often (then it is
            not taken).
        coarse: (6N, m) coarse space of a two-level preconditioner (:func:`coarse_basis`, e.g.
            the rigid-body modes of each layer), combined with block Jacobi within the
            constraints (``_CoarseLevel``); costs m passes per Gauss-Newton iteration, saves the
            many CG iterations that collective motions of whole layers take under Jacobi alone.
            ``presigma_free``'s directions join it (the prior does not damp them).
        presigma_rot, presigma_trans: a Gaussian prior towards the nominal geometry (Millepede's
            presigma, :class:`Presigma`) on the active sensors: ``0 +- presigma_rot`` (rad) on each
            rotation angle, ``0 +- presigma_trans`` (mm) on each translation, its chi2 in units of
            C divided by the data's degrees of freedom ``sum_i nu_i``. It enters the objective
            the steps minimise and compare (``C`` plus the prior's term), the gradient, ``H p``
            and the diagonal blocks (so the preconditioner and the coarse level); C itself is
            reported without it (``cost``, ``prior`` of the result). None (default): no prior.
        presigma_free: (6N, m) directions in Theta (e.g. ``misalignment.mode_vectors`` of global
            modes) the prior leaves to the data: it holds each sensor at the nominal geometry up
            to a combination of them (:class:`_PriorTerm`), so a coherent deformation of the
            whole detector is not pulled towards zero by thousands of per-sensor
            pseudo-measurements. None (default): the prior acts on every direction.
        solver: ``"cg"`` (default): matrix-free projected preconditioned CG, one pass per
            iteration; ``"direct"``: the Gauss-Newton matrix of the solved sensors is accumulated
            densely in the system pass and the constrained step solved exactly (one pass per
            Gauss-Newton iteration, no cache; Millepede's "inversion" method), for at most
            :data:`DIRECT_MAX_PARAMETERS` parameters (6 per solved sensor: e.g. the inner barrel
            with ``sensors``); ``coarse`` and ``cg_iterations`` do not apply; ``"sparse"``: the
            pass assembles ``H`` of all solved sensors block-sparse (the 6 x 6 blocks of the
            sensor pairs tracks connect: :class:`_SparseBlocks`; Millepede-II's sparse mode) and
            the CG iterations multiply by it in memory (one pass per Gauss-Newton iteration, no
            cache: the full ITS2 on any number of events, ``cg_iterations`` and ``tol`` as
            tight as wanted).
        error_samples: solver ``"sparse"``: in the last Gauss-Newton iteration, the errors of
            every solved sensor (:attr:`RefineResult.theta_cov`) from this many noise replicas
            of the data (:class:`_NoiseGradients`, accumulated in the system pass; one CG solve
            each, in memory); 0 (default): none.
        error_seed: the seed of those replicas.
        progress: tqdm bars; log: receives a line per Gauss-Newton iteration;
        on_iteration: called with every :class:`CGRecord`.
    """
    where = "refine"
    _check_model(model, where)
    n = model.n_sensors
    if not isinstance(constraints, Constraints) or constraints.n_sensors != n:
        got = constraints.n_sensors if isinstance(constraints, Constraints) else type(constraints).__name__
        raise ValueError(f"{where}: constraints must be a Constraints for the model's {n} sensors, got {got}")
    for name, val, low in (("gn_iterations", gn_iterations, 1), ("cg_iterations", cg_iterations, 1),
                           ("max_halvings", max_halvings, 0), ("min_sensor_hits", min_sensor_hits, 1),
                           ("error_samples", error_samples, 0), ("error_seed", error_seed, 0)):
        if not (isinstance(val, int) and not isinstance(val, bool) and val >= low):
            raise ValueError(f"{where}: {name} must be an integer >= {low}, got {val!r}")
    for name, val in (("tol", tol), ("damping", damping)):
        if not (isinstance(val, (int, float)) and not isinstance(val, bool) and 0 <= val < 1):
            raise ValueError(f"{where}: {name} must be a number in [0, 1), got {val!r}")
    presigma = Presigma.build(presigma_rot, presigma_trans, where)
    if presigma_free is not None:
        presigma_free = np.asarray(presigma_free, dtype=np.float64)
        if presigma_free.ndim != 2 or presigma_free.shape[0] != 6 * n or not np.isfinite(presigma_free).all():
            raise ValueError(f"{where}: presigma_free must be a finite (6N, m) = ({6 * n}, m) array, got shape "
                             f"{presigma_free.shape}")
        if presigma is None:
            raise ValueError(f"{where}: presigma_free names directions the prior leaves free, but there is no prior "
                             "(presigma_rot and presigma_trans are None)")
    if solver not in SOLVERS:
        raise ValueError(f"{where}: solver must be one of {list(SOLVERS)}, got {solver!r}")
    if error_samples and solver != "sparse":
        raise ValueError(f"{where}: error_samples are the sparse solver's errors (solver 'direct' gives exact ones), "
                         f"got solver {solver!r}")
    if solver == "direct" and coarse is not None:
        raise ValueError(f"{where}: coarse is the CG solver's preconditioner; solver 'direct' takes none")
    if coarse is not None:
        coarse = np.asarray(coarse, dtype=np.float64)
        if coarse.ndim != 2 or coarse.shape[0] != 6 * n or not np.isfinite(coarse).all():
            raise ValueError(f"{where}: coarse must be a finite (6N, m) = ({6 * n}, m) array, got shape "
                             f"{coarse.shape}")
        if presigma_free is not None:  # what the prior no longer damps, Jacobi reaches slowly: solved exactly
            coarse = np.concatenate([coarse, presigma_free], axis=1)
    solve = np.ones(n, dtype=bool)
    if sensors is not None:
        ids = np.asarray(sensors)
        if ids.ndim != 1 or (ids.size and (not np.issubdtype(ids.dtype, np.integer) or ids.min() < 0
                                           or ids.max() >= n)):
            raise ValueError(f"{where}: sensors must be a 1-d array of sensor ids in 0..{n - 1}, got {sensors!r}")
        solve[:] = False
        solve[ids] = True
    free = constraints.free[:, 0].numpy() > 0
    groups = [np.asarray(b) for b in bodies]
    if groups and solver != "direct":
        raise ValueError(f"{where}: bodies are solved by solver 'direct' only, got solver {solver!r}")
    in_body = np.zeros(n, dtype=np.int64)
    for i, b in enumerate(groups):
        if b.ndim != 1 or not b.size or not np.issubdtype(b.dtype, np.integer) or b.min() < 0 or b.max() >= n:
            raise ValueError(f"{where}: bodies[{i}] must be a non-empty 1-d array of sensor ids in 0..{n - 1}")
        if not free[b].all():
            raise ValueError(f"{where}: bodies[{i}] holds fixed sensors ({np.flatnonzero(~free[b]).size} of {b.size})")
        np.add.at(in_body, b, 1)
    overlap = (in_body > 1) | ((in_body > 0) & solve) if sensors is not None else in_body > 1
    if overlap.any():
        raise ValueError(f"{where}: a sensor is in two bodies or in a body and in sensors (sensor "
                         f"{int(np.flatnonzero(overlap)[0])})")
    solve &= in_body == 0
    candidates = np.flatnonzero(free & solve)
    unit = np.full(n, -1, dtype=np.int64)  # the direct solver's unknowns: single sensors, then the bodies
    unit[candidates] = np.arange(candidates.size)
    for i, b in enumerate(groups):
        unit[b] = candidates.size + i
    n_units = candidates.size + len(groups)
    if solver == "direct" and 6 * n_units > DIRECT_MAX_PARAMETERS:
        raise ValueError(f"{where}: solver 'direct' forms the dense Gauss-Newton matrix of the solved sensors: "
                         f"{candidates.size} sensors{f' and {len(groups)} bodies' if groups else ''} are "
                         f"{6 * n_units} parameters "
                         f"({(6 * n_units) ** 2 * 8 / 2**30:.1f} GB), more than {DIRECT_MAX_PARAMETERS}; "
                         "solve for fewer sensors (sensors, --layers) or use solver 'sparse' (errors by "
                         "error_samples) or 'cg'")
    # the direct and sparse solvers make one pass per linearisation: nothing to keep between passes
    src = _Source(model, data, where, chunk_tracks=chunk_tracks, cache_mb=cache_mb if solver == "cg" else 0.0,
                  cache_precision=cache_precision)
    say = log or (lambda _: None)
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    q = constraints.q.numpy()
    th0 = model.theta().reshape(-1).numpy().copy()
    th = th0.copy()
    fixed6 = ~np.repeat(free, 6)
    th[fixed6] = 0.0
    th = th - q @ (q.T @ th)
    th[fixed6] = 0.0  # Q's rows of the fixed sensors are zero only to rounding
    start_correction = float(np.abs(th - th0).max()) if th.size else 0.0
    theta = torch.from_numpy(th.reshape(n, 6))
    model.set_theta(theta)
    theta = model.theta()
    theta_start = theta.clone()
    records: list[GNRecord] = []
    passes = 0
    n_batches: int | None = len(src.batches) if src.batches is not None else None

    def bar(desc: str) -> Any:
        return tqdm(total=n_batches, desc=desc, unit="batch", leave=False, disable=not progress)

    cost_start = math.nan
    cost = math.nan
    theta_cov: Tensor | None = None
    prior_start = 0.0
    prior_now = 0.0
    solved = np.zeros(n, dtype=bool)
    for it in range(1, gn_iterations + 1):
        dense: _DenseBlock | _SparseBlocks | None = None
        if solver == "direct":
            dense = _DenseBlock(unit)
        elif solver == "sparse":
            dense = _SparseBlocks(free & solve)
        noise = _NoiseGradients(error_samples, n, error_seed) if error_samples and it == gn_iterations else None
        with bar(f"refine GN {it}: cost, gradient, {'blocks' if dense is None else 'H'}") as b:
            system = _system(src, b, dense, noise)
        passes += 1
        n_batches = n_batches if n_batches is not None else (b.n if progress else None)
        cost = system.cost
        active = free & solve & (system.hits.numpy() >= min_sensor_hits)
        unit_active = np.zeros(n_units, dtype=bool)
        unit_active[unit[active]] = True
        for i, b in enumerate(groups):  # a body: its hits together
            unit_active[candidates.size + i] = active[b] = system.hits.numpy()[b].sum() >= min_sensor_hits
        solved |= active
        prior = None if presigma is None else _PriorTerm(presigma, active, system.ndf, model.trans_geom,
                                                          presigma_free)
        prior_now = 0.0 if prior is None else prior.value(theta)
        if it == 1:
            cost_start, prior_start = cost, prior_now
        g, blocks = system.grad, system.blocks
        if prior is not None:
            g = g + prior.grad(theta)
            blocks = blocks + prior.blocks
        cons = constraints.with_free(active)
        rec = GNRecord(it, cost, math.nan, 0.0, 0.0, 0, False, 1.0, 0.0, int(active.sum()), system.seconds,
                       time.perf_counter() - t_start, prior_before=prior_now)
        records.append(rec)
        with_prior = "" if prior is None else (f", prior term {prior_now:.6g} (C + prior {cost + prior_now:.10g}"
                                               f"{f'; {prior.rank} directions free of it' if prior.rank else ''})")
        say(f"GN {it}: C = {cost:.10g}{with_prior} ({system.events} events, {system.tracks} tracks, "
            f"{int(active.sum())} active sensors), pass {system.seconds:.1f} s, cached "
            f"{src.cached_bytes / 2**20:.0f} MB")
        if isinstance(dense, _DenseBlock):
            t_d = time.perf_counter()
            ds = _direct_step(dense, unit_active, g, prior, cons, system.ndf)
            dense = None
            x = torch.zeros(n, 6, dtype=torch.float64)  # each unit's step on its sensors
            mapped = torch.from_numpy(unit >= 0)
            x[mapped] = ds.x[torch.from_numpy(unit[unit >= 0])]
            theta_cov = torch.full((n, 6, 6), math.nan, dtype=torch.float64)  # single sensors' errors
            theta_cov[torch.from_numpy(candidates)] = ds.cov[: candidates.size]
            xhx = 2.0 * (ds.predicted - _dot(g, x))
            rec.solver, rec.direct_dropped, rec.direct_seconds = "direct", ds.dropped, time.perf_counter() - t_d
            rec.grad_norm, rec.cg_iterations, rec.converged, rec.predicted_change = ds.grad_norm, 0, True, ds.predicted
            say(f"GN {it}: direct solve of {6 * int(unit_active.sum())} parameters "
                f"({int(unit_active[candidates.size:].sum())} rigid bodies) in {rec.direct_seconds:.1f} s, "
                f"curvatures {ds.eig_min:.3g} .. {ds.eig_max:.3g}, {ds.dropped} directions without curvature left out")
        else:  # block Jacobi on the diagonal blocks
            sparse = dense
            if sparse is not None:
                rec.solver = "sparse"
                say(f"GN {it}: H assembled sparse: {sparse.matrix.nnz // 36} blocks of 6 x 6 "
                    f"({sparse.matrix.data.nbytes / 2**20:.0f} MB)")
            minv = _preconditioner(blocks, active, damping)
            proj = cons.projection(minv)
            act6 = torch.from_numpy(active)[:, None].to(torch.float64)

            def jacobi(r: Tensor) -> Tensor:
                return proj(torch.einsum("nij,nj->ni", minv, r * act6))

            precond = jacobi
            cg_bar = tqdm(total=cg_iterations, desc=f"refine GN {it}: CG", unit="it", disable=not progress)

            def hessian(p: Tensor, b: Any, prior: _PriorTerm | None = prior,
                        sparse: _SparseBlocks | None = sparse) -> Tensor:
                hp = _matvec(src, p, b)[0] if sparse is None else sparse.matvec(p)
                return hp if prior is None else hp + prior.apply(p)

            def matvec(p: Tensor, k: int) -> Tensor:
                if sparse is not None:  # in memory: no pass over the data
                    return hessian(p, None)
                with bar(f"CG {k}: H p") as b:
                    return hessian(p, b)

            if coarse is not None and coarse.shape[1]:
                t_c = time.perf_counter()
                with tqdm(total=coarse.shape[1], desc=f"refine GN {it}: coarse Z^T H Z", unit="col",
                          disable=not progress) as cbar:
                    def coarse_matvec(z: Tensor) -> Tensor:
                        cbar.update(1)
                        if sparse is not None:
                            return hessian(z, None)
                        with bar("coarse: H z") as b:
                            return hessian(z, b)

                    cc = _CoarseLevel(coarse, cons, active, coarse_matvec)
                passes += cc.z.shape[1] if sparse is None else 0
                rec.coarse_size, rec.coarse_dropped = cc.size, cc.dropped
                rec.coarse_seconds = time.perf_counter() - t_c

                def two_level(r: Tensor, cc: _CoarseLevel = cc) -> Tensor:
                    return cc.apply(r, jacobi)

                precond = two_level

                say(f"GN {it}: coarse space of {cc.size} directions ({cc.dropped} without curvature dropped), "
                    f"{rec.coarse_seconds:.1f} s")

            def report(cg: CGRecord) -> None:
                rec.cg.append(cg)
                cg_bar.update(1)
                cg_bar.set_postfix(rel_res=f"{cg.relative_residual:.2e}", dC=f"{cg.predicted_change:.3e}")
                if on_iteration is not None:
                    on_iteration(cg)

            try:
                sol = _pcg(matvec, precond, g, cg_iterations, tol, it, t_start, report)
            finally:
                cg_bar.close()
            passes += len(rec.cg) if sparse is None else 0
            x = sol.x
            if noise is not None:
                t_e = time.perf_counter()
                theta_cov = _sampled_errors(noise, system, prior, active, matvec, precond, cons, cg_iterations, tol,
                                            error_seed, progress)
                rec.error_samples, rec.error_seconds = noise.k, time.perf_counter() - t_e
                say(f"GN {it}: errors of {int(active.sum())} sensors from {noise.k} noise replicas, "
                    f"{rec.error_seconds:.1f} s")
            xhx = _dot(sol.r - g, x)  # x.H x = (r - g).x
            rec.grad_norm, rec.cg_iterations, rec.converged = sol.residual0, len(rec.cg), sol.converged
            rec.predicted_change = sol.predicted
            if sol.note:
                say(f"GN {it}: CG {sol.note}")
        # the step: exactly on the constraint surface (the CG iterates are, to rounding)
        step = cons.project(x)
        scale = 1.0
        new_cost, new_prior = cost, prior_now
        before = cost + prior_now  # the objective the step minimises
        for _ in range(max_halvings + 1):
            model.set_theta(theta + scale * step)
            with bar(f"refine GN {it}: cost") as b:
                new_cost, _ = src.cost(b)
            passes += 1
            new_prior = 0.0 if prior is None else prior.value(model.theta())
            if new_cost + new_prior <= before + 1e-12 * abs(before) or not bool(step.abs().max() > 0):
                break
            scale *= 0.5
        else:
            say(f"GN {it}: the cost rose for every step scale down to {scale * 2:g}; step not taken")
            model.set_theta(theta)
            new_cost, new_prior, scale = cost, prior_now, 0.0
        rec.step_scale = scale
        rec.cost_after, rec.prior_after = new_cost, new_prior
        if scale != 1.0:  # q(s x) = s g.x + s^2 x.H x / 2 with x.H x = (r - g).x
            rec.predicted_change = float(scale * _dot(g, x) + 0.5 * scale**2 * xhx)
        rec.max_step = float((scale * step).abs().max())
        rec.time_s = time.perf_counter() - t_start
        theta = model.theta()
        cost, prior_now = new_cost, new_prior
        prior_change = "" if prior is None else (f", prior term {rec.prior_after:.6g} (change "
                                                 f"{rec.prior_after - rec.prior_before:.4g})")
        how = "direct solve" if rec.solver == "direct" else (f"{rec.cg_iterations} CG iterations (relative residual "
                                                             f"{sol.relative:.2e})")
        say(f"GN {it}: {how}, predicted {'dC' if prior is None else 'd(C + prior)'} = "
            f"{rec.predicted_change:.4g}, "
            f"actual {'' if prior is None else 'dC '}{new_cost - rec.cost_before:.4g} (times events: "
            f"{(new_cost - rec.cost_before) * system.events:.4g}){prior_change}, max |dTheta| {rec.max_step:.3g}")
        src.clear()  # Theta changed
    first = src.first
    assert first is not None
    return RefineResult(theta, theta_start, cost_start, cost, start_correction, first.events, first.tracks, passes,
                        time.perf_counter() - t_start, records, presigma=presigma, prior_start=prior_start,
                        prior=prior_now, ndf=first.ndf, theta_cov=theta_cov, solved=torch.from_numpy(solved))


# ------------------------------------------------------------------------------------------------
# A run directory of the alignment workers (``streamcal its refine``)

REFINE_JSON = "refine.json"


class SpoolTracks:
    """The tracks a run's alignment workers spooled (``RUN_DIR/spool/*.arrows``, Arrow IPC streams
    of schema ``its.hits``) as a data callable for :func:`refine`: every call reads the files again
    and yields one packed :class:`TrackBatch` per spooled batch (``pack_tracks`` with ``min_hits``,
    the vertex columns for ``with_vertex``), so memory holds one batch at a time.

    The files' batches are merged in the order of their first event id (the workers partition the
    events in blocks), so ``events`` keeps the first ``events`` events of the run (all without
    it). A file whose tail is damaged (a killed worker) is read up to it.

    Attributes (after a pass): ``info`` (files, batches, damaged files, events read) and
    ``rejects`` (``RejectCounts`` of the packing).
    """

    def __init__(self, spool_dir: str | os.PathLike[str], geom: ITSGeometry, *, events: int | None = None,
                 min_hits: int = 4, with_vertex: bool = True, log: Callable[[str], None] | None = None) -> None:
        from streamcal.detectors.its.evaluation import RunFormatError
        from streamcal.detectors.its.mille_export import _spool_key

        self.spool_dir = Path(spool_dir)
        if not self.spool_dir.is_dir():
            raise RunFormatError(self.spool_dir, "missing (the alignment workers spool their hit batches there "
                                                 "as *.arrows)")
        self.files = sorted(self.spool_dir.glob("*.arrows"), key=_spool_key)
        if not self.files:
            raise RunFormatError(self.spool_dir, "no spool files (*.arrows, Arrow IPC streams of schema its.hits)")
        if events is not None and not (isinstance(events, int) and not isinstance(events, bool) and events >= 1):
            raise ValueError(f"SpoolTracks: events must be a positive integer or None, got {events!r}")
        self.geom = geom
        self.events = events
        self.min_hits = min_hits
        self.with_vertex = with_vertex
        self.log = log
        self.info: dict[str, Any] = {}
        self.rejects = RejectCounts()
        self._warned: set[str] = set()

    def __call__(self) -> Iterator[TrackBatch]:
        import heapq

        import pyarrow as pa

        from streamcal.detectors.its.evaluation import RunFormatError

        handles = [pa.OSFile(str(p), "rb") for p in self.files]
        damaged: list[str] = []
        rejects = RejectCounts()
        n_batches = 0
        taken = 0
        try:
            readers: list[Any] = []
            for path, fh in zip(self.files, handles):
                try:
                    readers.append(pa.ipc.open_stream(fh))
                except (pa.ArrowInvalid, OSError) as exc:
                    raise RunFormatError(path, f"not an Arrow IPC stream: {exc}") from exc
            heap: list[tuple[int, int, Any]] = []

            def push(i: int) -> None:
                try:
                    b = readers[i].read_next_batch()
                except StopIteration:
                    return
                except (pa.ArrowInvalid, OSError) as exc:
                    name = self.files[i].name
                    damaged.append(name)
                    if self.log is not None and name not in self._warned:
                        self.log(f"spool {name}: read up to a damaged tail ({exc})")
                        self._warned.add(name)
                    return
                ev = b.column("event").to_numpy() if "event" in b.schema.names else np.zeros(0, np.int64)
                heapq.heappush(heap, (int(ev.min()) if ev.size else -1, i, b))

            for i in range(len(readers)):
                push(i)
            while heap and (self.events is None or taken < self.events):
                _, i, batch = heapq.heappop(heap)
                push(i)
                n_batches += 1
                ev = np.asarray(batch.column("event").to_numpy(zero_copy_only=False))
                uniq = np.unique(ev)
                if self.events is not None and uniq.size > self.events - taken:
                    uniq = uniq[: self.events - taken]
                    batch = batch.filter(pa.array(np.isin(ev, uniq)))
                taken += int(uniq.size)
                try:
                    tb, cnt = pack_tracks(batch, self.geom, min_hits=self.min_hits, with_vertex=self.with_vertex)
                except ValueError as exc:
                    raise RunFormatError(self.files[i], str(exc)) from exc
                rejects = rejects + cnt
                if tb.n_tracks:
                    yield tb
        finally:
            for fh in handles:
                fh.close()
        self.rejects = rejects
        self.info = {"files": [p.name for p in self.files], "batches": n_batches, "damaged": sorted(set(damaged)),
                     "events": taken}


def _metrics_rows(result: RefineResult, events: int) -> list[dict[str, Any]]:
    """``metrics.jsonl`` records (``evaluation.read_metrics``): an end-of-epoch record per
    Gauss-Newton iteration (epoch 0: the start) with the measured cost C and ``events`` (and,
    with a prior, its term ``prior`` beside C), and a synchronisation record per CG iteration with
    the cost the linearised problem predicts (C before the step plus the predicted change of the
    objective, C plus the prior's term)."""
    rows: list[dict[str, Any]] = [{"epoch": 0, "epoch_cost": result.cost_start, "events": events, "time_s": 0.0,
                                   "kind": "start"}]
    if result.presigma is not None:
        rows[0]["prior"] = result.prior_start
    sync = 0
    for g in result.gn:
        for c in g.cg:
            sync += 1
            rows.append({"epoch": g.iteration, "sync": sync, "step": c.iteration,
                         "cost": g.cost_before + c.predicted_change, "tracks": result.tracks, "time_s": c.time_s,
                         "kind": "cg", "predicted": True, "relative_residual": c.relative_residual})
        rows.append({"epoch": g.iteration, "epoch_cost": g.cost_after, "events": events, "time_s": g.time_s,
                     "kind": "gauss-newton", "predicted_change": g.predicted_change,
                     "cg_iterations": g.cg_iterations})
        if result.presigma is not None:
            rows[-1]["prior"] = g.prior_after
    return rows


def refine_run(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    events: int | None = None,
    gn_iterations: int = 2,
    cg_iterations: int = 100,
    tol: float = 1e-4,
    min_hits: int = 4,
    min_sensor_hits: int = 10,
    layers: Sequence[int] | None = None,
    rigid_layers: Sequence[int] | None = None,
    cache_mb: float = 0.0,
    cache_precision: str = "float64",
    chunk_tracks: int = 4096,
    coarse: str = "none",
    presigma_rot: float | None = None,
    presigma_trans: float | None = None,
    presigma_free_modes: Sequence[str] = (),
    solver: str = "cg",
    error_samples: int = 0,
    error_seed: int = 0,
    mode_constraints: bool = True,
    start: str | os.PathLike[str] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """:func:`refine` on a run directory of the alignment workers (``streamcal its refine``).
    ``coarse``: the two-level preconditioner's coarse space, one of :data:`COARSE_SPACES`;
    ``presigma_rot`` (rad), ``presigma_trans`` (mm): the prior towards the nominal geometry
    (:class:`Presigma`; None: none), recorded in ``refine.json``'s ``options`` and ``presigma``;
    ``presigma_free_modes``: global modes (``misalignment.WEAK_MODES`` and ``RIGID_MODES``) the prior
    leaves to the data (:func:`refine`'s ``presigma_free``);
    ``solver``: ``"cg"``, ``"direct"`` or ``"sparse"``, ``error_samples`` and ``error_seed`` (the
    sparse solver's errors) as :func:`refine`'s; ``rigid_layers`` (solver ``"direct"``):
    the staves of these layers solved as rigid bodies (:func:`refine`'s ``bodies``) beside the
    sensors of ``layers``; ``mode_constraints`` False: the run's
    weak-mode constraints are left out of the steps (its fixed layers stay fixed), for a subset of
    ``layers`` solved against the others (``run.json`` keeps the run's constraints: the frame of
    the evaluation's reference). ``start``: another run directory of the same detector and truth
    (e.g. an earlier refine on part of the data) whose ``theta.npy`` is the start instead of the
    run's.

    Reads ``run_dir/run.json`` (geometry, cost, constraints), starts from ``run_dir/theta.npy``,
    streams the spooled tracks (:class:`SpoolTracks`; the first ``events`` events) and writes
    ``out_dir`` as a run directory that ``streamcal evaluate align`` reads: ``run.json`` (the run's,
    one worker, ``epochs`` = Gauss-Newton iterations), ``theta.npy`` (refined), ``theta_true.npy``
    (copied), with solver ``"direct"`` (or ``"sparse"`` with ``error_samples``) ``theta_cov.npy``
    (the solved sensors' covariance blocks, :attr:`RefineResult.theta_cov`), ``solved.npy``
    (:attr:`RefineResult.solved`, the others held at their start; with the run's mode constraints
    imposed, for the evaluation's reference), ``metrics.jsonl`` (:func:`_metrics_rows`, written as
    the CG iterations go) and ``refine.json`` (the per-iteration record, seconds per pass, the spool
    and the packing's rejects). Returns the content of ``refine.json``.

    Raises:
        RunFormatError: (a ``StreamcalError``) naming the file or directory that is missing or
            malformed.
    """
    import json
    import shutil
    from dataclasses import replace

    from streamcal.detectors.its.evaluation import (
        METRICS_JSONL,
        SOLVED_NPY,
        THETA_COV_NPY,
        THETA_NPY,
        THETA_TRUE_NPY,
        RunFormatError,
        _load_theta,
        load_run_config,
        write_run_json,
    )
    from streamcal.detectors.its.geometry import build_geometry
    from streamcal.detectors.its.mille_export import SPOOL_DIR

    rd, out = Path(run_dir), Path(out_dir)
    if not rd.is_dir():
        raise RunFormatError(rd, "not a directory (expected a run directory of the alignment workers)")
    if out.resolve() == rd.resolve():
        raise ValueError(f"refine_run: out_dir must differ from run_dir ({rd}): the run's files are kept")
    rc = load_run_config(rd)
    geom = build_geometry(rc.geometry)
    theta0 = _load_theta(rd / THETA_NPY, geom.n_sensors)
    truth = _load_theta(rd / THETA_TRUE_NPY, geom.n_sensors)  # checked before the work
    if start is not None:
        sd = Path(start)
        if not sd.is_dir():
            raise RunFormatError(sd, "not a directory (expected a run directory whose theta.npy is the start)")
        if not np.array_equal(_load_theta(sd / THETA_TRUE_NPY, geom.n_sensors), truth):
            raise RunFormatError(sd / THETA_TRUE_NPY, f"differs from {rd / THETA_TRUE_NPY}: the start must be a "
                                                      "run of the same simulated detector")
        theta0 = _load_theta(sd / THETA_NPY, geom.n_sensors)
    model = ITSAlignmentModel.from_geometry(geom, replace(rc.model, precision="float64"))
    model.set_theta(torch.from_numpy(theta0))
    spec = rc.constraints if mode_constraints else replace(rc.constraints, modes=())
    constraints = spec.build(geom)
    if coarse not in COARSE_SPACES:
        raise ValueError(f"refine_run: coarse must be one of {list(COARSE_SPACES)}, got {coarse!r}")
    basis = coarse_basis(geom, COARSE_SPACES[coarse]) if COARSE_SPACES[coarse] else None
    prior = Presigma.build(presigma_rot, presigma_trans, "refine_run")  # checked before the work
    free_modes = tuple(presigma_free_modes)
    bad = [m for m in free_modes if m not in WEAK_MODES + RIGID_MODES]
    if bad:
        raise ValueError(f"refine_run: presigma_free_modes must be among {list(WEAK_MODES + RIGID_MODES)}, got {bad}")
    if free_modes and prior is None:
        raise ValueError("refine_run: presigma_free_modes are modes the prior leaves free, but there is no prior "
                         "(give presigma_rot and/or presigma_trans)")
    free_dirs = mode_vectors(geom, free_modes) if free_modes else None
    solve = None
    for name, val in (("layers", layers), ("rigid_layers", rigid_layers)):
        if val is not None and (not val or any(not (isinstance(x, int) and 0 <= x < geom.n_layers) for x in val)):
            raise ValueError(f"refine_run: {name} must be layer indices in 0..{geom.n_layers - 1}, got {list(val)}")
    if layers is not None:
        solve = np.flatnonzero(np.isin(geom.layer, np.asarray(layers, dtype=np.int64)))
    bodies = [np.flatnonzero((geom.layer == lay) & (geom.stave == s)) for lay in (rigid_layers or ())
              for s in np.unique(geom.stave[geom.layer == lay])]
    tracks = SpoolTracks(rd / SPOOL_DIR, geom, events=events, min_hits=min_hits,
                         with_vertex=rc.model.vertex == "given", log=log)
    out.mkdir(parents=True, exist_ok=True)
    write_run_json(out, replace(rc, workers=1, tau=1, epochs=gn_iterations, refined_from=str(rd)))
    shutil.copyfile(rd / THETA_TRUE_NPY, out / THETA_TRUE_NPY)
    metrics = out / METRICS_JSONL
    metrics.write_text("")
    with metrics.open("a") as mf:
        def on_iteration(c: CGRecord) -> None:
            mf.write(json.dumps({"epoch": c.gn, "cg": c.iteration, "predicted_change": c.predicted_change,
                                 "relative_residual": c.relative_residual, "time_s": c.time_s,
                                 "kind": "cg-progress"}) + "\n")
            mf.flush()

        result = refine(model, tracks, constraints, gn_iterations=gn_iterations, cg_iterations=cg_iterations,
                        tol=tol, chunk_tracks=chunk_tracks, cache_mb=cache_mb, cache_precision=cache_precision,
                        min_sensor_hits=min_sensor_hits, sensors=solve, bodies=bodies, coarse=basis,
                        presigma_rot=presigma_rot, presigma_trans=presigma_trans,
                        presigma_free=free_dirs, solver=solver, error_samples=error_samples,
                        error_seed=error_seed, progress=progress, log=log,
                        on_iteration=on_iteration)
    n_events = int(tracks.info.get("events", 0))
    metrics.write_text("".join(json.dumps(r, allow_nan=False) + "\n" for r in _metrics_rows(result, n_events)))
    np.save(out / THETA_NPY, result.theta.numpy())
    if result.theta_cov is not None:
        np.save(out / THETA_COV_NPY, result.theta_cov.numpy())
    if mode_constraints and spec.modes:  # the fit met the run's mode constraints with the held sensors' values
        assert result.solved is not None
        np.save(out / SOLVED_NPY, result.solved.numpy())
    cg_s = [c.pass_s for g in result.gn for c in g.cg]
    summary = {
        "source_run": str(rd),
        "method": SOLVERS[solver],
        "options": {"events": events, "gn_iterations": gn_iterations, "cg_iterations": cg_iterations, "tol": tol,
                    "min_hits": min_hits, "min_sensor_hits": min_sensor_hits,
                    "layers": None if layers is None else list(layers),
                    "rigid_layers": None if rigid_layers is None else list(rigid_layers), "cache_mb": cache_mb,
                    "cache_precision": cache_precision, "coarse": coarse, "presigma_rot": presigma_rot,
                    "presigma_trans": presigma_trans, "presigma_free_modes": list(free_modes), "solver": solver,
                    "error_samples": error_samples,
                    "error_seed": error_seed, "mode_constraints": mode_constraints,
                    "start": None if start is None else str(start),
                    "chunk_tracks": chunk_tracks, "threads": torch.get_num_threads()},
        "constraints": {"modes": list(spec.modes), "fixed_layers": list(spec.fixed_layers)},
        "covariance": None if result.theta_cov is None else {
            "file": THETA_COV_NPY, "sensors": int(torch.isfinite(result.theta_cov[:, 0, 0]).sum()),
            "definition": "per solved sensor the 6 x 6 covariance block of Theta (rad, mm): K V K, the held sensors "
                          "exact; NaN for the others",
            "estimate": "exact" if solver == "direct" else f"mean of x x^T over {error_samples} noise replicas "
                                                           f"(seed {error_seed})"},
        "spool": tracks.info, "rejects": asdict(tracks.rejects),
        "seconds_per_pass": {"system": [g.system_s for g in result.gn],
                             "cg_median": float(np.median(cg_s)) if cg_s else None,
                             "cg_first": cg_s[0] if cg_s else None},
        **result.to_dict(),
    }
    (out / REFINE_JSON).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
    return summary
