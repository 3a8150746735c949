"""ALICE TPC constants (O2 values) and the cylindrical grid used by the space-charge physics.

Conventions (used by every module under ``streamcal.detectors.tpc``):

* Units: cm, V, s. Charge density is expressed as rho/eps0 in V/cm^2 (O2's convention), so that
  Poisson's equation reads ``laplace(V) = -rho/eps0`` with both sides in V/cm^2.
* One TPC side (A or C) is a hollow cylinder r in [R_IFC, R_OFC], phi in [0, 2*pi) (periodic),
  z in [0, DRIFT_LENGTH], where z = 0 is the central electrode and z = DRIFT_LENGTH is the
  readout. Electrons drift from their point towards the readout (+z); ions drift from the
  readout towards the central electrode (-z).
* Grid arrays are indexed ``[phi, r, z]``. The r and z axes include both boundary nodes
  (``nr`` points from R_IFC to R_OFC, ``nz`` points from 0 to DRIFT_LENGTH); phi has ``nphi``
  points ``phi_k = 2*pi*k/nphi`` (periodic, no duplicated end point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = [
    "R_IFC",
    "R_OFC",
    "DRIFT_LENGTH",
    "N_SECTORS",
    "E_DRIFT",
    "V_DRIFT",
    "B_FIELD",
    "OMEGA_TAU",
    "C0",
    "C1",
    "ION_DRIFT_TIME",
    "PADS_PER_SECTOR",
    "PAD_ROWS",
    "PADS_TOTAL",
    "IDC_INTEGRATION_TIME",
    "STANDARD_GRIDS",
    "Grid",
    "parse_grid",
]

R_IFC = 83.5  # cm, inner field cage radius
R_OFC = 254.5  # cm, outer field cage radius
DRIFT_LENGTH = 249.525  # cm, per side
N_SECTORS = 18  # sectors in phi per side
E_DRIFT = 400.0  # V/cm, nominal drift field
V_DRIFT = 2.58  # cm/us, electron drift velocity
B_FIELD = 0.5  # T
OMEGA_TAU = 0.32
C0 = 1.0 / (1.0 + OMEGA_TAU**2)  # ~0.907
C1 = OMEGA_TAU / (1.0 + OMEGA_TAU**2)  # ~0.290
ION_DRIFT_TIME = 0.200  # s, ion drift time over the full drift length
PAD_ROWS = 152
PADS_PER_SECTOR = 14_560
PADS_TOTAL = 2 * N_SECTORS * PADS_PER_SECTOR  # 524,160 pads on both sides
IDC_INTEGRATION_TIME = 1e-3  # s

STANDARD_GRIDS: tuple[tuple[int, int, int], ...] = (
    (90, 17, 17),
    (180, 33, 33),
    (180, 65, 65),
    (180, 129, 129),
)


@dataclass(frozen=True)
class Grid:
    """A (phi x r x z) grid on one TPC side. ``nr`` and ``nz`` include both boundary nodes."""

    nphi: int
    nr: int
    nz: int
    r_min: float = R_IFC
    r_max: float = R_OFC
    length: float = DRIFT_LENGTH

    def __post_init__(self) -> None:
        for name, value, low in (("nphi", self.nphi, 4), ("nr", self.nr, 3), ("nz", self.nz, 3)):
            if not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"Grid.{name} must be an integer >= {low}, got {value!r}")
        if not (0.0 < self.r_min < self.r_max):
            raise ValueError(
                f"Grid radii must satisfy 0 < r_min < r_max, got r_min={self.r_min}, r_max={self.r_max}"
            )
        if not self.length > 0.0:
            raise ValueError(f"Grid.length must be > 0 cm, got {self.length}")

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.nphi, self.nr, self.nz)

    @property
    def dphi(self) -> float:
        return 2.0 * math.pi / self.nphi

    @property
    def dr(self) -> float:
        return (self.r_max - self.r_min) / (self.nr - 1)

    @property
    def dz(self) -> float:
        return self.length / (self.nz - 1)

    @property
    def phi(self) -> np.ndarray:
        return np.arange(self.nphi) * self.dphi

    @property
    def r(self) -> np.ndarray:
        return np.linspace(self.r_min, self.r_max, self.nr)

    @property
    def z(self) -> np.ndarray:
        return np.linspace(0.0, self.length, self.nz)

    def mesh(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcast coordinate arrays of shape (nphi, nr, nz): phi, r, z."""
        return np.meshgrid(self.phi, self.r, self.z, indexing="ij")

    def __str__(self) -> str:
        return f"{self.nphi}x{self.nr}x{self.nz}"


def parse_grid(text: str | tuple[int, int, int] | Grid, *, argument: str = "grid") -> Grid:
    """Parse ``"90x17x17"`` (phi x r x z) into a :class:`Grid`; errors name ``argument``."""
    if isinstance(text, Grid):
        return text
    if isinstance(text, (tuple, list)):
        parts = list(text)
    else:
        parts = str(text).lower().split("x")
    allowed = ", ".join("x".join(map(str, g)) for g in STANDARD_GRIDS)
    try:
        if len(parts) != 3:
            raise ValueError
        nphi, nr, nz = (int(p) for p in parts)
        return Grid(nphi, nr, nz)
    except (TypeError, ValueError) as exc:
        detail = f": {exc}" if str(exc) else ""
        raise ValueError(
            f"invalid {argument} {text!r}: expected PHIxRxZ with integers nphi>=4, nr>=3, nz>=3 "
            f"(standard grids: {allowed}){detail}"
        ) from None
