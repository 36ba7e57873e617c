"""``slimlm`` command line: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import shutil
import sys
from pathlib import Path

from safetensors import SafetensorError

from slimlm.errors import SlimlmError, read_json


def _add_model_args(p):
    p.add_argument("model", help="built-in alias (smollm2-135m), HF folder, .gguf file, or hub id")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="cpu", help="compute device (cpu, cuda, cuda:1); the model "
                   "stays on the CPU and each block visits the device in turn")
    p.add_argument("--data-dir", help="offline data folder (wikitext2/test.raw, wikitext2/valid.tokens); "
                   "default: $SLIMLM_DATA_DIR, else the datasets library")
    p.add_argument("--allow-pickle", action="store_true", help="allow loading pickled (.bin) weights")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_eval_args(p):
    p.add_argument("--eval-dataset", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--eval-seqlen", type=int, default=2048)
    p.add_argument("--eval-windows", type=int, help="limit to the first N windows")


def _add_calib_args(p, nsamples=128, seqlen=2048):
    p.add_argument("--calib", default="wikitext2", help="wikitext2, c4, or a text file")
    p.add_argument("--nsamples", type=int, default=nsamples)
    p.add_argument("--seqlen", type=int, default=seqlen)
    p.add_argument("--calib-sampling", default="random", choices=["random", "first"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, help="calibration windows per forward (default 2048 tokens)")
    p.add_argument("--owl-m", type=float, default=5.0, help="OWL outlier threshold M (x layer mean)")


def _add_allocation_args(p):
    p.add_argument("--allocation", default="uniform", help="uniform, owl, alphapruning, errortable, fisher (ours)")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL: budgets span target +- lambda")
    p.add_argument("--alpha-epsilon", type=float, default=0.2, help="AlphaPruning: ratios span 1 +- epsilon")


def _add_grid_args(p):
    p.add_argument("--group-size", type=int, default=128, help="quantization group (-1: per output channel)")
    p.add_argument("--asym", action="store_true", help="asymmetric grid with zero points (default symmetric)")
    p.add_argument("--scale-dtype", choices=["float16"], help="round scales to float16 (exact GGUF Q4_0/Q4_1/Q8_0 "
                   "export; default float32)")


def _add_run_args(p):
    p.add_argument("--offload", choices=["disk"], help="disk: keep the model on disk and stream one block at a "
                   "time from its safetensors shards into the output shards (memory about one block, any size)")
    p.add_argument("--resume", action="store_true", help="checkpoint every block in .OUT.partial beside --out "
                   "(always done with --offload disk) and continue an interrupted run from its last finished "
                   "block (same weights as an uninterrupted run)")


def _allocation_options(args) -> dict:
    return {"owl": {"lamda": args.owl_lambda}, "alphapruning": {"epsilon": args.alpha_epsilon}}.get(
        args.allocation, {})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimlm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prune", help="prune a model block by block on calibration data")
    _add_model_args(p)
    p.add_argument("--method", default="wanda", help="magnitude, wanda, sparsegpt, ria")
    p.add_argument("--sparsity", type=float, default=0.5, help="fraction of zeros per layer, in [0, 1)")
    p.add_argument("--pattern", default="unstructured", help="unstructured or N:M (keep N of every M)")
    p.add_argument("--group", choices=["row", "matrix"], help="comparison group (default: the paper's)")
    p.add_argument("--permute", action="store_true", help="channel permutation before N:M (RIA)")
    p.add_argument("--ria-alpha", type=float, default=0.5, help="RIA activation exponent")
    _add_calib_args(p)
    _add_allocation_args(p)
    p.add_argument("--budgets", help="JSON file FQN -> sparsity (from `slimlm allocate --out`)")
    p.add_argument("--wbits", type=int, help="also quantize the kept weights (joint sparse + quantized)")
    _add_grid_args(p)
    p.add_argument("--out", help="output folder (default runs/<model>-<method>-<budget>)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_run_args(p)
    p.add_argument("--eval", action="store_true", help="measure test perplexity after pruning")
    _add_eval_args(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("quantize", help="quantize weights (RTN, GPTQ), optionally rotated and W4A4")
    _add_model_args(p)
    p.add_argument("--method", default="gptq", choices=["rtn", "gptq"])
    p.add_argument("--wbits", type=int, default=4)
    _add_grid_args(p)
    p.add_argument("--act-order", action="store_true", help="GPTQ: columns by decreasing Hessian diagonal")
    p.add_argument("--one-pass", action="store_true",
                   help="GPTQ: calibrate every block on the dense model's activations (one pass, ~half the time)")
    p.add_argument("--abits", type=int, help="simulated per-token activation quantization (e.g. 4 for W4A4)")
    p.add_argument("--act-clip", type=float, default=1.0, help="activation clipping ratio")
    p.add_argument("--rotate", default="none", choices=["none", "hadamard"], help="QuaRot rotation first")
    p.add_argument("--avg-bits", type=float, help="mixed precision: per-layer bits with this weighted mean")
    _add_calib_args(p)
    _add_allocation_args(p)
    p.add_argument("--out", help="output folder (default runs/<model>-<method>-w<bits>)")
    p.add_argument("--overwrite", action="store_true")
    _add_run_args(p)
    p.add_argument("--eval", action="store_true", help="measure test perplexity after quantizing")
    _add_eval_args(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("analyze", help="per-layer weight spectra and activation metrics, with plots")
    _add_model_args(p)
    _add_calib_args(p, nsamples=32, seqlen=512)
    p.add_argument("--no-calib", action="store_true", help="weight metrics only (no calibration pass)")
    p.add_argument("--no-fisher", action="store_true", help="skip the gradient pass behind --allocation fisher")
    p.add_argument("--fisher-for", choices=("wanda", "sparsegpt"), default="wanda",
                   help="price the fisher tables for this method's changes (sparsegpt: slower, ~1 min per level)")
    p.add_argument("--esd-layer", help="FQN of the layer whose ESD is plotted (default: the first)")
    p.add_argument("--target", default="sparsity=0.7", help="budget plotted for each allocator")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("allocate", help="per-layer budget map from an analysis folder")
    p.add_argument("analysis", help="folder written by `slimlm analyze`")
    p.add_argument("--target", default="sparsity=0.7", help="sparsity=0.7, bits=3.5 or rank=0.5")
    _add_allocation_args(p)
    p.add_argument("--out", help="write the budget map to this JSON file (and a PNG beside it)")
    p.set_defaults(func=cmd_allocate, quiet=True)

    p = sub.add_parser("export", help="write a saved run in an engine's format")
    p.add_argument("run", help="folder written by `slimlm prune` or `slimlm quantize`")
    p.add_argument("--format", required=True, choices=["compressed-tensors", "sparse", "gguf"])
    p.add_argument("--out", required=True, help="output folder, or for gguf a .gguf file (never overwritten)")
    p.add_argument("--inexact", action="store_true", help="compressed-tensors: allow scales within an ulp "
                   "(bf16/fp16 runs); gguf: round block scales to float16 and report the deviation")
    p.add_argument("--gguf-type", default="auto", help="gguf: auto (the run's grid where a block type holds it "
                   "exactly, else the run's float dtype), f32, f16, bf16, q8_0, q4_0, q4_1")
    p.set_defaults(func=cmd_export, quiet=True)

    p = sub.add_parser("eval", help="perplexity and/or zero-shot accuracy of a saved run or any model")
    _add_model_args(p)
    _add_eval_args(p)
    p.add_argument("--tasks", help="comma-separated lm-evaluation-harness task names (piqa,arc_easy,hellaswag): "
                   "zero-shot accuracy instead of perplexity; needs pip install 'slimlm[eval]'")
    p.add_argument("--ppl", action="store_true", help="with --tasks: measure perplexity as well")
    p.add_argument("--limit", type=int, help="zero-shot: only the first N documents of each task")
    p.add_argument("--tasks-dir", help="zero-shot: folder of extra task YAMLs (their data_files paths are "
                   "resolved from the current directory)")
    p.add_argument("--num-fewshot", type=int, default=0, help="zero-shot: examples in each prompt")
    p.add_argument("--batch-size", type=int, default=1, help="zero-shot: requests per forward")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("report", help="one HTML + markdown page (tables, curves, plots) of every run found")
    p.add_argument("folders", nargs="+", help="folders searched for runs (slimlm.json) and analyses")
    p.add_argument("--out", help="output folder (default <first folder>/report)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    p.set_defaults(func=cmd_report, quiet=True)
    return parser


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
    slimlm.resume): for calibrated runs with --resume, and for every --offload disk run (its output shards
    are streamed into that folder anyway, so only the small activations are extra)."""
    import slimlm
    from slimlm.resume import Checkpoint, partial_dir, read_progress
    from slimlm.shards import check_free_space, load_streamed

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
    from slimlm.resume import partial_dir
    from slimlm.shards import save_streamed

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
    from slimlm.data import check_source, data_dir
    from slimlm.export import check_output
    from slimlm.prune import check_sparsity, get_method, parse_pattern

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
    from slimlm.data import check_source, data_dir
    from slimlm.export import check_output
    from slimlm.quant import QuantGrid

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
    from slimlm.data import check_source
    from slimlm.export import atomic_dir, check_output, versions, write_manifest

    check_output(args.out, args.overwrite), check_source(args.calib)
    unit, target = parse_target(args.target)
    model, tokenizer = slimlm.load_model(args.model, args.dtype, args.allow_pickle)
    calib = None if args.no_calib else slimlm.calibration(
        tokenizer, args.calib, args.nsamples, args.seqlen, args.calib_sampling, args.seed, args.data_dir)
    metrics = slimlm.analyze(model, calib, args.owl_m, device=args.device, batch_size=args.batch_size,
                             progress=not args.quiet, fisher=not args.no_fisher, fisher_method=args.fisher_for)
    with atomic_dir(args.out, args.overwrite) as tmp:
        write_analysis(model, metrics, tmp, unit, target, args.esd_layer)
        write_manifest(tmp, {"kind": "analysis", "model": args.model, "owl_m": args.owl_m, "versions": versions(),
                             "fisher_for": None if calib is None or args.no_fisher else args.fisher_for,
                             "calibration": None if calib is None else {
                                 "source": args.calib, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                                 "sampling": args.calib_sampling, "seed": args.seed}})
    print(json.dumps({"out": args.out, "layers": len(metrics)}))


def write_analysis(model, metrics: dict, folder: Path, unit: str, target: float, esd_layer=None) -> None:
    """metrics.json / metrics.csv, and the alpha-depth, ESD and budget plots."""
    import csv

    from slimlm import plots
    from slimlm.allocate import ALLOCATOR_METRIC, allocate_from_metrics
    from slimlm.analysis import esd
    from slimlm.models import linear_fqns

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
    plots.esd(esd(linear_fqns(model)[name].weight.detach()), metrics[name]["alpha"], metrics[name]["xmin"],
              name, folder / "esd.png")
    usable = [a for a, key in ALLOCATOR_METRIC.items() if key is None or key in records[0]]
    if unit != "sparsity":
        usable = [a for a in usable if a not in ("errortable", "fisher")]
    plots.budgets({a: allocate_from_metrics(metrics, a, target, unit) for a in usable},
                  folder / "budgets.png", unit)


def cmd_allocate(args) -> None:
    from slimlm import plots
    from slimlm.allocate import allocate_from_metrics, parse_target

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
    from slimlm.formats import export_compressed_tensors, export_sparse
    from slimlm.gguf_export import export_gguf

    extra = {}
    if args.format == "sparse":
        export_sparse(args.run, args.out)
    elif args.format == "gguf":
        written = export_gguf(args.run, args.out, args.gguf_type, exact=not args.inexact)
        extra = {"file": str(written), "max_abs_deviation": _gguf_deviation(written)}
    else:
        export_compressed_tensors(args.run, args.out, exact=not args.inexact)
    out = Path(args.out)
    size = out.stat().st_size if out.is_file() else sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(json.dumps({"out": args.out, "format": args.format, "bytes": size, **extra}))


def _gguf_deviation(path: Path) -> float:
    import gguf
    return json.loads(gguf.GGUFReader(path).fields["slimlm.export"].contents())["max_abs_deviation"]


def cmd_eval(args) -> None:
    """Perplexity by default; with --tasks zero-shot accuracy (plus perplexity with --ppl). A run folder's
    manifest gets each result under metrics.perplexity / metrics.zero_shot, the other key kept."""
    import slimlm
    from slimlm.evaluate import check_tasks, zero_shot
    from slimlm.export import MANIFEST, read_manifest, write_manifest

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
                                         args.tasks_dir, args.num_fewshot)
    folder = Path(args.model)
    if (folder / MANIFEST).is_file():  # a slimlm run: record the results in its manifest
        manifest = read_manifest(folder)
        manifest.setdefault("metrics", {}).update(metrics)
        write_manifest(folder, manifest)
    print(json.dumps({"model": args.model, **metrics.get("perplexity", {}),
                      **({"zero_shot": metrics["zero_shot"]["tasks"]} if tasks else {})}))


def cmd_report(args) -> None:
    from slimlm.report import write_report

    out, runs = write_report(args.folders, args.out, args.overwrite)
    print(json.dumps({"out": str(out), "runs": len(runs), "html": str(out / "report.html")}))


def _disk_full(e: Exception) -> bool:
    # safetensors reports a full disk as a SafetensorError carrying the OS message, not as an OSError
    return getattr(e, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        args.func(args)
    except SlimlmError as e:
        print(f"slimlm: error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:
        if not _disk_full(e):
            raise
        print(f"slimlm: error: no space left on device ({e}); free some space and rerun with --resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimlm: interrupted; no output was written (runs with --resume or --offload disk keep their "
              "finished blocks: rerun with --resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
