"""What each ``slimlm`` subcommand does: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

from slimlm.errors import SlimlmError, read_json


def _allocation_options(args) -> dict:
    return {"owl": {"lamda": args.owl_lambda}, "alphapruning": {"epsilon": args.alpha_epsilon}}.get(
        args.allocation, {})


def _group(args) -> int | None:
    return None if args.group_size in (-1, 0) else args.group_size


def _default_out(args, budget: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(args.model).stem if args.model.endswith(".gguf")
                  else Path(args.model).name or args.model)
    return Path("runs") / f"{name}-{args.method}-{budget}"


# options that do not change the computed weights: a resumed run may differ from the first in these
_NOT_SETTINGS = {"func", "out", "overwrite", "resume", "quiet", "allow_pickle", "eval", "eval_dataset",
                 "eval_seqlen", "eval_windows"}


def _open_run(args, out: Path, calibrated: bool, budgets: dict | None = None):
    """``(model, tokenizer, stream, checkpoint)``: the model (a meta skeleton whose blocks stream from disk
    with --offload disk) and the per-block checkpoint kept in the hidden partial folder beside ``out`` (see
    slimlm.runs.resume): for calibrated runs with --resume, and for every --offload disk run (its output shards
    are streamed into that folder anyway, so only the small activations are extra)."""
    import slimlm
    from slimlm.runs.offload import check_free_space, load_streamed
    from slimlm.runs.resume import Checkpoint, partial_dir, read_progress

    folder = partial_dir(out)
    settings = {k: v for k, v in sorted(vars(args).items()) if k not in _NOT_SETTINGS} | {"budgets_map": budgets}
    if folder.exists() and not args.resume:
        raise SlimlmError(f"{folder} holds an interrupted run of {out}; pass --resume to continue it, or delete it")
    if folder.exists():
        read_progress(folder, settings)  # a run with other settings is refused before any work
    if args.offload is None:
        model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle)
        return model, tokenizer, None, Checkpoint(folder, settings) if calibrated and args.resume else None
    if args.eval:
        raise SlimlmError("--eval needs the whole model in memory; evaluate the saved run with `slimlm eval`")
    model, tokenizer, stream = load_streamed(args.model, args.dtype, folder)
    check_free_space(model, stream)
    return model, tokenizer, stream, Checkpoint(folder, settings, weights=False)


def _finish(model, tokenizer, out, result, args, stream=None) -> None:
    """Optional evaluation, the atomic save, and a one-line JSON summary."""
    import slimlm
    from slimlm.runs.offload import save_streamed
    from slimlm.runs.resume import partial_dir

    result.manifest["model"] = args.model
    result.manifest["dtype"] = args.dtype
    if args.eval:
        result.manifest["metrics"] = {"perplexity": _eval(model, tokenizer, args)}
    if stream is not None:  # the partial folder holds the output shards: complete it and rename it
        save_streamed(model, tokenizer, stream, out, result.manifest, result.tensors, args.overwrite)
    else:
        slimlm.save(model.to("cpu"), tokenizer, out, result, args.overwrite)
        shutil.rmtree(partial_dir(out), ignore_errors=True)  # the finished run's checkpoint
    keys = ("method", "pattern", "sparsity", "wbits", "abits", "storage")
    summary = {k: result.manifest[k] for k in keys if k in result.manifest}
    summary["seconds"] = round(result.manifest["timings"]["total"], 2)
    if args.eval:
        summary["perplexity"] = result.manifest["metrics"]["perplexity"]["perplexity"]
    print(json.dumps({"out": str(out), **summary}))


def _eval(model, tokenizer, args) -> dict:
    import slimlm
    return slimlm.evaluate(model, tokenizer, args.eval_dataset, args.eval_seqlen, args.eval_windows,
                           args.data_dir, args.device, progress=not args.quiet)


def cmd_prune(args) -> None:
    import slimlm
    from slimlm.allocate import ALLOCATORS
    from slimlm.core.data import check_source, data_dir
    from slimlm.pruning.methods import get_method
    from slimlm.pruning.spec import check_sparsity, parse_pattern
    from slimlm.runs.save import check_output

    get_method(args.method), parse_pattern(args.pattern), check_sparsity(args.sparsity)  # fail fast
    check_source(args.calib), check_source(args.eval_dataset), data_dir(args.data_dir)
    budgets = read_json(args.budgets) if args.budgets else None
    if args.allocation not in ALLOCATORS:
        raise SlimlmError(f"unknown allocation '{args.allocation}'; choose one of {', '.join(ALLOCATORS)}")
    budget = args.pattern.replace(":", "of") if args.pattern != "unstructured" else f"{args.sparsity:g}"
    out = check_output(args.out or _default_out(args, budget), args.overwrite)
    model, tokenizer, stream, checkpoint = _open_run(args, out, get_method(args.method).needs_data, budgets)
    result = slimlm.prune(
        model, tokenizer, method=args.method, sparsity=args.sparsity, pattern=args.pattern,
        group=args.group, permute=args.permute, calib_source=args.calib, nsamples=args.nsamples,
        seqlen=args.seqlen, sampling=args.calib_sampling, seed=args.seed, data_dir=args.data_dir,
        device=args.device, batch_size=args.batch_size, ria_alpha=args.ria_alpha,
        allocation=args.allocation, allocation_options=_allocation_options(args), owl_m=args.owl_m,
        budgets=budgets, wbits=args.wbits, group_size=_group(args), symmetric=not args.asym,
        scale_dtype=args.scale_dtype,
        progress=not args.quiet, io=stream, checkpoint=checkpoint)
    _finish(model, tokenizer, out, result, args, stream)


def cmd_quantize(args) -> None:
    import slimlm
    from slimlm.allocate import ALLOCATORS
    from slimlm.core.data import check_source, data_dir
    from slimlm.quant.grids import QuantGrid
    from slimlm.runs.save import check_output

    QuantGrid(args.wbits, not args.asym, _group(args), scale_dtype=args.scale_dtype)  # fail fast on bad grids
    if args.abits is not None:
        QuantGrid(args.abits, True, None, args.act_clip)
    check_source(args.calib), check_source(args.eval_dataset), data_dir(args.data_dir)
    if args.allocation not in ALLOCATORS:
        raise SlimlmError(f"unknown allocation '{args.allocation}'; choose one of {', '.join(ALLOCATORS)}")
    budget = f"w{args.avg_bits:g}" if args.avg_bits else f"w{args.wbits}" + (f"a{args.abits}" if args.abits else "")
    out = check_output(args.out or _default_out(args, budget), args.overwrite)
    model, tokenizer, stream, checkpoint = _open_run(args, out, args.method == "gptq")
    result = slimlm.quantize(
        model, tokenizer, method=args.method, wbits=args.wbits, group_size=_group(args),
        symmetric=not args.asym, scale_dtype=args.scale_dtype, act_order=args.act_order, abits=args.abits,
        act_clip=args.act_clip, rotate=args.rotate, avg_bits=args.avg_bits, allocation=args.allocation,
        allocation_options=_allocation_options(args), calib_source=args.calib, nsamples=args.nsamples,
        seqlen=args.seqlen, sampling=args.calib_sampling, seed=args.seed, data_dir=args.data_dir,
        device=args.device, batch_size=args.batch_size, progress=not args.quiet, io=stream,
        checkpoint=checkpoint, sequential=not args.one_pass)
    _finish(model, tokenizer, out, result, args, stream)


def cmd_analyze(args) -> None:
    import slimlm
    from slimlm.allocate import parse_target
    from slimlm.core.data import check_source
    from slimlm.core.timing import timed
    from slimlm.runs.save import atomic_dir, check_output, versions, write_manifest

    check_output(args.out, args.overwrite), check_source(args.calib)
    unit, target = parse_target(args.target)
    model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle)
    start, timings = time.perf_counter(), {}
    with timed(timings, "data"):
        calib = None if args.no_calib else slimlm.calibration(
            tokenizer, args.calib, args.nsamples, args.seqlen, args.calib_sampling, args.seed, args.data_dir)
    metrics = slimlm.analyze(model, calib, args.owl_m, device=args.device, batch_size=args.batch_size,
                             progress=not args.quiet, fisher=not args.no_fisher, fisher_method=args.fisher_for,
                             timings=timings)
    with atomic_dir(args.out, args.overwrite) as tmp:
        with timed(timings, "plots"):
            write_analysis(model, metrics, tmp, unit, target, args.esd_layer)
        timings["total"] = time.perf_counter() - start  # data, analysis and plots (the model was loaded before)
        write_manifest(tmp, {"kind": "analysis", "model": args.model, "owl_m": args.owl_m, "versions": versions(),
                             "fisher_for": None if calib is None or args.no_fisher else args.fisher_for,
                             "calibration": None if calib is None else {
                                 "source": args.calib, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                                 "sampling": args.calib_sampling, "seed": args.seed}, "timings": timings})
    if not args.quiet:
        print(_timing_summary("analyze", timings), file=sys.stderr)
    print(json.dumps({"out": args.out, "layers": len(metrics), "seconds": round(timings["total"], 2)}))


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
    plots.esd(batched_esd([linear_fqns(model)[name].weight.detach()])[0], metrics[name]["alpha"],
              metrics[name]["xmin"], name, folder / "esd.png")
    usable = [a for a, key in ALLOCATOR_METRIC.items() if key is None or key in records[0]]
    if unit != "sparsity":
        usable = [a for a in usable if a not in ("errortable", "fisher")]
    plots.budgets({a: allocate_from_metrics(metrics, a, target, unit) for a in usable},
                  folder / "budgets.png", unit)


def cmd_allocate(args) -> None:
    from slimlm.allocate import allocate_from_metrics, parse_target
    from slimlm.report import plots

    unit, target = parse_target(args.target)
    records = read_json(Path(args.analysis) / "metrics.json")
    metrics = {r["name"]: r for r in records}
    budgets = allocate_from_metrics(metrics, args.allocation, target, unit, **_allocation_options(args))
    if args.out:
        Path(args.out).write_text(json.dumps(budgets, indent=1) + "\n")
        plots.budgets({args.allocation: budgets}, Path(args.out).with_suffix(".png"), unit)
    sizes = {n: metrics[n]["size"] for n in budgets}
    mean = sum(budgets[n] * sizes[n] for n in budgets) / sum(sizes.values())
    print(json.dumps({"allocation": args.allocation, unit: mean, "min": min(budgets.values()),
                      "max": max(budgets.values()), "budgets": budgets}))


def cmd_export(args) -> None:
    from slimlm.formats.compressed_tensors import export_compressed_tensors
    from slimlm.formats.gguf import export_gguf
    from slimlm.formats.sparse import export_sparse

    extra, progress = {}, not args.quiet
    if args.format == "sparse":
        export_sparse(args.run, args.out, progress)
    elif args.format == "gguf":
        written = export_gguf(args.run, args.out, args.gguf_type, exact=not args.inexact, progress=progress)
        extra = {"file": str(written), "max_abs_deviation": _gguf_deviation(written)}
    else:
        export_compressed_tensors(args.run, args.out, exact=not args.inexact, progress=progress)
    out = Path(args.out)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": args.out, "format": args.format, "bytes": size, **extra}))


def _gguf_deviation(path: Path) -> float:
    from slimlm.formats.gguf_metadata import read_metadata
    return json.loads(read_metadata(path, ["slimlm.export"])["slimlm.export"])["max_abs_deviation"]


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
        metrics["perplexity"] = _eval(model, tokenizer, args)
    if tasks:
        metrics["zero_shot"] = zero_shot(model, tokenizer, tasks, args.limit, args.batch_size, args.device,
                                         args.tasks_dir, args.num_fewshot, progress=not args.quiet)
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
