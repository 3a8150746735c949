"""The 1D and 3D correction models: shapes on odd grids, periodic phi, boundary channels, the
seed-style U-Net's size, the gradient-boosted-tree interface, config errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from streamcal.errors import ConfigError
from streamcal.models.sc1d import SC1DConfig, SC1DNet, SC1DTrees, build_sc1d, sc1d_features
from streamcal.models.sc3d import N_BOUNDARY, UNet3D, UNet3DConfig, boundary_distances


def _n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# -- U-Net ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(18, 9, 9), (90, 17, 17), (20, 5, 7), (4, 3, 3)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("padding", ["zeros", "circular_phi"])
def test_unet_keeps_the_grid_shape_for_odd_sizes(shape: tuple[int, int, int], padding: str) -> None:
    cfg = UNet3DConfig(depth=4, width=2, padding=padding, residual=True)
    model = UNet3D(cfg)
    fields = torch.randn(2, 2, *shape)
    pre = torch.randn(2, 3, *shape)
    out = model(fields, pre)
    assert out.shape == (2, 3, *shape)
    assert torch.isfinite(out).all()


def test_seed_style_unet_has_the_seed_size() -> None:
    cfg = UNet3DConfig.seed_style()
    assert (cfg.padding, cfg.boundary_channels, cfg.residual) == ("zeros", False, False)
    assert cfg.channels() == [4, 8, 16, 32, 64] and cfg.in_channels == 2

    def conv(c_in: int, c_out: int, k: int = 3) -> int:
        return k**3 * c_in * c_out + c_out

    ch = [4, 8, 16, 32, 64]
    expected = conv(2, 4) + conv(4, 4)
    expected += sum(conv(ch[i - 1], ch[i]) + conv(ch[i], ch[i]) for i in range(1, 5))  # contracting path
    expected += sum(conv(ch[i + 1] + ch[i], ch[i]) + conv(ch[i], ch[i]) for i in range(4))  # expanding path
    expected += conv(4, 3, k=1)  # 1x1x1 output, dr drphi dz
    model = UNet3D(cfg)
    assert _n_params(model) == expected == 368_231
    assert model(torch.randn(1, 2, 90, 17, 17)).shape == (1, 3, 90, 17, 17)


def _positive(model: UNet3D) -> UNet3D:
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.rand_like(p) * 0.1 + 0.01)  # every path positive: ReLU passes everything
    return model


@pytest.mark.parametrize("padding", ["zeros", "circular_phi"])
def test_circular_phi_padding_wraps_around(padding: str) -> None:
    """An impulse at phi index 0 reaches the last phi node only through the periodic boundary."""
    torch.manual_seed(0)
    model = _positive(UNet3D(UNet3DConfig(depth=1, width=2, padding=padding, boundary_channels=False, residual=False)))
    base = torch.ones(1, 2, 12, 5, 5)
    bumped = base.clone()
    bumped[0, 1, 0, 2, 2] += 1.0
    delta = (model(bumped) - model(base)).abs()[0, :, -1, 2, 2]  # response at phi index 11
    if padding == "circular_phi":
        assert (delta > 1e-6).all()
    else:
        assert (delta == 0).all()  # two 3x3x3 convolutions reach 2 nodes: 0 -> 2, never 11


def test_circular_unet_is_equivariant_to_phi_rotations() -> None:
    """Periodic phi: rotating the input by a multiple of the pooling stride rotates the output."""
    torch.manual_seed(1)
    for padding, equivariant in (("circular_phi", True), ("zeros", False)):
        model = UNet3D(UNet3DConfig(depth=3, width=3, padding=padding, boundary_channels=True, residual=False))
        x = torch.rand(1, 2, 16, 9, 9)
        shift = 4  # 2^(depth - 1)
        a = model(torch.roll(x, shift, dims=2))
        b = torch.roll(model(x), shift, dims=2)
        assert torch.allclose(a, b, atol=1e-5) is equivariant, padding


def test_boundary_channels_are_distances_to_the_four_boundaries() -> None:
    b = boundary_distances((6, 5, 7))
    assert b.shape == (N_BOUNDARY, 6, 5, 7)
    assert torch.all(b[0, :, 0] == 0) and torch.all(b[0, :, -1] == 1)  # from the IFC (r index 0)
    assert torch.all(b[1, :, -1] == 0) and torch.all(b[1, :, 0] == 1)  # from the OFC
    assert torch.all(b[2, :, :, -1] == 0) and torch.all(b[2, :, :, 0] == 1)  # from the readout (z = L)
    assert torch.all(b[3, :, :, 0] == 0) and torch.all(b[3, :, :, -1] == 1)  # from the central electrode (z = 0)
    assert torch.allclose(b[0, 0, :, 0], torch.linspace(0, 1, 5))
    with_b = UNet3D(UNet3DConfig(boundary_channels=True, residual=False))
    without = UNet3D(UNet3DConfig(boundary_channels=False, residual=False))
    assert with_b.down[0][0].conv.in_channels == 2 + N_BOUNDARY
    assert without.down[0][0].conv.in_channels == 2
    assert UNet3DConfig(boundary_channels=True, residual=True).in_channels == 2 + N_BOUNDARY + 3


def test_boundary_channels_break_translation_invariance_in_r() -> None:
    """With the boundary channels a uniform input gives an r-dependent output away from the
    zero-padded edges; without them the interior is translation invariant."""
    torch.manual_seed(2)
    x = torch.ones(1, 2, 8, 11, 11)
    for flag in (True, False):
        model = UNet3D(UNet3DConfig(depth=1, width=4, padding="circular_phi", boundary_channels=flag, residual=False))
        out = model(x)[0, 0, 0, 3:-3, 5]  # r nodes the zero padding cannot reach (2 convolutions), mid z
        assert bool(out.max() - out.min() > 1e-6) is flag


def test_residual_unet_adds_its_output_to_the_precorrection() -> None:
    model = UNet3D(UNet3DConfig(depth=2, width=2, residual=True))
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.zero_()
    fields, pre = torch.randn(1, 2, 8, 5, 5), torch.randn(1, 3, 8, 5, 5)
    assert torch.equal(model(fields, pre), pre)
    with pytest.raises(ValueError, match="precorrection"):
        model(fields)


@pytest.mark.parametrize("depth", [1, 3])
def test_last_relu_off_gives_the_head_signed_features(depth: int) -> None:
    """Only the last 3x3x3 convolution loses its ReLU; its features (the head's input) then take
    both signs, with it (the seed's network) they are >= 0. Same parameters either way."""
    torch.manual_seed(0)
    x = torch.randn(2, 2, 8, 7, 7)
    seen = {}
    for flag in (True, False):
        model = UNet3D(UNet3DConfig(depth=depth, width=4, boundary_channels=False, residual=False, last_relu=flag))
        last = (model.up[-1] if depth > 1 else model.down[0])[1]
        relus = [m.relu for m in model.modules() if hasattr(m, "relu") and isinstance(m.relu, bool)]
        assert relus.count(False) == (0 if flag else 1) and last.relu is flag
        feats = []
        model.head.register_forward_hook(lambda _m, inp, _out: feats.append(inp[0]))
        with torch.no_grad():
            model(x)
        seen[flag] = feats[0]
        assert sum(p.numel() for p in model.parameters()) == sum(
            p.numel() for p in UNet3D(UNet3DConfig(depth=depth, width=4, boundary_channels=False, residual=False)).parameters())
    assert float(seen[True].min()) >= 0.0 and float(seen[False].min()) < 0.0 < float(seen[False].max())


def test_unet_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="field 'padding'"):
        UNet3DConfig.from_dict({"padding": "reflect"})
    with pytest.raises(ConfigError, match="field 'depth'"):
        UNet3DConfig.from_dict({"depth": 0})
    assert UNet3DConfig.seed_style(depth=3).depth == 3


# -- 1D model --------------------------------------------------------------------------------------
@pytest.mark.parametrize("architecture", ["bilinear", "mlp"])
@pytest.mark.parametrize("use_phi", [False, True])
def test_sc1d_net_shapes(architecture: str, use_phi: bool) -> None:
    cfg = SC1DConfig(architecture=architecture, use_phi=use_phi, n_fourier=5, hidden=(16, 16), rank=4)
    net = SC1DNet(cfg)
    b, p = 3, 17 * 9
    idc = torch.randn(b, 10)
    pos = torch.rand(p, cfg.n_position)
    extra = torch.randn(b, p, 3)
    out = net(idc, pos, extra)
    assert out.shape == (b, p, 3)
    assert torch.allclose(net(idc, pos.expand(b, -1, -1), extra), out)  # shared or per-sample positions
    with pytest.raises(ValueError, match="extra"):
        net(idc, pos)
    with pytest.raises(ValueError, match="idc"):
        net(torch.randn(b, 7), pos, extra)


def test_sc1d_mlp_split_first_layer_equals_the_concatenation() -> None:
    """The IDC part of the first layer computed once per sample is the plain MLP on [idc, pos, extra]."""
    cfg = SC1DConfig(architecture="mlp", n_fourier=3, hidden=(8, 8))
    net = SC1DNet(cfg)
    idc, pos, extra = torch.randn(2, 6), torch.rand(5, 2), torch.randn(2, 5, 3)
    x = torch.cat([idc[:, None].expand(-1, 5, -1), pos.expand(2, -1, -1), extra], dim=-1)  # (2, 5, 11)
    w = torch.cat([net.idc_in.weight, net.local_in.weight], dim=1)  # (8, 11)
    h = torch.nn.functional.silu(x @ w.T + net.idc_in.bias)
    assert torch.allclose(net(idc, pos, extra), net.body(h), atol=1e-6)


def test_sc1d_without_average_correction_takes_no_extra() -> None:
    net = SC1DNet(SC1DConfig(use_average_correction=False, n_fourier=2, hidden=(4,), rank=2))
    assert net(torch.randn(2, 4), torch.rand(6, 2)).shape == (2, 6, 3)


def test_sc1d_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="field 'hidden'"):
        SC1DConfig.from_dict({"hidden": []})
    with pytest.raises(ConfigError, match="field 'activation'"):
        SC1DConfig.from_dict({"activation": "swish"})
    with pytest.raises(ConfigError, match="field 'max_iter'"):
        SC1DConfig.from_dict({"trees": {"max_iter": 0}})


def test_gradient_boosted_trees_have_the_net_interface() -> None:
    pytest.importorskip("sklearn")
    cfg = SC1DConfig.from_dict({"kind": "trees", "n_fourier": 2,
                                "trees": {"max_iter": 30, "max_leaf_nodes": 8, "min_samples_leaf": 5}})
    trees = build_sc1d(cfg)
    assert isinstance(trees, SC1DTrees) and not trees.fitted
    rng = np.random.default_rng(0)
    b, p = 40, 12
    idc = rng.normal(size=(b, 4)).astype(np.float32)
    pos = rng.uniform(-1, 1, size=(p, 2)).astype(np.float32)
    extra = rng.normal(size=(b, p, 3)).astype(np.float32)
    with pytest.raises(RuntimeError, match="before fit"):
        trees.predict(idc, pos, extra)
    x = sc1d_features(idc, pos, extra)  # (B, P, 9)
    y = np.stack([x[..., 0] * (1 + x[..., 4]), x[..., 1], x[..., 6]], axis=-1)  # a learnable target
    trees.fit(x.reshape(-1, x.shape[-1]), y.reshape(-1, 3))
    out = trees.predict(idc, pos, extra)
    assert out.shape == (b, p, 3) and out.dtype == np.float32
    assert np.sqrt(np.mean((out - y) ** 2)) < 0.5 * np.sqrt(np.mean(y**2))
    with pytest.raises(ValueError, match="extra"):
        trees.predict(idc, pos)
    with pytest.raises(ValueError, match="kind"):
        SC1DNet(cfg)
