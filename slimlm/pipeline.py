"""Running a recipe: check every setting, load the model once, run the steps in order, save the run once, export.

``execute`` is what ``slimlm prune``, ``quantize``, ``shrink``, ``lowrank``, ``analyze``, ``gguf`` and ``run`` all
do (all but ``run`` turn their command line into a one-step recipe, ``cli.commands.one_step_recipe``), so a command
and the replay of the recipe it wrote share one code path and give bit-identical weights on the same machine. Each
step kind is one entry of ``steps.STEPS``: its typed config (``slimlm.config``) and the function that runs it.

Order: every step is checked before the model is loaded (its errors name the step, ``steps[1].quantize: ...``);
the shrink / lowrank / rotate / prune / quantize / eval / analyze steps run in order on the one in-memory model
(or, with ``--offload disk``, on blocks streamed from disk); the run folder (weights, tokenizer, ``slimlm.json``,
``recipe.yaml``) is written once, atomically, after them; export steps then read the saved run.

Manifest: that of the last compression step (each ``eval`` step records its perplexity in the manifest of the
compression step before it). With several compression steps it also lists each step's manifest under ``steps``,
sums their seconds in ``timings.total``, and carries the ``rotation`` of a rotate step, which
``api.apply_runtime`` and the exporters read.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

from slimlm.config import to_mapping
from slimlm.core import distributed
from slimlm.core.result import Result
from slimlm.core.placement import parse as parse_devices, spread_over
from slimlm.errors import SlimlmError
from slimlm.recipe import COMPRESSION, Recipe, RunOptions, check, dumps, relocated
from slimlm.runs.save import RECIPE
from slimlm.steps import STEPS, Context


# ---------------------------------------------------------------- the run folder's name

def _prune_budget(ns, model) -> str:
    """'2of4', '0.5', 'owl-0.7', 'budgets-0.699': the pattern, or the allocation and the global sparsity, which
    with a budgets map or overrides is the parameter-weighted mean of the per-layer targets they give."""
    from slimlm.core.budgets import layer_budgets, size_weighted_mean
    from slimlm.api import DEFAULT_SPARSITY
    from slimlm.core.architectures import linear_fqns
    from slimlm.pruning.spec import parse_pattern

    if parse_pattern(ns.pattern) is not None:
        return ns.pattern.replace(":", "of")
    budgets, overrides = ns.budgets_map(), ns.overrides()
    target = DEFAULT_SPARSITY if ns.sparsity is None else ns.sparsity
    if ns.allocation == "uniform" and (budgets is not None or overrides is not None):
        sizes = {fqn: linear.weight.numel() for fqn, linear in linear_fqns(model).items()}
        target = size_weighted_mean(layer_budgets(sizes, target, budgets, overrides), sizes)
    parts = [name for name, on in ((ns.allocation, ns.allocation != "uniform"), ("budgets", budgets is not None),
                                   ("override", overrides is not None)) if on]
    return "-".join(parts + [f"{round(target, 4):g}"])


def default_out(recipe: Recipe, model) -> Path:
    """runs/<model>-<method>-<budget> of the last prune or quantize step (runs/<model>-rotated without one)."""
    name = recipe.run.model
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem if name.endswith(".gguf") else Path(name).name or name)
    steps = [(kind, ns) for kind, ns in recipe.compression() if kind != "rotate"]
    if not steps:
        return Path("runs") / f"{name}-rotated"
    kind, ns = steps[-1]
    if kind in ("shrink", "lowrank"):
        budget = f"drop{ns.drop_layers}-{ns.score}" if getattr(ns, "drop_layers", None) else \
            f"{ns.method}-{ns.resolved_allocation}-p{ns.params:g}"
        return Path("runs") / f"{name}-{budget}"
    if kind == "prune":
        budget = _prune_budget(ns, model)
    else:
        budget = f"w{ns.avg_bits:g}" if ns.avg_bits else f"w{ns.wbits}" + (f"a{ns.abits}" if ns.abits else "")
        budget += (f"kv{ns.kvbits}" if ns.kvbits else "") + ("-override" if ns.override else "")
        budget += f"-intact-{ns.intact_kv}" if ns.intact_kv else ""
        method = ns.method if ns.transform == "none" else f"{ns.transform}-{ns.method}"
        return Path("runs") / f"{name}-{method}-{budget}"
    return Path("runs") / f"{name}-{ns.method}-{budget}"


# ---------------------------------------------------------------- loading

def _open(recipe: Recipe, options: RunOptions):
    """``(model, tokenizer, stream)``; with --offload disk the model is a meta skeleton whose blocks ``stream``
    reads from its shards (its output folder is set once the run's folder is known)."""
    import slimlm
    from slimlm.runs.offload import load_streamed

    run = recipe.run
    if options.offload is None:
        return (*slimlm.load_model(run.model, run.dtype, options.allow_pickle, cache=not options.no_cache), None)
    return load_streamed(run.model, run.dtype, Path())


def _checkpoint(recipe: Recipe, options: RunOptions, out: Path, stream):
    """The per-block checkpoint in the partial folder beside ``out`` (slimlm.runs.resume): for calibrated runs with
    --resume, and for every --offload disk run (its output shards are streamed into that folder anyway)."""
    from slimlm.pruning.methods import get_method
    from slimlm.runs.resume import Checkpoint, partial_dir, read_progress

    folder = partial_dir(out)
    if folder.exists() and not options.resume:
        raise SlimlmError(f"{folder} holds an interrupted run of {out}; pass --resume to continue it, or delete it")
    if not (options.resume or options.offload):
        return None
    (kind, ns), = recipe.compression()  # _check_order allows one step here
    run = recipe.run
    settings = {"model": run.model, "dtype": run.dtype, "device": run.device, "data_dir": run.data_dir,
                "offload": options.offload, **to_mapping(ns), "budgets_map": ns.budgets_map() if kind == "prune"
                else None}
    if folder.exists():
        read_progress(folder, settings)  # a run with other settings is refused before any work
    calibrated = get_method(ns.method).needs_data if kind == "prune" else ns.method == "gptq"
    if stream is not None:
        return Checkpoint(folder, settings, weights=False)
    return Checkpoint(folder, settings) if calibrated else None


# ---------------------------------------------------------------- the whole recipe

def _run_manifest(recipe: Recipe, manifests: list[dict]) -> dict:
    manifest = dict(manifests[-1])
    if len(manifests) > 1:
        manifest["steps"] = manifests
        manifest["timings"] = {"total": sum(m["timings"]["total"] for m in manifests)}
    rotation = next((m["rotation"] for m in manifests if m["kind"] == "rotate"), None)
    if rotation is not None:
        manifest["rotation"] = rotation
    return manifest | {"model": recipe.run.model, "dtype": recipe.run.dtype}


def _summary(out: Path, manifest: dict) -> dict:
    from slimlm.allocate import holdout

    keys = ("method", "pattern", "sparsity", "wbits", "abits", "storage", "removed_layers", "params_kept")
    summary = {"out": str(out), **{k: manifest[k] for k in keys if k in manifest},
               "seconds": round(manifest["timings"]["total"], 2),
               **holdout.summary(_check_of(manifest))}
    if "perplexity" in manifest.get("metrics", {}):
        measured = manifest["metrics"]["perplexity"]
        summary |= {key: measured[key] for key in ("perplexity", "source_perplexity") if key in measured}
    return summary


def _check_of(manifest: dict) -> dict | None:
    """The allocation check's record: under ``allocation`` in a prune or quantize manifest, ``allocation_check``
    in a shrink or lowrank one (which name their allocation by a string)."""
    allocation = manifest.get("allocation")
    return allocation.get("check") if isinstance(allocation, dict) else manifest.get("allocation_check")


def run_steps(recipe: Recipe, ctx: Context, kinds=("analyze", *COMPRESSION, "eval")):
    """Run the recipe's steps of ``kinds`` in order on ``ctx.model`` (never the file steps, which follow the saved
    run); returns the compression steps' manifests (each with the perplexity of an eval step after it), the
    tensors to save beside the model, and the ``Outcome`` of each analysis and evaluation of the dense model."""
    manifests, tensors, reports, sources = [], {}, [], None
    for kind, c in recipe.steps:
        if kind not in kinds or STEPS[kind].phase != "model":
            continue
        if kind == "eval" and not distributed.is_main():
            continue  # under torchrun the ranks hold the same model: rank 0 measures it
        if kind in COMPRESSION and sources is None:
            sources = _source_evals(recipe, ctx, kinds)
        result = STEPS[kind].fn(ctx, c)
        if isinstance(result, Result):
            manifests.append(result.manifest)
            tensors |= result.tensors
        elif kind == "eval" and manifests:
            source = (sources or {}).get(c)
            manifests[-1].setdefault("metrics", {})["perplexity"] = result | (
                {"source_perplexity": source["perplexity"]} if source else {})
        else:
            reports.append(Outcome(kind, {"model": recipe.run.model, **result} if kind == "eval" else result))
    return manifests, tensors, reports


def _source_evals(recipe: Recipe, ctx: Context, kinds) -> dict:
    """Each evaluation that follows a compression step, measured on the model before that step (the source), on
    the same windows: what the compression cost is the difference. Rank 0 only, as every evaluation; not with
    ``--offload disk``, whose model is not in memory before its blocks stream."""
    if ctx.stream is not None or not distributed.is_main():
        return {}
    kinds_seen, sources = set(), {}
    for kind, c in recipe.steps:
        if kind == "eval" and kinds_seen & set(COMPRESSION) and "eval" in kinds and c not in sources:
            sources[c] = STEPS["eval"].fn(ctx, c)
        kinds_seen.add(kind)
    return sources


def text_of(recipe: Recipe, options: RunOptions) -> str:
    """The recipe and run options as one text (what every rank must agree on)."""
    return dumps(recipe) + repr(replace(options, quiet=False))


def _prepare(recipe: Recipe, options: RunOptions, name_steps: bool):
    """Check everything, then load the model: ``(recipe relocated to its run folder, context)``."""
    from slimlm.runs.offload import check_free_space
    from slimlm.runs.resume import partial_dir
    from slimlm.runs.save import check_output

    check(recipe, options, name_steps)
    if options.device_map:
        parse_devices(options.device_map)  # a bad --device-map fails before the model is loaded
    if distributed.world() > 1 and any(kind == "analyze" for kind, _ in recipe.steps):
        raise SlimlmError("an analyze step runs in one process; run this recipe without torchrun")
    distributed.check_same(text_of(recipe, options), "options")
    model, tokenizer, stream = _open(recipe, options)
    out, checkpoint = None, None
    if recipe.compression():
        out = Path(recipe.run.out or default_out(recipe, model))
        recipe = relocated(recipe, str(out))
        check_output(out, options.overwrite)
        if stream is not None:
            stream = replace(stream, folder=partial_dir(out))
            check_free_space(model, stream)
        checkpoint = _checkpoint(recipe, options, out, stream)
    return recipe, Context(model, tokenizer, recipe.run, options, stream, checkpoint, dumps(recipe), out)


@dataclass(frozen=True)
class Outcome:
    """One thing a recipe produced: a folder or file written, or an evaluation. ``summary`` is what the CLI prints
    (one JSON line); ``manifest``, for the run folder, what it holds."""

    kind: str  # run, analyze, eval, gguf, export
    summary: dict
    manifest: dict | None = None


def execute(recipe: Recipe, options: RunOptions, name_steps: bool = True) -> list[Outcome]:
    """Run ``recipe`` (see the module docstring); returns what it produced, in order; under torchrun only rank 0
    returns anything. ``name_steps``: see ``recipe.check``."""
    from slimlm.runs.offload import save_streamed
    from slimlm.runs.resume import partial_dir
    from slimlm.runs.save import save_run

    recipe, ctx = _prepare(recipe, options, name_steps)
    with spread_over(options.device_map):
        manifests, tensors, results = run_steps(recipe, ctx)
    if not distributed.is_main():
        return []  # rank 0 saves and exports the run that every rank computed
    if ctx.out is not None:
        manifest = _run_manifest(recipe, manifests)
        if ctx.stream is not None:  # the partial folder holds the output shards: complete it and rename it
            save_streamed(ctx.model, ctx.tokenizer, ctx.stream, ctx.out, manifest, tensors, options.overwrite,
                          {RECIPE: ctx.text})
        else:
            save_run(ctx.model.to("cpu"), ctx.tokenizer, ctx.out, manifest, options.overwrite, tensors,
                     {RECIPE: ctx.text})
            shutil.rmtree(partial_dir(ctx.out), ignore_errors=True)  # the finished run's checkpoint
        results.append(Outcome("run", _summary(ctx.out, manifest), manifest))
    for kind, c in recipe.steps:  # after the run is saved: a gguf step moves the weights onto the file's grids
        if STEPS[kind].phase == "file":
            results.append(Outcome(kind, STEPS[kind].fn(ctx, c)))
    return results
