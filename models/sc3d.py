"""3D distortion-fluctuation correction: the seed's U-Net (section 4.1) and its improvements.

The seed's network (after Ronneberger et al., MICCAI 2015): at each level two 3x3x3
convolutions, each followed by a ReLU; 2x2x2 max pooling between levels on the contracting path;
4 feature channels at the first level, doubled at each level; a symmetric expanding path with
2x2x2 up-sampling, concatenation with the contracting path's output of the same level, and two
3x3x3 convolutions; a final 1x1x1 convolution. Inputs: the average space-charge density and the
density fluctuation on the (phi, r, z) grid; outputs here: the three correction fluctuations
(dr, drphi, dz) (the seed showed dr only).

Improvements on the weaknesses the seed names (section 4.3), each a config flag:

* ``padding: circular_phi``: phi is periodic, so the convolutions pad phi circularly (zero padding
  in r and z, which are bounded by the field cages, the readout and the central electrode).
* ``boundary_channels``: four extra input channels with the normalised distance of each node to the
  inner and outer field cage (r) and to the readout and the central electrode (z). The U-Net is
  translation invariant; the problem is not ("the distance to the boundary needs to be provided").
* ``residual``: the 1D correction's prediction is three extra input channels and the network adds
  its output to it, so it learns the residual of the 1D correction, the local fluctuations ("the
  effect of global dependencies needs to be reduced by applying the 1D distortion-fluctuation
  correction before").
* ``last_relu: false``: the last 3x3x3 convolution before the 1x1x1 output convolution has no
  ReLU. With it (the seed's network), the output head sees only non-negative features, so ``width``
  channels must carry the positive and negative parts of three signed components separately: with
  4 channels the network cannot represent a sharp local pattern in dr, drphi and dz at once (the
  line-charge response, seed Fig. 5, flips sign within one grid node in r and in phi).

:meth:`UNet3DConfig.seed_style` is the seed's network: zero padding, no boundary channels, no 1D
pre-correction, depth 5, width 4 (368,231 parameters with three outputs).

Odd grid sizes (90x17x17, 180x33x33 are not powers of two): pooling uses ``ceil_mode`` (a
trailing odd node is pooled alone: 17 -> 9 -> 5 -> 3 -> 2, 90 -> 45 -> 23 -> 12 -> 6), and the
expanding path interpolates each level to the exact size of the skip connection it is
concatenated with, so the output has the input's shape for any grid.

Tensors are laid out ``(batch, channel, phi, r, z)``, as the grid arrays ``[phi, r, z]``.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from streamcal.config import Config

__all__ = [
    "N_COMPONENTS",
    "N_FIELDS",
    "N_BOUNDARY",
    "UNet3DConfig",
    "UNet3D",
    "boundary_distances",
]

N_COMPONENTS = 3  # dr, drphi, dz
N_FIELDS = 2  # average density, density fluctuation
N_BOUNDARY = 4  # distance to IFC, OFC, readout, central electrode


@dataclass(frozen=True)
class UNet3DConfig(Config):
    """The 3D U-Net (module doc).

    Attributes:
        depth: number of levels (>= 1; ``depth - 1`` poolings).
        width: channels at the first level (>= 1).
        growth: channel multiplier per level (the seed doubles: 2).
        padding: ``zeros`` (seed) or ``circular_phi`` (periodic phi, zeros in r and z).
        boundary_channels: add the four boundary-distance input channels.
        residual: take the 1D correction (3 channels) as input and learn its residual.
        upsample: ``nearest`` (the seed's 2x2x2 up-sampling) or ``trilinear`` interpolation.
        last_relu: ReLU after the last 3x3x3 convolution (the seed's network; module doc).
    """

    owner = "model"
    depth: int = 4
    width: int = 8
    growth: int = 2
    padding: Literal["zeros", "circular_phi"] = "circular_phi"
    boundary_channels: bool = True
    residual: bool = True
    upsample: Literal["nearest", "trilinear"] = "nearest"
    last_relu: bool = True

    def validate(self) -> None:
        if not 1 <= self.depth <= 8:
            self.fail("depth", f"must be in [1, 8], got {self.depth}")
        if self.width < 1:
            self.fail("width", f"must be >= 1, got {self.width}")
        if self.growth < 1:
            self.fail("growth", f"must be >= 1, got {self.growth}")

    @classmethod
    def seed_style(cls, **overrides: object) -> UNet3DConfig:
        """The seed's U-Net: zero padding, no boundary channels, no 1D pre-correction, 5 levels, 4
        channels doubling per level (``overrides`` replace fields, e.g. ``depth=4``)."""
        base = cls(depth=5, width=4, growth=2, padding="zeros", boundary_channels=False, residual=False,
                   upsample="nearest")
        return replace(base, **overrides)  # type: ignore[arg-type]

    @property
    def in_channels(self) -> int:
        return N_FIELDS + N_BOUNDARY * self.boundary_channels + N_COMPONENTS * self.residual

    def channels(self) -> list[int]:
        """Feature channels per level."""
        return [self.width * self.growth**level for level in range(self.depth)]


def boundary_distances(shape: tuple[int, int, int], *, dtype: torch.dtype = torch.float32,
                       device: torch.device | str | None = None) -> Tensor:
    """The boundary channels (4, nphi, nr, nz): distance to the IFC, OFC (r) and to the readout,
    central electrode (z), each divided by the full extent (so in [0, 1]).

    The grid's r and z nodes are uniform and include both boundaries (``Grid``), so the normalised
    distance to the inner field cage at node ``j`` is ``j / (nr - 1)``; z = 0 is the central
    electrode and z = L the readout.
    """
    nphi, nr, nz = shape
    r = torch.linspace(0.0, 1.0, nr, dtype=dtype, device=device)  # (nr,)
    z = torch.linspace(0.0, 1.0, nz, dtype=dtype, device=device)  # (nz,)
    rr = r.view(1, nr, 1).expand(nphi, nr, nz)  # (nphi, nr, nz)
    zz = z.view(1, 1, nz).expand(nphi, nr, nz)  # (nphi, nr, nz)
    return torch.stack([rr, 1.0 - rr, 1.0 - zz, zz])  # (4, nphi, nr, nz)


class _Conv(nn.Module):
    """3x3x3 convolution with the configured padding, then ReLU (unless ``relu`` is false)."""

    def __init__(self, c_in: int, c_out: int, circular_phi: bool, relu: bool = True) -> None:
        super().__init__()
        self.circular_phi = circular_phi
        self.relu = relu
        self.conv = nn.Conv3d(c_in, c_out, kernel_size=3, padding=0 if circular_phi else 1)

    def forward(self, x: Tensor) -> Tensor:
        if self.circular_phi:
            # F.pad counts from the last dim: (z_lo, z_hi, r_lo, r_hi, phi_lo, phi_hi)
            x = F.pad(x, (0, 0, 0, 0, 1, 1), mode="circular")  # (B, C, nphi + 2, nr, nz), phi wraps
            x = F.pad(x, (1, 1, 1, 1, 0, 0))  # (B, C, nphi + 2, nr + 2, nz + 2), zeros in r and z
        y = self.conv(x)  # (B, C_out, nphi, nr, nz)
        return torch.relu(y) if self.relu else y


class _Block(nn.Sequential):
    """Two 3x3x3 convolutions + ReLU (one U-Net level)."""

    def __init__(self, c_in: int, c_out: int, circular_phi: bool, last_relu: bool = True) -> None:
        super().__init__(_Conv(c_in, c_out, circular_phi), _Conv(c_out, c_out, circular_phi, relu=last_relu))


class UNet3D(nn.Module):
    """The U-Net of :class:`UNet3DConfig`.

    ``forward(fields, precorrection=None)``: ``fields`` (B, 2, nphi, nr, nz), the normalised average
    density and density fluctuation; ``precorrection`` (B, 3, nphi, nr, nz), the normalised 1D
    correction, required with ``residual``. Returns (B, 3, nphi, nr, nz), the normalised
    correction fluctuation (with ``residual``: the 1D correction plus the learnt residual).
    """

    def __init__(self, config: UNet3DConfig | None = None) -> None:
        super().__init__()
        self.config = cfg = UNet3DConfig() if config is None else config
        circ = cfg.padding == "circular_phi"
        ch = cfg.channels()
        self.down = nn.ModuleList()
        c_in = cfg.in_channels
        for level, c in enumerate(ch):
            self.down.append(_Block(c_in, c, circ, last_relu=cfg.last_relu or cfg.depth > 1))
            c_in = c
        self.pool = nn.MaxPool3d(2, ceil_mode=True)
        self.up = nn.ModuleList(_Block(ch[level + 1] + ch[level], ch[level], circ, last_relu=cfg.last_relu or level > 0)
                                for level in reversed(range(cfg.depth - 1)))
        self.head = nn.Conv3d(ch[0], N_COMPONENTS, kernel_size=1)
        self._boundary: Tensor | None = None

    def _boundary_channels(self, x: Tensor) -> Tensor:
        b = self._boundary
        if b is None or b.shape[1:] != x.shape[2:] or b.device != x.device or b.dtype != x.dtype:
            b = boundary_distances(tuple(x.shape[2:]), dtype=x.dtype, device=x.device)  # (4, nphi, nr, nz)
            self._boundary = b
        return b.unsqueeze(0).expand(x.shape[0], -1, -1, -1, -1)  # (B, 4, nphi, nr, nz)

    def forward(self, fields: Tensor, precorrection: Tensor | None = None) -> Tensor:
        cfg = self.config
        if fields.ndim != 5 or fields.shape[1] != N_FIELDS:
            raise ValueError(f"fields must have shape (B, {N_FIELDS}, nphi, nr, nz), got {tuple(fields.shape)}")
        parts = [fields]  # (B, 2, nphi, nr, nz)
        if cfg.boundary_channels:
            parts.append(self._boundary_channels(fields))  # (B, 4, nphi, nr, nz)
        if cfg.residual:
            if precorrection is None or precorrection.shape != (fields.shape[0], N_COMPONENTS, *fields.shape[2:]):
                got = None if precorrection is None else tuple(precorrection.shape)
                raise ValueError(f"residual U-Net needs precorrection of shape "
                                 f"{(fields.shape[0], N_COMPONENTS, *fields.shape[2:])}, got {got}")
            parts.append(precorrection)  # (B, 3, nphi, nr, nz)
        x = torch.cat(parts, dim=1) if len(parts) > 1 else fields  # (B, C_in, nphi, nr, nz)
        skips: list[Tensor] = []
        for level, block in enumerate(self.down):
            if level:
                x = self.pool(x)  # (B, C, ceil(n/2) per axis)
            x = block(x)  # (B, ch[level], ...)
            skips.append(x)
        x = skips.pop()  # bottom level
        for block in self.up:
            skip = skips.pop()  # (B, ch[l], n_l...)
            mode = cfg.upsample
            x = F.interpolate(x, size=skip.shape[2:], mode=mode,
                              align_corners=False if mode == "trilinear" else None)  # (B, ch[l+1], n_l...)
            x = block(torch.cat([x, skip], dim=1))  # (B, ch[l], n_l...)
        out = self.head(x)  # (B, 3, nphi, nr, nz)
        if cfg.residual:
            out = out + precorrection  # type: ignore[operator]
        return out
