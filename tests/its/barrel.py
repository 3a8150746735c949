"""The small-barrel alignment setup shared by the ITS tests: geometry, simulation, cost, misalignment."""

from __future__ import annotations

from streamcal.detectors.its.geometry import ITS2_LAYERS, ITSGeometryConfig, LayerSpec
from streamcal.detectors.its.misalignment import MisalignmentConfig
from streamcal.models.its_alignment import ITSAlignmentConfig

# tracks of 0.3-5 GeV/c within |eta| < 0.4 from a beam spot, no multiple scattering (fast, exact fits)
SIM = dict(beam_spot_sigma=(0.015, 0.015, 10.0), eta_max=0.4, pt_min=0.3, pt_max=5.0, multiple_scattering=False)
COST = ITSAlignmentConfig(multiple_scattering=False)
# local deltas: rotations about the chip centre 0.1 mrad, shifts 20 um (rms)
MISALIGN = MisalignmentConfig(sigma_rot=(1e-4, 1e-4, 1e-4), sigma_trans=(0.02, 0.02, 0.02), seed=5)


def barrel_config() -> ITSGeometryConfig:
    """The three ITS2 inner layers with two chips per stave, and two more layers at 46 and 54 mm
    (five layers, 200 chips)."""
    ib = [LayerSpec(lay.n_staves, 1, 2, lay.r_min, lay.x_x0) for lay in ITS2_LAYERS[:3]]
    extra = [LayerSpec(24, 1, 2, 46.0, 0.0035), LayerSpec(28, 1, 2, 54.0, 0.0035)]
    return ITSGeometryConfig(layers=tuple(ib + extra))
