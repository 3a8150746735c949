"""ONNX export of the TPC corrections, and ``streamcal export onnx``.

    streamcal export onnx --checkpoint runs/sc3d --out sc3d.onnx [--opset 17] [--static-batch]

The exported graph is the whole inference path of the checkpoint's corrector
(:func:`streamcal.detectors.tpc.tasks.load_corrector`), normalisation included: it maps the same
raw inputs that :meth:`SC1DCorrector.predict_batch` / :meth:`SC3DCorrector.predict_batch` take
to the same outputs, in cm. The caller applies no pre- or post-processing. All tensors are
float32, laid out ``(batch, ...)`` with the grid axes ``(phi, r, z)`` and the components
``(dr, drphi, dz)``; the batch axis is dynamic (``batch_dynamic``, else fixed to 1), the grid is
the checkpoint's.

sc1d (dense model only; gradient-boosted trees are not exported):

* ``idc1d`` (batch, n_t): the relative 1D IDCs of the last ion drift time, chronological;
* ``idc1d_average`` (batch, n_t): the 1D IDCs of the average map the correction is relative to
  (ones: the nominal reference, what the corrector assumes when none is given);
* ``average_correction`` (batch, 3, nphi, nr, nz) cm, only with ``model.use_average_correction``:
  that average map's correction (the corrector's default is the nominal training map,
  ``task_state.average_correction`` of the checkpoint);
* output ``correction`` (batch, 3, nphi, nr, nz) cm: the correction fluctuation (broadcast over
  phi for a phi-independent model, as ``predict_batch`` returns it).

In the graph: the Fourier features ``rfft(idc1d - idc1d_average)[:n_fourier] / n_t`` as
``[Re, Im]`` (a float64 matrix product, as the corrector's float64 FFT), standardised with
``idc_mean`` and ``idc_std``; the average correction averaged over phi (unless ``use_phi``) and
divided by ``extra_scale``; the network at the fixed grid positions; the output times
``target_scale``.

sc3d:

* ``density_average``, ``density_fluctuation`` (batch, nphi, nr, nz) V/cm^2;
* ``precorrection`` (batch, 3, nphi, nr, nz) cm, only for a residual model: the 1D correction
  (the sc1d export's output, or the linear scaler, whichever the model was trained with);
* output ``correction`` (batch, 3, nphi, nr, nz) cm.

In the graph: the densities divided by ``density_scale`` and ``fluctuation_scale``, the
pre-correction divided by ``target_scale`` (per component), the U-Net, the output times
``target_scale``.

Next to ``FILE.onnx``, ``FILE.json`` describes the inputs and outputs (names, shapes, units), the
grid, the normalisation constants (already in the graph; listed for reference), the source
checkpoint and the versions used; the same JSON is in the model's ``metadata_props``
(``streamcal.metadata``). The export is checked with ``onnx.checker`` and, unless
``verify=False``, run in onnxruntime against the torch corrector.

onnx and onnxruntime are optional (``pip install 'streamcal[onnx]'``); they and torch are imported
on use, so the ``streamcal`` command loads this module as a plugin without them. The exporter is
torch's TorchScript-based one (``torch.onnx.export(dynamo=False)``), which needs no package
beyond ``onnx``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from streamcal.errors import StreamcalError

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

    from streamcal.detectors.tpc.tasks import SC1DCorrector, SC3DCorrector

__all__ = [
    "METADATA_FORMAT",
    "OptionalDependencyError",
    "correction_module",
    "export_corrector",
    "export_onnx",
    "add_subparser",
    "cmd_export_onnx",
]

METADATA_FORMAT = "streamcal.onnx/1"
INSTALL_HINT = "pip install 'streamcal[onnx]'"
# onnxruntime against the torch corrector (cm): |ort - torch| <= VERIFY_ATOL + VERIFY_RTOL |torch|
VERIFY_ATOL = 1e-5
VERIFY_RTOL = 1e-4
# the TorchScript exporter: unflatten (sc1d) needs opset 13, and 20 is its highest
MIN_OPSET, MAX_OPSET = 13, 20


class OptionalDependencyError(StreamcalError, ImportError):
    """An optional package (onnx, onnxruntime) is missing; the message says how to install it."""


def _require(module: str, why: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise OptionalDependencyError(f"{why} needs the '{module}' package: {INSTALL_HINT}") from exc


# -- the exported modules ------------------------------------------------------------------------
def correction_module(corrector: SC1DCorrector | SC3DCorrector) -> torch.nn.Module:
    """The torch module that the ONNX file holds: the corrector's raw inputs -> correction in cm
    (module doc), in eval mode, on the corrector's device; positional inputs in the order of the
    metadata's ``inputs``."""
    import numpy as np
    import torch
    from torch import Tensor, nn

    from streamcal.detectors.tpc.tasks import SC1DCorrector, positions
    from streamcal.models.sc1d import SC1DTrees

    def buffer(x: Any, dtype: torch.dtype = torch.float32) -> Tensor:
        return torch.as_tensor(np.asarray(x), dtype=dtype, device=corrector.device)

    s, grid = corrector.state, corrector.grid
    if isinstance(corrector, SC1DCorrector):
        if isinstance(corrector.model, SC1DTrees):
            raise StreamcalError("the gradient-boosted-tree 1D correction (model.kind: trees) has no torch network "
                                 "to export; use the dense model (model.kind: dense)")
        cfg = corrector.model_config
        n_t = _n_time_bins(corrector)
        t = np.arange(n_t)
        j = np.arange(cfg.n_fourier)
        angle = 2.0 * math.pi * (np.outer(t, j) % n_t) / n_t  # (n_t, k), exact phases
        dft = np.concatenate([np.cos(angle), -np.sin(angle)], axis=1) / n_t  # (n_t, 2k): [Re, Im] of rfft / n

        class SC1DGraph(nn.Module):
            """(idc1d, idc1d_average[, average_correction]) -> (B, 3, nphi, nr, nz) cm."""

            def __init__(self) -> None:
                super().__init__()
                self.net = corrector.model
                self.register_buffer("dft", buffer(dft, torch.float64))  # (n_t, 2k)
                self.register_buffer("idc_mean", buffer(s["idc_mean"], torch.float64))  # (2k,)
                self.register_buffer("idc_std", buffer(s["idc_std"], torch.float64))  # (2k,)
                self.register_buffer("position", buffer(positions(grid, cfg.use_phi)))  # (P, n_pos)
                self.register_buffer("target_scale", buffer(s["target_scale"]))  # (3,)
                if cfg.use_average_correction:
                    self.register_buffer("extra_scale", buffer(s["extra_scale"]))  # (3,)

            def forward(self, idc1d: Tensor, idc1d_average: Tensor, *average_correction: Tensor) -> Tensor:
                fluct = idc1d.double() - idc1d_average.double()  # (B, n_t)
                feats = ((fluct @ self.dft - self.idc_mean) / self.idc_std).float()  # (B, 2k)
                extra = None
                if cfg.use_average_correction:
                    avg = average_correction[0]  # (B, 3, nphi, nr, nz) cm
                    if not cfg.use_phi:
                        avg = avg.mean(dim=2)  # (B, 3, nr, nz)
                    extra = avg.flatten(2).transpose(1, 2) / self.extra_scale  # (B, P, 3)
                out = self.net(feats, self.position, extra) * self.target_scale  # (B, P, 3) cm
                out = out.transpose(1, 2)  # (B, 3, P)
                if cfg.use_phi:
                    return out.reshape(-1, 3, grid.nphi, grid.nr, grid.nz)  # (B, 3, nphi, nr, nz)
                out = out.reshape(-1, 3, 1, grid.nr, grid.nz)  # (B, 3, 1, nr, nz)
                return out.expand(-1, -1, grid.nphi, -1, -1)  # (B, 3, nphi, nr, nz)

        return SC1DGraph().eval()

    residual = corrector.model_config.residual

    class SC3DGraph(nn.Module):
        """(density_average, density_fluctuation[, precorrection]) -> (B, 3, nphi, nr, nz) cm."""

        def __init__(self) -> None:
            super().__init__()
            self.net = corrector.model
            self.register_buffer("density_scale", buffer(s["density_scale"]))  # ()
            self.register_buffer("fluctuation_scale", buffer(s["fluctuation_scale"]))  # ()
            self.register_buffer("target_scale", buffer(np.asarray(s["target_scale"]).reshape(3, 1, 1, 1)))  # (3, 1, 1, 1)

        def forward(self, density_average: Tensor, density_fluctuation: Tensor, *precorrection: Tensor) -> Tensor:
            fields = torch.stack([density_average / self.density_scale,
                                  density_fluctuation / self.fluctuation_scale], dim=1)  # (B, 2, nphi, nr, nz)
            pre = precorrection[0] / self.target_scale if residual else None  # (B, 3, nphi, nr, nz)
            return self.net(fields, pre) * self.target_scale  # (B, 3, nphi, nr, nz) cm

    return SC3DGraph().eval()


def _n_time_bins(corrector: SC1DCorrector) -> int:
    """Length of the 1D IDC series the sc1d model was trained on (200 at 1 ms bins)."""
    return int(corrector.config.data.dataset_config("train").density.n_time_bins)


def _io_spec(corrector: SC1DCorrector | SC3DCorrector) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(inputs, outputs): name, shape (``"batch"`` for the batch axis), dtype, unit, description."""
    from streamcal.detectors.tpc.tasks import SC1DCorrector

    g = list(corrector.grid.shape)
    out = [{"name": "correction", "shape": ["batch", 3, *g], "dtype": "float32", "unit": "cm",
            "description": "correction fluctuation (dr, drphi, dz) on the (phi, r, z) grid"}]
    if isinstance(corrector, SC1DCorrector):
        n_t = _n_time_bins(corrector)
        ins = [
            {"name": "idc1d", "shape": ["batch", n_t], "dtype": "float32", "unit": "relative",
             "description": "1D IDCs of the last ion drift time, chronological (oldest first)"},
            {"name": "idc1d_average", "shape": ["batch", n_t], "dtype": "float32", "unit": "relative",
             "description": "1D IDCs of the average map the correction is relative to (ones: nominal)"},
        ]
        if corrector.model_config.use_average_correction:
            ins.append({"name": "average_correction", "shape": ["batch", 3, *g], "dtype": "float32", "unit": "cm",
                        "description": "correction of that average map (dr, drphi, dz); the nominal one is "
                                       "task_state.average_correction of the checkpoint"})
        return ins, out
    ins = [
        {"name": "density_average", "shape": ["batch", *g], "dtype": "float32", "unit": "V/cm^2",
         "description": "average space-charge density map"},
        {"name": "density_fluctuation", "shape": ["batch", *g], "dtype": "float32", "unit": "V/cm^2",
         "description": "density fluctuation (current map minus the average map)"},
    ]
    if corrector.model_config.residual:
        ins.append({"name": "precorrection", "shape": ["batch", 3, *g], "dtype": "float32", "unit": "cm",
                    "description": f"the 1D correction ({corrector.config.precorrection}) the residual model refines"})
    return ins, out


def _example_inputs(corrector: SC1DCorrector | SC3DCorrector, batch: int, seed: int = 0) -> list[np.ndarray]:
    """Plausible raw inputs (float32) in the order of :func:`_io_spec`, scaled by the checkpoint's
    normalisation constants: for tracing and the onnxruntime check."""
    import numpy as np

    from streamcal.detectors.tpc.tasks import SC1DCorrector

    rng = np.random.default_rng(seed)
    shape = corrector.grid.shape
    s = corrector.state
    if isinstance(corrector, SC1DCorrector):
        n_t = _n_time_bins(corrector)
        x = [1.0 + 0.02 * rng.standard_normal((batch, n_t)), 1.0 + 0.002 * rng.standard_normal((batch, n_t))]
        if corrector.model_config.use_average_correction:
            scale = rng.uniform(0.9, 1.1, (batch, 1, 1, 1, 1))
            x.append(corrector.average_correction[None] * scale)  # (B, 3, nphi, nr, nz)
        return [np.ascontiguousarray(a, dtype=np.float32) for a in x]
    ds, fs = float(s["density_scale"]), float(s["fluctuation_scale"])
    ts = np.asarray(s["target_scale"], np.float64).reshape(1, 3, 1, 1, 1)
    x = [ds * rng.uniform(0.5, 1.5, (batch, *shape)), fs * rng.standard_normal((batch, *shape))]
    if corrector.model_config.residual:
        x.append(ts * rng.standard_normal((batch, 3, *shape)))
    return [np.ascontiguousarray(a, dtype=np.float32) for a in x]


def _reference(corrector: SC1DCorrector | SC3DCorrector, inputs: list[np.ndarray]) -> np.ndarray:
    """The corrector's own torch path on raw ``inputs`` (order of :func:`_io_spec`)."""
    from streamcal.detectors.tpc.tasks import SC1DCorrector

    if isinstance(corrector, SC1DCorrector):
        return corrector.predict_batch(inputs[0], idc1d_average=inputs[1],
                                       average_correction=inputs[2] if len(inputs) > 2 else None)
    return corrector.predict_batch(*inputs)


# -- export --------------------------------------------------------------------------------------
def export_corrector(corrector: SC1DCorrector | SC3DCorrector, out_path: str | Path, *, opset: int = 17,
                     batch_dynamic: bool = True, verify: bool = True,
                     source: dict[str, Any] | None = None) -> dict[str, Any]:
    """Export a loaded corrector (module doc) to ``out_path`` (``.onnx``) and its metadata to the
    ``.json`` beside it; returns the metadata. ``source`` describes where the weights came from."""
    import torch

    onnx = _require("onnx", "ONNX export")
    ort = _require("onnxruntime", "checking the export (verify=False skips it)") if verify else None
    out = _check_args(out_path, opset)
    inputs, outputs = _io_spec(corrector)
    names = [i["name"] for i in inputs]
    module = correction_module(corrector)
    example = [torch.from_numpy(a).to(corrector.device) for a in _example_inputs(corrector, 2 if batch_dynamic else 1)]
    dynamic = {n: {0: "batch"} for n in [*names, "correction"]} if batch_dynamic else None
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # The TorchScript exporter announces its own deprecation (and that of an internal helper) in
        # favour of the torch.export-based one, which needs onnxscript; this one needs only onnx.
        warnings.filterwarnings("ignore", message=r"You are using the legacy TorchScript-based ONNX export",
                                category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"The feature will be removed", category=DeprecationWarning,
                                module=r"torch\.onnx\.")
        # The models' input-shape checks only raise; traced, they are constants for the fixed grid.
        warnings.filterwarnings("ignore", message=r"Converting a tensor to a Python boolean",
                                category=torch.jit.TracerWarning, module=r"streamcal\.models\.")
        # The circular phi padding slices with step -1, which the exporter does not constant-fold.
        warnings.filterwarnings("ignore", message=r"Constant folding - Only steps=1 can be constant folded",
                                category=UserWarning)
        with torch.no_grad():  # also accepts a model that cached tensors under torch.inference_mode
            torch.onnx.export(module, tuple(example), str(out), dynamo=False, input_names=names,
                              output_names=["correction"], dynamic_axes=dynamic, opset_version=opset)
    if not batch_dynamic:
        for spec in (*inputs, *outputs):
            spec["shape"][0] = 1
    meta = _metadata(corrector, inputs, outputs, opset, source or {})
    model = onnx.load(str(out))
    model.doc_string = f"streamcal {meta['task']} correction: raw inputs -> correction fluctuation (cm)"
    props = {"streamcal.task": meta["task"], "streamcal.metadata": json.dumps(meta, default=str)}
    onnx.helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    if ort is not None:
        meta["verification"] = _verify(corrector, out, ort, batch_dynamic)
    out.with_suffix(".json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return {**meta, "onnx_path": str(out), "json_path": str(out.with_suffix(".json"))}


def _metadata(corrector: SC1DCorrector | SC3DCorrector, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]],
              opset: int, source: dict[str, Any]) -> dict[str, Any]:
    import numpy as np
    import onnx
    import torch

    def values(x: Any) -> Any:
        a = np.asarray(x, dtype=np.float64)
        return float(a) if a.ndim == 0 else a.tolist()

    g = corrector.grid
    s = corrector.state
    if corrector.task == "sc1d":
        keys = ["idc_mean", "idc_std", "target_scale"] + ["extra_scale"] * corrector.model_config.use_average_correction
        steps = [
            "features = (rfft(idc1d - idc1d_average)[:n_fourier] / n_t as [Re, Im] - idc_mean) / idc_std",
            "extra = phi-average of average_correction (unless use_phi) / extra_scale, per component"
            if corrector.model_config.use_average_correction else "no average-correction input",
            "correction = network(features, positions, extra) * target_scale, per component",
        ]
        model_info = {"n_fourier": corrector.model_config.n_fourier, "use_phi": corrector.model_config.use_phi,
                      "architecture": corrector.model_config.architecture}
    else:
        keys = ["density_scale", "fluctuation_scale", "target_scale"]
        steps = [
            "fields = [density_average / density_scale, density_fluctuation / fluctuation_scale]",
            "pre = precorrection / target_scale, per component" if corrector.model_config.residual
            else "no precorrection input",
            "correction = network(fields[, pre]) * target_scale, per component",
        ]
        model_info = {"depth": corrector.model_config.depth, "width": corrector.model_config.width,
                      "padding": corrector.model_config.padding, "residual": corrector.model_config.residual,
                      "boundary_channels": corrector.model_config.boundary_channels}
    n_params = sum(p.numel() for p in corrector.model.parameters())
    return {
        "format": METADATA_FORMAT,
        "task": corrector.task,
        "opset": opset,
        "inputs": inputs,
        "outputs": outputs,
        "layout": "row-major; grid axes (phi, r, z); components (dr, drphi, dz)",
        "grid": {"spec": str(g), "shape": list(g.shape), "r_min_cm": g.r_min, "r_max_cm": g.r_max,
                 "length_cm": g.length, "phi": "phi_i = 2 pi i / nphi", "r": "uniform, both field cages included",
                 "z": "uniform from the central electrode (0) to the readout"},
        "normalisation": {"in_graph": True, "steps": steps, "constants": {k: values(s[k]) for k in keys},
                          "units": {"target_scale": "cm", "extra_scale": "cm", "density_scale": "V/cm^2",
                                    "fluctuation_scale": "V/cm^2"}},
        "model": {**model_info, "n_params": int(n_params)},
        "source": source,
        "exported_with": {"torch": str(torch.__version__), "onnx": str(onnx.__version__),
                          "exporter": "torch.onnx.export (TorchScript)"},
    }


def _verify(corrector: SC1DCorrector | SC3DCorrector, path: Path, ort: Any, batch_dynamic: bool) -> dict[str, Any]:
    """Run the file in onnxruntime against the corrector's torch path; error beyond the tolerance."""
    import numpy as np

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    worst, batches = 0.0, ([1, 3] if batch_dynamic else [1])
    for b in batches:
        x = _example_inputs(corrector, b, seed=b)
        ref = _reference(corrector, x)
        got = sess.run(["correction"], dict(zip(names, x)))[0]
        if got.shape != ref.shape:
            raise StreamcalError(f"{path}: onnxruntime output has shape {got.shape}, the corrector {ref.shape}")
        err = np.abs(got.astype(np.float64) - ref)
        if not np.all(err <= VERIFY_ATOL + VERIFY_RTOL * np.abs(ref)):
            raise StreamcalError(f"{path}: onnxruntime differs from the torch corrector by up to {err.max():.3g} cm "
                                 f"at batch {b} (tolerance {VERIFY_ATOL} cm + {VERIFY_RTOL} relative)")
        worst = max(worst, float(err.max()))
    return {"onnxruntime": str(ort.__version__), "batches": batches, "max_abs_diff_cm": worst,
            "tolerance": {"atol_cm": VERIFY_ATOL, "rtol": VERIFY_RTOL}}


def _check_args(out_path: str | Path, opset: int) -> Path:
    out = Path(out_path)
    if out.suffix != ".onnx":
        raise StreamcalError(f"the ONNX output must be a '.onnx' file (its metadata goes to the '.json' beside it), "
                             f"got {out}")
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise StreamcalError(f"opset must be in [{MIN_OPSET}, {MAX_OPSET}] (what the exporter supports for these "
                             f"models; 17 is the default), got {opset}")
    return out


def _checkpoint_file(path: Path) -> Path:
    """The file :func:`streamcal.train.load_checkpoint` reads for ``path`` (a run directory: best, else last)."""
    if path.is_dir():
        return path / "best.pt" if (path / "best.pt").exists() else path / "last.pt"
    return path


def export_onnx(checkpoint_dir: str | Path, out_path: str | Path, *, opset: int = 17, batch_dynamic: bool = True,
                verify: bool = True) -> dict[str, Any]:
    """Export the torch network of an sc1d (dense) or sc3d checkpoint, with its normalisation, to ONNX.

    ``checkpoint_dir``: a run directory of ``streamcal train`` (its ``best.pt``, else ``last.pt``) or
    a ``.pt`` file; ``out_path``: the ``.onnx`` file (the metadata goes to the ``.json`` beside it);
    ``batch_dynamic``: dynamic batch axis (else batch 1); ``verify``: compare onnxruntime with the
    torch corrector (needs onnxruntime). Returns the metadata (module doc) plus ``onnx_path`` and
    ``json_path``.
    """
    from streamcal.detectors.tpc.tasks import load_corrector
    from streamcal.train import load_checkpoint

    _require("onnx", "ONNX export")
    _check_args(out_path, opset)
    ckpt_path = Path(checkpoint_dir)
    ckpt = load_checkpoint(ckpt_path)
    file = _checkpoint_file(ckpt_path)
    task = ckpt.get("task")
    if task not in ("sc1d", "sc3d"):
        raise StreamcalError(f"{file}: a {task!r} checkpoint; ONNX export covers the TPC corrections sc1d and sc3d")
    kind = (ckpt.get("task_config") or {}).get("model", {}).get("kind", "dense") if task == "sc1d" else "unet"
    if ckpt.get("model_pickle") is not None or kind == "trees":
        raise StreamcalError(f"{file}: an sc1d gradient-boosted-tree model (model.kind: trees); trees are not exported "
                             f"to ONNX, only the torch networks: train the dense 1D model (model.kind: dense) to export it")
    source = {"checkpoint": str(file), "sha256": hashlib.sha256(file.read_bytes()).hexdigest(),
              "epoch": ckpt.get("epoch"), "best_rmse_um": (ckpt.get("best") or {}).get("rmse_um"),
              "trained_with_torch": ckpt.get("torch_version"), "task_config": ckpt.get("task_config")}
    corrector = load_corrector(file, device="cpu")
    return export_corrector(corrector, out_path, opset=opset, batch_dynamic=batch_dynamic, verify=verify,
                            source=source)


# -- CLI -------------------------------------------------------------------------------------------
def cmd_export_onnx(args: argparse.Namespace) -> int:
    meta = export_onnx(args.checkpoint, args.out, opset=args.opset, batch_dynamic=not args.static_batch,
                       verify=not args.no_verify)
    print(json.dumps({"onnx": meta["onnx_path"], "json": meta["json_path"], "task": meta["task"],
                      "opset": meta["opset"], "inputs": {i["name"]: i["shape"] for i in meta["inputs"]},
                      "outputs": {o["name"]: o["shape"] for o in meta["outputs"]},
                      "verification": meta.get("verification")}, indent=2))
    return 0


def add_subparser(subparsers: Any) -> None:
    """Register ``streamcal export onnx --checkpoint DIR --out FILE.onnx [--opset N]``."""
    p = subparsers.add_parser("export", help="export trained models (onnx)",
                              description="Export a trained model for use outside Python.")
    sub = p.add_subparsers(dest="export_format", metavar="FORMAT", required=True)
    o = sub.add_parser("onnx", help="sc1d (dense) or sc3d checkpoint -> ONNX with the normalisation in the graph",
                       description=__doc__.split("\n\n")[0] if __doc__ else None)
    o.add_argument("--checkpoint", required=True, help="run directory (best.pt, else last.pt) or .pt file")
    o.add_argument("--out", required=True, help="the .onnx file; its metadata goes to the .json beside it")
    o.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    o.add_argument("--static-batch", action="store_true", help="fix the batch axis to 1 (default: dynamic)")
    o.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison with torch")
    o.set_defaults(func=cmd_export_onnx)
