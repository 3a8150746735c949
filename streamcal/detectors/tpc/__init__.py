"""ALICE TPC space-charge physics: density and IDC simulation, Poisson solver, Langevin distortions."""

from streamcal.detectors.tpc.constants import Grid, parse_grid

__all__ = ["Grid", "parse_grid"]
