"""The shared training loop on the TPC tasks: tiny configs train in seconds, checkpoints resume
exactly, metrics are written, every shipped training config validates, bad fields are named,
trained models load for inference."""

from __future__ import annotations

import dataclasses
import glob
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from streamcal.errors import ConfigError
from streamcal.train import RunConfig, get_task_class, load_checkpoint, load_run_config, parse_run_config, train

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "train"
TINY = {"sc1d": CONFIGS / "sc1d_tiny.yaml", "sc3d": CONFIGS / "sc3d_tiny.yaml"}


def _tiny(task: str, **train_overrides: object) -> RunConfig:
    run = load_run_config(TINY[task])
    return dataclasses.replace(run, train=dataclasses.replace(run.train, **train_overrides))


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_tiny_config_trains_in_seconds_and_the_loss_decreases(task: str, tmp_path: Path) -> None:
    run = _tiny(task)
    result = train(run, out=tmp_path)
    losses = [r["train_loss"] for r in result.history]
    assert len(losses) == run.train.epochs and result.stopped == "completed"
    assert losses[-1] < 0.9 * losses[0] and losses[-1] == min(losses)
    records = _lines(tmp_path / "metrics.jsonl")
    assert [r["epoch"] for r in records] == list(range(1, run.train.epochs + 1))
    for r in records:
        assert set(r["rmse_um"]) == {"dr", "drphi", "dz"}
        assert all(np.isfinite(v) and v > 0 for v in r["rmse_um"].values())
        assert r["samples_per_s"] > 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["task"] == task and summary["epochs_run"] == run.train.epochs
    assert "linear_scaler_rmse_um" in summary["baselines"]
    # the model beats doing nothing on the unbiased evaluation split
    none = summary["baselines"]["none_rmse_um"]
    assert all(summary["best"]["rmse_um"][c] < none[c] for c in none)
    assert (tmp_path / "best.pt").exists() and (tmp_path / "last.pt").exists()


@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_resume_gives_the_uninterrupted_result(task: str, tmp_path: Path) -> None:
    run = _tiny(task, epochs=4)
    full = train(run, out=tmp_path / "full")
    part = train(run, out=tmp_path / "resumed", stop_after_epochs=2)
    assert part.stopped == "interrupted" and len(part.history) == 2
    resumed = train(run, out=tmp_path / "resumed", resume=True)
    assert len(resumed.history) == 4
    a = load_checkpoint(tmp_path / "full" / "last.pt")["model_state"]
    b = load_checkpoint(tmp_path / "resumed" / "last.pt")["model_state"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [r["train_loss"] for r in full.history] == [r["train_loss"] for r in resumed.history]
    assert [r["rmse_um"] for r in _lines(tmp_path / "full" / "metrics.jsonl")] == \
        [r["rmse_um"] for r in _lines(tmp_path / "resumed" / "metrics.jsonl")]


@pytest.mark.parametrize("path", sorted(glob.glob(str(CONFIGS / "*.yaml"))), ids=lambda p: Path(p).name)
def test_every_shipped_training_config_validates(path: str) -> None:
    run = load_run_config(path)
    assert run.task in ("sc1d", "sc3d")
    assert Path(path).stem.startswith(run.task)
    task = get_task_class(run.task)(run.task_config)
    model = task.build_model()  # the model of the config can be built (no data needed)
    if isinstance(model, torch.nn.Module):
        assert sum(p.numel() for p in model.parameters()) > 0


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("task: sc1d\nmodel: {hiden: [8]}\n", "hiden"),
        ("task: sc1d\ntrain: {epochs: ten}\n", "epochs"),
        ("task: sc1d\ntrain: {optimizer: {name: lion}}\n", "name"),
        ("task: sc1d\ndata: {grid: 90x17}\n", "grid"),
        ("task: sc3d\ndata: {local_fraction: 1.2}\n", "local_fraction"),
        ("task: sc3d\ndata: {local_width_cm: [5.0, 500.0]}\n", "local_width_cm"),
        ("task: sc3d\ndata: {local_amplitude: [-3.0, 1.0]}\n", "local_amplitude"),
        ("task: sc1d\nmodle: {}\n", "modle"),
        ("task: sc3d\nmodel: {residual: true}\nprecorrection: sc1d\n", "sc1d_checkpoint"),
        ("task: sc3d\nmodel: {padding: reflect}\n", "padding"),
        ("task: sc2d\n", "task"),
    ],
)
def test_a_bad_config_field_is_named(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=f"field '{field}'") as exc:
        load_run_config(_write(tmp_path, text))
    assert "bad.yaml" in str(exc.value)


def test_the_command_line_task_must_match_the_file() -> None:
    with pytest.raises(ConfigError, match="field 'task'.*sc1d"):
        load_run_config(TINY["sc1d"], task="sc3d")


def test_streamcal_train_command(tmp_path: Path) -> None:
    from streamcal.cli import main

    out = tmp_path / "run"
    assert main(["train", "sc1d", "--config", str(TINY["sc1d"]), "--out", str(out), "--epochs", "2"]) == 0
    assert len(_lines(out / "metrics.jsonl")) == 2
    assert main(["train", "sc1d", "--config", str(TINY["sc1d"]), "--out", str(out), "--epochs", "3", "--resume"]) == 0
    assert [r["epoch"] for r in _lines(out / "metrics.jsonl")] == [1, 2, 3]
    assert main(["train", "sc1d", "--config", str(TINY["sc1d"]), "--epochs", "0"]) == 1  # names the field


def test_importing_the_train_module_does_not_load_torch() -> None:
    code = "import sys, streamcal.train, streamcal.cli; streamcal.cli.build_parser(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- inference from checkpoints ---------------------------------------------------------------------
def _eval_rmse_um(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.sqrt(np.mean(np.square(pred.astype(np.float64) - truth), axis=(0, 2, 3, 4))) * 1e4


def test_sc1d_corrector_reproduces_the_recorded_evaluation(tmp_path: Path) -> None:
    from streamcal.detectors.tpc.tasks import FluctuationData, SC1DCorrector, load_corrector

    run = _tiny("sc1d")
    result = train(run, out=tmp_path)
    corrector = load_corrector(tmp_path)
    assert isinstance(corrector, SC1DCorrector)
    data = FluctuationData(run.task_config.data.dataset_config("eval"), densities=False)
    idx = np.arange(len(data))
    k, m = data.split_index(idx)
    pred = corrector.predict_batch(data.idc1d[k], idc1d_average=data.idc_average[m],
                                   average_correction=data.average_correction[m])
    rmse = _eval_rmse_um(pred, data.correction_fluctuation(idx))
    best = result.best["rmse_um"]
    assert np.allclose(rmse, [best["dr"], best["drphi"], best["dz"]], rtol=1e-4)
    one = corrector.predict(data.idc1d[0], idc1d_average=data.idc_average[0],
                            average_correction=data.average_correction[0])
    assert one.shape == (3, 18, 9, 9) and one.dtype == np.float32
    assert np.allclose(one, pred[0], atol=1e-6)
    assert np.all(one == one[:, :1])  # phi-independent (the 1D IDCs carry no phi information)
    nominal = corrector.predict(np.ones(200))  # the stage's call: nominal reference by default
    assert nominal.shape == (3, 18, 9, 9) and np.isfinite(nominal).all()
    with pytest.raises(ValueError, match="idc1d"):
        corrector.predict(np.ones((2, 200)))


def test_sc3d_corrector_reproduces_the_recorded_evaluation(tmp_path: Path) -> None:
    from streamcal.detectors.tpc.tasks import FluctuationData, SC3DCorrector, linear_scaler, load_corrector

    run = _tiny("sc3d")
    result = train(run, out=tmp_path)
    corrector = load_corrector(tmp_path / "best.pt")
    assert isinstance(corrector, SC3DCorrector) and corrector.needs_precorrection
    data = FluctuationData(run.task_config.data.dataset_config("eval"))
    idx = np.arange(len(data))
    k, m = data.split_index(idx)
    pre = linear_scaler(data.average_correction[m], data.idc1d[k], data.idc_average[m])
    pred = corrector.predict_batch(data.average_density[m], data.density_fluctuation(idx), pre)
    rmse = _eval_rmse_um(pred, data.correction_fluctuation(idx))
    best = result.best["rmse_um"]
    assert np.allclose(rmse, [best["dr"], best["drphi"], best["dz"]], rtol=1e-4)
    one = corrector.predict(data.average_density[m[0]], data.density_fluctuation(idx[:1])[0], pre[0])
    assert one.shape == (3, 18, 9, 9) and np.allclose(one, pred[0], atol=1e-5)
    with pytest.raises(ValueError, match="1D correction"):
        corrector.predict(data.average_density[0], data.density_fluctuation(idx[:1])[0])


def test_sc3d_residual_on_a_trained_sc1d(tmp_path: Path) -> None:
    """The residual U-Net takes a trained 1D model's prediction as its pre-correction."""
    train(_tiny("sc1d", epochs=2), out=tmp_path / "sc1d")
    base = load_run_config(TINY["sc3d"])
    raw = base.to_dict()
    raw.update(precorrection="sc1d", sc1d_checkpoint=str(tmp_path / "sc1d"))
    raw["train"]["epochs"] = 1
    result = train(parse_run_config(raw), out=tmp_path / "sc3d")
    sc1d_rmse = load_checkpoint(tmp_path / "sc1d")["best"]["rmse_um"]
    # the pre-correction baseline of the 3D run is the 1D model's evaluation on the same data
    pre = result.baselines["precorrection_rmse_um"]
    assert np.allclose([pre[c] for c in pre], [sc1d_rmse[c] for c in pre], rtol=1e-4)


def test_gradient_boosted_trees_train_through_the_same_entry_point(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    from streamcal.detectors.tpc.tasks import load_corrector

    raw = load_run_config(TINY["sc1d"]).to_dict()
    raw["model"].update(kind="trees", trees={"max_iter": 40, "max_leaf_nodes": 15, "max_rows": 5000})
    result = train(parse_run_config(raw), out=tmp_path)
    assert len(result.history) == 1 and result.best is not None
    none = result.baselines["none_rmse_um"]
    assert all(result.best["rmse_um"][c] < none[c] for c in none)
    corrector = load_corrector(tmp_path)
    assert corrector.predict(np.ones(200)).shape == (3, 18, 9, 9)


def test_linear_scaler_scales_the_average_correction() -> None:
    from streamcal.detectors.tpc.tasks import linear_scaler

    avg = np.random.default_rng(0).normal(size=(3, 4, 3, 3)).astype(np.float32)
    assert np.all(linear_scaler(avg, np.ones(200)) == 0)
    assert np.allclose(linear_scaler(avg, np.full(200, 1.02)), 0.02 * avg, atol=1e-7)
    ref = np.full(200, 1.1)
    assert np.allclose(linear_scaler(avg, np.full(200, 1.21), ref), 0.1 * avg, atol=1e-6)
    batch = linear_scaler(avg, np.stack([np.ones(200), np.full(200, 0.99)]))
    assert batch.shape == (2, 3, 4, 3, 3) and np.allclose(batch[1], -0.01 * avg, atol=1e-7)


def test_fluctuation_data_matches_the_dataset_generator(tmp_path: Path) -> None:
    from streamcal.detectors.tpc.dataset import DatasetConfig, DatasetGenerator
    from streamcal.detectors.tpc.tasks import FluctuationData, idc_fluctuation_features

    cfg = DatasetConfig(grid="18x5x5", n_random=2, seed=3, split="train", bias=0.05)
    gen = DatasetGenerator(cfg)
    data = FluctuationData(cfg, cache_dir=tmp_path)
    cached = FluctuationData(cfg, cache_dir=tmp_path)  # read back from the .npz
    assert len(list(tmp_path.glob("*.npz"))) == 1
    for i in (0, 13, 30, 53):
        s = gen.sample(i)
        for d in (data, cached):
            assert np.allclose(d.correction_fluctuation(np.array([i]))[0], s["correction_fluctuation"], atol=1e-6)
            assert np.allclose(d.density_fluctuation(np.array([i]))[0], s["density_fluctuation"], atol=1e-6)
        k, m = data.split_index(np.array([i]))
        assert np.allclose(data.idc1d[k[0]], s["idc1d"]) and np.allclose(data.idc_average[m[0]], s["idc1d_average"])
        feats = idc_fluctuation_features(s["idc1d"], s["idc1d_average"], 20)
        if int(s["average_index"]) == 13:  # nominal average: the fluctuation is relative to 1
            assert np.allclose(feats, s["idc_fourier"], atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_tiny_training_on_cuda_with_mixed_precision(task: str, tmp_path: Path) -> None:
    from streamcal.detectors.tpc.tasks import load_corrector

    run = _tiny(task, device="cuda", mixed_precision=True, epochs=4)
    result = train(run, out=tmp_path)
    losses = [r["train_loss"] for r in result.history]
    assert losses[-1] < 0.8 * losses[0]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["device"].startswith("cuda")
    corrector = load_corrector(tmp_path, device="cuda")
    if task == "sc1d":
        assert corrector.predict(np.ones(200)).shape == (3, 18, 9, 9)
