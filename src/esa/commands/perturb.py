"""``esa perturb``, ``esa dose-response`` and ``esa bitscan``: the perturbation protocols of esa.perturb.protocols."""

from __future__ import annotations

from pathlib import Path

from esa.commands.baseline import add_model_args, add_output_args, model_entry
from esa.perturb.protocols.bitscan import greedy_verdict
from esa.perturb.protocols import (
    CONTROLS,
    DOSE_PARAM,
    BitscanConfig,
    EvalConfig,
    PerturbConfig,
)

TARGETS_HELP = ("superweights (detected on calibration windows), topk:<ranking file>:<k>, rows:<glob>:<i>, "
                "cols:<glob>:<j>, tensor:<glob>, a .json/.csv coordinate file, or 'param[row,col];…' "
                "(row = out, col = in)")


def add_eval_args(p) -> None:
    """The flags of an :class:`EvalConfig` (read back by :func:`eval_config`); ``esa scaling`` shares them."""
    e = EvalConfig()
    p.add_argument("--dataset", default=e.dataset, help="corpus name or .txt/.jsonl path")
    p.add_argument("--context-len", type=int, default=e.context_len, help="tokens per chunks window")
    p.add_argument("--max-eval-tokens", type=int, default=e.max_eval_tokens,
                   help="scored tokens evaluated, in the model's own tokens (0 = the whole corpus, seed-invariant)")
    p.add_argument("--seed", type=int, default=e.seed, help="picks the evaluation and calibration windows")
    p.add_argument("--batch-tokens", type=int, default=e.batch_tokens, help="micro-batch token budget")
    p.add_argument("--calib-samples", type=int, default=e.calib_samples,
                   help="windows for super-weight detection (not among the evaluated ones)")
    p.add_argument("--n-boot", type=int, default=e.n_boot, help="bootstrap resamples per ΔNLL CI")
    p.add_argument("--collapse-ppl", type=float, default=e.collapse_ppl,
                   help="a trial collapsed when its PPL exceeds this or a loss is non-finite")


def eval_config(args) -> EvalConfig:
    """The :class:`EvalConfig` of :func:`add_eval_args`' flags (``--max-eval-tokens 0``: the whole corpus)."""
    return EvalConfig(args.dataset, args.context_len, None if args.max_eval_tokens == 0 else args.max_eval_tokens,
                      args.seed, args.batch_tokens, args.calib_samples, args.n_boot, args.collapse_ppl)


def _common(p, stem: str) -> None:
    p.add_argument("--model", default="smollm2-135m", help="suite alias, hub id, local dir or .gguf file")
    p.add_argument("--targets", default="superweights", help=TARGETS_HELP)
    add_eval_args(p)
    p.add_argument("--tasks", nargs="*", default=[],
                   help="zero-shot tasks scored under every perturbation, paired item by item with the unperturbed "
                        "model (e.g. piqa, corpus_mc:python-docs, corpus_cloze:python-docs)")
    p.add_argument("--task-data", nargs="*", default=[], metavar="TASK=PATH",
                   help="read TASK from a local JSONL in the dataset's own schema instead of the hub")
    p.add_argument("--task-limit", type=int, default=None, help="items per task (seeded by --seed)")
    add_model_args(p)
    add_output_args(p, f"runs/{stem}", "the JSON, .npz and plot exported from it")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "perturb", help="perturb a target set and size-matched controls; paired ΔNLL statistics",
        description="Applies --op to the targets and to controls (random_k: random elements of the same tensors, "
                    "one draw per --control-seeds; bottom_k: lowest-ranked elements) on the same fixed windows as "
                    "the unperturbed baseline; writes perturb.json, perturb.npz (per-window arrays), perturb.png.")
    _common(p, "perturb")
    p.add_argument("--op", default="zero", help="zero | sign_flip | scale:factor=F | set:value=V | "
                   "gauss_noise:sigma=S[,relative_to=tensor_std] | uniform_noise:width=W | bit_flip:bit=B | "
                   "random_bit_flip:prob=P[,bits=…]")
    p.add_argument("--controls", default=None,
                   help=f"comma list of {', '.join(CONTROLS)} (or none); default: random_k, plus bottom_k when a "
                        "ranking is known (--ranking, a topk: target, or superweights: magnitude)")
    p.add_argument("--ranking", default=None, help="ranking.parquet/.csv for bottom_k (from `esa sensitivity`)")
    p.add_argument("--control-seeds", nargs="+", type=int, default=[0, 1, 2], help="random_k draws")
    p.set_defaults(func=run_perturb_cmd)

    d = subparsers.add_parser(
        "dose-response", help="ΔNLL of a target set and a random control as one op parameter grows",
        description=f"Sweeps the op's parameter ({', '.join(f'{k}: {v}' for k, v in DOSE_PARAM.items())}); "
                    "writes dose_response.json, .npz and .png (curves with CI bands).")
    _common(d, "dose_response")
    d.add_argument("--op", default="scale", help="op name, optionally with fixed parameters, e.g. "
                   "gauss_noise:relative_to=tensor_std")
    d.add_argument("--values", nargs="+", default=["0", "0.25", "0.5", "1", "2", "4", "8"],
                   help="values of the swept parameter (bit_flip: positions or names such as exponent_msb)")
    d.add_argument("--control-seeds", nargs="*", type=int, default=[0, 1, 2],
                   help="random_k draws (none: no control)")
    d.set_defaults(func=run_dose_cmd)

    b = subparsers.add_parser(
        "bitscan", help="ΔNLL of every single bit flip of the top target weights; fewest flips to collapse",
        description="Flips each --bits position of each of the first --top-n target weights alone (heat map), "
                    "then greedily adds the most damaging flip until the model collapses (PPL above "
                    "--collapse-ppl or non-finite). Writes bitscan.json, .npz and .png.")
    _common(b, "bitscan")
    c = BitscanConfig()
    b.add_argument("--top-n", type=int, default=c.top_n, help="weights scanned, in the target spec's order")
    b.add_argument("--bits", nargs="+", default=list(c.bits),
                   help="positions (0 = mantissa LSB) or names: sign exponent_msb exponent_lsb mantissa_msb "
                        "mantissa_lsb exponent[i] mantissa[i]")
    b.add_argument("--max-flips", type=int, default=c.max_flips, help="greedy search gives up after this many")
    b.add_argument("--greedy-pool", type=int, default=c.greedy_pool,
                   help="flips competing in the greedy search (the most damaging single flips)")
    b.add_argument("--order", default=c.order, choices=("listed", "predicted"),
                   help="listed: measure every flip; predicted: rank flips by their predicted ΔNLL (one gradient "
                        "pass), measure in that order and stop once none left can beat the --screen-n-th worst")
    b.add_argument("--screen-n", type=int, default=c.screen_n, help="predicted order: worst flips to find")
    b.add_argument("--calib-flips", type=int, default=c.calib_flips,
                   help="predicted order: random flips measured first; they set the error bound")
    b.add_argument("--estimator", default=c.estimator, help="predicted order: grad_squared | fisher | hutchinson")
    b.set_defaults(func=run_bitscan_cmd)


def _console():
    """A console at least 130 columns wide, so the tables stay readable when output is piped (80 default)."""
    from rich.console import Console

    return Console(width=max(Console().width, 130))


def _num(x, fmt: str = ".4g") -> str:
    from esa.core.files import as_float

    return format(as_float(x), fmt)


def _stats_table(title: str, comps: list[dict]):
    from rich.table import Table

    table = Table(title=title, caption="ΔNLL: nats/token, mean over windows (perturbed − reference); "
                                       "p: Wilcoxon signed-rank, Holm-adjusted across this run")
    for col in ("comparison", "ΔNLL", "95% CI", "PPL", "PPL ratio", "p", "p Holm", "d_z", "collapsed"):
        table.add_column(col, justify="left" if col == "comparison" else "right")
    for c in comps:
        table.add_row(c["name"], _num(c["mean_delta_nll"]), f"[{_num(c['ci_low'])}, {_num(c['ci_high'])}]",
                      _num(c["ppl_perturbed"]), _num(c["ppl_ratio"]), _num(c["p_wilcoxon"], ".2g"),
                      _num(c["p_wilcoxon_holm"], ".2g"), _num(c["cohens_dz"], ".3g"),
                      "[red]yes[/red]" if c["collapsed"] else "no")
    return table


def _finish(console, out: Path, stem: str, doc: dict) -> None:
    for note in doc["notes"]:
        console.print(f"note: {note}")
    console.print(f"baseline PPL {_num(doc['baseline']['perplexity'])} on {doc['data']['n_windows']} windows "
                  f"({doc['data']['scored_tokens']} scored tokens); {_num(doc['wall_seconds'], '.1f')} s")
    console.print(f"results: {out / f'{stem}.json'}\nplot: {out / f'{stem}.png'}")


# ---- flags → one-off study → exports ------------------------------------------------------------------------

STEMS = {"perturbation": "perturb", "dose_response": "dose_response", "bitscan": "bitscan"}
OWNED = ("perturb.json", "dose_response.json", "bitscan.json")  # an earlier run's files (older ESA: no database)


def given_params(op) -> dict:
    """The parameters of ``op`` that differ from the op's defaults (what a user wrote in ``name:key=value``)."""
    import dataclasses

    return {f.name: getattr(op, f.name) for f in dataclasses.fields(op)
            if f.default is dataclasses.MISSING or getattr(op, f.name) != f.default}


def one_off_study(args, kind: str, section: dict):
    """The study a perturbation command runs: one model, one dataset, context length and seed, kind ``kind``."""
    from esa.study import parse_study

    model = model_entry(args)
    from esa.evals.zeroshot import parse_task_data

    settings = {"n_boot": args.n_boot, "calib_samples": args.calib_samples, "collapse_ppl": args.collapse_ppl,
                "tasks": list(args.tasks), "task_data": parse_task_data(args.task_data), "task_limit": args.task_limit}
    return parse_study({"name": f"esa-{STEMS[kind]}", "models": [model], "datasets": [args.dataset],
                        "context_lens": [args.context_len], "seeds": [args.seed],
                        "max_eval_tokens": None if args.max_eval_tokens == 0 else args.max_eval_tokens,
                        "batch_tokens": args.batch_tokens, "kinds": [kind], kind: {**section, **settings}},
                       f"esa {args.command}")


def run_and_export(args, kind: str, section: dict) -> dict:
    """Run the one-off study into ``<out-dir>/esa.db`` (resuming), then export ``<stem>.json``, ``.npz`` and
    ``.png`` from the stored run; returns the exported document."""
    from esa.commands.study import progress_printer
    from esa.executors.one_off import check_out_dir, log_path, run_one_off
    from esa.perturb import plots
    from esa.core.files import write_arrays, write_json
    from esa.tracking import from_args

    out, stem = Path(args.out_dir), STEMS[kind]
    db = args.db or out / "esa.db"
    check_out_dir(out, db, OWNED, args.overwrite, f"esa {args.command}")
    study = one_off_study(args, kind, section)
    printer = from_args(args, progress_printer(_console(), log_path(db)), db)
    (result,) = run_one_off(study, db, f"esa {args.command}", args.overwrite, printer).of(kind)
    protocol = result.documents["protocol"]
    doc = {"schema": protocol["schema"], "provenance": result.row.provenance, "model": result.row.model,
           **{k: v for k, v in protocol.items() if k != "schema"}, "database": str(db), "run_id": result.row.run_id}
    for name in OWNED:
        (out / name).unlink(missing_ok=True)  # an older run's files would contradict the database
    write_json(out / f"{stem}.json", doc)
    write_arrays(out / f"{stem}.npz", **result.arrays)
    {"perturb": plots.plot_perturb, "dose_response": plots.plot_dose_response,
     "bitscan": plots.plot_bitscan}[stem](doc, out / f"{stem}.png")
    return doc


def run_perturb_cmd(args) -> int:
    from esa.perturb.ops import parse_op
    from esa.perturb.protocols.choose import check_controls, resolve_controls

    controls = None if args.controls is None else tuple(args.controls.split(","))
    cfg = PerturbConfig(args.targets, args.op, controls, args.ranking, tuple(args.control_seeds), eval_config(args))
    op = parse_op(cfg.op)  # fail before loading anything
    check_controls(cfg)
    grid = {k: [v] if isinstance(v, list) else v for k, v in given_params(op).items()}  # a list is one value
    target = {"name": "target", "spec": cfg.targets, "bottom_ranking": cfg.ranking}
    doc = run_and_export(args, "perturbation", {"targets": [target], "ops": [{"op": op.name, "grid": grid}],
                                                "controls": list(resolve_controls(cfg)),
                                                "control_seeds": list(cfg.control_seeds)})
    console = _console()
    sizes = ", ".join(f"{a['name']} {a['n_elements']}" for a in doc["arms"])
    console.print(_stats_table(f"{doc['model']['model_id']}: {cfg.targets} under {cfg.op} (elements: {sizes})",
                               doc["comparisons"]))
    sep = doc["separation"]
    console.print("separation: target/random ΔNLL = " + (_num(sep["target_over_random"]) if sep[
        "target_over_random"] is not None else "n/a") + ", random/bottom ΔNLL = " + (
        _num(sep["random_over_bottom"]) if sep["random_over_bottom"] is not None else "n/a"))
    _finish(console, Path(args.out_dir), "perturb", doc)
    return 0


def run_dose_cmd(args) -> int:
    from esa.perturb.protocols import dose_ops
    from esa.perturb.protocols.experiments import parse_value

    param, ops = dose_ops(args.op, args.values)  # fail before loading anything
    fixed = {k: v for k, v in given_params(ops[0]).items() if k != param}
    section = {"targets": [{"name": "target", "spec": args.targets}],
               "ops": [{"op": ops[0].name, "values": [parse_value(v) for v in args.values], "params": fixed}],
               "controls": ["random_k"] if args.control_seeds else [], "control_seeds": list(args.control_seeds)}
    doc = run_and_export(args, "dose_response", section)
    comps = [r[arm] for r in doc["rows"] for arm in ("target", "random_k") if arm in r]
    console = _console()
    console.print(_stats_table(f"{doc['model']['model_id']}: dose-response of {args.targets} "
                               f"({doc['targets']['n_elements']} elements)", comps))
    _finish(console, Path(args.out_dir), "dose_response", doc)
    return 0


def run_bitscan_cmd(args) -> int:
    from rich.table import Table

    cfg = BitscanConfig(args.targets, args.top_n, tuple(args.bits), args.max_flips, args.greedy_pool,
                        eval_config(args), args.order, args.screen_n, args.calib_flips, args.estimator)
    section = {"targets": [{"name": "target", "spec": cfg.targets}], "top_n": cfg.top_n, "bits": list(cfg.bits),
               "max_flips": cfg.max_flips, "greedy_pool": cfg.greedy_pool, "order": cfg.order,
               "screen_n": cfg.screen_n, "calib_flips": cfg.calib_flips, "estimator": cfg.estimator}
    doc = run_and_export(args, "bitscan", section)
    bits = [b["spec"] for b in doc["bits"]]
    table = Table(title=f"{doc['model']['model_id']}: single-flip ΔNLL (nats/token), weights × bits",
                  caption="✕ = collapsed (PPL above the threshold or non-finite)")
    for col in ("weight", "value", *bits):
        table.add_column(col, justify="left" if col == "weight" else "right")
    for i, w in enumerate(doc["weights"]):
        row = [c for c in doc["cells"] if c["weight"] == i]
        table.add_row(w["label"], _num(w["value"]),
                      *[_num(c["mean_delta_nll"], ".3g") + (" ✕" if c["collapsed"] else "") for c in row])
    console = _console()
    console.print(table)
    if "screening" in doc:
        s = doc["screening"]
        console.print(f"predicted-first: measured {s['n_measured']} of {s['n_candidates']} flips "
                      f"({s['calibration_flips']} random first); stop: {s['stop']} [bound: {s['bound_kind']}]")
    g = doc["greedy"]
    if g["collapsed"]:
        exact = " (exact minimum)" if g["exact_minimum"] else " (greedy upper bound)"
        console.print(f"{greedy_verdict(g)}{exact}: " + "; ".join(g["flips"]))
    else:
        console.print(f"{greedy_verdict(g)} (PPL threshold {g['collapse_ppl']:g})")
    _finish(console, Path(args.out_dir), "bitscan", doc)
    return 0
