"""What each ``slimlm`` subcommand does: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import json
from pathlib import Path

from slimlm.errors import SlimlmError, read_json


def one_step_recipe(kind: str, args):
    """The recipe of a ``slimlm prune/quantize/shrink/lowrank/analyze/gguf`` command line: its step's config (plus
    ``eval`` for --eval); the analysis folder and a gguf step's file are their own ``out``, a run folder the
    recipe's."""
    from dataclasses import replace

    from slimlm.cli.settings import eval_config, run_config, step_config
    from slimlm.recipe import Recipe

    step = step_config(kind, args)
    if kind == "analyze":  # the command's --out is the run-level one: the analysis folder
        step = replace(step, out=None)
    steps = [(kind, step)] + ([("eval", eval_config(args))] if getattr(args, "eval", False) else [])
    return Recipe(run_config(args, None if kind == "gguf" else args.out), tuple(steps))


def readable(value):
    """``value`` with every float rounded for a reader: four significant digits, one decimal from 1000 up (the
    manifest keeps full precision)."""
    if isinstance(value, float):
        return round(value, 1) if abs(value) >= 1000 else float(f"{value:.4g}")
    if isinstance(value, dict):
        return {k: readable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [readable(v) for v in value]
    return value


def printed(result: dict) -> str:
    """One JSON line of a command's result, its floats ``readable``."""
    return json.dumps(readable(result))


def _execute(kind: str, args, recipe=None) -> None:
    """A compression or analysis command line is a one-step recipe: the command and ``slimlm run`` of the recipe it
    writes share one code path. Prints each step's result as one JSON line."""
    from slimlm.pipeline import execute
    from slimlm.recipe import RunOptions

    recipe = recipe or one_step_recipe(kind, args)
    for outcome in execute(recipe, RunOptions.from_args(args), name_steps=False):
        print(printed(outcome.summary))


def cmd_prune(args) -> None:
    _execute("prune", args)


def cmd_quantize(args) -> None:
    _execute("quantize", args)


def cmd_shrink(args) -> None:
    _execute("shrink", args)


def cmd_lowrank(args) -> None:
    _execute("lowrank", args)


def cmd_speed(args) -> None:
    """Speed of MODEL beside its baseline (first), measured in alternating rounds (evaluation.speed)."""
    from slimlm.core.files import read_manifest
    from slimlm.core.models import model_source
    from slimlm.evaluation.speed import measure_speed
    from slimlm.evaluation.speed_table import format_table

    model_source(args.model, args.allow_pickle)  # a missing folder or file is said first, before the baseline
    baseline = args.baseline
    if baseline is None and Path(args.model).is_dir():
        baseline = read_manifest(args.model).get("model")
    if baseline is None:
        raise SlimlmError(f"--baseline is needed: {args.model} is not a run folder that names its source model")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        raise SlimlmError(f"--batches takes comma-separated batch sizes, e.g. 1,8; got '{args.batches}'") from None
    result = measure_speed([baseline, args.model], args.engine, args.prompt_tokens, args.new_tokens, batches,
                           args.repeats, args.threads, args.device, args.dtype, progress=not args.quiet)
    print(json.dumps(result) if args.json else format_table(result))


def cmd_analyze(args) -> None:
    _execute("analyze", args)


def cmd_run(args) -> None:
    from slimlm.pipeline import execute
    from slimlm.recipe import RunOptions, read_recipe, relocated

    recipe = read_recipe(args.recipe)
    for outcome in execute(relocated(recipe, args.out) if args.out else recipe, RunOptions.from_args(args)):
        print(printed(outcome.summary))


def _values(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise SlimlmError(f"{flag}: expected comma-separated {kind.__name__} values, got '{text}'") from None


def cmd_sweep(args) -> None:
    from slimlm.recipe import RunOptions, check
    from slimlm.sweep import grid, sweep

    run = {"model": args.model, "dtype": args.dtype, "device": args.device, "data-dir": args.data_dir}
    prune = {"calib": args.calib, "nsamples": args.nsamples, "seqlen": args.seqlen,
             "calib-sampling": args.calib_sampling, "batch-size": args.batch_size, "owl-m": args.owl_m}
    evaluation = {"eval-dataset": args.eval_dataset, "eval-seqlen": args.eval_seqlen,
                  "eval-windows": args.eval_windows}
    cells = grid(run, prune, evaluation, _values(args.methods, str, "--methods"),
                 _values(args.sparsities, float, "--sparsities"), _values(args.allocations, str, "--allocations"),
                 _values(args.seeds, int, "--seeds"))
    options = RunOptions(allow_pickle=args.allow_pickle, no_cache=args.no_cache)
    for cell in cells.values():  # every cell's settings are checked before Ray starts
        check(cell, options)
    rows = sweep(cells, args.out, args.ray, args.cpus_per_cell, args.gpus_per_cell, not args.quiet, options)
    print(json.dumps({"out": args.out, "cells": len(rows), "results": str(Path(args.out) / "sweep.json")}))


def cmd_allocate(args) -> None:
    from slimlm.allocate import allocate_from_metrics, parse_target
    from slimlm.config import AllocationConfig, from_namespace
    from slimlm.core.budgets import size_weighted_mean
    from slimlm.report import plots

    allocation = from_namespace(AllocationConfig, args)
    unit, target = parse_target(args.target)
    records = read_json(Path(args.analysis) / "metrics.json")
    metrics = {r["name"]: r for r in records}
    budgets = allocate_from_metrics(metrics, args.allocation, target, unit, **allocation.allocation_options())
    if args.out:
        Path(args.out).write_text(json.dumps(budgets, indent=1) + "\n")
        plots.budgets({args.allocation: budgets}, Path(args.out).with_suffix(".png"), unit)
    sizes = {n: metrics[n]["size"] for n in budgets}
    mean, low, high = size_weighted_mean(budgets, sizes), min(budgets.values()), max(budgets.values())
    if args.json:
        print(json.dumps({"allocation": args.allocation, unit: mean, "min": low, "max": high, "budgets": budgets}))
        return
    print(f"{args.allocation} allocation, target {unit}={target:g}: parameter-weighted mean {mean:.4f} over "
          f"{len(budgets)} linears, min {low:.3f}, max {high:.3f}")
    print("\n".join(_budget_table(budgets, metrics)))
    if args.out:
        print(f"budget map written to {args.out} (plot: {Path(args.out).with_suffix('.png')})")


def _budget_table(budgets: dict[str, float], metrics: dict[str, dict]) -> list[str]:
    """One row per block: the parameter-weighted mean budget of its linears, then each linear's by kind."""
    from slimlm.core.budgets import size_weighted_mean

    kinds = list(dict.fromkeys(metrics[n]["kind"] for n in budgets))
    names = [k.rsplit(".", 1)[-1] for k in kinds]  # q_proj rather than self_attn.q_proj, where that is unique
    if len(set(names)) < len(kinds):
        names = kinds
    widths = [max(len(name), 5) for name in names]
    blocks: dict[int, dict[str, str]] = {}
    for fqn in budgets:
        blocks.setdefault(metrics[fqn]["block"], {})[metrics[fqn]["kind"]] = fqn
    lines = ["block   mean  " + "  ".join(f"{name:>{w}}" for name, w in zip(names, widths))]
    for block, fqns in sorted(blocks.items()):
        names_here = fqns.values()
        mean = size_weighted_mean({f: budgets[f] for f in names_here}, {f: metrics[f]["size"] for f in names_here})
        cells = [f"{budgets[fqns[k]]:>{w}.3f}" if k in fqns else " " * w for k, w in zip(kinds, widths)]
        lines.append(f"{block:>5}  {mean:.3f}  " + "  ".join(cells))
    return lines


def cmd_export(args) -> None:
    """Export a saved run; the export carries the run's recipe with this export step added (runs saved before
    recipes existed have none to carry)."""
    from slimlm.cli.settings import step_config
    from slimlm.steps import export
    from slimlm.recipe import Recipe, dumps, read_recipe
    from slimlm.runs.save import RECIPE

    step, text = step_config("export", args), None
    if (Path(args.run) / RECIPE).is_file():
        recipe = read_recipe(Path(args.run) / RECIPE)
        text = dumps(Recipe(recipe.run, (*recipe.steps, ("export", step))))
    print(json.dumps(export(args.run, step, text, not args.quiet)))


def cmd_eval(args) -> None:
    """Perplexity by default; with --tasks zero-shot accuracy (plus perplexity with --ppl). With --record, a
    run folder's manifest gets each result under metrics.perplexity / metrics.zero_shot, the other key kept."""
    import slimlm
    from slimlm.core.data import check_data
    from slimlm.core.models import model_source
    from slimlm.evaluation.zeroshot import check_tasks, zero_shot
    from slimlm.core.files import MANIFEST, read_manifest
    from slimlm.runs.save import write_manifest

    if args.engine == "llama.cpp":
        return _eval_llama_cpp(args)
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise SlimlmError("--tasks needs at least one task name (e.g. --tasks piqa,arc_easy)")
    if args.limit is not None and args.limit < 1:
        raise SlimlmError("--limit must be a positive number of documents")
    if args.batch_size < 1:
        raise SlimlmError("--batch-size must be at least 1")
    folder = Path(args.model)
    if args.record and not (folder / MANIFEST).is_file():
        raise SlimlmError(f"--record writes into a run folder's {MANIFEST}; {args.model} has none")
    model_source(args.model, args.allow_pickle)  # fail fast on bad names and unreachable data, before loading
    if tasks:
        check_tasks(tasks, args.tasks_dir)
    if not tasks or args.ppl:
        check_data(args.eval_dataset, args.data_dir)
    model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle, cache=not args.no_cache)
    if folder.is_dir():
        slimlm.apply_runtime(model, read_manifest(folder), folder)
    metrics = {}
    if not tasks or args.ppl:
        metrics["perplexity"] = _eval(model, tokenizer, args, args.batch_size)
    if tasks:
        metrics["zero_shot"] = zero_shot(model, tokenizer, tasks, args.limit, args.batch_size, args.device,
                                         args.tasks_dir, args.num_fewshot, progress=not args.quiet)
    if args.record:
        manifest = read_manifest(folder)
        manifest.setdefault("metrics", {}).update(metrics)
        write_manifest(folder, manifest)
    print(printed({"model": args.model, **metrics.get("perplexity", {}),
                   **({"zero_shot": metrics["zero_shot"]["tasks"]} if tasks else {})}))


def _eval_llama_cpp(args) -> None:
    """Perplexity (and KLD from a reference file) of a .gguf file by llama.cpp's llama-perplexity."""
    from slimlm.core.data import OFFLINE_FILES, check_data, data_dir
    from slimlm.evaluation.llama_cpp import llama_perplexity, tool

    if not args.model.endswith(".gguf"):
        raise SlimlmError(f"--engine llama.cpp evaluates a .gguf file; {args.model} is not one (write one with "
                          "slimlm gguf or slimlm export --format gguf)")
    from slimlm.gguf.metadata import check_file

    for path in (args.model, args.kld_reference):
        if path is not None and not Path(path).is_file():
            raise SlimlmError(f"no such file: {path}")
        if path is not None:
            check_file(path)  # llama.cpp's own reason would be lost behind "failed to load model"
    check_data(args.eval_dataset, args.data_dir)
    text = Path(args.eval_dataset)
    if args.eval_dataset in OFFLINE_FILES:
        folder = data_dir(args.data_dir)
        if folder is None:
            raise SlimlmError("--engine llama.cpp reads a local file: pass --data-dir (or set SLIMLM_DATA_DIR) "
                              "or give --eval-dataset a text file")
        text = folder / OFFLINE_FILES[args.eval_dataset]["test"]
    tool("llama-perplexity")  # fails here, with the build command, when it is missing
    kld = None
    if args.kld_reference:
        import tempfile
        kld = Path(tempfile.mkdtemp(prefix="slimlm-kld-")) / "reference.kld"
        llama_perplexity(args.kld_reference, text, args.eval_seqlen, args.eval_windows, args.threads, kld,
                         save_base=True)
    try:
        result = llama_perplexity(args.model, text, args.eval_seqlen, args.eval_windows, args.threads, kld)
    finally:
        if kld is not None:
            kld.unlink(missing_ok=True)
            kld.parent.rmdir()
    print(printed({"model": args.model, "dataset": str(text), **result}))


def cmd_gguf(args) -> None:
    """A one-step recipe (``gguf``), written into the file as ``slimlm.recipe``."""
    from slimlm.core.models import model_source

    recipe = one_step_recipe("gguf", args)  # bad settings first, in a second
    model_source(args.model, args.allow_pickle)
    _execute("gguf", args, recipe)


def _eval(model, tokenizer, args, batch_size: int = 1) -> dict:
    """Test perplexity; unless --quiet, the plan (windows, tokens) and a time estimate go to stderr first."""
    import slimlm
    return slimlm.evaluate(model, tokenizer, args.eval_dataset, args.eval_seqlen, args.eval_windows,
                           args.data_dir, args.device, batch_size, progress=not args.quiet)


def cmd_report(args) -> None:
    from slimlm.report.page import write_report

    out, runs = write_report(args.folders, args.out, args.overwrite)
    print(json.dumps({"out": str(out), "runs": len(runs), "html": str(out / "report.html")}))


def cmd_cache(args) -> None:
    from slimlm.cli.cache import cmd_cache_clear, cmd_cache_list

    (cmd_cache_list if args.action == "list" else cmd_cache_clear)(args)
