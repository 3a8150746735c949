"""One shared training loop for every streamcal model, and ``streamcal train``.

A model file holds a ``torch.nn.Module`` and its config, nothing else; the data, features, loss and
metrics of a model live in a *task* (:class:`Task`, e.g. the TPC tasks in
:mod:`streamcal.detectors.tpc.tasks`); this module runs any task:

    streamcal train sc1d --config configs/train/sc1d.yaml [--out DIR] [--resume]

A training config is one YAML file: ``task`` (optional, must match the command), ``train``
(:class:`TrainConfig`) and the task's own sections (its ``config_class``, e.g. ``data`` and
``model``). Every section is a typed frozen dataclass (:class:`streamcal.config.Config`): unknown
or ill-typed fields are errors that name the file, the section and the field. Relative paths in a
config are relative to the working directory.

What the loop does (:func:`train`):

* seeds torch from ``train.seed`` before the model is built; the batch order of epoch ``e`` is a
  function of ``(seed, e)`` only, and the torch RNG state is checkpointed, so a run resumed from its
  last checkpoint continues exactly as the uninterrupted run would (tested on CPU);
* ``device: auto`` takes CUDA where present; ``mixed_precision`` applies on CUDA only (bfloat16
  autocast where supported, else float16 with a gradient scaler);
* per epoch: a tqdm progress bar, then the task's evaluation (RMSE per component in um), one JSON
  line appended to ``OUT/metrics.jsonl``, ``OUT/last.pt`` (and ``OUT/best.pt`` when the evaluation
  score improves), optional early stopping and a wall-clock limit;
* at the end ``OUT/summary.json``: best metrics, the task's baselines, throughput.

Models that are not trained by gradient descent (the gradient-boosted trees of the 1D correction)
go through the same entry point: the task's ``fit`` replaces the epochs, the evaluation, the JSONL
line, the checkpoint and the summary are the same.

Importing this module does not import torch (the ``streamcal`` command loads it as a plugin).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import math
import os
import pickle
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from streamcal.config import Config
from streamcal.errors import ConfigError, StreamcalError

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "CHECKPOINT_FORMAT",
    "TASKS",
    "OptimizerConfig",
    "SchedulerConfig",
    "TrainConfig",
    "RunConfig",
    "Task",
    "TrainResult",
    "register_task",
    "get_task_class",
    "load_run_config",
    "parse_run_config",
    "resolve_device",
    "train",
    "load_checkpoint",
    "add_subparser",
    "cmd_train",
]

CHECKPOINT_FORMAT = "streamcal.checkpoint/1"

# task name -> "module:Class", imported on use
TASKS: dict[str, str] = {
    "sc1d": "streamcal.detectors.tpc.tasks:SC1DTask",
    "sc3d": "streamcal.detectors.tpc.tasks:SC3DTask",
}


# -- configs -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OptimizerConfig(Config):
    """Attributes: ``name`` (adamw, adam, sgd), ``lr``, ``weight_decay``, ``momentum`` (sgd),
    ``betas`` (adam, adamw)."""

    owner = "train.optimizer"
    name: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    betas: tuple[float, float] = (0.9, 0.999)

    def validate(self) -> None:
        if not self.lr > 0:
            self.fail("lr", f"must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            self.fail("weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.momentum < 1:
            self.fail("momentum", f"must be in [0, 1), got {self.momentum}")
        if not all(0 <= b < 1 for b in self.betas):
            self.fail("betas", f"must be in [0, 1), got {list(self.betas)}")


@dataclass(frozen=True)
class SchedulerConfig(Config):
    """Learning-rate schedule, a function of the optimizer step (so it resumes exactly).

    Attributes:
        name: ``constant``, ``cosine`` (to ``min_lr_ratio x lr`` at the last step) or ``step``
            (times ``gamma`` every ``step_epochs`` epochs).
        warmup_steps: linear warm-up from 0 over this many steps.
    """

    owner = "train.scheduler"
    name: Literal["constant", "cosine", "step"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    step_epochs: int = 10
    gamma: float = 0.1

    def validate(self) -> None:
        if self.warmup_steps < 0:
            self.fail("warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            self.fail("min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        if self.step_epochs < 1:
            self.fail("step_epochs", f"must be >= 1, got {self.step_epochs}")
        if not 0 < self.gamma <= 1:
            self.fail("gamma", f"must be in (0, 1], got {self.gamma}")

    def factor(self, step: int, total_steps: int, steps_per_epoch: int) -> float:
        """The learning-rate multiplier at optimizer step ``step`` (0-based)."""
        w = 1.0 if step >= self.warmup_steps else (step + 1) / self.warmup_steps
        if self.name == "constant":
            return w
        if self.name == "step":
            return w * self.gamma ** (step // (self.step_epochs * max(1, steps_per_epoch)))
        span = max(1, total_steps - self.warmup_steps)
        progress = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        return w * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


@dataclass(frozen=True)
class TrainConfig(Config):
    """The ``train`` section: everything the shared loop needs, nothing model-specific.

    Attributes:
        seed: seeds the model initialisation and the batch order.
        device: ``auto`` (CUDA where present), ``cpu`` or ``cuda``.
        mixed_precision: autocast on CUDA (bfloat16 where supported, else float16 + grad scaler);
            ignored on CPU.
        epochs: number of epochs (>= 1).
        batch_size: samples per optimizer step.
        eval_batch_size: samples per evaluation batch (default ``4 x batch_size``).
        optimizer, scheduler: see :class:`OptimizerConfig`, :class:`SchedulerConfig`.
        grad_clip: clip the gradient norm to this value (null: no clipping).
        checkpoint_dir: the run directory (``--out`` overrides it).
        resume: continue from ``checkpoint_dir/last.pt`` if it exists (``--resume``).
        early_stop_patience: stop after this many epochs without an evaluation-score improvement
            larger than ``early_stop_min_delta`` (null: never).
        time_limit_min: stop after the epoch during which this many minutes were exceeded.
        num_threads: torch CPU threads during training (null: torch's default).
        progress: show the tqdm bar.
    """

    owner = "train"
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    mixed_precision: bool = True
    epochs: int = 10
    batch_size: int = 32
    eval_batch_size: int | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    grad_clip: float | None = None
    checkpoint_dir: str = "runs/train"
    resume: bool = False
    early_stop_patience: int | None = None
    early_stop_min_delta: float = 0.0
    time_limit_min: float | None = None
    num_threads: int | None = None
    progress: bool = True

    def validate(self) -> None:
        if self.seed < 0:
            self.fail("seed", f"must be >= 0, got {self.seed}")
        if self.epochs < 1:
            self.fail("epochs", f"must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            self.fail("batch_size", f"must be >= 1, got {self.batch_size}")
        if self.eval_batch_size is not None and self.eval_batch_size < 1:
            self.fail("eval_batch_size", f"must be >= 1, got {self.eval_batch_size}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            self.fail("grad_clip", f"must be > 0 or null, got {self.grad_clip}")
        if not self.checkpoint_dir:
            self.fail("checkpoint_dir", "must not be empty")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            self.fail("early_stop_patience", f"must be >= 1 or null, got {self.early_stop_patience}")
        if self.early_stop_min_delta < 0:
            self.fail("early_stop_min_delta", f"must be >= 0, got {self.early_stop_min_delta}")
        if self.time_limit_min is not None and not self.time_limit_min > 0:
            self.fail("time_limit_min", f"must be > 0 or null, got {self.time_limit_min}")
        if self.num_threads is not None and self.num_threads < 1:
            self.fail("num_threads", f"must be >= 1 or null, got {self.num_threads}")


@dataclass(frozen=True)
class RunConfig:
    """A parsed training file: the task name, the loop's config and the task's config."""

    task: str
    train: TrainConfig
    task_config: Config
    source: str = "<dict>"

    def to_dict(self) -> dict[str, Any]:
        return {"task": self.task, "train": self.train.to_dict(), **self.task_config.to_dict()}


# -- tasks ---------------------------------------------------------------------------------------
class Task(Protocol):
    """What the loop needs from a model's glue. Batches are dicts of tensors (moved to the device
    by the loop); ``eval_step`` returns sums (tensors) that the loop adds up over the evaluation
    set and ``metrics`` turns into numbers, at least ``score`` (lower is better) and ``rmse_um``."""

    name: str
    config_class: type[Config]

    def __init__(self, config: Any) -> None: ...

    def prepare(self, *, progress: bool, device: str) -> None:
        """Load or generate the data and compute the normalisation (unless loaded by ``load_state_dict``)."""

    def state_dict(self) -> dict[str, Any]:
        """What inference needs besides the weights (normalisation constants), as tensors."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def build_model(self) -> Any:
        """A ``torch.nn.Module`` (trained by the loop) or an object with ``fit`` (see :meth:`fit`)."""

    def n_train(self) -> int: ...

    def train_loader(self, *, epoch: int, batch_size: int, seed: int) -> Iterable[dict[str, Any]]: ...

    def eval_loader(self, *, batch_size: int) -> Iterable[dict[str, Any]]: ...

    def loss(self, model: Any, batch: dict[str, Any]) -> torch.Tensor: ...

    def eval_step(self, model: Any, batch: dict[str, Any]) -> dict[str, torch.Tensor]: ...

    def metrics(self, sums: dict[str, torch.Tensor]) -> dict[str, Any]: ...

    def fit(self, model: Any, *, seed: int) -> None:
        """Fit a model that is not a ``torch.nn.Module`` in one go."""

    baselines: dict[str, Any]


def register_task(name: str, target: str | type) -> None:
    """Make ``streamcal train NAME`` run ``target`` (a class or ``"module:Class"``)."""
    TASKS[name] = target if isinstance(target, str) else f"{target.__module__}:{target.__qualname__}"


def get_task_class(name: str) -> Any:
    if name not in TASKS:
        raise StreamcalError(f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)


# -- config files --------------------------------------------------------------------------------
def parse_run_config(data: dict[str, Any], *, task: str | None = None, source: str = "<dict>") -> RunConfig:
    """A :class:`RunConfig` from a mapping (a parsed YAML file); errors name ``source`` and the field."""
    if not isinstance(data, dict):
        raise ConfigError(source, "(file)", f"must be a mapping with 'train' and the task's sections, got {type(data).__name__}")
    data = dict(data)
    name = data.pop("task", None)
    if task is not None and name is not None and name != task:
        raise ConfigError(source, "task", f"the file is for task {name!r}, not {task!r}")
    name = task or name
    if name is None:
        raise ConfigError(source, "task", f"missing (one of {', '.join(sorted(TASKS))})")
    if name not in TASKS:
        raise ConfigError(source, "task", f"unknown task {name!r} (known: {', '.join(sorted(TASKS))})")
    cls = get_task_class(name)
    try:
        train_cfg = TrainConfig.from_dict(data.pop("train", None), owner="train")
        task_cfg = cls.config_class.from_dict(data, owner=name)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.owner}", exc.field, str(exc).split(": field ", 1)[-1].split(": ", 1)[-1]) from None
    return RunConfig(task=name, train=train_cfg, task_config=task_cfg, source=source)


def load_run_config(path: str | os.PathLike, *, task: str | None = None) -> RunConfig:
    """Load and validate a training YAML file (module doc)."""
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text())
    except FileNotFoundError:
        raise StreamcalError(f"config file not found: {p}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(p), "(yaml)", str(exc)) from None
    return parse_run_config(data or {}, task=task, source=str(p))


# -- the loop --------------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA where present, else CPU; ``cuda`` without a device is an error."""
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise StreamcalError("train.device is 'cuda' but no CUDA device is available (use 'auto' or 'cpu')")
    return torch.device(name)


@dataclass
class TrainResult:
    """What :func:`train` returns: the run directory, the per-epoch records, the best record."""

    out_dir: Path
    history: list[dict[str, Any]]
    best: dict[str, Any] | None
    baselines: dict[str, Any]
    stopped: str  # "completed", "early_stop", "time_limit", "interrupted"
    samples_per_s: float


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    import torch

    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def _batch_len(batch: dict[str, Any]) -> int:
    import torch

    ref = batch.get("target")
    if ref is None:
        ref = next(v for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim)
    return int(ref.shape[0])


def _optimizer(cfg: OptimizerConfig, params: Iterator[Any]) -> Any:
    import torch

    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _save(obj: dict[str, Any], path: Path) -> None:
    import torch

    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)  # a crash never leaves a half-written checkpoint


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint (a ``.pt`` file, or a run directory: its ``best.pt``, else ``last.pt``)."""
    import torch

    p = Path(path)
    if p.is_dir():
        p = p / "best.pt" if (p / "best.pt").exists() else p / "last.pt"
    if not p.exists():
        raise StreamcalError(f"no checkpoint at {p}")
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise StreamcalError(f"{p} is not a streamcal checkpoint ({CHECKPOINT_FORMAT})")
    return ckpt


def _evaluate(task: Any, model: Any, device: torch.device, batch_size: int, autocast: Callable[[], Any]) -> dict[str, Any]:
    import torch

    sums: dict[str, torch.Tensor] = {}
    if isinstance(model, torch.nn.Module):
        model.eval()
    with torch.no_grad(), autocast():
        for batch in task.eval_loader(batch_size=batch_size):
            for k, v in task.eval_step(model, _to_device(batch, device)).items():
                v = v.detach().double().cpu()
                sums[k] = sums[k] + v if k in sums else v
    return task.metrics(sums)


def train(run: RunConfig, *, out: str | os.PathLike | None = None, resume: bool | None = None,
          stop_after_epochs: int | None = None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train ``run`` (module doc). ``out`` overrides ``train.checkpoint_dir``, ``resume``
    ``train.resume``; ``stop_after_epochs`` ends this call after that many epochs (as an
    interruption would, for tests); ``log`` receives one line per epoch."""
    import contextlib

    import torch
    from tqdm.auto import tqdm

    cfg = run.train
    out_dir = Path(out if out is not None else cfg.checkpoint_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    resume = cfg.resume if resume is None else resume
    device = resolve_device(cfg.device)
    say = log or (lambda s: None)
    old_threads = torch.get_num_threads()
    if cfg.num_threads and device.type == "cpu":
        torch.set_num_threads(cfg.num_threads)
    try:
        ckpt = None
        if resume and (out_dir / "last.pt").exists():
            ckpt = load_checkpoint(out_dir / "last.pt")
            if ckpt["task"] != run.task:
                raise StreamcalError(f"{out_dir / 'last.pt'} is a {ckpt['task']} run, not {run.task}")
        task = get_task_class(run.task)(run.task_config)
        if ckpt is not None:
            task.load_state_dict(ckpt["task_state"])
        t_prep = time.perf_counter()
        task.prepare(progress=cfg.progress, device=str(device))
        say(f"{run.task}: data ready in {time.perf_counter() - t_prep:.1f} s ({task.n_train()} training samples)")
        torch.manual_seed(cfg.seed)
        model = task.build_model()
        (out_dir / "config.json").write_text(json.dumps(run.to_dict(), indent=2, default=str))
        metrics_path = out_dir / "metrics.jsonl"
        if ckpt is None:
            metrics_path.write_text("")
        use_amp = cfg.mixed_precision and device.type == "cuda"
        amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16

        def autocast() -> Any:
            return torch.autocast("cuda", dtype=amp_dtype) if use_amp else contextlib.nullcontext()

        if not isinstance(model, torch.nn.Module):
            return _fit_once(run, task, model, out_dir, device, autocast, say)

        model.to(device)
        steps_per_epoch = max(1, math.ceil(task.n_train() / cfg.batch_size))
        total_steps = steps_per_epoch * cfg.epochs
        optimizer = _optimizer(cfg.optimizer, model.parameters())
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: cfg.scheduler.factor(step, total_steps, steps_per_epoch))
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp and amp_dtype == torch.float16)
        start_epoch, step, history, best, bad_epochs = 0, 0, [], None, 0
        if ckpt is not None:
            model.load_state_dict(ckpt["model_state"])
            optimizer.load_state_dict(ckpt["optimizer_state"])
            scheduler.load_state_dict(ckpt["scheduler_state"])
            scaler.load_state_dict(ckpt["scaler_state"])
            start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
            history, best, bad_epochs = list(ckpt["history"]), ckpt["best"], int(ckpt["bad_epochs"])
            torch.set_rng_state(ckpt["rng_torch"])
            if device.type == "cuda" and ckpt.get("rng_cuda") is not None:
                torch.cuda.set_rng_state(ckpt["rng_cuda"], device)
            say(f"{run.task}: resumed from {out_dir / 'last.pt'} after epoch {start_epoch}")
        n_params = sum(p.numel() for p in model.parameters())
        eval_bs = cfg.eval_batch_size or 4 * cfg.batch_size
        t_run = time.perf_counter()
        stopped, samples, train_time, ran = "completed", 0, 0.0, 0
        for epoch in range(start_epoch, cfg.epochs):
            model.train()
            t0 = time.perf_counter()
            loss_sum, n_seen = 0.0, 0
            bar = tqdm(task.train_loader(epoch=epoch, batch_size=cfg.batch_size, seed=cfg.seed), total=steps_per_epoch,
                       desc=f"{run.task} epoch {epoch + 1}/{cfg.epochs}", disable=not cfg.progress, leave=False,
                       unit="batch")
            for batch in bar:
                batch = _to_device(batch, device)
                with autocast():
                    loss = task.loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step += 1
                b = _batch_len(batch)
                loss_sum += float(loss.detach()) * b
                n_seen += b
                bar.set_postfix(loss=f"{loss_sum / n_seen:.4g}")
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t_train = time.perf_counter() - t0
            train_time += t_train
            samples += n_seen
            t1 = time.perf_counter()
            ev = _evaluate(task, model, device, eval_bs, autocast)
            record = {
                "epoch": epoch + 1, "step": step, "train_loss": loss_sum / max(1, n_seen),
                "lr": optimizer.param_groups[0]["lr"], **ev,
                "train_s": round(t_train, 3), "eval_s": round(time.perf_counter() - t1, 3),
                "samples_per_s": n_seen / t_train if t_train > 0 else None,
            }  # fmt: skip
            history.append(record)
            with metrics_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
            improved = best is None or record["score"] < best["score"] - cfg.early_stop_min_delta
            if improved:
                best, bad_epochs = record, 0
            else:
                bad_epochs += 1
            rmse = ", ".join(f"{k} {v:.1f}" for k, v in record["rmse_um"].items())
            say(f"{run.task} epoch {epoch + 1}/{cfg.epochs}: train loss {record['train_loss']:.4g}, "
                f"eval RMSE [um] {rmse}, {record['samples_per_s']:.1f} samples/s")
            state = {
                "format": CHECKPOINT_FORMAT, "task": run.task, "epoch": epoch + 1, "step": step,
                "train_config": cfg.to_dict(), "task_config": run.task_config.to_dict(),
                "task_state": task.state_dict(), "model_state": model.state_dict(), "model_pickle": None,
                "n_params": n_params, "optimizer_state": optimizer.state_dict(),
                "scheduler_state": scheduler.state_dict(), "scaler_state": scaler.state_dict(),
                "rng_torch": torch.get_rng_state(),
                "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                "history": history, "best": best, "bad_epochs": bad_epochs, "baselines": task.baselines,
                "torch_version": str(torch.__version__),
            }  # fmt: skip
            _save(state, out_dir / "last.pt")
            if improved:
                _save(state, out_dir / "best.pt")
            ran += 1
            if cfg.early_stop_patience is not None and bad_epochs >= cfg.early_stop_patience:
                stopped = "early_stop"
                break
            if cfg.time_limit_min is not None and time.perf_counter() - t_run > 60 * cfg.time_limit_min:
                stopped = "time_limit" if epoch + 1 < cfg.epochs else "completed"
                break
            if stop_after_epochs is not None and ran >= stop_after_epochs and epoch + 1 < cfg.epochs:
                stopped = "interrupted"
                break
        rate = samples / train_time if train_time > 0 else 0.0
        _write_summary(out_dir, run, history, best, task.baselines, stopped, rate, n_params, device)
        return TrainResult(out_dir, history, best, task.baselines, stopped, rate)
    finally:
        torch.set_num_threads(old_threads)


def _fit_once(run: RunConfig, task: Any, model: Any, out_dir: Path, device: Any, autocast: Callable[[], Any],
              say: Callable[[str], None]) -> TrainResult:
    """The loop for models fitted in one go (no epochs): fit, evaluate, record, checkpoint."""
    import torch

    cfg = run.train
    t0 = time.perf_counter()
    task.fit(model, seed=cfg.seed)
    t_fit = time.perf_counter() - t0
    t1 = time.perf_counter()
    ev = _evaluate(task, model, device, cfg.eval_batch_size or 4 * cfg.batch_size, autocast)
    record = {"epoch": 1, "step": 1, "train_loss": None, "lr": None, **ev, "train_s": round(t_fit, 3),
              "eval_s": round(time.perf_counter() - t1, 3), "samples_per_s": task.n_train() / t_fit if t_fit else None}
    with (out_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
    payload = torch.frombuffer(bytearray(pickle.dumps(model)), dtype=torch.uint8)
    state = {
        "format": CHECKPOINT_FORMAT, "task": run.task, "epoch": 1, "step": 1, "train_config": cfg.to_dict(),
        "task_config": run.task_config.to_dict(), "task_state": task.state_dict(), "model_state": None,
        "model_pickle": payload, "history": [record], "best": record, "baselines": task.baselines,
        "torch_version": str(torch.__version__),
    }  # fmt: skip
    _save(state, out_dir / "last.pt")
    _save(state, out_dir / "best.pt")
    rmse = ", ".join(f"{k} {v:.1f}" for k, v in record["rmse_um"].items())
    say(f"{run.task} (fitted in {t_fit:.1f} s): eval RMSE [um] {rmse}")
    rate = record["samples_per_s"] or 0.0
    _write_summary(out_dir, run, [record], record, task.baselines, "completed", rate, None, device)
    return TrainResult(out_dir, [record], record, task.baselines, "completed", rate)


def _write_summary(out_dir: Path, run: RunConfig, history: list[dict[str, Any]], best: dict[str, Any] | None,
                   baselines: dict[str, Any], stopped: str, rate: float, n_params: int | None, device: Any) -> None:
    summary = {
        "task": run.task, "config": run.source, "stopped": stopped, "epochs_run": len(history),
        "best_epoch": best["epoch"] if best else None, "best": best, "last": history[-1] if history else None,
        "baselines": baselines, "train_samples_per_s": rate, "n_params": n_params, "device": str(device),
    }  # fmt: skip
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))


# -- CLI -------------------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    run = load_run_config(args.config, task=args.task)
    overrides: dict[str, Any] = {}
    if args.device:
        overrides["device"] = args.device
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.no_progress:
        overrides["progress"] = False
    if overrides:
        try:
            run = dataclasses.replace(run, train=dataclasses.replace(run.train, **overrides))
        except ConfigError as exc:
            raise ConfigError(f"command line ({exc.owner})", exc.field, str(exc).split(": ", 2)[-1]) from None
    result = train(run, out=args.out, resume=args.resume or None, log=lambda s: print(s, file=sys.stderr, flush=True))
    best = result.best or {}
    print(json.dumps({"out": str(result.out_dir), "stopped": result.stopped, "best_epoch": best.get("epoch"),
                      "rmse_um": best.get("rmse_um"), "baselines": result.baselines,
                      "train_samples_per_s": round(result.samples_per_s, 2)}, indent=2))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``streamcal train TASK --config FILE [--out DIR] [--resume]``."""
    p = subparsers.add_parser("train", help="train a model with the shared loop (sc1d, sc3d)",
                              description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("task", choices=sorted(TASKS), help="what to train")
    p.add_argument("--config", required=True, help="training YAML (e.g. configs/train/sc1d.yaml)")
    p.add_argument("--out", help="run directory (default: train.checkpoint_dir of the config)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if it exists")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="override train.device")
    p.add_argument("--epochs", type=int, help="override train.epochs")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)
