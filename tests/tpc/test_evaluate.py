"""``streamcal evaluate``: tiny sc1d, sc3d and seed-style U-Net runs evaluated on unbiased held-out
data; the summary's numbers against independent numpy computations on samples of the dataset
generator; the figures are PNG files; errors name the checkpoint."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from streamcal.errors import StreamcalError
from streamcal.evaluate import COMPONENTS, FIGURES, evaluate
from streamcal.train import load_checkpoint, load_run_config, parse_run_config, train

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "train"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny runs (18x9x9): sc1d, sc3d (residual on the linear scaler), seed-style U-Net."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for name, config in (("sc1d", "sc1d_tiny"), ("sc3d", "sc3d_tiny"), ("seed", "sc3d_seed_tiny")):
        train(load_run_config(CONFIGS / f"{config}.yaml"), out=root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def reports(runs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("reports")
    out = {}
    for task in ("sc1d", "sc3d"):
        result = evaluate(task, runs[task], root / task, baseline_checkpoint=runs["seed"],
                          device="cpu", progress=False)
        out[task] = result.summary
        assert json.loads((result.report_dir / "summary.json").read_text()) == result.summary
        out[task]["_dir"] = result.report_dir
    return out


@pytest.fixture(scope="module")
def generated() -> dict[str, np.ndarray]:
    """Independently of the evaluation code: the unbiased evaluation samples of the tiny configs
    (sc1d_tiny and sc3d_tiny share their data) from the dataset generator: ``truth`` (N, 3, nphi,
    nr, nz) cm, the linear scaler's prediction ``linear`` (same shape), the relative 1D IDC change
    ``ratio`` (N,) and the 27 average corrections ``average`` (27, 3, nphi, nr, nz)."""
    from streamcal.detectors.tpc.dataset import DatasetConfig, DatasetGenerator

    d = load_run_config(CONFIGS / "sc1d_tiny.yaml").task_config.data
    d3 = load_run_config(CONFIGS / "sc3d_tiny.yaml").task_config.data
    fields = ("grid", "n_random_eval", "seed", "scale_step", "rate_hz", "epsilon")
    assert all(getattr(d, f) == getattr(d3, f) for f in fields)  # the same evaluation split
    gen = DatasetGenerator(DatasetConfig(grid=d.grid, n_random=d.n_random_eval, split="eval", seed=d.seed))
    _, avg_corr = gen.average_distortions()  # (27, 3, nphi, nr, nz)
    truth, linear, ratio = [], [], []
    for i in range(len(gen)):
        s = gen.sample(i)
        assert float(s["bias_factor"]) == 1.0  # unbiased
        r = float(np.mean(s["idc1d"], dtype=np.float64) / np.mean(s["idc1d_average"], dtype=np.float64) - 1.0)
        truth.append(s["correction_fluctuation"].astype(np.float64))
        linear.append(r * avg_corr[int(s["average_index"])])
        ratio.append(r)
    return {"truth": np.stack(truth), "linear": np.stack(linear), "ratio": np.array(ratio), "average": avg_corr}


def _rmse_um(residual: np.ndarray) -> list[float]:
    return list(np.sqrt(np.mean(np.square(residual), axis=(0, 2, 3, 4))) * 1e4)


def _components(d: dict[str, float]) -> list[float]:
    return [d[c] for c in COMPONENTS]


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == PNG_SIGNATURE and raw[12:16] == b"IHDR", f"{path} is not a PNG file"
    return struct.unpack(">II", raw[16:24])


@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_report_keys_and_figures(reports: dict[str, dict[str, Any]], task: str) -> None:
    s = reports[task]
    assert {"task", "checkpoint", "baseline_checkpoint", "data", "rmse_um", "figures", "targets", "targets_met"} <= set(s)
    assert s["task"] == task and s["checkpoint"]["config"]["data"]["grid"] == "18x9x9"
    assert s["data"] == {**s["data"], "grid": "18x9x9", "split": "eval", "unbiased": True, "n_random": 1,
                         "n_samples": 27, "seed": 0}
    expected = {"model", "linear_scaler", "seed_unet", "none", "phi_average_truth"}
    assert set(s["rmse_um"]) == expected | ({"after_1d"} if task == "sc3d" else set())
    for values in s["rmse_um"].values():
        assert set(values) == set(COMPONENTS) and all(math.isfinite(v) and v > 0 for v in values.values())
    assert set(s["figures"]) == {"fig3", "fig4_left", "fig4_right", "fig5"}
    for key, name in FIGURES.items():
        assert s["figures"][key]["file"] == name
        width, height = _png_size(s["_dir"] / name)
        assert width > 300 and height > 200 and (s["_dir"] / name).stat().st_size > 10_000
    fig3 = s["figures"]["fig3"]
    assert fig3["epochs"] == [1, 2, 3, 4] and fig3["source"].endswith("metrics.jsonl")
    assert fig3["baseline"]["epochs"] == [1, 2, 3, 4]
    assert (fig3["rmse_precorrection_um"] is not None) == (task == "sc3d")


@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_rmse_matches_independent_numpy_and_the_recorded_evaluation(
        reports: dict[str, dict[str, Any]], runs: dict[str, Path], generated: dict[str, np.ndarray], task: str) -> None:
    s = reports[task]
    truth, linear = generated["truth"], generated["linear"]
    rmse = s["rmse_um"]
    np.testing.assert_allclose(_components(rmse["none"]), _rmse_um(truth), rtol=1e-5)
    np.testing.assert_allclose(_components(rmse["linear_scaler"]), _rmse_um(linear - truth), rtol=1e-5)
    floor = _rmse_um(truth.mean(axis=2, keepdims=True) - truth)
    np.testing.assert_allclose(_components(rmse["phi_average_truth"]), floor, rtol=1e-5)
    # same data as training's last evaluation: the model's RMSE is the recorded one
    best = load_checkpoint(runs[task])["best"]
    np.testing.assert_allclose(_components(rmse["model"]), _components(best["rmse_um"]), rtol=1e-4)
    if task == "sc3d":  # residual on the linear scaler: "after 1D" is the linear scaler
        np.testing.assert_allclose(_components(rmse["after_1d"]), _components(best["rmse_precorrection_um"]), rtol=1e-4)
        np.testing.assert_allclose(_components(rmse["after_1d"]), _components(rmse["linear_scaler"]), rtol=1e-6)
    # figure 4 left: the bins hold every voxel once; their moments give the overall mean and RMSE
    f = s["figures"]["fig4_left"]
    n_vox = truth[:, 0].size
    lin = f["series"]["linear_scaler"]
    for i, c in enumerate(COMPONENTS):
        count = np.array(f["count"][c], dtype=np.float64)
        assert count.sum() == n_vox and len(f["bin_edges_um"][c]) == len(count) + 1
        mean = np.array([0.0 if v is None else v for v in lin[c]["mean_um"]])
        std = np.array([0.0 if v is None else v for v in lin[c]["std_um"]])
        diff_um = (linear - truth)[:, i] * 1e4
        scale = rmse["linear_scaler"][c]  # float32 maps: compare at 1e-5 of the RMSE
        assert np.sum(count * mean) / n_vox == pytest.approx(diff_um.mean(), abs=1e-5 * scale)
        assert math.sqrt(np.sum(count * (std**2 + mean**2)) / n_vox) == pytest.approx(scale, rel=1e-5)


def test_residual_vs_r_matches_numpy(reports: dict[str, dict[str, Any]], generated: dict[str, np.ndarray]) -> None:
    """Figure 4 right: the linear scaler's mean and RMSE vs r at 0 <= z < 5 cm over phi, for the
    samples nearest +1 sigma of the relative 1D IDC change, recomputed from generator samples."""
    from streamcal.detectors.tpc.constants import parse_grid

    f = reports["sc1d"]["figures"]["fig4_right"]
    truth, linear, ratio = generated["truth"], generated["linear"], generated["ratio"]
    grid = parse_grid("18x9x9")
    sigma = ratio.std()
    n_sel = math.ceil(0.1 * len(ratio))
    sel = np.argsort(np.abs(ratio - sigma), kind="stable")[:n_sel]
    assert f["selection"]["n_samples"] == n_sel and f["selection"]["sigma"] == pytest.approx(sigma, rel=1e-9)
    assert f["selection"]["interval"] == pytest.approx([ratio[sel].min(), ratio[sel].max()], rel=1e-9)
    assert f["z_nodes_cm"] == [0.0] and f["r_cm"] == pytest.approx(list(grid.r))
    part = (linear - truth)[sel][..., grid.z < 5.0] * 1e4  # (n_sel, 3, nphi, nr, 1) um
    for i, c in enumerate(COMPONENTS):
        rms = np.sqrt(np.mean(np.square(part[:, i]), axis=(0, 1, 3)))
        tol = 1e-5 * rms.max()  # float32 maps
        np.testing.assert_allclose(f["series"]["linear_scaler"][c]["mean_um"], part[:, i].mean(axis=(0, 1, 3)),
                                   rtol=0, atol=tol)
        np.testing.assert_allclose(f["series"]["linear_scaler"][c]["rmse_um"], rms, rtol=0, atol=tol)
        for series in f["series"].values():  # an RMSE is never below the |mean|
            assert np.all(np.array(series[c]["rmse_um"]) >= np.abs(series[c]["mean_um"]) * (1 - 1e-9))


def test_line_charge_correlation(reports: dict[str, dict[str, Any]], generated: dict[str, np.ndarray]) -> None:
    from streamcal.detectors.tpc.constants import parse_grid
    from streamcal.detectors.tpc.dataset import line_charge_sample

    grid = parse_grid("18x9x9")
    lc = line_charge_sample(grid, radius=110.0, sector=9)
    nominal = generated["average"][13]  # the nominal average map's correction (scalings 0, 0, 0)
    share = float(np.mean(lc["idc1d"], dtype=np.float64) - 1.0)
    assert share > 0
    at_z0 = grid.z < 5.0
    for task in ("sc1d", "sc3d"):
        f = reports[task]["figures"]["fig5"]
        assert f["radius_cm"] == 110.0 and f["sector"] == 9 and f["idc_relative_change"] == pytest.approx(share)
        assert set(f["correlation"]) >= {"model", "linear_scaler", "seed_unet"}
        for series, values in {**f["correlation"], **f["correlation_full_volume"]}.items():
            assert set(values) == set(COMPONENTS)
            assert all(v is None or -1.0 <= v <= 1.0 for v in values.values()), series
        for i, c in enumerate(COMPONENTS):  # the linear scaler: the nominal correction times the charge share
            x = lc["correction_fluctuation"][i][..., at_z0].ravel()
            y = (share * nominal[i])[..., at_z0].ravel()
            assert f["correlation"]["linear_scaler"][c] == pytest.approx(np.corrcoef(x, y)[0, 1], abs=1e-5)
            # its amplitude: least-squares slope of predicted on numerical through the origin
            assert f["gain"]["linear_scaler"][c] == pytest.approx(float(np.dot(x, y) / np.dot(x, x)), rel=1e-4)
        assert all(v is not None for v in f["correlation"]["model"].values())
        assert set(f["gain"]) == set(f["correlation"])


@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_targets(reports: dict[str, dict[str, Any]], task: str) -> None:
    s = reports[task]
    targets = {(t["name"], t["component"]): t for t in s["targets"]}
    assert set(targets) == {(n, c) for n in ("rmse", "rmse_1d_over_linear_scaler", "line_charge_correlation")
                            for c in COMPONENTS}
    for (name, c), t in targets.items():
        if t["value"] is not None:
            ok = t["value"] <= t["threshold"] if t["comparison"] == "<=" else t["value"] >= t["threshold"]
            assert t["met"] == ok, (name, c)
    for c in COMPONENTS:
        assert targets[("rmse", c)]["value"] == s["rmse_um"]["model"][c] and targets[("rmse", c)]["threshold"] == 100.0
        one_d = "model" if task == "sc1d" else "after_1d"
        assert targets[("rmse_1d_over_linear_scaler", c)]["value"] == pytest.approx(
            s["rmse_um"][one_d][c] / s["rmse_um"]["linear_scaler"][c])
        assert targets[("line_charge_correlation", c)]["applicable"] == (task == "sc3d")
    assert s["targets_met"] == all(t["met"] for t in s["targets"] if t["applicable"])


def test_sc3d_after_a_trained_sc1d(runs: dict[str, Path], reports: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    """A residual U-Net on a trained sc1d: "after 1D" is that model's own evaluation."""
    raw = load_run_config(CONFIGS / "sc3d_tiny.yaml").to_dict()
    raw.update(precorrection="sc1d", sc1d_checkpoint=str(runs["sc1d"]))
    raw["train"]["epochs"] = 1
    train(parse_run_config(raw), out=tmp_path / "sc3d")
    s = evaluate("sc3d", tmp_path / "sc3d", tmp_path / "report", device="cpu", progress=False).summary
    assert s["precorrection"]["kind"] == "sc1d" and s["baseline_checkpoint"] is None
    after_1d = _components(s["rmse_um"]["after_1d"])
    np.testing.assert_allclose(after_1d, _components(reports["sc1d"]["rmse_um"]["model"]), rtol=1e-5)
    best = load_checkpoint(tmp_path / "sc3d")["best"]
    np.testing.assert_allclose(after_1d, _components(best["rmse_precorrection_um"]), rtol=1e-4)
    np.testing.assert_allclose(_components(s["rmse_um"]["model"]), _components(best["rmse_um"]), rtol=1e-4)
    with pytest.raises(StreamcalError, match="missing-sc1d"):
        evaluate("sc3d", tmp_path / "sc3d", tmp_path / "r2", sc1d_checkpoint=tmp_path / "missing-sc1d", progress=False)


def test_command_line(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from streamcal.cli import main

    report = tmp_path / "report"
    assert main(["evaluate", "sc1d", "--checkpoint", str(runs["sc1d"]), "--report", str(report),
                 "--n-eval", "2", "--seed", "3", "--device", "cpu", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert str(report / "summary.json") in out and "linear IDC scaler" in out and "target rmse" in out
    s = json.loads((report / "summary.json").read_text())
    assert s["data"]["n_samples"] == 54 and s["data"]["seed"] == 3 and s["baseline_checkpoint"] is None
    assert all((report / name).stat().st_size > 0 for name in FIGURES.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["sc1d", "--checkpoint", "{sc3d}"], r"sc3d/best\.pt is an sc3d checkpoint, not sc1d"),
        (["sc3d", "--checkpoint", "{sc1d}"], r"sc1d/best\.pt is an sc1d checkpoint, not sc3d"),
        (["sc1d", "--checkpoint", "{tmp}/nowhere"], r"checkpoint not found: .*nowhere"),
        (["sc1d", "--checkpoint", "{tmp}"], r"holds no best\.pt or last\.pt"),
        (["sc1d", "--checkpoint", "{tmp}/junk.pt"], r"junk\.pt is not a readable streamcal checkpoint"),
        (["sc1d", "--checkpoint", "{sc1d}", "--baseline-checkpoint", "{sc1d}"],
         r"baseline checkpoint .*sc1d/best\.pt is an sc1d checkpoint, not sc3d"),
        (["sc1d", "--checkpoint", "{sc1d}", "--baseline-checkpoint", "{sc3d}"], r"residual U-Net"),
        (["sc1d", "--checkpoint", "{sc1d}", "--n-eval", "0"], r"--n-eval must be >= 1"),
    ],
)
def test_errors_name_the_checkpoint(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    args: list[str], message: str) -> None:
    import re

    from streamcal.cli import main

    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    argv = ["evaluate", *[a.format(sc1d=runs["sc1d"], sc3d=runs["sc3d"], tmp=tmp_path) for a in args],
            "--report", str(tmp_path / "report"), "--no-progress"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "report").exists()  # nothing written
