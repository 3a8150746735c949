"""Fixtures shared by the ITS tests."""

from __future__ import annotations

import pytest

from streamcal.detectors.its.geometry import build_geometry
from tests.its.barrel import barrel_config


@pytest.fixture(scope="module")
def geom_config():
    """The small barrel of :func:`tests.its.barrel.barrel_config`."""
    return barrel_config()


@pytest.fixture(scope="module")
def geom(geom_config):
    return build_geometry(geom_config)
