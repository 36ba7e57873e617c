"""What each ``slimlm`` subcommand does: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import json
from pathlib import Path

from slimlm.errors import SlimlmError, read_json


def _execute(kind: str, args) -> None:
    """A ``prune``/``quantize``/``analyze`` command line is a one-step recipe (plus ``eval`` for --eval): the
    command and ``slimlm run`` of the recipe it writes share one code path."""
    from slimlm.pipeline import execute
    from slimlm.recipe import RunOptions, from_args

    execute(from_args(kind, args), RunOptions.from_args(args), name_steps=False)


def cmd_prune(args) -> None:
    _execute("prune", args)


def cmd_quantize(args) -> None:
    _execute("quantize", args)


def cmd_analyze(args) -> None:
    _execute("analyze", args)


def cmd_run(args) -> None:
    from slimlm.pipeline import execute
    from slimlm.recipe import RunOptions, read_recipe, relocated

    recipe = read_recipe(args.recipe)
    execute(relocated(recipe, args.out) if args.out else recipe, RunOptions.from_args(args))


def cmd_allocate(args) -> None:
    from slimlm.allocate import allocate_from_metrics, parse_target
    from slimlm.recipe import allocation_options
    from slimlm.report import plots

    unit, target = parse_target(args.target)
    records = read_json(Path(args.analysis) / "metrics.json")
    metrics = {r["name"]: r for r in records}
    budgets = allocate_from_metrics(metrics, args.allocation, target, unit, **allocation_options(args))
    if args.out:
        Path(args.out).write_text(json.dumps(budgets, indent=1) + "\n")
        plots.budgets({args.allocation: budgets}, Path(args.out).with_suffix(".png"), unit)
    sizes = {n: metrics[n]["size"] for n in budgets}
    mean = sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes.values())
    print(json.dumps({"allocation": args.allocation, unit: mean, "min": min(budgets.values()),
                      "max": max(budgets.values()), "budgets": budgets}))


def cmd_export(args) -> None:
    """Export a saved run; the export carries the run's recipe with this export step added (runs saved before
    recipes existed have none to carry)."""
    from slimlm.pipeline import export
    from slimlm.recipe import Recipe, dumps, read_recipe, settings_from
    from slimlm.runs.save import RECIPE

    step, text = settings_from("export", args), None
    if (Path(args.run) / RECIPE).is_file():
        recipe = read_recipe(Path(args.run) / RECIPE)
        text = dumps(Recipe(recipe.run, [*recipe.steps, ("export", step)]))
    print(json.dumps(export(args.run, step, text)))


def cmd_eval(args) -> None:
    """Perplexity by default; with --tasks zero-shot accuracy (plus perplexity with --ppl). A run folder's
    manifest gets each result under metrics.perplexity / metrics.zero_shot, the other key kept."""
    import slimlm
    from slimlm.evaluation.zeroshot import check_tasks, zero_shot
    from slimlm.runs.save import MANIFEST, read_manifest, write_manifest

    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if args.tasks is not None and not tasks:
        raise SlimlmError("--tasks needs at least one task name (e.g. --tasks piqa,arc_easy)")
    if args.limit is not None and args.limit < 1:
        raise SlimlmError("--limit must be a positive number of documents")
    if tasks:
        check_tasks(tasks, args.tasks_dir)  # fail fast on unknown names, before loading the model
    model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle)
    slimlm.apply_runtime(model, read_manifest(args.model) if Path(args.model).is_dir() else {})
    metrics = {}
    if not tasks or args.ppl:
        metrics["perplexity"] = slimlm.evaluate(model, tokenizer, args.eval_dataset, args.eval_seqlen,
                                                args.eval_windows, args.data_dir, args.device,
                                                progress=not args.quiet)
    if tasks:
        metrics["zero_shot"] = zero_shot(model, tokenizer, tasks, args.limit, args.batch_size, args.device,
                                         args.tasks_dir, args.num_fewshot)
    folder = Path(args.model)
    if (folder / MANIFEST).is_file():  # a slimlm run: record the results in its manifest
        manifest = read_manifest(folder)
        manifest.setdefault("metrics", {}).update(metrics)
        write_manifest(folder, manifest)
    print(json.dumps({"model": args.model, **metrics.get("perplexity", {}),
                      **({"zero_shot": metrics["zero_shot"]["tasks"]} if tasks else {})}))


def cmd_report(args) -> None:
    from slimlm.report.page import write_report

    out, runs = write_report(args.folders, args.out, args.overwrite)
    print(json.dumps({"out": str(out), "runs": len(runs), "html": str(out / "report.html")}))
