#!/usr/bin/env python
"""Reproduce the small TPC demo weights shipped in ``models/weights/``.

    python scripts/make_demo_weights.py --train     # full trainings (CPU: ~20 + ~50-80 min), then strip
    python scripts/make_demo_weights.py             # strip existing runs/sc1d and runs/sc3d

The trainings are exactly ``streamcal train sc1d --config configs/train/sc1d.yaml`` and
``streamcal train sc3d --config configs/train/sc3d.yaml`` (seeded: seed 0, 90x17x17). The
shipped files are their best checkpoints without the optimizer, scheduler and RNG states
(what ``load_corrector`` needs: the task config, its normalisation state and the weights).
Prints a JSON summary; fails if a file is 2 MB or more.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {"sc1d": ("configs/train/sc1d.yaml", "runs/sc1d"), "sc3d": ("configs/train/sc3d.yaml", "runs/sc3d")}
OUT = ROOT / "models" / "weights"
LIMIT = 2_000_000
TRAINING_ONLY = ("optimizer_state", "scheduler_state", "scaler_state", "rng_torch", "rng_cuda")


def strip(src: Path, dst: Path) -> dict:
    import torch

    ckpt = torch.load(src, map_location="cpu", weights_only=False)
    for key in TRAINING_ONLY:
        ckpt.pop(key, None)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ckpt, dst)
    size = dst.stat().st_size
    if size >= LIMIT:
        raise SystemExit(f"{dst}: {size} bytes, over the {LIMIT}-byte limit for committed weights")
    return {"from": str(src.relative_to(ROOT)), "to": str(dst.relative_to(ROOT)), "bytes": size,
            "epoch": ckpt["epoch"], "best": ckpt.get("best", {}).get("rmse_um")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train", action="store_true", help="run the two full trainings first")
    args = p.parse_args(argv)
    out = {}
    for task, (config, run) in RUNS.items():
        if args.train:
            subprocess.run([sys.executable, "-m", "streamcal.cli", "train", task, "--config", config, "--out", run],
                           cwd=ROOT, check=True)
        src = ROOT / run / "best.pt"
        if not src.exists():
            raise SystemExit(f"{src} is missing: run with --train (or streamcal train {task} --config {config})")
        out[task] = strip(src, OUT / f"{task}_90x17x17.pt")
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
