"""Training-set generator: determinism, disjoint splits, shapes and units, shards, CLI."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from streamcal.detectors.tpc.constants import Grid
from streamcal.detectors.tpc.dataset import (
    N_AVERAGE_MAPS,
    SCALAR_FIELDS,
    TENSOR_FIELDS,
    DatasetConfig,
    DatasetGenerator,
    TPCFluctuationDataset,
    _shard_indices,
    average_scalings,
    read_shards,
    write_shards,
)

GRID = Grid(36, 9, 9)


@pytest.fixture(scope="module")
def train() -> DatasetGenerator:
    return DatasetGenerator(DatasetConfig(grid=GRID, n_random=4, seed=1, split="train"))


@pytest.fixture(scope="module")
def evaluation() -> DatasetGenerator:
    return DatasetGenerator(DatasetConfig(grid=GRID, n_random=4, seed=1, split="eval"))


def test_shapes_dtypes_and_units(train: DatasetGenerator) -> None:
    s = train.sample(30)  # random map 1, average 3
    nphi, nr, nz = GRID.shape
    n_t = 200
    shapes = {
        "density_average": (nphi, nr, nz),
        "density_fluctuation": (nphi, nr, nz),
        "distortion_fluctuation": (3, nphi, nr, nz),
        "correction_fluctuation": (3, nphi, nr, nz),
        "idc1d": (n_t,),
        "idc1d_average": (n_t,),
        "idc_fourier": (40,),
    }
    assert set(s) == set(TENSOR_FIELDS) | set(SCALAR_FIELDS)
    for name, shape in shapes.items():
        assert s[name].shape == shape and s[name].dtype == np.float32, name
        assert np.all(np.isfinite(s[name])), name
    assert (int(s["random_index"]), int(s["average_index"])) == (1, 3)
    # units: rho/eps0 in V/cm^2 (~0.7 at the IFC at 50 kHz), distortions in cm (fluctuations ~ mm)
    assert 0.4 < s["density_average"][:, 0].mean() < 1.0
    assert 0.0 < np.abs(s["distortion_fluctuation"]).max() < 5.0
    # fluctuation = random - average: the random map is the same for every average
    a, b = train.sample(27), train.sample(53)
    np.testing.assert_allclose(
        a["density_average"] + a["density_fluctuation"], b["density_average"] + b["density_fluctuation"], rtol=1e-5, atol=1e-6
    )
    np.testing.assert_array_equal(a["idc1d"], b["idc1d"])


def test_average_maps(train: DatasetGenerator) -> None:
    scalings = average_scalings(0.1)
    assert scalings.shape == (N_AVERAGE_MAPS, 3) and len({tuple(x) for x in scalings}) == 27
    np.testing.assert_array_equal(scalings[13], 0.0)
    nominal = train.sample(13)
    np.testing.assert_allclose(nominal["density_average"], train.nominal.astype(np.float32))
    np.testing.assert_allclose(nominal["idc1d_average"], 1.0)
    up = train.sample(22)  # c = +0.1, l = p = 0
    np.testing.assert_allclose(up["density_average"], 1.1 * nominal["density_average"], rtol=1e-6)
    # global fluctuation: the random map is within a few % of the nominal average
    assert abs(float(nominal["relative_fluctuation"])) < 0.1


def test_determinism_by_seed(train: DatasetGenerator) -> None:
    again = DatasetGenerator(DatasetConfig(grid=GRID, n_random=4, seed=1, split="train"))
    for i in (0, 40, 107):
        x, y = train.sample(i), again.sample(i)
        for name in x:
            np.testing.assert_array_equal(x[name], y[name])
    other = DatasetGenerator(DatasetConfig(grid=GRID, n_random=4, seed=2, split="train"))
    assert not np.array_equal(other.random_map(0, with_distortions=False)["density"], train.random_map(0)["density"])


def test_splits_never_share_a_random_map(train: DatasetGenerator, evaluation: DatasetGenerator) -> None:
    train_maps = [train.random_map(k, with_distortions=False)["density"] for k in range(4)]
    eval_maps = [evaluation.random_map(k, with_distortions=False)["density"] for k in range(4)]
    for t in train_maps:
        for e in eval_maps:
            assert not np.allclose(t, e, rtol=1e-3)
            # not even a rescaled copy (the training bias multiplies a map by a factor)
            assert abs(np.corrcoef(t.ravel() - train.nominal.ravel(), e.ravel() - train.nominal.ravel())[0, 1]) < 0.5
    keys = {tuple(g.random_seed_sequence(k).spawn_key) for g in (train, evaluation) for k in range(1000)}
    assert len(keys) == 2000  # disjoint seed streams for the full default index space
    # eval is unbiased, train biased
    assert all(evaluation.random_map(k, with_distortions=False)["bias_factor"] == 1.0 for k in range(4))
    factors = [train.random_map(k, with_distortions=False)["bias_factor"] for k in range(4)]
    assert all(0.95 <= f <= 1.05 for f in factors) and len(set(factors)) == 4


def test_training_bias_widens_the_fluctuations_evaluation_is_unbiased() -> None:
    """Global relative fluctuation of 60 random maps: ~1.5 % (eq. 1 at 10^4 pile-up) unbiased in the
    evaluation split, ~3.5 % with the training bias 1 + 0.05 U(-1, 1) (measured 1.56 %, 3.52 %)."""
    g = Grid(18, 5, 5)

    def spread(split: str) -> float:
        gen = DatasetGenerator(DatasetConfig(grid=g, n_random=60, seed=9, split=split, bias=0.05))
        total = float(np.sum(gen.nominal * gen._volume))
        rel = [float(np.sum(gen.random_map(k, with_distortions=False)["density"] * gen._volume)) / total - 1.0
               for k in range(60)]  # fmt: skip
        return float(np.std(rel, ddof=1))

    unbiased, biased = spread("eval"), spread("train")
    assert unbiased == pytest.approx(0.0152, rel=0.25)
    assert biased > 1.8 * unbiased
    # the variance adds up: sigma^2 + b^2 / 3 for a uniform factor of half-width b
    assert biased == pytest.approx(np.sqrt(unbiased**2 + 0.05**2 / 3), rel=0.25)


def test_worker_sharding_covers_every_sample_once() -> None:
    for n_workers in (1, 2, 3):
        parts = [_shard_indices(5, 120, w, n_workers) for w in range(n_workers)]
        flat = sorted(i for p in parts for i in p)
        assert flat == list(range(5, 120))
        for p in parts:  # whole random maps per worker
            assert len({i // N_AVERAGE_MAPS % n_workers for i in p}) <= 1


def test_iterable_dataset_yields_tensors() -> None:
    ds = TPCFluctuationDataset(DatasetConfig(grid=GRID, n_random=2, seed=3), start=25, stop=29)
    items = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    assert len(ds) == 4 and len(items) == 2
    assert items[0]["density_fluctuation"].shape == (2, *GRID.shape)
    assert items[0]["distortion_fluctuation"].dtype == torch.float32
    assert items[1]["sample_index"].tolist() == [27, 28]
    with pytest.raises(ValueError, match=r"start, stop must satisfy 0 <= start <= stop <= 54"):
        TPCFluctuationDataset(DatasetConfig(grid=GRID, n_random=2), start=0, stop=55)


@pytest.mark.parametrize("file_format", ["parquet", "arrow"])
def test_shards_round_trip(tmp_path: Path, file_format: str) -> None:
    config = DatasetConfig(grid=GRID, n_random=2, seed=4, split="eval")
    paths = write_shards(config, tmp_path, n_samples=7, start=24, shard_size=3, file_format=file_format, progress=False)
    assert [p.name for p in paths] == [f"eval-0000{i}.{file_format}" for i in range(3)]
    data = read_shards(tmp_path)
    assert data["density_fluctuation"].shape == (7, *GRID.shape)
    assert data["distortion_fluctuation"].shape == (7, 3, *GRID.shape)
    assert data["sample_index"].tolist() == list(range(24, 31))
    reference = DatasetGenerator(config).sample(26)
    np.testing.assert_array_equal(data["correction_fluctuation"][2], reference["correction_fluctuation"])
    meta = json.loads((tmp_path / "eval-dataset.json").read_text())
    assert meta["grid"] == "36x9x9" and meta["bias"] == 0.0 and meta["units"]["distortion_fluctuation"].startswith("cm")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"grid": "90x17"}, "invalid DatasetConfig.grid"),
        ({"n_random": 0}, "n_random must be an integer >= 1"),
        ({"split": "test"}, r"split must be one of \['eval', 'train'\]"),
        ({"bias": 1.5}, r"bias must be a number in \[0, 1\)"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"n_fourier": 500}, r"n_fourier must be an integer in \[1, 101\]"),
        ({"scale_step": 0.9}, r"scale_step must be a number in \[0, 0.8\)"),
    ],
)
def test_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DatasetConfig(**kwargs)


def test_index_errors(train: DatasetGenerator) -> None:
    with pytest.raises(IndexError, match=r"sample index must be in \[0, 108\)"):
        train.sample(108)
    with pytest.raises(IndexError, match=r"random map index must be in \[0, 4\)"):
        train.random_map(-1)


# -- CLI ----------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    from streamcal.detectors.tpc.cli import add_subparser

    parser = argparse.ArgumentParser(prog="streamcal")
    add_subparser(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_simulate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "maps.npz"
    args = _parser().parse_args(["tpc", "simulate", "--grid", "36x9x9", "--maps", "2", "--seed", "3", "--out", str(out)])
    assert args.func(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["pile_up"] == pytest.approx(1e4) and summary["maps"] == 2
    with np.load(out) as f:
        assert f["density"].shape == (2, 36, 9, 9) and f["idc1d"].shape == (2, 200)
    arrow = tmp_path / "maps.arrow"
    args = _parser().parse_args(["tpc", "simulate", "--grid", "36x9x9", "--maps", "1", "--out", str(arrow)])
    assert args.func(args) == 0 and arrow.exists()
    args = _parser().parse_args(["tpc", "simulate", "--grid", "8x4x4", "--out", str(tmp_path / "x.txt")])
    assert args.func(args) == 2
    assert "--out must end in .npz, .arrow or .parquet" in capsys.readouterr().err


def test_cli_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tpc", "dataset", "--out", str(tmp_path), "--grid", "36x9x9", "--samples", "4", "--random-maps", "1",
            "--seed", "5", "--split", "eval", "--shard-size", "3", "--no-progress"]  # fmt: skip
    args = _parser().parse_args(argv)
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["shards"] == ["eval-00000.parquet", "eval-00001.parquet"] and report["samples_per_s"] > 0
    assert read_shards(tmp_path)["sample_index"].tolist() == [0, 1, 2, 3]
    args = _parser().parse_args(argv[:-1] + ["--samples", "28", "--no-progress"])
    assert args.func(args) == 2
    assert "--samples must be <= random-maps x 27 = 27" in capsys.readouterr().err


def test_cli_solver_check(capsys: pytest.CaptureFixture[str]) -> None:
    args = _parser().parse_args(["tpc", "solver-check", "--grids", "90x17x17", "--repeats", "1"])
    assert args.func(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["grids"][0]["grid"] == "90x17x17"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tpc", "simulate", "--grid", "90x17"], "invalid --grid"),
        (["tpc", "simulate", "--rate", "-5"], "argument --rate: expected a finite number >= 0"),
        (["tpc", "simulate", "--epsilon", "0"], "argument --epsilon: expected a finite number > 0"),
        (["tpc", "dataset", "--out", "x", "--split", "test"], "invalid choice: 'test'"),
        (["tpc", "dataset", "--out", "x", "--shard-size", "0"], "argument --shard-size: expected an integer >= 1"),
        (["tpc", "dataset", "--out", "x", "--seed", "-1"], "argument --seed: expected an integer >= 0"),
    ],
)
def test_cli_bad_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


# -- local perturbations (training-only augmentation) ----------------------------------------------
def test_local_perturbations_off_by_default_and_never_in_evaluation() -> None:
    plain = DatasetGenerator(DatasetConfig(grid=GRID, n_random=3, seed=5, split="train"))
    assert "local" not in plain.config.summary()  # same cache key as before the option existed
    ev = DatasetGenerator(DatasetConfig(grid=GRID, n_random=3, seed=5, split="eval", local_fraction=1.0))
    ev0 = DatasetGenerator(DatasetConfig(grid=GRID, n_random=3, seed=5, split="eval"))
    assert ev.config.effective_local_fraction == 0.0 and "local" not in ev.config.summary()
    for k in range(3):
        a, b = ev.random_map(k, with_distortions=False), ev0.random_map(k, with_distortions=False)
        assert a["local"] == [] and plain.random_map(k, with_distortions=False)["local"] == []
        np.testing.assert_array_equal(a["density"], b["density"])


def test_local_perturbations_match_the_closed_form_density() -> None:
    """Density is linear in the readout history, so a perturbation of ``a x spot x expected readout``
    during bins [t0, t1) adds exactly ``a x spot x density_from_readout(expected on [t0, t1))``; a
    full-drift one adds ``a x spot x`` the nominal average (the seed's line charge). The base map
    (own random stream) is unchanged, and the 1D IDCs rise by the perturbation's share per bin."""
    from streamcal.detectors.tpc.dataset import gaussian_spot
    from streamcal.detectors.tpc.density import _cell_widths, density_from_readout, expected_readout

    g = Grid(36, 9, 9)
    cfg = DatasetConfig(grid=g, n_random=12, seed=2, bias=0.0, local_fraction=1.0, local_max=3, local_amplitude=(0.2, 1.5))
    gen = DatasetGenerator(cfg)
    base = DatasetGenerator(DatasetConfig(grid=g, n_random=12, seed=2, bias=0.0))
    expected = expected_readout(cfg.density, g.r, g.nphi, length=g.length)  # (n_t, nphi, nr)
    eps = cfg.density.epsilon_on(g.phi[:, None], g.r[None, :])
    for k in range(12):
        m, m0 = gen.random_map(k, with_distortions=False), base.random_map(k, with_distortions=False)
        assert 1 <= len(m["local"]) <= 3
        model = np.zeros(g.shape)
        delta_e = np.zeros_like(expected)
        for p in m["local"]:
            assert 0.2 <= p["amplitude"] <= 1.5 and 3.0 <= p["width"] <= 12.0 and 0 <= p["t0"] < p["t1"] <= expected.shape[0]
            spot = gaussian_spot(g, phi0=p["phi0"], r0=p["r0"], width=p["width"])
            e = np.zeros_like(expected)
            e[p["t0"]:p["t1"]] = expected[p["t0"]:p["t1"]]
            model += p["amplitude"] * spot[:, :, None] * density_from_readout(e, g, cfg.density)
            delta_e += p["amplitude"] * e * spot[None]
        np.testing.assert_allclose(m["density"] - m0["density"], model, rtol=1e-9, atol=1e-12 * gen.nominal.max())
        # 1D IDC per bin: total ion charge entering, relative to the expectation
        dr = _cell_widths(g.r)
        share = np.einsum("tpr,pr,r->t", delta_e, eps, dr) / np.einsum("tpr,pr,r->t", expected, eps, dr)
        np.testing.assert_allclose(m["idc1d"] - m0["idc1d"], share, rtol=1e-9, atol=1e-12)
    # a single perturbation over the whole drift time is a line charge: a x spot x nominal average
    one = DatasetGenerator(DatasetConfig(grid=g, n_random=30, seed=2, bias=0.0, local_fraction=1.0, local_max=1))
    spans = {k: one.random_map(k, with_distortions=False)["local"][0] for k in range(30)}
    full = [k for k, p in spans.items() if (p["t0"], p["t1"]) == (0, expected.shape[0])]
    assert full  # drawn with probability 1/2 per map
    k = full[0]
    m = one.random_map(k, with_distortions=False)
    m0 = DatasetGenerator(DatasetConfig(grid=g, n_random=30, seed=2, bias=0.0)).random_map(k, with_distortions=False)
    p = m["local"][0]
    spot = gaussian_spot(g, phi0=p["phi0"], r0=p["r0"], width=p["width"])
    np.testing.assert_allclose(m["density"] - m0["density"], p["amplitude"] * spot[:, :, None] * one.nominal,
                               rtol=1e-9, atol=1e-12 * one.nominal.max())


def test_local_fraction_is_the_share_of_perturbed_maps() -> None:
    gen = DatasetGenerator(DatasetConfig(grid=Grid(18, 5, 5), n_random=200, seed=4, local_fraction=0.3))
    n = sum(bool(gen.random_map(k, with_distortions=False)["local"]) for k in range(200))
    assert 35 <= n <= 85  # binomial(200, 0.3): mean 60, sd 6.5; the bounds are ~4 sd
    again = DatasetGenerator(DatasetConfig(grid=Grid(18, 5, 5), n_random=200, seed=4, local_fraction=0.3))
    assert again.random_map(7, with_distortions=False)["local"] == gen.random_map(7, with_distortions=False)["local"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"local_fraction": 1.5}, r"local_fraction must be a number in \[0, 1\]"),
        ({"local_max": 0}, "local_max must be an integer >= 1"),
        ({"local_amplitude": (-2.0, 1.0)}, "local_amplitude must have lo >= -1"),
        ({"local_amplitude": (1.0, 0.5)}, "local_amplitude must be a pair of finite numbers with lo <= hi"),
        ({"local_amplitude": 3}, r"local_amplitude must be a pair \(lo, hi\)"),
        ({"local_width_cm": (0.0, 5.0)}, r"local_width_cm must lie in \(0, "),
    ],
)
def test_local_perturbation_config_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        DatasetConfig(**kwargs)
