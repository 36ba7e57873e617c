"""Running a recipe: check every setting, load the model once, run the steps in order, save the run once, export.

``execute`` is what ``slimlm prune``, ``quantize``, ``shrink``, ``lowrank``, ``analyze`` and ``run`` all do (all
but ``run`` turn their command line into a one-step recipe, ``recipe.from_args``), so a command and the replay of
the recipe it wrote share one code path and give bit-identical weights on the same machine.

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

import json
import re
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from slimlm.core import distributed
from slimlm.core.placement import parse as parse_devices, spread_over
from slimlm.errors import SlimlmError
from slimlm.recipe import (COMPRESSION, Recipe, RunOptions, allocation_options, budgets_map, check, dumps, grid_group,
                           override_map, relocated, runtime_options)
from slimlm.runs.save import RECIPE


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
    budgets, overrides = budgets_map(ns), override_map(ns)
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
            f"{ns.method}-{shrink_allocation(ns)}-p{ns.params:g}"
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


# ---------------------------------------------------------------- the steps

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
                "offload": options.offload, **vars(ns), "budgets_map": budgets_map(ns) if kind == "prune" else None}
    if folder.exists():
        read_progress(folder, settings)  # a run with other settings is refused before any work
    calibrated = get_method(ns.method).needs_data if kind == "prune" else ns.method == "gptq"
    if stream is not None:
        return Checkpoint(folder, settings, weights=False)
    return Checkpoint(folder, settings) if calibrated else None


def _rotate(model, ns) -> dict:
    from slimlm.transforms.rotate import rotate_
    from slimlm.runs.save import versions

    start = time.perf_counter()
    rotation = rotate_(model, seed=ns.seed, online_down=not ns.no_online_down)
    return {"kind": "rotate", "method": "quarot", "seed": ns.seed, "rotation": rotation,
            "timings": {"total": time.perf_counter() - start}, "versions": versions()}


def _prune(model, tokenizer, run, ns, progress, stream, checkpoint):
    import slimlm

    result = slimlm.prune(
        model, tokenizer, method=ns.method, sparsity=ns.sparsity, pattern=ns.pattern, group=ns.group,
        permute=ns.permute, calib_source=ns.calib, nsamples=ns.nsamples, seqlen=ns.seqlen,
        sampling=ns.calib_sampling, seed=ns.seed, data_dir=run.data_dir, device=run.device,
        batch_size=ns.batch_size, ria_alpha=ns.ria_alpha, allocation=ns.allocation,
        allocation_options=allocation_options(ns), owl_m=ns.owl_m, budgets=budgets_map(ns),
        overrides=override_map(ns), wbits=ns.wbits, group_size=grid_group(ns), symmetric=not ns.asym,
        scale_dtype=ns.scale_dtype, progress=progress, io=stream, checkpoint=checkpoint)
    if ns.budgets:
        result.manifest["allocation"]["file"] = ns.budgets
    return result


def _quantize(model, tokenizer, run, ns, progress, stream, checkpoint):
    import slimlm

    return slimlm.quantize(
        model, tokenizer, method=ns.method, wbits=ns.wbits, group_size=grid_group(ns), symmetric=not ns.asym,
        scale_dtype=ns.scale_dtype, act_order=ns.act_order, abits=ns.abits, act_clip=ns.act_clip,
        rotate=ns.rotate, **runtime_options(ns), avg_bits=ns.avg_bits, allocation=ns.allocation,
        allocation_options=allocation_options(ns), overrides=override_map(ns), calib_source=ns.calib,
        nsamples=ns.nsamples, seqlen=ns.seqlen, sampling=ns.calib_sampling, seed=ns.seed, data_dir=run.data_dir,
        device=run.device, batch_size=ns.batch_size, progress=progress, io=stream, checkpoint=checkpoint,
        sequential=not ns.one_pass, epochs=ns.epochs, calibrate_kv=ns.calibrate_kv)


def shrink_allocation(ns) -> str:
    """A shrink or lowrank step's allocation, ``auto`` resolved to its method's own."""
    if ns.allocation != "auto":
        return ns.allocation
    return {"svdllm": "uniform", "slicegpt": "uniform"}.get(ns.method, ns.method)


def _lowrank(model, tokenizer, run, ns, progress):
    from slimlm.structured.factorize import lowrank

    return lowrank(model, tokenizer, params=ns.params, method=ns.method, allocation=shrink_allocation(ns),
                   merge=ns.merge, owl_m=ns.owl_m, calib_source=ns.calib, nsamples=ns.nsamples, seqlen=ns.seqlen,
                   sampling=ns.calib_sampling, seed=ns.seed, data_dir=run.data_dir, device=run.device,
                   batch_size=ns.batch_size, progress=progress)


def _shrink(model, tokenizer, run, ns, progress):
    from slimlm.structured.shrink import shrink

    return shrink(model, tokenizer, drop_layers=ns.drop_layers, score=ns.score, iterative=ns.iterative,
                  params=ns.params, method=ns.method, allocation=shrink_allocation(ns),
                  compensate=not ns.no_compensate, owl_m=ns.owl_m, calib_source=ns.calib, nsamples=ns.nsamples, seqlen=ns.seqlen,
                  sampling=ns.calib_sampling, seed=ns.seed, data_dir=run.data_dir, device=run.device,
                  batch_size=ns.batch_size, progress=progress)


def _eval(model, tokenizer, run, ns, progress) -> dict:
    import slimlm

    return slimlm.evaluate(model, tokenizer, ns.eval_dataset, ns.eval_seqlen, ns.eval_windows, run.data_dir,
                           run.device, progress=progress)


def _analyze(model, tokenizer, run, ns, options: RunOptions, out, recipe_text: str) -> None:
    """An analysis folder (metrics, plots, manifest with per-part timings, and recipe) of the model as it is at
    this step; unless quiet, a one-line timing summary on stderr."""
    import slimlm
    from slimlm.allocate import parse_target
    from slimlm.core.timing import timed
    from slimlm.runs.save import atomic_dir, versions, write_manifest

    unit, target = parse_target(ns.target)
    start, timings = time.perf_counter(), {}
    with timed(timings, "data"):
        calib = None if ns.no_calib else slimlm.calibration(tokenizer, ns.calib, ns.nsamples, ns.seqlen,
                                                            ns.calib_sampling, ns.seed, run.data_dir)
    metrics = slimlm.analyze(model, calib, ns.owl_m, device=run.device, batch_size=ns.batch_size,
                             progress=not options.quiet, fisher=not ns.no_fisher, fisher_method=ns.fisher_for,
                             timings=timings)
    with atomic_dir(out, options.overwrite) as tmp:
        with timed(timings, "plots"):
            write_analysis(model, metrics, tmp, unit, target, ns.esd_layer)
        timings["total"] = time.perf_counter() - start  # data, analysis and plots (the model was loaded before)
        write_manifest(tmp, {"kind": "analysis", "model": run.model, "owl_m": ns.owl_m, "versions": versions(),
                             "fisher_for": None if calib is None or ns.no_fisher else ns.fisher_for,
                             "calibration": None if calib is None else {
                                 "source": ns.calib, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                                 "sampling": ns.calib_sampling, "seed": ns.seed}, "timings": timings})
        (tmp / RECIPE).write_text(recipe_text)
    if not options.quiet:
        print(_timing_summary("analyze", timings), file=sys.stderr)
    print(json.dumps({"out": str(out), "layers": len(metrics), "seconds": round(timings["total"], 2)}))


def _gguf(model, tokenizer, run, ns, recipe_text: str, progress: bool) -> dict:
    from slimlm.gguf.quantize import to_gguf

    path = to_gguf(model, tokenizer, ns.out, ns.type, ns.method, ns.imatrix, calib_source=ns.calib,
                   nsamples=ns.nsamples, seqlen=ns.seqlen, sampling=ns.calib_sampling, seed=ns.seed,
                   data_dir=run.data_dir, act_order=ns.act_order, batch_size=ns.batch_size, size=ns.size,
                   source=run.model, recipe=recipe_text, progress=progress)
    return {"out": str(path), "bytes": path.stat().st_size}


def _timing_summary(command: str, timings: dict[str, float]) -> str:
    """One line for stderr: the total, then every part in the order it ran, e.g.
    ``analyze took 51.2 s: data 1.2 s, spectra 3.1 s, ...``."""
    parts = ", ".join(f"{key.replace('_', ' ')} {seconds:.1f} s" for key, seconds in timings.items()
                      if key != "total")
    return f"{command} took {timings['total']:.1f} s: {parts}"


def write_analysis(model, metrics: dict, folder: Path, unit: str, target: float, esd_layer=None) -> None:
    """metrics.json / metrics.csv, and the alpha-depth, ESD and budget plots."""
    import csv

    from slimlm.allocate import ALLOCATOR_METRIC, allocate_from_metrics
    from slimlm.analysis.spectra import batched_esd
    from slimlm.core.architectures import linear_fqns
    from slimlm.report import plots

    records = list(metrics.values())
    (folder / "metrics.json").write_text(json.dumps(records, indent=1) + "\n")
    columns = [k for k in records[0] if k not in ("errors", "fisher")]  # tables stay in metrics.json
    with open(folder / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    plots.alpha_depth(metrics, folder / "alpha_depth.png")
    name = esd_layer or records[0]["name"]
    if name not in metrics:
        raise SlimlmError(f"--esd-layer {name} is not a linear inside the decoder blocks")
    # batched_esd: one matrix on one intra-op thread (2 threads took 6-13 s on a shared CPU, 1 thread 0.09 s)
    plots.esd(batched_esd([linear_fqns(model)[name].weight.detach()])[0], metrics[name]["alpha"],
              metrics[name]["xmin"], name, folder / "esd.png")
    usable = [a for a, key in ALLOCATOR_METRIC.items() if key is None or key in records[0]]
    if unit != "sparsity":
        usable = [a for a in usable if a not in ("errortable", "fisher")]
    plots.budgets({a: allocate_from_metrics(metrics, a, target, unit) for a in usable},
                  folder / "budgets.png", unit)


def export(run_dir, ns, recipe_text: str | None, progress: bool = True) -> dict:
    """Write the saved run ``run_dir`` as an export step's settings ``ns`` say; returns its summary."""
    from slimlm.formats.compressed_tensors import export_compressed_tensors
    from slimlm.gguf.export import export_gguf
    from slimlm.formats.sparse import export_sparse

    extra = {}
    if ns.format == "sparse":
        export_sparse(run_dir, ns.out, recipe_text, progress)
    elif ns.format == "gguf":
        written = export_gguf(run_dir, ns.out, ns.gguf_type, exact=not ns.inexact, recipe=recipe_text,
                              progress=progress)
        extra = {"file": str(written), "max_abs_deviation": _gguf_deviation(written)}
    else:
        export_compressed_tensors(run_dir, ns.out, exact=not ns.inexact, recipe=recipe_text, progress=progress)
    out = Path(ns.out)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    return {"out": ns.out, "format": ns.format, "bytes": size, **extra}


def _gguf_deviation(path: Path) -> float:
    from slimlm.gguf.metadata import read_metadata
    return json.loads(read_metadata(path, ["slimlm.export"])["slimlm.export"])["max_abs_deviation"]


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
    keys = ("method", "pattern", "sparsity", "wbits", "abits", "storage", "removed_layers", "params_kept")
    summary = {"out": str(out), **{k: manifest[k] for k in keys if k in manifest},
               "seconds": round(manifest["timings"]["total"], 2)}
    if "perplexity" in manifest.get("metrics", {}):
        summary["perplexity"] = manifest["metrics"]["perplexity"]["perplexity"]
    return summary


def run_steps(recipe: Recipe, model, tokenizer, options: RunOptions, kinds=("analyze", *COMPRESSION, "eval"),
              stream=None, checkpoint=None, text: str | None = None) -> tuple[list[dict], dict]:
    """Run the recipe's steps of ``kinds`` in order on the loaded model (never its exports, which read a saved run);
    returns the compression steps' manifests, each with the perplexity of an eval step after it, and the tensors
    to save beside the model. ``text``: the recipe written into analysis folders (default ``dumps(recipe)``)."""
    progress, manifests, tensors = not options.quiet, [], {}
    for kind, ns in recipe.steps:
        if kind not in kinds:
            continue
        if kind == "rotate":
            manifests.append(_rotate(model, ns))
        elif kind in ("prune", "quantize"):
            result = (_prune if kind == "prune" else _quantize)(model, tokenizer, recipe.run, ns, progress,
                                                                stream, checkpoint)
            manifests.append(result.manifest)
            tensors |= result.tensors
        elif kind in ("shrink", "lowrank"):
            step = _shrink if kind == "shrink" else _lowrank
            manifests.append(step(model, tokenizer, recipe.run, ns, progress).manifest)
        elif kind == "eval" and not distributed.is_main():
            continue  # under torchrun the ranks hold the same model: rank 0 measures it
        elif kind == "eval":
            perplexity = _eval(model, tokenizer, recipe.run, ns, progress)
            if manifests:
                manifests[-1].setdefault("metrics", {})["perplexity"] = perplexity
            else:
                print(json.dumps({"model": recipe.run.model, **perplexity}))
        elif kind == "analyze":
            _analyze(model, tokenizer, recipe.run, ns, options, Path(ns.out or recipe.run.out),
                     text or dumps(recipe))
    return manifests, tensors


def text_of(recipe: Recipe, options: RunOptions) -> str:
    """The recipe and run options as one text (what every rank must agree on)."""
    return dumps(recipe) + repr(replace(options, quiet=False))


def execute(recipe: Recipe, options: RunOptions, name_steps: bool = True) -> None:
    """Run ``recipe`` (see the module docstring), printing one JSON line per folder written or evaluation;
    ``name_steps``: see ``recipe.check``."""
    from slimlm.runs.offload import check_free_space, save_streamed
    from slimlm.runs.resume import partial_dir
    from slimlm.runs.save import check_output, save_run

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
    text = dumps(recipe)
    with spread_over(options.device_map):
        manifests, tensors = run_steps(recipe, model, tokenizer, options, stream=stream, checkpoint=checkpoint,
                                       text=text)
    if not distributed.is_main():
        return  # rank 0 saves, prints and exports the run that every rank computed
    if out is not None:
        manifest = _run_manifest(recipe, manifests)
        if stream is not None:  # the partial folder holds the output shards: complete it and rename it
            save_streamed(model, tokenizer, stream, out, manifest, tensors, options.overwrite, {RECIPE: text})
        else:
            save_run(model.to("cpu"), tokenizer, out, manifest, options.overwrite, tensors, {RECIPE: text})
            shutil.rmtree(partial_dir(out), ignore_errors=True)  # the finished run's checkpoint
        print(json.dumps(_summary(out, manifest)))
    for kind, ns in recipe.steps:  # after the run is saved: a gguf step moves the weights onto the file's grids
        if kind == "gguf":
            print(json.dumps(_gguf(model, tokenizer, recipe.run, ns, text, not options.quiet)))
        elif kind == "export":
            print(json.dumps(export(out, ns, text, not options.quiet)))
