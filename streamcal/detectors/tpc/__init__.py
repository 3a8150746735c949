"""ALICE TPC space-charge physics: density and IDC simulation, Poisson solver, Langevin distortions.

Modules (seed sections 2-4):

* :mod:`~streamcal.detectors.tpc.constants`: O2 constants and the (phi x r x z) :class:`Grid`;
* :mod:`~streamcal.detectors.tpc.density`: pile-up space-charge density maps (seed eq. 1);
* :mod:`~streamcal.detectors.tpc.idc`: integrated digital currents, 1D/0D, IDC0/IDC1/IDCDelta,
  the 3D IDC history and its Fourier input;
* :mod:`~streamcal.detectors.tpc.poisson`: the direct Poisson solver (torch, CPU or CUDA);
* :mod:`~streamcal.detectors.tpc.langevin`: distortions and corrections (dr, drphi, dz);
* :mod:`~streamcal.detectors.tpc.dataset`: the augmented training set and the line-charge case.

The names below are imported from their modules on first use, so that importing this package
(the ``streamcal`` command does, for ``streamcal tpc``) does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from streamcal.detectors.tpc.constants import (
    C0,
    C1,
    DRIFT_LENGTH,
    E_DRIFT,
    ION_DRIFT_TIME,
    PADS_TOTAL,
    R_IFC,
    R_OFC,
    STANDARD_GRIDS,
    Grid,
    parse_grid,
)

if TYPE_CHECKING:
    from streamcal.detectors.tpc.dataset import (
        DatasetConfig,
        DatasetGenerator,
        TPCFluctuationDataset,
        line_charge_profile,
        line_charge_sample,
        read_shards,
        write_shards,
    )
    from streamcal.detectors.tpc.density import (
        DensityConfig,
        DensitySample,
        DensitySimulator,
        MultiplicityModel,
        average_density,
        eq1_relative_fluctuation,
        sector_epsilon_map,
        simulate_density,
    )
    from streamcal.detectors.tpc.idc import (
        IDCConfig,
        IDCDecomposition,
        IDCHistory,
        IDCSeries,
        IDCSimulator,
        PadGeometry,
        density_from_idc,
        idc_0d,
        idc_1d,
        idc_decomposition,
        idc_fourier,
    )
    from streamcal.detectors.tpc.langevin import (
        Distortions,
        apply_map,
        correct_points,
        global_corrections,
        global_distortions,
        local_distortions,
        space_charge_distortions,
    )
    from streamcal.detectors.tpc.poisson import (
        PoissonSolver,
        closed_form_solution,
        laplacian_matrix,
        solve_poisson,
        solver_check,
    )

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("DensityConfig", "DensitySample", "DensitySimulator", "MultiplicityModel", "average_density",
         "eq1_relative_fluctuation", "sector_epsilon_map", "simulate_density"),
        "density",
    ),
    **dict.fromkeys(
        ("IDCConfig", "IDCDecomposition", "IDCHistory", "IDCSeries", "IDCSimulator", "PadGeometry",
         "density_from_idc", "idc_0d", "idc_1d", "idc_decomposition", "idc_fourier"),
        "idc",
    ),
    **dict.fromkeys(
        ("PoissonSolver", "closed_form_solution", "laplacian_matrix", "solve_poisson", "solver_check"),
        "poisson",
    ),
    **dict.fromkeys(
        ("Distortions", "apply_map", "correct_points", "global_corrections", "global_distortions",
         "local_distortions", "space_charge_distortions"),
        "langevin",
    ),
    **dict.fromkeys(
        ("DatasetConfig", "DatasetGenerator", "TPCFluctuationDataset", "line_charge_profile", "line_charge_sample",
         "read_shards", "write_shards"),
        "dataset",
    ),
}  # fmt: skip

__all__ = [
    "C0",
    "C1",
    "DRIFT_LENGTH",
    "E_DRIFT",
    "ION_DRIFT_TIME",
    "PADS_TOTAL",
    "R_IFC",
    "R_OFC",
    "STANDARD_GRIDS",
    "Grid",
    "parse_grid",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
