"""Stage kinds of streamcal (installed as ``streamcal.actors``)."""
