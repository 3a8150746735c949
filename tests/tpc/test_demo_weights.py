"""The shipped demo weights (models/weights/, reproduced by scripts/make_demo_weights.py) and the
3D correction graph that uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from streamcal.detectors.tpc.tasks import load_corrector
from streamcal.schemas import tensor_to_numpy
from streamcal.testing import run_graph_local

ROOT = Path(__file__).resolve().parents[2]
WEIGHTS = ROOT / "models" / "weights"


@pytest.mark.parametrize("task", ["sc1d", "sc3d"])
def test_shipped_weights_are_small_trained_and_load(task):
    import torch

    path = WEIGHTS / f"{task}_90x17x17.pt"
    assert path.stat().st_size < 2_000_000
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    assert "optimizer_state" not in ckpt  # inference only
    assert ckpt["task"] == task and max(ckpt["best"]["rmse_um"].values()) <= 100.0  # the full training's held-out RMSE
    corr = load_corrector(path)
    assert corr.task == task and corr.grid.shape == (90, 17, 17)


def test_the_3d_graph_corrects_every_frame_on_the_shipped_weights(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # the graph names the weights relative to the repository root
    text = (ROOT / "configs" / "tpc_3d.yaml").read_text()
    text = (text.replace("intervals: 3000", "intervals: 300").replace("speed: 1.0, clock: wall", "speed: 0")
            .replace("db: tpc-calib.sqlite", f"db: {tmp_path / 'calib.sqlite'}"))
    assert "intervals: 300" in text and "speed: 0" in text and str(tmp_path) in text
    res = run_graph_local(text)
    sc3d = res.stage("sc3d").summary()
    assert sc3d["frames"] == 30 and sc3d["not_corrected"] == 0 and sc3d["missing_intervals"] == 0
    out = res.published["corrections"]
    assert len(out) == 30
    corr = np.stack([tensor_to_numpy(b.column("correction"))[0] for _, b in out])  # (30, 3, nphi, nr, nz) cm
    assert corr.shape == (30, 3, 90, 17, 17) and np.isfinite(corr).all()
    # a correction fluctuation: sub-mm to mm, not the average correction (cm)
    assert 1e-4 < np.abs(corr).mean() < 0.5
    assert res.stage("store").summary()["stored"] == 3


def test_the_1d_fast_path_for_the_nominal_map_equals_the_full_network():
    # live frames use the nominal average map: the voxel factors are computed once and reused
    corr = load_corrector(WEIGHTS / "sc1d_90x17x17.pt")
    idc = 1 + 0.02 * np.random.default_rng(0).normal(size=(4, 200))
    fast = corr.predict_batch(idc)
    full = corr.predict_batch(idc, average_correction=corr.average_correction)
    assert corr._local_terms is not None
    np.testing.assert_allclose(fast, full, rtol=0, atol=1e-7)  # cm
    assert np.abs(full).max() > 1e-3  # a real correction, not zeros
    # on CPU the per-frame part runs in numpy; torch's combine gives the same numbers
    assert corr._numpy_head is not None
    corr._numpy_head = None
    np.testing.assert_allclose(corr.predict_batch(idc), fast, rtol=0, atol=1e-7)


def test_a_checkpoint_of_another_grid_is_refused_by_the_stages():
    from streamcal.errors import ConfigError
    from streamcal.testing import run_stage

    for kind, extra in (("tpc_sc1d", {}), ("tpc_sc3d", {"residual_input": True})):
        task = kind.split("_")[1]
        cfg = {"grid": "180x33x33", "method": "model", "checkpoint": str(WEIGHTS / f"{task}_90x17x17.pt"), **extra}
        with pytest.raises(ConfigError, match="trained on grid 90x17x17, not 180x33x33"):
            run_stage(kind, cfg, {"idc": []})


def test_load_corrector_refuses_another_task():
    with pytest.raises(ValueError, match=r"is an sc1d model trained on grid 90x17x17, not 90x17x17 \(sc3d\)"):
        load_corrector(WEIGHTS / "sc1d_90x17x17.pt", task="sc3d")
