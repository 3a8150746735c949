"""Evaluation of an ITS2 alignment run against closed forms and known misalignments: the run
directory format (round trip, errors naming the file), residual misalignment of a known local
shift and with fixed layers and mode constraints, DCA_xy on the ideal geometry against the
propagated hit resolution and multiple scattering, a pure transverse shift of every chip (DCA
bias of about the shift before, none with the true Theta), chi2/ndf and DCA width of a random
misalignment before and after, and the ``streamcal evaluate align`` command on a synthetic run.

Geometry: the first four ITS2 layers with fewer chips (``ITSGeometryConfig.small``). Samples of
a few thousand tracks; everything on CPU in float64."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest

from streamcal.cli import build_parser, main
from streamcal.detectors.its.align import Constraints, OptimizerConfig, pack_tracks, reference_solution
from streamcal.detectors.its.evaluation import (
    DOFS,
    FIGURES,
    ConstraintSpec,
    EvaluationConfig,
    RunConfig,
    RunFormatError,
    alignment_targets,
    chi2_per_track,
    dca_vs_pt,
    dca_xy,
    default_test_seed,
    evaluate_run,
    expected_truth,
    load_run,
    load_run_config,
    read_metrics,
    residual_statistics,
    robust_sigma,
    sensor_precision,
    simulate_eval_sample,
    solve_errors,
    write_run_json,
)
from streamcal.detectors.its.geometry import ITSGeometryConfig, build_geometry
from streamcal.detectors.its.misalignment import (
    MisalignmentConfig,
    apply_alignment,
    compose,
    local_to_global,
    misalign,
    weak_mode,
)
from streamcal.detectors.its.simulation import SimulationConfig, simulate_batch
from streamcal.models.its_alignment import ITSAlignmentConfig, ITSAlignmentModel
from tests.its import barrel

GEOM_CFG = ITSGeometryConfig.small(n_layers=4, chips_v=(9, 9, 9, 28))
# uniform pT fills every bin of 0.2 .. 20 GeV/c; |eta| < 0.5 and a 10 mm long beam spot keep the
# tracks inside the four layers
SIM = SimulationConfig(beam_spot_sigma=(0.015, 0.015, 10.0), eta_max=0.5, pt_spectrum="uniform", seed=3)
MISALIGN = MisalignmentConfig(sigma_rot=(1e-4, 1e-4, 1e-4), sigma_trans=(0.02, 0.02, 0.02), seed=5)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def geom():
    return build_geometry(GEOM_CFG)


def _zeros(geom) -> np.ndarray:
    return np.zeros((geom.n_sensors, 6))


def _config(geom_cfg: ITSGeometryConfig = GEOM_CFG, **kw) -> RunConfig:
    base = dict(geometry=geom_cfg, misalignment=MISALIGN, simulation=SIM, model=ITSAlignmentConfig(),
                constraints=ConstraintSpec(), workers=4, tau=5, epochs=3, optimizer=OptimizerConfig())
    base.update(kw)
    return RunConfig(**base)


def _write_run(path, config: RunConfig, theta: np.ndarray, theta_true: np.ndarray, costs=(3.0, 1.5, 0.9)) -> None:
    write_run_json(path, config)
    np.save(path / "theta.npy", theta)
    np.save(path / "theta_true.npy", theta_true)
    lines = []
    step = 0
    for e, c in enumerate(costs):
        for s in range(2):
            step += config.tau
            lines.append({"epoch": e, "sync": s, "step": step, "cost": c * (1.1 - 0.1 * s), "tracks": 800,
                          "time_s": 0.5 * step})
        lines.append({"epoch": e, "epoch_cost": c, "events": 3000, "time_s": 0.5 * step})
    (path / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))


# ------------------------------------------------------------------------------------------------
# Run directory format


def test_run_json_round_trip(tmp_path):
    cfg = _config(
        misalignment=replace(MISALIGN, modes=(("radial", 1e-4), ("rz", 2e-4))),
        simulation=replace(SIM, beam_spot_mean=(0.01, -0.02, 0.5)),
        model=ITSAlignmentConfig(vertex="fit", beam_spot=(0.01, -0.02, 0.0), multiple_scattering=False),
        constraints=ConstraintSpec(modes=("rz", "curl"), fixed_layers=(0, 3)),
        optimizer=OptimizerConfig(method="adam", betas=(0.8, 0.99)),
    )
    path = write_run_json(tmp_path / "run", cfg)
    raw = json.loads(path.read_text())
    assert isinstance(raw["geometry"]["layers"], list) and raw["geometry"]["layers"][3]["r_min"] == 194.4
    assert raw["constraints"] == {"modes": ["rz", "curl"], "fixed_layers": [0, 3]}
    back = load_run_config(tmp_path / "run")
    assert back == cfg
    assert back.misalignment.modes == (("radial", 1e-4), ("rz", 2e-4))
    assert isinstance(back.geometry.layers, tuple) and back.geometry.n_sensors == GEOM_CFG.n_sensors
    assert back.label == "M=4, tau=5"


def test_metrics_are_parsed(tmp_path, geom):
    _write_run(tmp_path, _config(), _zeros(geom), _zeros(geom))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"note": "other kind"}\n\n')
        f.write('{"epoch": 3, "epoch_cost": null, "events": 0, "time_s": 20.0}\n')  # an epoch without events
    m = read_metrics(tmp_path / "metrics.jsonl")
    assert m.epoch.tolist() == [0, 1, 2, 3] and m.epoch_cost[:3].tolist() == [3.0, 1.5, 0.9]
    assert math.isnan(m.epoch_cost[3])
    assert m.sync_index.tolist() == [0, 1] * 3 and m.sync_step.tolist() == [5, 10, 15, 20, 25, 30]
    assert m.sync_cost[0] == pytest.approx(3.3) and m.skipped == 1
    run = load_run(tmp_path)
    assert run.theta.shape == (geom.n_sensors, 6) and run.label == "M=4, tau=5"


def test_bad_run_directories_name_the_file(tmp_path, geom):
    with pytest.raises(RunFormatError, match="not a directory"):
        load_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunFormatError, match=r"run\.json: missing"):
        load_run(tmp_path / "empty")

    good = tmp_path / "good"
    _write_run(good, _config(), _zeros(geom), _zeros(geom))
    raw = json.loads((good / "run.json").read_text())

    def broken(name: str, mutate) -> object:
        d = tmp_path / name
        _write_run(d, _config(), _zeros(geom), _zeros(geom))
        data = json.loads(json.dumps(raw))
        mutate(data)
        (d / "run.json").write_text(json.dumps(data))
        return d

    with pytest.raises(RunFormatError, match=r"run\.json: unknown key\(s\) \['colour'\]"):
        load_run(broken("unknown", lambda d: d.update(colour="red")))
    with pytest.raises(RunFormatError, match=r"run\.json: simulation: .*pt_min"):
        load_run(broken("badsim", lambda d: d["simulation"].update(pt_min=-1.0)))
    with pytest.raises(RunFormatError, match=r"run\.json: missing key\(s\) \['tau'\]"):
        load_run(broken("notau", lambda d: d.pop("tau")))
    with pytest.raises(RunFormatError, match=r"run\.json: constraints: .*unknown mode 'wobble'"):
        load_run(broken("badmode", lambda d: d["constraints"].update(modes=["wobble"])))

    np.save(good / "theta.npy", np.zeros((geom.n_sensors - 1, 6)))
    with pytest.raises(RunFormatError, match=rf"theta\.npy: must have shape \({geom.n_sensors}, 6\)"):
        load_run(good)
    load_run(good, arrays=False)  # a run to compare costs with needs no arrays
    np.save(good / "theta.npy", _zeros(geom))
    (good / "theta_true.npy").unlink()
    with pytest.raises(RunFormatError, match=r"theta_true\.npy: missing"):
        load_run(good)
    np.save(good / "theta_true.npy", np.full((geom.n_sensors, 6), np.nan))
    with pytest.raises(RunFormatError, match=r"theta_true\.npy: must be finite"):
        load_run(good)
    np.save(good / "theta_true.npy", _zeros(geom))
    for bad in (np.ones(geom.n_sensors - 1, dtype=bool), np.ones(geom.n_sensors)):
        np.save(good / "solved.npy", bad)
        with pytest.raises(RunFormatError, match=rf"solved\.npy: must be a bool array of shape \({geom.n_sensors},\)"):
            load_run(good)
    np.save(good / "solved.npy", np.arange(geom.n_sensors) % 2 == 0)
    assert load_run(good).solved.sum() == (geom.n_sensors + 1) // 2
    (good / "solved.npy").unlink()
    assert load_run(good).solved is None
    with (good / "metrics.jsonl").open("a") as f:
        f.write('{"epoch": 3, "sync": 0, "cost": 1.0}\n{not json\n')
    with pytest.raises(RunFormatError, match=r"metrics\.jsonl: line 10: record without 'step'"):
        load_run(good)


# ------------------------------------------------------------------------------------------------
# Residual misalignment


def test_residuals_of_a_known_local_shift(geom):
    """Every chip shifted by 20 um along u: before, du has mean -20 and RMS 20 um and the other
    DoFs nothing (the round trip through the global Theta is exact); after with the truth, 0."""
    local = _zeros(geom)
    local[:, 3] = 0.02
    truth = local_to_global(geom, local)
    before = residual_statistics(geom, _zeros(geom), truth)
    assert before["all"]["du"]["mean"] == pytest.approx(-20.0, abs=1e-9)
    assert before["all"]["du"]["rms"] == pytest.approx(20.0, abs=1e-9)
    assert before["layers"]["du"]["n"] == [int((geom.layer == i).sum()) for i in range(geom.n_layers)]
    for dof in DOFS:
        if dof != "du":
            assert before["all"][dof]["rms"] < 1e-6
    after = residual_statistics(geom, truth, truth)
    assert all(after["all"][d]["rms"] == 0.0 for d in DOFS)


def test_truth_relative_to_fixed_layers(geom):
    """With layers 0 and 3 fixed, a rigid motion G of the whole detector cannot be seen: the fit
    returns the rest relative to the fixed sensors, which is what the reference is."""
    spec = ConstraintSpec(fixed_layers=(0, 3))
    fixed = spec.fixed_sensors(geom)
    rest = misalign(geom, MISALIGN)
    rest[fixed] = 0.0
    g = np.broadcast_to(np.array([0.0, 0.0, 2e-4, 0.05, -0.03, 0.01]), rest.shape).copy()
    truth = compose(g, rest)
    free = np.ones(geom.n_sensors, dtype=bool)
    free[fixed] = False
    ref = expected_truth(geom, truth, spec)
    res = residual_statistics(geom, rest, ref, free)
    assert max(res["all"][d]["rms"] for d in DOFS) < 1e-6
    assert res["all"]["du"]["n"] == int(free.sum()) < geom.n_sensors
    naive = residual_statistics(geom, rest, truth, free)  # without the fixed frame: the rigid motion
    assert naive["all"]["du"]["rms"] > 10.0


def test_constrained_modes_are_projected_out(geom):
    """A rotation about the beam axis is blind; a constrained fit returns the truth without it."""
    spec = ConstraintSpec(modes=("rz",))
    rest = misalign(geom, MISALIGN)
    truth = rest + weak_mode(geom, "rz", 1e-3)
    q = Constraints.build(geom, modes=("rz",)).q.numpy()
    fit = (rest.reshape(-1) - q @ (q.T @ rest.reshape(-1))).reshape(rest.shape)  # Q^T fit = 0
    res = residual_statistics(geom, fit, expected_truth(geom, truth, spec))
    assert max(res["all"][d]["rms"] for d in DOFS) < 1e-6
    before = residual_statistics(geom, _zeros(geom), expected_truth(geom, truth, spec))
    assert before["all"]["du"]["rms"] == pytest.approx(20.0, rel=0.15)  # the random part only
    assert before["all"]["rot_w"]["rms"] == pytest.approx(100.0, rel=0.15)


def test_the_reference_of_a_fit_that_holds_some_sensors():
    """A fit that moves only some sensors (the others held at their start, as ``streamcal its
    refine`` holds those with too few hits) meets the constraint ``Q^T Theta = 0`` with the held
    sensors' values: the reference must too. On the five-layer test barrel, tracks from vertices
    on the beam axis (the rotation about it blind) with a 10 pm resolution (noise-free to the
    fit), every seventh chip held at 0 and seeing no hits: the constrained fit
    (``reference_solution``, converged) equals ``expected_truth`` with ``solved`` to 1e-3 of the
    misalignment's scale (measured <= 8e-5: the linear projection of a rotation against its
    composition), while the reference that projects the mode out over every sensor is off by the
    held sensors' share of the truth's rotation: a common turn of the solved chips (measured 6
    urad). The held rows are the truth's; without held sensors both references agree."""
    geom = build_geometry(barrel.barrel_config())
    truth = misalign(geom, barrel.MISALIGN)
    sim = SimulationConfig(seed=8, sigma_u=1e-8, sigma_v=1e-8, **dict(barrel.SIM, beam_spot_sigma=(0.0, 0.0, 10.0)))
    hits = simulate_batch(geom, sim, 600, placement=apply_alignment(geom, truth))
    held = np.zeros(geom.n_sensors, dtype=bool)
    held[np.arange(3, geom.n_sensors, 7)] = True
    batch = pack_tracks(hits.filter(pa.array(~held[hits.column("sensor").to_numpy()])), geom)[0]
    assert np.bincount(batch.sensor[batch.mask].numpy(), minlength=geom.n_sensors)[~held].min() >= 20
    spec = ConstraintSpec(modes=("rz",))
    cons = Constraints.build(geom, modes=("rz",)).with_free(~held)
    fit = reference_solution(ITSAlignmentModel.from_geometry(geom, barrel.COST), [batch], cons, n_iter=8,
                             tol=1e-12).theta.numpy()
    scale = np.array([1e-4] * 3 + [0.02] * 3)
    ref = expected_truth(geom, truth, spec, solved=~held, theta_fit=fit)
    assert np.all(np.abs(fit - ref)[~held].max(0) < 1e-3 * scale), np.abs(fit - ref)[~held].max(0) / scale
    old = expected_truth(geom, truth, spec)
    turn = (old - fit)[~held, 2]  # the old reference's common rotation about the beam axis
    assert np.abs(turn.mean()) > 3e-2 * scale[2] and np.std(turn) < 1e-2 * np.abs(turn.mean()), (turn.mean(),
                                                                                                 turn.std())
    np.testing.assert_array_equal(ref[held], truth[held])
    np.testing.assert_allclose(expected_truth(geom, truth, spec, solved=np.ones(geom.n_sensors, dtype=bool),
                                              theta_fit=truth), old, rtol=0, atol=1e-15)
    with pytest.raises(ValueError, match="solved and theta_fit go together"):
        expected_truth(geom, truth, spec, solved=~held)
    with pytest.raises(ValueError, match=r"solved must be a bool mask of shape"):
        expected_truth(geom, truth, spec, solved=np.ones(3, dtype=bool), theta_fit=truth)


# ------------------------------------------------------------------------------------------------
# DCA_xy


def test_robust_sigma_of_a_gaussian():
    rng = np.random.default_rng(1)
    sig, err = robust_sigma(rng.normal(3.0, 2.0, 40_000))
    assert sig == pytest.approx(2.0, abs=3 * err) and err == pytest.approx(1.166 * 2.0 / 200, rel=0.02)


def test_dca_on_the_ideal_geometry(geom):
    """Ideal geometry with multiple scattering: no bias, and the width is what the hit resolution
    and the Highland scattering give through the fit (pulls of unit width), falling with pT."""
    sample = simulate_eval_sample(geom, SIM, 2000)
    assert sample.batch.n_tracks > 13_000
    bins = dca_vs_pt(dca_xy(geom, sample, _zeros(geom), ITSAlignmentConfig()))
    mean, err = np.array(bins["mean_um"], dtype=float), np.array(bins["mean_err_um"], dtype=float)
    chi2 = float(np.sum((mean / err) ** 2))
    assert chi2 < 29.6, (mean, err)  # 10 bins, p = 0.001
    width, expected = np.array(bins["width_um"], dtype=float), np.array(bins["expected_um"], dtype=float)
    w_err = np.array(bins["width_err_um"], dtype=float)
    pull, pull_err = np.array(bins["pull_width"], dtype=float), np.array(bins["pull_width_err"], dtype=float)
    # statistical (3 sigma) plus 5 % for the approximations of the prediction (mean layer radii,
    # straight-line lever arms, normal incidence)
    assert np.all(np.abs(width - expected) < 3 * w_err + 0.05 * expected), (width, expected, w_err)
    assert np.all(np.abs(pull - 1.0) < 3 * pull_err + 0.05), (pull, pull_err)
    assert width[0] > 3 * width[-1]  # multiple scattering dominates at low pT


def test_transverse_shift_gives_a_dca_bias_of_the_shift(geom):
    """All chips shifted by d = 20 um along u (r-phi): the reconstructed hits move by -d along
    the track normal (times cos of the chip's angle to the azimuthal direction, 0.95 .. 1), so
    the fitted circle is the parallel one: DCA bias -d <cos>. With the true Theta: no bias."""
    d = 0.02
    local = _zeros(geom)
    local[:, 3] = d
    truth = local_to_global(geom, local)
    sim = replace(SIM, pt_min=1.0, pt_max=10.0, multiple_scattering=False, seed=4)
    sample = simulate_eval_sample(geom, sim, 1000, theta=truth)
    cost = ITSAlignmentConfig(multiple_scattering=False)
    before = dca_xy(geom, sample, _zeros(geom), cost)
    after = dca_xy(geom, sample, truth, cost)
    err = before.dca.std() / math.sqrt(before.dca.size)
    assert -d * 1.0 - 3 * err < before.dca.mean() < -d * 0.93 + 3 * err
    assert abs(after.dca.mean()) < 3 * err
    assert robust_sigma(after.dca)[0] == pytest.approx(robust_sigma(before.dca)[0], rel=0.05)


def test_random_misalignment_before_and_after(geom):
    """20 um / 0.1 mrad random misalignment: chi2/ndf and DCA width grow before; with the true
    Theta both match the ideal geometry."""
    truth = misalign(geom, MISALIGN)
    sim = replace(SIM, seed=8)
    cost = ITSAlignmentConfig()
    ideal = simulate_eval_sample(geom, sim, 1500)
    mis = simulate_eval_sample(geom, sim, 1500, theta=truth)

    def chi2_ndf(sample, theta):
        c2, ndf, _ = chi2_per_track(geom, sample, theta, cost)
        return c2.sum() / ndf.sum()

    c_ideal, c_before, c_after = chi2_ndf(ideal, _zeros(geom)), chi2_ndf(mis, _zeros(geom)), chi2_ndf(mis, truth)
    assert c_before > 5 * c_ideal
    assert c_after == pytest.approx(c_ideal, rel=0.06)
    hi = mis.pt > 2.0  # above the multiple-scattering dominated region
    w_ideal = robust_sigma(dca_xy(geom, ideal, _zeros(geom), cost).dca[ideal.pt > 2.0])
    w_before = robust_sigma(dca_xy(geom, mis, _zeros(geom), cost).dca[hi])
    w_after = robust_sigma(dca_xy(geom, mis, truth, cost).dca[hi])
    assert w_before[0] > 1.3 * w_ideal[0]
    assert w_after[0] == pytest.approx(w_ideal[0], abs=3 * math.hypot(w_after[1], w_ideal[1]))


# ------------------------------------------------------------------------------------------------
# The whole report and the command

TINY = ITSGeometryConfig.small(n_layers=4, chips_v=(3, 3, 3, 4))
TINY_SIM = replace(SIM, eta_max=0.25, beam_spot_sigma=(0.015, 0.015, 5.0), seed=21)


def test_evaluate_run_with_the_true_theta(tmp_path):
    geom = build_geometry(TINY)
    truth = misalign(geom, MISALIGN)
    cfg = _config(TINY, simulation=TINY_SIM)
    _write_run(tmp_path, cfg, truth, truth)
    s = evaluate_run(tmp_path, config=EvaluationConfig(events=600))
    h = s["headline"]
    assert all(h["residual_rms_after"][d] == 0.0 for d in DOFS)
    assert h["residual_rms_before"]["du"] == pytest.approx(20.0, rel=0.2)
    # the sensors the 3000 training events reach (>= 100 expected hits): residuals and precision
    r = s["residuals"]
    assert r["training_events"] == 3000 and 0 < r["reached_sensors"] < r["free_sensors"]
    assert sum(r["reached_per_layer"]) == r["reached_sensors"]
    assert all(h["residual_rms_after_reached"][d] == 0.0 for d in DOFS)
    du = r["precision_reached"]["du"]["expected_sigma_median"]
    assert all(x is None or 0.0 < x < 1e3 for x in du) and any(x is not None for x in du), r["precision_reached"]
    assert h["chi2_ndf_mean"]["before"] > 3 * h["chi2_ndf_mean"]["after"]
    assert s["test_samples"]["seed"] == default_test_seed(21) != 21
    with pytest.raises(ValueError, match="training seed"):
        evaluate_run(tmp_path, config=EvaluationConfig(events=50, seed=21))


def test_cli_evaluate_align(tmp_path, capsys):
    geom = build_geometry(TINY)
    truth = misalign(geom, MISALIGN)
    spec = ConstraintSpec(modes=("rz",), fixed_layers=(0,))
    cfg = _config(TINY, simulation=TINY_SIM, constraints=spec)
    _write_run(tmp_path / "run", cfg, expected_truth(geom, truth, spec), truth)
    _write_run(tmp_path / "other", replace(cfg, workers=8, tau=2), _zeros(geom), truth, costs=(3.0, 2.0, 1.2, 1.0))
    out = tmp_path / "report"
    rc = main(["evaluate", "align", "--run", str(tmp_path / "run"), "--compare", str(tmp_path / "other"),
               "--report", str(out), "--events", "300", "--seed", "5"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "DCA_xy max |bias|" in text and "summary.json" in text
    s = json.loads((out / "summary.json").read_text())
    assert set(s) >= {"run", "test_samples", "headline", "residuals", "dca_xy", "chi2_ndf", "cost_history", "figures"}
    assert set(s["headline"]) >= {"residual_rms_after", "dca_bias_max_abs_um", "dca_resolution_ratio_after_ideal",
                                  "dca_resolution_ratio_after_ideal_max", "chi2_ndf_mean"}
    assert set(s["dca_xy"]["series"]) == {"ideal", "before", "after"}
    assert len(s["dca_xy"]["series"]["after"]["width_um"]) == len(s["dca_xy"]["pt_edges"]) - 1
    assert len(s["residuals"]["after"]["layers"]["du"]["rms"]) == 4
    assert s["residuals"]["fixed_sensors"] == int((geom.layer == 0).sum())
    assert max(s["headline"]["residual_rms_after"].values()) < 1e-6
    assert [h["label"] for h in s["cost_history"]] == ["M=4, tau=5", "M=8, tau=2"]
    assert s["cost_history"][1]["epoch_cost"] == [3.0, 2.0, 1.2, 1.0]
    for name in FIGURES.values():
        assert (out / name).stat().st_size > 10_000


def test_cli_evaluate_dispatch(tmp_path, capsys):
    assert main(["evaluate", "align", "--report", str(tmp_path)]) == 2
    assert "needs --run" in capsys.readouterr().err
    assert main(["evaluate", "sc1d", "--report", str(tmp_path)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err
    assert main(["evaluate", "sc3d", "--checkpoint", "x", "--run", "y", "--report", str(tmp_path)]) == 2
    assert "only apply to evaluate align" in capsys.readouterr().err
    assert main(["evaluate", "align", "--run", str(tmp_path / "missing"), "--report", str(tmp_path)]) == 1
    assert "missing: not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["evaluate", "--help"])
    assert "align" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------
# What the data can tell about each sensor


def _global_covariance(geom, sigma_local: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """(N, 6, 6) covariance of Theta for independent local errors ``sigma_local`` (N, 6; rad, mm):
    ``J diag(sigma^2) J^T`` with ``J`` the derivative of ``local_to_global`` at 0 by central
    differences."""
    n = geom.n_sensors
    jac = np.zeros((n, 6, 6))
    for j in range(6):
        step = np.zeros((n, 6))
        step[:, j] = eps
        jac[:, :, j] = (local_to_global(geom, step) - local_to_global(geom, -step)) / (2 * eps)
    return np.einsum("nij,nj,nkj->nik", jac, sigma_local**2, jac)


def test_solve_errors_are_taken_to_the_local_frame(geom):
    """:func:`solve_errors`: a covariance of Theta built from known local errors (through
    ``local_to_global``'s derivative, independent of ``align.local_basis``) gives back those errors
    per layer and DoF (RMS over the sensors that have a block, in urad and um, to 1e-6), the
    residual's RMS over the same sensors and the pulls; sensors without a block (NaN) or outside
    the selection are left out."""
    n = geom.n_sensors
    rng = np.random.default_rng(3)
    sigma = np.exp(rng.uniform(-1, 1, (n, 6))) * np.array([1e-5] * 3 + [1e-3] * 3)  # ~10 urad, ~1 um
    cov = _global_covariance(geom, sigma)
    cov[geom.layer == 3] = np.nan  # not solved
    sel = np.ones(n, dtype=bool)
    sel[:5] = False
    resid = rng.standard_normal((n, 6)) * 2.0
    out = solve_errors(geom, ITSAlignmentConfig(), cov, resid, sel)
    scale = np.array([1e6] * 3 + [1e3] * 3)
    assert out["sensors_per_layer"] == [int(((geom.layer == li) & sel).sum()) if li < 3 else 0 for li in range(4)]
    for jd, dof in enumerate(DOFS):
        for li in range(4):
            m = sel & (geom.layer == li)
            if li == 3:
                assert out[dof]["sigma_rms"][li] is None and out[dof]["pull_rms"][li] is None
                continue
            sig = sigma[m, jd] * scale[jd]
            assert out[dof]["sigma_rms"][li] == pytest.approx(np.sqrt(np.mean(sig**2)), rel=1e-6)
            assert out[dof]["residual_rms"][li] == pytest.approx(np.sqrt(np.mean(resid[m, jd] ** 2)), rel=1e-12)
            assert out[dof]["pull_rms"][li] == pytest.approx(np.sqrt(np.mean((resid[m, jd] / sig) ** 2)), rel=1e-6)
    # held against targets: the sensors whose error is within the target (the errors are ~10
    # urad and ~1 um, so about half), and the residual's RMS over those alone
    targets = alignment_targets(10.0, 1.0)
    assert set(targets) == {"rot_u", "rot_v", "rot_w", "du", "dv"}
    within = solve_errors(geom, ITSAlignmentConfig(), cov, resid, sel, targets)["within_target"]
    assert set(within) == set(targets) and "within_target" not in out
    for dof, target in targets.items():
        jd = DOFS.index(dof)
        w = within[dof]
        assert w["target"] == target and w["of_sensors"] == out["sensors_per_layer"]
        for li in range(4):
            m = sel & (geom.layer == li) & (sigma[:, jd] * scale[jd] <= target) & (li < 3)
            assert w["sensors"][li] == int(m.sum())
            assert 0 < w["sensors"][li] < out["sensors_per_layer"][li] or li == 3
            if li == 3:
                assert w["residual_rms"][li] is None
            else:
                assert w["residual_rms"][li] == pytest.approx(np.sqrt(np.mean(resid[m, jd] ** 2)), rel=1e-12)


def test_a_run_with_the_solves_covariance(tmp_path, capsys, geom):
    """``theta_cov.npy`` beside ``theta.npy`` (``streamcal its refine --solver direct``): loaded
    with the run (blocks all finite or all NaN, symmetric, shape of the geometry; a bad file is
    named) and reported by ``evaluate_run`` as ``residuals.solve_errors`` and by ``streamcal
    evaluate align`` as a row of its table."""
    small = build_geometry(TINY)
    truth = misalign(small, MISALIGN)
    _write_run(tmp_path, _config(TINY, simulation=TINY_SIM), truth, truth)
    sigma = np.full((small.n_sensors, 6), 2e-6)
    cov = _global_covariance(small, sigma)
    cov[0] = np.nan
    np.save(tmp_path / "theta_cov.npy", cov)
    run = load_run(tmp_path)
    assert np.isnan(run.theta_cov[0]).all() and np.isfinite(run.theta_cov[1:]).all()
    s = evaluate_run(tmp_path, config=EvaluationConfig(events=300))
    errs = s["residuals"]["solve_errors"]
    assert sum(errs["sensors_per_layer"]) == small.n_sensors - 1
    assert errs["rot_u"]["sigma_rms"][0] == pytest.approx(2.0, rel=1e-6)  # urad
    assert errs["du"]["pull_rms"][0] == 0.0  # Theta is the truth
    assert errs["all_layers"]["sigma_rms"]["dw"] == pytest.approx(2e-3, rel=1e-6)  # um
    capsys.readouterr()
    assert main(["evaluate", "align", "--run", str(tmp_path), "--report", str(tmp_path / "report"), "--events",
                 "300"]) == 0
    out = capsys.readouterr().out.splitlines()
    row = next(r for r in out if r.startswith("solve's errors"))
    assert row.split()[2:] == ["2", "2", "2", "0.002", "0.002", "0.002"]
    # errors of 2 urad are within a 10 urad target, 2e-3 um within 1 um: every solved sensor counts
    assert s["headline"]["within_target"]["rot_v"] == {"target": 10.0, "sensors": small.n_sensors - 1,
                                                       "of_sensors": small.n_sensors - 1, "residual_rms": 0.0}
    row = next(r for r in out if r.startswith("within target"))
    assert row.count(f"0 ({small.n_sensors - 1})") == 5
    # a target tighter than every error: no sensor is constrained to it
    s = evaluate_run(tmp_path, config=EvaluationConfig(events=300, target_rotation_urad=1.0))
    assert s["headline"]["within_target"]["rot_u"]["sensors"] == 0
    assert s["headline"]["within_target"]["rot_u"]["residual_rms"] is None
    bad = cov.copy()
    bad[1, 0, 0] = np.nan
    for arr, match in ((cov[:-1], r"must be .* shape \(%d, 6, 6\)" % small.n_sensors),
                       (bad, "sensor 1: a block must be all"),
                       (cov + np.triu(np.full((6, 6), 1e-9), 1), "the blocks must be symmetric")):
        np.save(tmp_path / "theta_cov.npy", arr)
        with pytest.raises(RunFormatError, match=r"theta_cov\.npy: " + match):
            load_run(tmp_path)
    load_run(tmp_path, arrays=False)  # a run to compare costs with does not read it


def test_sensor_precision_is_the_error_of_a_lone_sensor_fit_and_bounds_the_global_one():
    """Without multiple scattering the hit weights are exact inverse variances, so the expected
    conditional error of a sensor (the Fisher bound of its 6 DoFs) is the error of the global
    least-squares fit (``reference_solution``, sparse KKT, sandwich covariance; its pulls are
    validated against the truth in test_align.py) with every other sensor fixed, to the
    per-event 1/ndf weighting of the seed's cost; with only two layers fixed it is a lower bound
    of the global fit's error, and it shrinks as 1/sqrt(data)."""

    geom = build_geometry(ITSGeometryConfig.small(n_layers=4, chips_v=(3, 3, 3, 4)))
    cost = ITSAlignmentConfig(multiple_scattering=False)
    sim = SimulationConfig(beam_spot_sigma=(0.015, 0.015, 5.0), eta_max=0.25, pt_min=0.3, pt_max=5.0,
                           multiple_scattering=False, seed=4)
    batch, _ = pack_tracks(simulate_batch(geom, sim, 400), geom, with_vertex=True)
    prec = sensor_precision(geom, batch, cost, 1.0)
    hits = np.bincount(batch.sensor[batch.mask].numpy(), minlength=geom.n_sensors)
    np.testing.assert_array_equal(prec.hits, hits)
    for layer in (0, 1, 2):  # the best-hit sensor of each layer
        s = int(np.argmax(np.where(geom.layer == layer, hits, 0)))
        model = ITSAlignmentModel.from_geometry(geom, cost)
        lone = reference_solution(model, [batch], Constraints.build(geom, fixed=np.delete(np.arange(geom.n_sensors), s)),
                                  n_iter=1, vertex_noise=True)
        err = lone.errors(model)[s]
        # the seed's cost weights each event's chi2 by 1/ndf, not optimal for the Fisher bound:
        # the lone fit's error is the bound's to 0.7 % here, never below it
        np.testing.assert_allclose(prec.sigma[s], err, rtol=0.01)
        assert np.all(prec.sigma[s] <= err * (1 + 1e-9))
    model = ITSAlignmentModel.from_geometry(geom, cost)
    fixed = np.nonzero((geom.layer == 0) | (geom.layer == 3) | (hits < 10))[0]
    glob = reference_solution(model, [batch], Constraints.build(geom, fixed=fixed), n_iter=1,
                              vertex_noise=True).errors(model)
    free = np.setdiff1d(np.arange(geom.n_sensors), fixed)
    assert np.all(prec.sigma[free] <= glob[free] * (1 + 1e-9))
    assert np.any(prec.sigma[free] < 0.9 * glob[free])  # correlations matter for some
    np.testing.assert_allclose(sensor_precision(geom, batch, cost, 4.0).sigma[free], prec.sigma[free] / 2, rtol=1e-9)
    with pytest.raises(ValueError, match="scale must be a positive finite number"):
        sensor_precision(geom, batch, cost, 0.0)
