"""ONNX export of the TPC corrections: onnxruntime on the exported file gives the torch corrector's
output on real evaluation samples (batch 1 and 3), the metadata JSON describes the file, the tree
model and a missing onnx package give clear errors, and ``streamcal export onnx`` works."""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from streamcal.errors import StreamcalError  # noqa: E402
from streamcal.export import OptionalDependencyError, export_onnx  # noqa: E402
from streamcal.train import RunConfig, load_run_config, parse_run_config, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = {"sc1d": ROOT / "configs" / "train" / "sc1d_tiny.yaml", "sc3d": ROOT / "configs" / "train" / "sc3d_tiny.yaml"}
# onnxruntime vs torch, in cm: absolute tolerance only (0.1 um; the corrections are ~0.01-1 cm)
ATOL_CM = 1e-5


def _run(task: str, model: dict | None = None, **train_overrides: object) -> RunConfig:
    run = load_run_config(TINY[task])
    if model:
        raw = run.to_dict()
        raw["model"].update(model)
        run = parse_run_config(raw)
    return dataclasses.replace(run, train=dataclasses.replace(run.train, **train_overrides))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny sc1d and sc3d configs trained once for the module (a few seconds each)."""
    out = {}
    for task in ("sc1d", "sc3d"):
        out[task] = tmp_path_factory.mktemp(task)
        train(_run(task), out=out[task])
    return out


def _session(path: Path) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@functools.lru_cache(maxsize=None)
def _eval_data(task: str):
    """The evaluation split of the tiny config (generated once per module)."""
    from streamcal.detectors.tpc.tasks import FluctuationData

    return FluctuationData(load_run_config(TINY[task]).task_config.data.dataset_config("eval"), densities=task == "sc3d")


def _sc1d_inputs(data, idx: np.ndarray) -> dict[str, np.ndarray]:
    k, m = data.split_index(idx)
    return {"idc1d": data.idc1d[k], "idc1d_average": data.idc_average[m],
            "average_correction": data.average_correction[m]}


def _sc3d_inputs(data, idx: np.ndarray) -> dict[str, np.ndarray]:
    from streamcal.detectors.tpc.tasks import linear_scaler

    k, m = data.split_index(idx)
    return {"density_average": data.average_density[m], "density_fluctuation": data.density_fluctuation(idx),
            "precorrection": linear_scaler(data.average_correction[m], data.idc1d[k], data.idc_average[m])}


BATCHES = [np.array([13]), np.array([0, 9, 26])]  # batch 1 (the nominal average map) and batch 3


def test_sc1d_onnx_gives_the_corrector_output(trained: dict[str, Path], tmp_path: Path) -> None:
    from streamcal.detectors.tpc.tasks import load_corrector

    meta = export_onnx(trained["sc1d"], tmp_path / "sc1d.onnx")
    corrector = load_corrector(trained["sc1d"])
    sess = _session(tmp_path / "sc1d.onnx")
    assert [i.name for i in sess.get_inputs()] == ["idc1d", "idc1d_average", "average_correction"]
    assert [o.name for o in sess.get_outputs()] == ["correction"]
    data = _eval_data("sc1d")
    for idx in BATCHES:
        feed = _sc1d_inputs(data, idx)
        ref = corrector.predict_batch(feed["idc1d"], idc1d_average=feed["idc1d_average"],
                                      average_correction=feed["average_correction"])
        got = sess.run(None, feed)[0]
        assert got.shape == ref.shape == (len(idx), 3, 18, 9, 9) and got.dtype == np.float32
        assert np.abs(ref).max() > 100 * ATOL_CM  # a real correction, not zeros
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL_CM)
    # the corrector's defaults (nominal reference) are ones and the checkpoint's average correction
    idc = data.idc1d[:1]
    got = sess.run(None, {"idc1d": idc, "idc1d_average": np.ones_like(idc),
                          "average_correction": corrector.average_correction[None]})[0]
    np.testing.assert_allclose(got[0], corrector.predict(idc[0]), rtol=0, atol=ATOL_CM)
    assert meta["verification"]["max_abs_diff_cm"] <= ATOL_CM


def test_sc3d_onnx_gives_the_corrector_output(trained: dict[str, Path], tmp_path: Path) -> None:
    from streamcal.detectors.tpc.tasks import load_corrector

    export_onnx(trained["sc3d"], tmp_path / "sc3d.onnx")
    corrector = load_corrector(trained["sc3d"])
    sess = _session(tmp_path / "sc3d.onnx")
    assert [i.name for i in sess.get_inputs()] == ["density_average", "density_fluctuation", "precorrection"]
    data = _eval_data("sc3d")
    for idx in BATCHES:
        feed = _sc3d_inputs(data, idx)
        ref = corrector.predict_batch(feed["density_average"], feed["density_fluctuation"], feed["precorrection"])
        got = sess.run(["correction"], feed)[0]
        assert got.shape == ref.shape == (len(idx), 3, 18, 9, 9) and got.dtype == np.float32
        assert np.abs(ref - feed["precorrection"]).max() > 100 * ATOL_CM  # the network adds a residual
        np.testing.assert_allclose(got, ref, rtol=0, atol=ATOL_CM)


@pytest.mark.parametrize(
    ("task", "model", "names"),
    [
        ("sc1d", {"use_phi": True, "use_average_correction": False, "architecture": "mlp"},
         ["idc1d", "idc1d_average"]),
        ("sc3d", {"residual": False, "padding": "zeros", "boundary_channels": False},
         ["density_average", "density_fluctuation"]),
    ],
    ids=["sc1d-mlp-phi-no-average", "sc3d-plain-unet"],
)
def test_other_architectures_export(task: str, model: dict, names: list[str], tmp_path: Path) -> None:
    from streamcal.detectors.tpc.tasks import load_corrector

    train(_run(task, model, epochs=1), out=tmp_path / "run")
    export_onnx(tmp_path / "run", tmp_path / "m.onnx")
    sess = _session(tmp_path / "m.onnx")
    assert [i.name for i in sess.get_inputs()] == names
    corrector = load_corrector(tmp_path / "run")
    data = _eval_data(task)
    idx = BATCHES[1]
    if task == "sc1d":
        feed = {k: v for k, v in _sc1d_inputs(data, idx).items() if k in names}
        ref = corrector.predict_batch(feed["idc1d"], idc1d_average=feed["idc1d_average"])
        assert not np.allclose(ref, ref[:, :, :1])  # per voxel: depends on phi
    else:
        feed = {k: v for k, v in _sc3d_inputs(data, idx).items() if k in names}
        ref = corrector.predict_batch(feed["density_average"], feed["density_fluctuation"])
    np.testing.assert_allclose(sess.run(None, feed)[0], ref, rtol=0, atol=ATOL_CM)


def test_metadata_json_describes_the_file(trained: dict[str, Path], tmp_path: Path) -> None:
    import torch

    from streamcal.train import load_checkpoint

    meta = export_onnx(trained["sc3d"], tmp_path / "out" / "sc3d.onnx", opset=17)
    side = json.loads((tmp_path / "out" / "sc3d.json").read_text())
    assert meta["json_path"] == str(tmp_path / "out" / "sc3d.json")
    assert side["task"] == "sc3d" and side["opset"] == 17 and side["grid"]["shape"] == [18, 9, 9]
    assert [(i["name"], i["shape"]) for i in side["inputs"]] == [
        ("density_average", ["batch", 18, 9, 9]), ("density_fluctuation", ["batch", 18, 9, 9]),
        ("precorrection", ["batch", 3, 18, 9, 9])]
    assert [(o["name"], o["shape"], o["unit"]) for o in side["outputs"]] == [("correction", ["batch", 3, 18, 9, 9], "cm")]
    state = load_checkpoint(trained["sc3d"])["task_state"]
    consts = side["normalisation"]["constants"]
    assert side["normalisation"]["in_graph"] is True
    assert np.allclose(consts["target_scale"], state["target_scale"].numpy())
    assert np.isclose(consts["density_scale"], float(state["density_scale"]))
    assert side["source"]["checkpoint"] == str(trained["sc3d"] / "best.pt") and len(side["source"]["sha256"]) == 64
    assert side["exported_with"]["torch"] == str(torch.__version__)
    model = onnx.load(str(tmp_path / "out" / "sc3d.onnx"))
    props = {p.key: p.value for p in model.metadata_props}
    assert json.loads(props["streamcal.metadata"])["inputs"] == side["inputs"]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input]
    assert dims[0] == ["batch", 18, 9, 9]


def test_static_batch(trained: dict[str, Path], tmp_path: Path) -> None:
    meta = export_onnx(trained["sc1d"], tmp_path / "b1.onnx", batch_dynamic=False)
    assert meta["inputs"][0]["shape"] == [1, 200] and meta["verification"]["batches"] == [1]
    model = onnx.load(str(tmp_path / "b1.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [1, 200]
    assert [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim] == [1, 3, 18, 9, 9]


def test_tree_checkpoint_is_refused_by_name(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    run = _run("sc1d", {"kind": "trees", "trees": {"max_iter": 5, "max_leaf_nodes": 7, "max_rows": 2000}})
    train(run, out=tmp_path / "trees")
    with pytest.raises(StreamcalError, match=r"trees.*best\.pt|best\.pt.*trees") as exc:
        export_onnx(tmp_path / "trees", tmp_path / "trees.onnx")
    assert str(tmp_path / "trees" / "best.pt") in str(exc.value)
    assert "not exported" in str(exc.value) and "model.kind: dense" in str(exc.value)
    assert not (tmp_path / "trees.onnx").exists()


def test_missing_onnx_gives_the_install_hint(trained: dict[str, Path], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx -> ImportError
    with pytest.raises(OptionalDependencyError, match=r"pip install 'streamcal\[onnx\]'"):
        export_onnx(trained["sc3d"], tmp_path / "m.onnx")
    monkeypatch.setitem(sys.modules, "onnx", onnx)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ImportError, match=r"onnxruntime.*pip install 'streamcal\[onnx\]'"):
        export_onnx(trained["sc3d"], tmp_path / "m.onnx")
    export_onnx(trained["sc3d"], tmp_path / "m.onnx", verify=False)  # runs without onnxruntime
    assert (tmp_path / "m.onnx").exists() and "verification" not in json.loads((tmp_path / "m.json").read_text())


def test_streamcal_export_onnx_command(trained: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    from streamcal.cli import main

    out = tmp_path / "cli" / "sc3d.onnx"
    assert main(["export", "onnx", "--checkpoint", str(trained["sc3d"]), "--out", str(out), "--opset", "17"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["onnx"] == str(out) and printed["task"] == "sc3d" and printed["opset"] == 17
    assert printed["inputs"]["density_average"] == ["batch", 18, 9, 9]
    assert out.exists() and out.with_suffix(".json").exists()
    # errors name what was wrong and give exit code 1
    assert main(["export", "onnx", "--checkpoint", str(trained["sc3d"]), "--out", str(tmp_path / "x.json")]) == 1
    assert "'.onnx'" in capsys.readouterr().err
    assert main(["export", "onnx", "--checkpoint", str(trained["sc3d"]), "--out", str(out), "--opset", "9"]) == 1
    assert "opset must be in [13, 20]" in capsys.readouterr().err
    assert main(["export", "onnx", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 1
    assert "no checkpoint" in capsys.readouterr().err
