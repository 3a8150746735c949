"""ITS2 alignment commands: ``streamcal evaluate align``, ``streamcal its export-mille`` and
``streamcal its refine``.

    streamcal evaluate align --run RUN_DIR [--compare RUN_DIR2 ...] --report OUT_DIR
                             [--events N] [--seed S] [--pt-spectrum run|uniform] [--min-sensor-hits N]
                             [--target-rot URAD] [--target-trans UM]
    streamcal its export-mille --run RUN_DIR --out OUT_DIR [--at zero|fitted] [--min-hits N]
                             [--normalisation cost|chi2] [--double] [--method M] [--min-entries N]
    streamcal its refine --run RUN_DIR --out OUT_DIR [--events N] [--gn-iterations G]
                             [--cg-iterations K] [--tol T] [--cache-mb MB] [--cache-precision P]
                             [--threads N] [--min-hits N] [--min-sensor-hits N] [--layers L ...]
                             [--coarse C] [--presigma-rot RAD] [--presigma-trans MM]
                             [--presigma-free MODE ...]
                             [--solver cg|direct|sparse] [--error-samples K] [--error-seed S]
                             [--rigid-layers L ...] [--no-mode-constraints]
                             [--start-from RUN_DIR] [--no-progress]

Writes ``OUT_DIR/summary.json`` and the PNG figures of
:mod:`streamcal.detectors.its.evaluation` (residual misalignment per layer, DCA_xy vs pT,
chi2/ndf, cost history of the run and of the ``--compare`` runs).

``add_subparser(subparsers)`` is called by the main ``streamcal`` CLI after
``streamcal.evaluate`` has registered ``evaluate {sc1d,sc3d}``: it adds ``align`` to the choices
of that command and its own options, and dispatches on the task (``--checkpoint`` stays
mandatory for sc1d/sc3d, ``--run`` is for align). Without the TPC evaluation it registers
``evaluate align`` alone. Invalid combinations print the reason and return 2; the function
never calls ``sys.exit``.

``its export-mille`` writes ``OUT_DIR/mp2data.bin`` (Millepede-II records of the run's spooled
tracks), ``OUT_DIR/steer.txt`` (the ``pede`` steering file: fixed layers, constrained modes),
``OUT_DIR/theta0.npy`` and ``OUT_DIR/summary.json`` (:mod:`streamcal.detectors.its.mille_export`).

``its refine`` continues a run with global Gauss-Newton steps solved by projected preconditioned
conjugate gradients, matrix-free or on the sparse matrix assembled in one pass, or directly for
some layers (:mod:`streamcal.detectors.its.refine`): from the run's
``theta.npy``, with its constraints and cost, on its spooled tracks, and writes ``OUT_DIR`` as a
run directory for ``evaluate align`` plus ``OUT_DIR/refine.json``. ``--presigma-rot`` and
``--presigma-trans`` add Millepede's presigma, a Gaussian prior towards the nominal geometry on
each solved sensor's rotation about its centre (rad) and its centre's shift (mm)
(:class:`~streamcal.detectors.its.refine.Presigma`); ``--presigma-free`` names global modes (the
weak-mode table's, rigid-body ones) it leaves to the data.
Importing this module does not import torch.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streamcal.argtypes import non_negative_float, non_negative_int, positive_float, positive_int

__all__ = ["add_subparser", "cmd_evaluate_align", "cmd_its_export_mille", "cmd_its_refine"]




def _table(summary: dict[str, Any]) -> str:
    h = summary["headline"]
    units = h["residual_units"]

    def num(v: float | None, fmt: str = ".3g") -> str:
        return "n/a" if v is None else format(v, fmt)

    rows = [f"run {summary['run']['dir']} ({summary['run']['label']}, {summary['run']['n_sensors']} sensors)",
            f"{'residual RMS':16s} " + " ".join(f"{d + ' [' + units[d] + ']':>14s}" for d in units)]
    for key in ("before", "after"):
        rows.append(f"{key:16s} " + " ".join(f"{num(h['residual_rms_' + key][d]):>14s}" for d in units))
    if h.get("residual_rms_after_reached"):
        n = summary["residuals"]["reached_sensors"]
        rows.append(f"{'after, reached':16s} " + " ".join(f"{num(h['residual_rms_after_reached'][d]):>14s}" for d in units)
                    + f"   ({n} sensors with >= {summary['residuals']['min_sensor_hits']} expected training hits)")
    errs = summary["residuals"].get("solve_errors")
    if errs:
        n = sum(errs["sensors_per_layer"])
        for label, key in (("after, solved", "residual_rms"), ("solve's errors", "sigma_rms")):
            rows.append(f"{label:16s} " + " ".join(f"{num(errs['all_layers'][key][d]):>14s}" for d in units)
                        + ("" if key == "sigma_rms" else f"   ({n} sensors with the solve's errors, theta_cov.npy)"))
        wt = h["within_target"]
        rows.append(f"{'within target':16s} " + " ".join(
            f"{num(wt[d]['residual_rms']) + ' (' + str(wt[d]['sensors']) + ')' if d in wt else '':>14s}" for d in units)
            + "   (RMS over the sensors whose error is within the target, "
            + ", ".join(f"{wt[d]['target']:g} {units[d]}" for d in ("rot_u", "du") if d in wt) + "; their number)")
    rows.append("DCA_xy max |bias| [um]: " + ", ".join(f"{k} {num(v)}" for k, v in h["dca_bias_max_abs_um"].items()))
    ratio = ", ".join(num(r) for r in h["dca_resolution_ratio_after_ideal"])
    worst = num(h["dca_resolution_ratio_after_ideal_max"])
    rows.append(f"DCA_xy resolution after / ideal per pT bin: [{ratio}], max {worst}")
    rows.append("chi2/ndf mean: " + ", ".join(f"{k} {num(v)}" for k, v in h["chi2_ndf_mean"].items()))
    return "\n".join(rows)


def cmd_evaluate_align(args: argparse.Namespace) -> int:
    """Run the evaluation of ``args.run`` and print the headline numbers."""
    from streamcal.detectors.its.evaluation import FIGURES, EvaluationConfig, evaluate_alignment

    if not args.run:
        print("error: evaluate align needs --run RUN_DIR", file=sys.stderr)
        return 2
    if getattr(args, "checkpoint", None):
        print("error: --checkpoint is for evaluate sc1d/sc3d; evaluate align takes --run RUN_DIR", file=sys.stderr)
        return 2
    try:
        config = EvaluationConfig(events=args.events, seed=args.seed, pt_spectrum=args.pt_spectrum,
                                  min_sensor_hits=args.min_sensor_hits, target_rotation_urad=args.target_rot,
                                  target_translation_um=args.target_trans)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = evaluate_alignment(args.run, args.report, compare=args.compare or (), config=config,
                                log=lambda s: print(s, file=sys.stderr, flush=True))
    print(_table(result.summary))
    print(f"report: {result.report_dir / 'summary.json'} (+ {len(FIGURES)} PNG figures)")
    return 0


def _add_align_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("align (ITS2 alignment run)")
    g.add_argument("--run", metavar="RUN_DIR",
                   help="run directory of the alignment workers (run.json, theta.npy, theta_true.npy, metrics.jsonl)")
    g.add_argument("--compare", nargs="+", action="extend", metavar="RUN_DIR",
                   help="more run directories whose cost history is drawn beside the run's")
    g.add_argument("--events", type=positive_int, default=20_000, help="events per test sample (default 20000)")
    g.add_argument("--min-sensor-hits", type=positive_int, default=100,
                   help="residuals are also reported over the sensors the training data reach with at least "
                        "this many hits (default 100)")
    g.add_argument("--target-rot", type=positive_float, default=10.0, metavar="URAD",
                   help="accuracy target of the rotations: with the solve's errors (theta_cov.npy) the residual "
                        "is also reported over the sensors whose error is within it (default 10)")
    g.add_argument("--target-trans", type=positive_float, default=1.0, metavar="UM",
                   help="the same for the shifts in the measurement directions du, dv (default 1)")
    g.add_argument("--pt-spectrum", choices=("run", "uniform"), default="run",
                   help="pT spectrum of the test samples: the run's, or uniform over its range (fills high pT)")


def cmd_its_export_mille(args: argparse.Namespace) -> int:
    """Export the run ``args.run`` to Millepede-II files in ``args.out``; print what was written."""
    from streamcal.detectors.its.mille_export import MILLE_FILE, STEERING_FILE, SUMMARY_FILE, export_run
    from streamcal.errors import StreamcalError

    try:
        summary = export_run(args.run, args.out, at=args.at, min_hits=args.min_hits, double_precision=args.double,
                             normalisation=args.normalisation, method=args.method, min_entries=args.min_entries,
                             log=lambda s: print(s, file=sys.stderr, flush=True))
    except StreamcalError:
        raise  # names the run file; the main CLI prints it
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rej = summary["rejects"]
    print(f"{summary['records']} records ({summary['tracks']} tracks, {summary['measurements']} measurements) "
          f"-> {args.out}/{MILLE_FILE}; steering {args.out}/{STEERING_FILE} (method {summary['method']}, "
          f"{summary['constraints']['written']} constraints, {summary['parameters']['fixed']} fixed parameters)")
    packed = sum(rej.get(k, 0) for k in ("tracks_too_few_hits", "tracks_too_many_hits", "tracks_bad_vertex"))
    print(f"rejected tracks: {packed} by the hit checks, {rej['tracks_zero_ndf']} without degrees of freedom; "
          f"summary {args.out}/{SUMMARY_FILE}")
    print(f"run: cd {args.out} && pede {STEERING_FILE}")
    return 0


def cmd_its_refine(args: argparse.Namespace) -> int:
    """Refine the run ``args.run`` into ``args.out``; print the cost before and after."""
    from streamcal.errors import StreamcalError

    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    from streamcal.detectors.its.refine import REFINE_JSON, refine_run

    try:
        summary = refine_run(args.run, args.out, events=args.events, gn_iterations=args.gn_iterations,
                             cg_iterations=args.cg_iterations, tol=args.tol, min_hits=args.min_hits,
                             min_sensor_hits=args.min_sensor_hits, layers=args.layers,
                             rigid_layers=args.rigid_layers,
                             cache_mb=args.cache_mb, cache_precision=args.cache_precision, coarse=args.coarse,
                             presigma_rot=args.presigma_rot, presigma_trans=args.presigma_trans,
                             presigma_free_modes=args.presigma_free, solver=args.solver,
                             error_samples=args.error_samples, error_seed=args.error_seed,
                             mode_constraints=not args.no_mode_constraints,
                             start=args.start_from,
                             progress=not args.no_progress, log=lambda s: print(s, file=sys.stderr, flush=True))
    except StreamcalError:
        raise  # names the run file; the main CLI prints it
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ev = summary["events"]
    print(f"cost {summary['cost_start']:.10g} -> {summary['cost']:.10g} (change times events "
          f"{summary['cost_change_times_events']:.4g}; {ev} events, {summary['tracks']} tracks)")
    if summary["presigma"] is not None:
        print(f"prior term {summary['prior_start']:.6g} -> {summary['prior']:.6g} (presigma rot "
              f"{summary['presigma']['rot']} rad, trans {summary['presigma']['trans']} mm; in units of C, chi2 / "
              f"{summary['ndf']:.6g} degrees of freedom)")
        free = summary["options"]["presigma_free_modes"]
        if free:
            print(f"the prior leaves free: {', '.join(free)}")
    for g in summary["gn"]:
        res = min(c["relative_residual"] for c in g["cg"]) if g["cg"] else 0.0  # the iterate taken
        actual = (g["cost_after"] + g["prior_after"]) - (g["cost_before"] + g["prior_before"])
        how = (f"direct solve ({g['direct_seconds']:.1f} s)" if g["solver"] == "direct" else
               f"{g['cg_iterations']} CG iterations (relative residual {res:.2e})")
        print(f"GN {g['iteration']}: {how}, predicted {g['predicted_change']:.4g}, actual {actual:.4g}, "
              f"max |dTheta| {g['max_step']:.3g}")
    sp = summary["seconds_per_pass"]
    cg = "n/a" if sp["cg_median"] is None else f"{sp['cg_median']:.2f}"
    what = "cost/gradient/blocks" if summary["options"]["solver"] == "cg" else "cost/gradient/H"
    print(f"seconds per pass: {what} {', '.join(f'{s:.1f}' for s in sp['system'])}; CG median {cg}; "
          f"total {summary['seconds']:.0f} s, {summary['passes']} passes")
    print(f"run directory: {args.out} (streamcal evaluate align --run {args.out} --report REPORT_DIR); "
          f"record {args.out}/{REFINE_JSON}")
    return 0


def _add_refine(its_sub: Any) -> None:
    from streamcal.detectors.its.misalignment import RIGID_MODES, WEAK_MODES

    p = its_sub.add_parser(
        "refine", help="continue a run with global Gauss-Newton steps (preconditioned CG, matrix-free or on the "
                       "sparse assembled matrix, or a dense direct solve for some layers)",
        description="Continue an alignment run with global Gauss-Newton iterations on its cost, each solving the "
                    "projected normal equations (track parameters profiled out) within the run's constraints: by "
                    "preconditioned conjugate gradients, matrix-free, one pass over the spooled tracks "
                    "(RUN_DIR/spool/*.arrows) per CG iteration; or by the same CG on the sparse matrix assembled "
                    "in one pass (--solver sparse, any number of sensors and events); or (--solver direct, for up "
                    "to 3,333 solved sensors) exactly from the dense matrix formed in one pass. Starts from "
                    "RUN_DIR/theta.npy (or --start-from's) and writes OUT_DIR as a run directory for `streamcal "
                    "evaluate align` (run.json, theta.npy, theta_true.npy, "
                    "metrics.jsonl) and OUT_DIR/refine.json (per-iteration record).")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run directory of the alignment workers (run.json, theta.npy, theta_true.npy, spool/*.arrows)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output run directory (created)")
    p.add_argument("--events", type=positive_int, default=None,
                   help="use only the first N events of the spool (default: all)")
    p.add_argument("--gn-iterations", type=positive_int, default=2, help="Gauss-Newton relinearisations (default 2)")
    p.add_argument("--cg-iterations", type=positive_int, default=100,
                   help="CG iterations per Gauss-Newton iteration at most, one pass each (default 100)")
    p.add_argument("--tol", type=positive_float, default=1e-4,
                   help="stop CG at this relative projected preconditioned residual (default 1e-4)")
    p.add_argument("--cache-mb", type=non_negative_float, default=2048.0,
                   help="memory for the linearised tracks kept between the CG passes (about 1.5 kB per track in "
                        "float64); chunks beyond it are recomputed every pass (default 2048)")
    p.add_argument("--cache-precision", choices=("float64", "float32"), default="float64",
                   help="precision of the kept linearisation (float32: half the memory, H p to ~1e-7)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--min-hits", type=positive_int, default=4,
                   help="tracks with fewer valid hits are rejected (default 4, as the workers)")
    p.add_argument("--min-sensor-hits", type=positive_int, default=10,
                   help="sensors with fewer hits keep the run's value (default 10)")
    p.add_argument("--layers", type=int, nargs="+", metavar="L", default=None,
                   help="solve only for the sensors of these layers; the others keep the run's value (default: all)")
    p.add_argument("--coarse", choices=("none", "rigid", "rigid+weak"), default="none",
                   help="coarse space of a two-level CG preconditioner: each layer's rigid-body motions (rigid), and "
                        "its share of the weak modes (rigid+weak); one pass per direction per Gauss-Newton "
                        "iteration, fewer CG iterations for the collective motions of whole layers (default none)")
    p.add_argument("--presigma-rot", type=positive_float, default=None, metavar="RAD",
                   help="Millepede's presigma for the rotations: a Gaussian prior 0 +- RAD (radians) on each of the "
                        "three angles of every solved sensor's rotation about its own centre, pulling towards the "
                        "nominal geometry; its chi2 is divided by the data's degrees of freedom, as the cost's "
                        "(default: no prior)")
    p.add_argument("--presigma-trans", type=positive_float, default=None, metavar="MM",
                   help="Millepede's presigma for the translations: a Gaussian prior 0 +- MM (millimetres) on each "
                        "component of every solved sensor's centre shift (default: no prior)")
    p.add_argument("--presigma-free", nargs="+", choices=WEAK_MODES + RIGID_MODES, default=(), metavar="MODE",
                   help="global modes the prior leaves to the data: it holds each sensor at the nominal geometry up "
                        "to a combination of them, so a coherent deformation (e.g. an elliptical barrel) is not "
                        "pulled towards zero by the per-sensor pseudo-measurements; any of "
                        f"{', '.join(WEAK_MODES + RIGID_MODES)} (default: none). Keep the dilations (radial, "
                        "zexpansion) held: they rescale every track's fitted momentum or dip, which the tracks "
                        "hardly measure (freed on 300k simulated ITS2 events, zexpansion contracted the inner "
                        "barrel by 4-6e-6, dv pulls 1.7)")
    p.add_argument("--solver", choices=("cg", "direct", "sparse"), default="cg",
                   help="cg: matrix-free preconditioned conjugate gradients, one pass per iteration (any number of "
                        "sensors); sparse: the Gauss-Newton matrix of the solved sensors assembled block-sparse in "
                        "one pass (the 6 x 6 blocks of the sensor pairs tracks connect: the full ITS2 in about "
                        "0.7 GB, Millepede's sparse mode), then the same CG in memory, as many iterations as "
                        "--cg-iterations and --tol ask, without passes over the data; direct: the Gauss-Newton "
                        "matrix of the solved sensors formed densely in one pass and each step solved exactly "
                        "(Millepede's inversion), for up to 3,333 solved sensors, e.g. "
                        "--layers 0 1 2 (the inner barrel, 432 chips) with the others as the reference (default cg)")
    p.add_argument("--error-samples", type=non_negative_int, default=0, metavar="K",
                   help="with --solver sparse: every solved chip's 6 x 6 errors (theta_cov.npy, for evaluate align) "
                        "from K noise replicas of the data at the last linearisation, each solved through the same "
                        "matrix: each variance to sqrt(2/K) relative, a layer's RMS far better (default 0: none)")
    p.add_argument("--error-seed", type=non_negative_int, default=0, metavar="S",
                   help="seed of the noise replicas (default 0)")
    p.add_argument("--rigid-layers", type=int, nargs="+", metavar="L", default=None,
                   help="with --solver direct: the staves of these layers solved as rigid bodies, one 6-parameter "
                        "step per stave from all its chips' hits, beside the single sensors of --layers (e.g. "
                        "--layers 0 1 2 --rigid-layers 3 4 5 6: 432 chips and 144 staves)")
    p.add_argument("--no-mode-constraints", action="store_true",
                   help="drop the run's weak-mode constraints from the steps (its fixed layers stay fixed): with "
                        "--layers the held sensors define the frame, and the solved layers' collective rotation or "
                        "shift relative to them is measured rather than held at its start")
    p.add_argument("--start-from", metavar="RUN_DIR", default=None,
                   help="start from this run directory's theta.npy instead of RUN_DIR's (a run of the same detector "
                        "and truth, e.g. a refine of part of the data; RUN_DIR's spool is the data)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_its_refine)


def _add_its_group(subparsers: Any) -> None:
    """Register ``streamcal its export-mille`` and ``streamcal its refine``."""
    if "its" in subparsers.choices:
        raise RuntimeError("streamcal.detectors.its.cli: a command 'its' is already registered")
    its = subparsers.add_parser("its", help="ITS2 alignment tools (export-mille, refine)",
                                description="ITS2 alignment tools.")
    its_sub = its.add_subparsers(dest="its_command", metavar="COMMAND", required=True)
    p = its_sub.add_parser(
        "export-mille", help="write a run's tracks as Millepede-II binary records and a pede steering file",
        description="Write the tracks a run's alignment workers spooled (RUN_DIR/spool/*.arrows) as Millepede-II "
                    "records (OUT_DIR/mp2data.bin: per track the xy and z residual of every hit and the vertex "
                    "term, with local and global derivatives of the run's cost), a pede steering file "
                    "(OUT_DIR/steer.txt: the fixed layers and constrained modes of run.json), the linearisation "
                    "point OUT_DIR/theta0.npy and OUT_DIR/summary.json.")
    p.add_argument("--run", required=True, metavar="RUN_DIR",
                   help="run directory of the alignment workers (run.json, spool/*.arrows; theta.npy for --at fitted)")
    p.add_argument("--out", required=True, metavar="OUT_DIR", help="output directory (created)")
    p.add_argument("--at", choices=("zero", "fitted"), default="zero",
                   help="linearisation point: Theta = 0 (pede aligns from the ideal geometry; default) or the run's "
                        "theta.npy (pede's corrections to it)")
    p.add_argument("--min-hits", type=positive_int, default=4,
                   help="tracks with fewer valid hits are rejected (default 4, as the workers)")
    p.add_argument("--normalisation", choices=("cost", "chi2"), default="cost",
                   help="cost: sigmas scaled so that pede minimises the run's cost (times the total ndf; default); "
                        "chi2: the plain sigmas, pede minimises the un-normalised chi2 sum")
    p.add_argument("--double", action="store_true", help="float64 records (GBL MilleBinary) instead of float32")
    p.add_argument("--method", default="auto",
                   help="pede method (default auto: inversion up to 10000 parameters, else sparseMINRES-QLP)")
    p.add_argument("--min-entries", type=positive_int, default=1,
                   help="pede's entries cut: parameters with fewer measurements are not fitted (default 1)")
    p.set_defaults(func=cmd_its_export_mille)
    _add_refine(its_sub)


def add_subparser(subparsers: Any) -> None:
    """Add ``align`` to ``streamcal evaluate`` (or register ``evaluate align`` alone) and register
    ``streamcal its export-mille`` and ``streamcal its refine``."""
    _add_evaluate_align(subparsers)
    _add_its_group(subparsers)


def _add_evaluate_align(subparsers: Any) -> None:
    parser = subparsers.choices.get("evaluate")
    if parser is None:
        parser = subparsers.add_parser("evaluate", help="evaluate an ITS2 alignment run",
                                       description="Evaluate an ITS2 alignment run: summary.json and PNG figures.")
        parser.add_argument("task", choices=["align"], help="what to evaluate")
        parser.add_argument("--report", required=True, help="output directory: summary.json and the PNG figures")
        parser.add_argument("--seed", type=int, help="align: seed of the test samples (default: derived from the "
                                                     "run's training seed)")
        _add_align_options(parser)
        parser.set_defaults(func=cmd_evaluate_align)
        return
    actions = {a.dest: a for a in parser._actions}
    task, checkpoint, seed = actions.get("task"), actions.get("checkpoint"), actions.get("seed")
    if task is None or task.choices is None or "report" not in actions or seed is None:
        raise RuntimeError("streamcal.detectors.its.cli: the 'evaluate' command has no positional 'task' with "
                           "choices, --report and --seed to extend")
    task.choices = [*task.choices, "align"]
    task.help = f"{task.help}; align: an ITS2 alignment run (--run)"
    seed.help = f"{seed.help}; align: seed of the test samples (default: derived from the run's training seed)"
    if parser.description:
        parser.description += " `evaluate align --run DIR`: the report of an ITS2 alignment run."
    tpc_func = parser.get_default("func")
    if checkpoint is not None and checkpoint.required:
        checkpoint.required = False  # checked below for the tasks that need it
        checkpoint.help = f"{checkpoint.help} (sc1d, sc3d: required)"
    _add_align_options(parser)

    def dispatch(args: argparse.Namespace) -> int:
        if args.task == "align":
            return cmd_evaluate_align(args)
        given = [f"--{name.replace('_', '-')}" for name in ("run", "compare") if getattr(args, name)]
        if given:
            print(f"error: {', '.join(given)} only apply to evaluate align", file=sys.stderr)
            return 2
        if checkpoint is not None and getattr(args, checkpoint.dest) is None:
            print(f"error: evaluate {args.task} needs --checkpoint DIR", file=sys.stderr)
            return 2
        return int(tpc_func(args))

    parser.set_defaults(func=dispatch)
