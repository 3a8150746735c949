"""Fixtures shared by the ITS tests."""

from __future__ import annotations

import pytest

from streamcal.detectors.its.geometry import ITS2_LAYERS, ITSGeometryConfig, LayerSpec, build_geometry


@pytest.fixture(scope="module")
def geom_config():
    """A small barrel for the alignment tests: the three ITS2 inner layers with two chips per
    stave, and two more layers at 46 and 54 mm (five layers, 200 chips)."""
    ib = [LayerSpec(lay.n_staves, 1, 2, lay.r_min, lay.x_x0) for lay in ITS2_LAYERS[:3]]
    extra = [LayerSpec(24, 1, 2, 46.0, 0.0035), LayerSpec(28, 1, 2, 54.0, 0.0035)]
    return ITSGeometryConfig(layers=tuple(ib + extra))


@pytest.fixture(scope="module")
def geom(geom_config):
    return build_geometry(geom_config)
