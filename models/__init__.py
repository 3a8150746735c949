"""Torch models of streamcal (installed as ``streamcal.models``)."""
