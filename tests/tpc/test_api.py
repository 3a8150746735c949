"""The public namespace of ``streamcal.detectors.tpc`` and the ``streamcal tpc`` command."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import streamcal.detectors.tpc as tpc

MODULES = ("constants", "density", "idc", "poisson", "langevin", "dataset", "cli")


def test_every_exported_name_resolves_to_its_module() -> None:
    from streamcal.detectors.tpc import constants

    assert len(set(tpc.__all__)) == len(tpc.__all__)
    for name in tpc.__all__:
        home = importlib.import_module(f"streamcal.detectors.tpc.{tpc._LAZY[name]}") if name in tpc._LAZY else constants
        assert name in home.__all__, name
        assert getattr(tpc, name) is getattr(home, name), name
    assert set(tpc.__all__) <= set(dir(tpc))
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        tpc.nope  # noqa: B018


def test_every_module_declares_all() -> None:
    for name in MODULES:
        module = importlib.import_module(f"streamcal.detectors.tpc.{name}")
        assert module.__all__, name
        for exported in module.__all__:
            assert hasattr(module, exported), f"{name}.{exported}"


def test_package_import_does_not_load_torch() -> None:
    # `streamcal tpc --help` and every other streamcal command import this package.
    code = "import sys, streamcal.detectors.tpc, streamcal.detectors.tpc.cli; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_streamcal_command_runs_tpc_subcommands(tmp_path: Path) -> None:
    """The installed CLI wiring: ``streamcal tpc simulate|dataset|solver-check`` as a user runs them."""
    from streamcal.cli import main

    assert main(["tpc", "simulate", "--grid", "18x5x5", "--maps", "1", "--out", str(tmp_path / "m.npz")]) == 0
    assert (tmp_path / "m.npz").exists()
    argv = ["tpc", "dataset", "--out", str(tmp_path / "ds"), "--grid", "18x5x5", "--samples", "2",
            "--random-maps", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert sorted(p.name for p in (tmp_path / "ds").iterdir()) == ["train-00000.parquet", "train-dataset.json"]
    assert main(["tpc", "solver-check", "--grids", "18x9x9", "--repeats", "1"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["tpc", "simulate", "--rate", "-1"])
    assert exc.value.code == 2


def test_solver_check_subprocess_json() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamcal.cli", "tpc", "solver-check", "--grids", "18x9x9", "--repeats", "1"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    report = json.loads(out.stdout)
    assert report["grids"][0]["grid"] == "18x9x9" and report["grids"][0]["rel_error_m0"] < 0.1


@pytest.mark.parametrize(
    ("make", "argument", "allowed"),
    [
        (lambda: tpc.parse_grid("90x17"), "invalid grid '90x17'", "standard grids: 90x17x17, 180x33x33, 180x65x65, 180x129x129"),
        (lambda: tpc.parse_grid("90x17x1"), "invalid grid", "nz>=3"),
        (lambda: tpc.Grid(2, 17, 17), "Grid.nphi", ">= 4"),
        (lambda: tpc.DensityConfig(rate_hz=-5.0), "DensityConfig.rate_hz", ">= 0 Hz"),
        (lambda: tpc.DensityConfig(time_bin=1.0), "DensityConfig.time_bin", "0 < time_bin <= ion_drift_time (0.2 s)"),
        (lambda: tpc.PoissonSolver("12x7x9").solve(np.zeros((12, 9, 7))), "rho must have shape", "(..., 12, 7, 9)"),
        (lambda: tpc.PoissonSolver("12x7x9", dtype="float16"), "dtype", "['float32', 'float64']"),
        (lambda: tpc.IDCConfig(n_sides=3), "IDCConfig.n_sides", "1 or 2"),
        (lambda: tpc.DatasetConfig(split="test"), "DatasetConfig.split", "['eval', 'train']"),
        (lambda: tpc.DatasetConfig(grid="90x17x0"), "invalid DatasetConfig.grid", "standard grids"),
    ],
)
def test_errors_name_the_argument_and_the_allowed_values(make, argument: str, allowed: str) -> None:
    with pytest.raises(ValueError) as exc:
        make()
    assert argument in str(exc.value) and allowed in str(exc.value)
