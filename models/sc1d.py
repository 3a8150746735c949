"""1D distortion-fluctuation correction (seed section 3: "a Boosted Decision Tree (BDT) algorithm
or a simple dense neural network will be trained to predict the correction for the distortion
fluctuations based on the 1D IDCs").

The 1D IDCs only see the fluctuations of the number of events and of the track multiplicity:
they say how much charge entered the drift volume in each millisecond of the last ion drift time,
not where in (phi, r). Because an ion of age ``tau`` sits at ``z = L - v_ion tau``, the 1D IDC
history is a z profile of the global density fluctuation, and the correction fluctuation it
causes depends, to leading order, on z only (seed section 5) and on r through the field.

Inputs of one prediction (one sample, ``P`` positions):

* ``idc``: (B, 2 n_fourier) the Fourier coefficients of the 1D IDC fluctuation over the last
  200 ms (:func:`streamcal.detectors.tpc.idc.idc_fourier`), normalised by the task;
* ``position``: (P, n_position) or (B, P, n_position): ``r`` and ``z`` scaled to [-1, 1] and, with
  ``use_phi``, ``cos(phi)`` and ``sin(phi)``;
* ``extra``: (B, P, 3) or None: with ``use_average_correction`` the average correction
  (dr, drphi, dz) at the position, normalised: under linear scaling the correction fluctuation is
  the average correction times the relative charge change, so it carries the derivative of the
  correction with respect to the IDCs that the seed's data-driven calibration measures.

Output: (B, P, 3), the correction fluctuation (dr, drphi, dz) at the positions, normalised.

Two dense architectures:

* ``mlp``: one multilayer perceptron on the concatenation ``[idc, position, extra]``. Its first
  layer is split so that the IDC part is computed once per sample, not once per position:
  ``W [idc; pos; extra] = W_idc idc + W_pos pos + W_extra extra``.
* ``bilinear`` (default): ``out_c = sum_k G_ck(position, extra) Q_k(idc) + b_c(position, extra)``,
  a position network ``G`` times an IDC embedding ``Q`` (a linear map plus an MLP). The correction
  is, to first order, a position-dependent linear functional of the density-fluctuation profile,
  which this form represents exactly with ``rank`` terms; the MLP parts take the non-linearity.

:class:`SC1DTrees` is the gradient-boosted-tree alternative (scikit-learn's
``HistGradientBoostingRegressor``, one per component) on the same features with the same
``predict`` interface (numpy in, numpy out). No training loops here: the shared loop is
:mod:`streamcal.train`, the data glue :mod:`streamcal.detectors.tpc.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from streamcal.config import Config

__all__ = [
    "N_COMPONENTS",
    "SC1DTreesConfig",
    "SC1DConfig",
    "SC1DNet",
    "SC1DTrees",
    "build_sc1d",
    "sc1d_features",
]

N_COMPONENTS = 3  # dr, drphi, dz

Activation = Literal["relu", "gelu", "silu", "tanh"]
_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass(frozen=True)
class SC1DTreesConfig(Config):
    """Gradient-boosted trees (``HistGradientBoostingRegressor``, one per component).

    Attributes:
        max_iter: boosting iterations (>= 1).
        learning_rate: shrinkage (> 0).
        max_leaf_nodes: leaves per tree (>= 2).
        min_samples_leaf: (>= 1).
        l2_regularization: (>= 0).
        max_rows: at most this many (sample, position) rows are used for the fit, drawn at random
            (the full set is samples x positions, millions of rows at 90x17x17).
    """

    owner = "model.trees"
    max_iter: int = 300
    learning_rate: float = 0.1
    max_leaf_nodes: int = 63
    min_samples_leaf: int = 20
    l2_regularization: float = 0.0
    max_rows: int = 300_000

    def validate(self) -> None:
        if self.max_iter < 1:
            self.fail("max_iter", f"must be >= 1, got {self.max_iter}")
        if not self.learning_rate > 0:
            self.fail("learning_rate", f"must be > 0, got {self.learning_rate}")
        if self.max_leaf_nodes < 2:
            self.fail("max_leaf_nodes", f"must be >= 2, got {self.max_leaf_nodes}")
        if self.min_samples_leaf < 1:
            self.fail("min_samples_leaf", f"must be >= 1, got {self.min_samples_leaf}")
        if self.l2_regularization < 0:
            self.fail("l2_regularization", f"must be >= 0, got {self.l2_regularization}")
        if self.max_rows < 100:
            self.fail("max_rows", f"must be >= 100, got {self.max_rows}")


@dataclass(frozen=True)
class SC1DConfig(Config):
    """The 1D correction model (module doc).

    Attributes:
        kind: ``dense`` (:class:`SC1DNet`) or ``trees`` (:class:`SC1DTrees`).
        n_fourier: number of complex Fourier coefficients of the IDC history (input ``2 n_fourier``).
        use_phi: add ``cos(phi), sin(phi)`` to the position and predict per voxel; otherwise the
            prediction is per (r, z) and holds for every phi.
        use_average_correction: add the average correction at the position (3 values).
        idc_norm: how the task standardises the Fourier input: ``global`` (one scale for all
            coefficients, keeping their relative sizes: the high frequencies are mostly noise and
            stay small) or ``per_coefficient`` (each to unit variance).
        architecture: ``bilinear`` or ``mlp`` (dense only, module doc).
        hidden: hidden layer sizes of the MLPs (dense only).
        rank: number of bilinear terms (``bilinear`` only).
        activation: hidden activation.
        dropout: dropout probability after each hidden layer.
        trees: the tree settings (``kind: trees`` only).
    """

    owner = "model"
    kind: Literal["dense", "trees"] = "dense"
    n_fourier: int = 20
    use_phi: bool = False
    use_average_correction: bool = True
    idc_norm: Literal["global", "per_coefficient"] = "global"
    architecture: Literal["bilinear", "mlp"] = "bilinear"
    hidden: tuple[int, ...] = (128, 128)
    rank: int = 32
    activation: Activation = "silu"
    dropout: float = 0.0
    trees: SC1DTreesConfig = field(default_factory=SC1DTreesConfig)

    def validate(self) -> None:
        if not 1 <= self.n_fourier <= 101:
            self.fail("n_fourier", f"must be in [1, 101] (200 time bins), got {self.n_fourier}")
        if not self.hidden or any(h < 1 for h in self.hidden):
            self.fail("hidden", f"must be a non-empty list of sizes >= 1, got {list(self.hidden)}")
        if self.rank < 1:
            self.fail("rank", f"must be >= 1, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            self.fail("dropout", f"must be in [0, 1), got {self.dropout}")

    @property
    def n_idc(self) -> int:
        return 2 * self.n_fourier

    @property
    def n_position(self) -> int:
        return 4 if self.use_phi else 2

    @property
    def n_extra(self) -> int:
        return N_COMPONENTS if self.use_average_correction else 0

    @property
    def n_features(self) -> int:
        return self.n_idc + self.n_position + self.n_extra


def _mlp(n_in: int, hidden: tuple[int, ...], n_out: int, activation: str, dropout: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(n_in, h), _ACTIVATIONS[activation]()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        n_in = h
    layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


def _check_inputs(cfg: SC1DConfig, idc: Tensor, position: Tensor, extra: Tensor | None) -> tuple[Tensor, Tensor | None]:
    if idc.ndim != 2 or idc.shape[1] != cfg.n_idc:
        raise ValueError(f"idc must have shape (B, {cfg.n_idc}), got {tuple(idc.shape)}")
    b = idc.shape[0]
    if position.ndim == 2:
        position = position.unsqueeze(0).expand(b, -1, -1)  # (P, n_pos) -> (B, P, n_pos)
    if position.ndim != 3 or position.shape[0] != b or position.shape[2] != cfg.n_position:
        raise ValueError(f"position must have shape (P, {cfg.n_position}) or (B, P, {cfg.n_position}), "
                         f"got {tuple(position.shape)}")
    if cfg.n_extra:
        if extra is None or extra.shape != (*position.shape[:2], cfg.n_extra):
            got = None if extra is None else tuple(extra.shape)
            raise ValueError(f"extra must have shape {(*position.shape[:2], cfg.n_extra)} "
                             f"(use_average_correction), got {got}")
    else:
        extra = None
    return position, extra


class SC1DNet(nn.Module):
    """Dense 1D correction network (module doc): ``forward(idc, position, extra) -> (B, P, 3)``."""

    def __init__(self, config: SC1DConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = SC1DConfig() if config is None else config
        if cfg.kind != "dense":
            raise ValueError(f"SC1DNet needs model.kind 'dense', got {cfg.kind!r} (use SC1DTrees)")
        n_local = cfg.n_position + cfg.n_extra
        act, hid = cfg.activation, cfg.hidden
        if cfg.architecture == "mlp":
            h0 = hid[0]
            self.idc_in = nn.Linear(cfg.n_idc, h0)  # the IDC part of the first layer, once per sample
            self.local_in = nn.Linear(n_local, h0, bias=False)
            self.body = _mlp(h0, hid[1:], N_COMPONENTS, act, cfg.dropout)
            self.act0 = _ACTIVATIONS[act]()
            self.drop0 = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        else:
            self.idc_linear = nn.Linear(cfg.n_idc, cfg.rank, bias=False)
            self.idc_mlp = _mlp(cfg.n_idc, hid, cfg.rank, act, cfg.dropout)
            self.local_net = _mlp(n_local, hid, N_COMPONENTS * (cfg.rank + 1), act, cfg.dropout)
            nn.init.zeros_(self.idc_mlp[-1].weight)  # start from the linear model; the MLP learns the rest
            nn.init.zeros_(self.idc_mlp[-1].bias)

    def forward(self, idc: Tensor, position: Tensor, extra: Tensor | None = None) -> Tensor:
        cfg = self.config
        position, extra = _check_inputs(cfg, idc, position, extra)
        local = position if extra is None else torch.cat([position, extra], dim=-1)  # (B, P, n_local)
        if cfg.architecture == "mlp":
            h = self.idc_in(idc).unsqueeze(1) + self.local_in(local)  # (B, 1, H) + (B, P, H) -> (B, P, H)
            return self.body(self.drop0(self.act0(h)))  # (B, P, 3)
        return self.combine(idc, self.local_terms(local))

    def local_terms(self, local: Tensor) -> Tensor:
        """Bilinear architecture: the per-voxel factors ``(..., P, 3, R + 1)`` from ``[position,
        extra]``. They do not depend on the IDCs, so inference can compute them once per average map."""
        return self.local_net(local).unflatten(-1, (N_COMPONENTS, self.config.rank + 1))

    def combine(self, idc: Tensor, g: Tensor) -> Tensor:
        """Bilinear architecture: ``(B, n_idc)`` IDC features with the local factors ``g``
        ((B, P, 3, R + 1), or (P, 3, R + 1) shared by the batch) -> ``(B, P, 3)``."""
        q = self.idc_linear(idc) + self.idc_mlp(idc)  # (B, R)
        if g.ndim == 3:
            return torch.einsum("pcr,br->bpc", g[..., :-1], q) + g[..., -1]
        return torch.einsum("bpcr,br->bpc", g[..., :-1], q) + g[..., -1]  # (B, P, 3)


def sc1d_features(idc: np.ndarray, position: np.ndarray, extra: np.ndarray | None) -> np.ndarray:
    """The flat feature rows ``[idc, position, extra]`` (B, P, F) of the tree model.

    ``idc`` (B, n_idc), ``position`` (P, n_pos) or (B, P, n_pos), ``extra`` (B, P, n_extra) or None.
    """
    idc = np.asarray(idc, dtype=np.float32)
    b = idc.shape[0]
    position = np.asarray(position, dtype=np.float32)
    if position.ndim == 2:
        position = np.broadcast_to(position[None], (b, *position.shape))  # (B, P, n_pos)
    p = position.shape[1]
    parts = [np.broadcast_to(idc[:, None, :], (b, p, idc.shape[1])), position]  # (B, P, n_idc), (B, P, n_pos)
    if extra is not None:
        parts.append(np.asarray(extra, dtype=np.float32))  # (B, P, n_extra)
    return np.concatenate(parts, axis=-1)  # (B, P, F)


def _sklearn_hgb() -> Any:
    try:
        from sklearn.ensemble import HistGradientBoostingRegressor
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the gradient-boosted-tree 1D correction needs scikit-learn: pip install 'streamcal[trees]'"
        ) from exc
    return HistGradientBoostingRegressor


class SC1DTrees:
    """Gradient-boosted-tree 1D correction with the interface of :class:`SC1DNet` (numpy).

    ``fit(features, targets)`` with rows (N, F) from :func:`sc1d_features` and targets (N, 3);
    ``predict(idc, position, extra) -> (B, P, 3)``. Picklable (the checkpoint stores it pickled).
    """

    def __init__(self, config: SC1DConfig | None = None) -> None:
        self.config = SC1DConfig(kind="trees") if config is None else config
        if self.config.kind != "trees":
            raise ValueError(f"SC1DTrees needs model.kind 'trees', got {self.config.kind!r}")
        self.regressors: list[Any] = []

    @property
    def fitted(self) -> bool:
        return len(self.regressors) == N_COMPONENTS

    def fit(self, features: np.ndarray, targets: np.ndarray, *, seed: int = 0) -> SC1DTrees:
        hgb = _sklearn_hgb()
        t = self.config.trees
        x = np.asarray(features, dtype=np.float32)
        y = np.asarray(targets, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.config.n_features or y.shape != (x.shape[0], N_COMPONENTS):
            raise ValueError(f"features must be (N, {self.config.n_features}) and targets (N, 3), "
                             f"got {x.shape} and {y.shape}")
        self.regressors = [
            hgb(max_iter=t.max_iter, learning_rate=t.learning_rate, max_leaf_nodes=t.max_leaf_nodes,
                min_samples_leaf=t.min_samples_leaf, l2_regularization=t.l2_regularization,
                early_stopping=False, random_state=seed + c).fit(x, y[:, c])
            for c in range(N_COMPONENTS)
        ]  # fmt: skip
        return self

    def predict(self, idc: np.ndarray, position: np.ndarray, extra: np.ndarray | None = None) -> np.ndarray:
        if not self.fitted:
            raise RuntimeError("SC1DTrees.predict before fit")
        cfg = self.config
        idc = np.asarray(idc)
        if idc.ndim != 2 or idc.shape[1] != cfg.n_idc:
            raise ValueError(f"idc must have shape (B, {cfg.n_idc}), got {idc.shape}")
        if (extra is None) != (cfg.n_extra == 0):
            raise ValueError(f"extra must be {'given' if cfg.n_extra else 'None'} (use_average_correction)")
        x = sc1d_features(idc, position, extra)  # (B, P, F)
        if x.shape[-1] != cfg.n_features:
            raise ValueError(f"expected {cfg.n_features} features, got {x.shape[-1]}")
        flat = x.reshape(-1, x.shape[-1])  # (B P, F)
        out = np.stack([r.predict(flat) for r in self.regressors], axis=-1)  # (B P, 3)
        return out.reshape(*x.shape[:2], N_COMPONENTS).astype(np.float32)  # (B, P, 3)


def build_sc1d(config: SC1DConfig) -> SC1DNet | SC1DTrees:
    """The model of ``config.kind``."""
    return SC1DNet(config) if config.kind == "dense" else SC1DTrees(config)
