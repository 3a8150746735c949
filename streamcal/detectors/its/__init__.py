"""ALICE ITS2 geometry, misalignment, track simulation and the track-based alignment cost."""
