"""The step kinds of a recipe: each one's typed config (``slimlm.config``) and the function that runs it on the
model as the steps before it left it (``STEPS``), and the two outputs written after the run is saved (GGUF files
and exports)."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from slimlm.config import STEP_CONFIGS, RunConfig
from slimlm.core.result import Result
from slimlm.errors import SlimlmError
from slimlm.recipe import RunOptions
from slimlm.runs.save import RECIPE


@dataclass
class Context:
    """What every step function sees: the model as the steps before left it, the recipe's run-level settings, how
    it runs, the block stream and checkpoint (``--offload``/``--resume``), the recipe's text and the run folder."""

    model: Any
    tokenizer: Any
    run: RunConfig
    options: RunOptions
    stream: Any = None
    checkpoint: Any = None
    text: str = ""
    out: Path | None = None

    @property
    def progress(self) -> bool:
        return not self.options.quiet


def _rotate(ctx: Context, c) -> Result:
    from slimlm.transforms.rotate import rotate_
    from slimlm.runs.save import versions

    start = time.perf_counter()
    rotation = rotate_(ctx.model, seed=c.seed, online_down=not c.no_online_down)
    return Result({"kind": "rotate", "method": "quarot", "seed": c.seed, "rotation": rotation,
                   "config": c.in_effect(), "timings": {"total": time.perf_counter() - start},
                   "versions": versions()})


def _prune(ctx: Context, c) -> Result:
    import slimlm

    return slimlm.prune(ctx.model, ctx.tokenizer, c, data_dir=ctx.run.data_dir, device=ctx.run.device,
                        progress=ctx.progress, io=ctx.stream, checkpoint=ctx.checkpoint)


def _quantize(ctx: Context, c) -> Result:
    import slimlm

    return slimlm.quantize(ctx.model, ctx.tokenizer, c, data_dir=ctx.run.data_dir, device=ctx.run.device,
                           progress=ctx.progress, io=ctx.stream, checkpoint=ctx.checkpoint)


def _lowrank(ctx: Context, c) -> Result:
    from slimlm.structured.factorize import lowrank

    return lowrank(ctx.model, ctx.tokenizer, c, data_dir=ctx.run.data_dir, device=ctx.run.device,
                   progress=ctx.progress)


def _shrink(ctx: Context, c) -> Result:
    from slimlm.structured.shrink import shrink

    return shrink(ctx.model, ctx.tokenizer, c, data_dir=ctx.run.data_dir, device=ctx.run.device,
                  progress=ctx.progress)


def _eval(ctx: Context, c) -> dict:
    import slimlm

    return slimlm.evaluate(ctx.model, ctx.tokenizer, c.eval_dataset, c.eval_seqlen, c.eval_windows,
                           ctx.run.data_dir, ctx.run.device, progress=ctx.progress)


def _analyze(ctx: Context, c) -> dict:
    """An analysis folder (metrics, plots, manifest with per-part timings, and recipe) of the model as it is at
    this step; unless quiet, a one-line timing summary on stderr."""
    import slimlm
    from slimlm.allocate import parse_target
    from slimlm.core.timing import timed
    from slimlm.runs.save import atomic_dir, versions, write_manifest

    out, run = Path(c.out or ctx.run.out), ctx.run
    unit, target = parse_target(c.target)
    start, timings = time.perf_counter(), {}
    with timed(timings, "data"):
        calib = None if c.no_calib else slimlm.calibration(ctx.tokenizer, c.calib, c.nsamples, c.seqlen,
                                                           c.calib_sampling, c.seed, run.data_dir)
    metrics = slimlm.analyze(ctx.model, calib, c.owl_m, device=run.device, batch_size=c.batch_size,
                             progress=ctx.progress, fisher=not c.no_fisher, fisher_method=c.fisher_for,
                             timings=timings)
    with atomic_dir(out, ctx.options.overwrite) as tmp:
        with timed(timings, "plots"):
            write_analysis(ctx.model, metrics, tmp, unit, target, c.esd_layer)
        timings["total"] = time.perf_counter() - start  # data, analysis and plots (the model was loaded before)
        write_manifest(tmp, {"kind": "analysis", "model": run.model, "owl_m": c.owl_m, "versions": versions(),
                             "config": c.in_effect(),
                             "fisher_for": None if calib is None or c.no_fisher else c.fisher_for,
                             "calibration": None if calib is None else {
                                 "source": c.calib, "nsamples": calib.shape[0], "seqlen": calib.shape[1],
                                 "sampling": c.calib_sampling, "seed": c.seed}, "timings": timings})
        (tmp / RECIPE).write_text(ctx.text)
    if ctx.progress:
        print(_timing_summary("analyze", timings), file=sys.stderr)
    return {"out": str(out), "layers": len(metrics), "seconds": round(timings["total"], 2)}


def _gguf(ctx: Context, c) -> dict:
    """The file written, with its bits per weight, how many tensors of each type, and the size of the model it
    came from (a GGUF can be larger than its source: the built-in Q4_1 file's 576-wide rows cannot hold Q4_K)."""
    from collections import Counter

    from slimlm.allocate import holdout
    from slimlm.core.models import source_bytes
    from slimlm.gguf.metadata import read_metadata
    from slimlm.gguf.quantize import to_gguf

    path = to_gguf(ctx.model, ctx.tokenizer, c.out, config=c, data_dir=ctx.run.data_dir, source=ctx.run.model,
                   recipe=ctx.text, progress=ctx.progress, overwrite=ctx.options.overwrite)
    record = json.loads(read_metadata(path, ["slimlm.export"])["slimlm.export"])
    counts = Counter(kind for name, kind in record["types"].items() if name.endswith(".weight"))
    return {"out": str(path), "bytes": path.stat().st_size, "bits_per_weight": round(record["bits_per_weight"], 3),
            "types": dict(counts.most_common()), "source_bytes": source_bytes(ctx.run.model),
            **holdout.summary((record.get("size") or {}).get("check"))}


def _export(ctx: Context, c) -> dict:
    return export(ctx.out, c, ctx.text, ctx.progress)


@dataclass(frozen=True)
class Step:
    """A recipe step kind: its config type, the function that runs it, and when (``model``: on the loaded model,
    in recipe order; ``file``: after the run folder is saved, since it writes a file from the model as it is or
    reads the saved run)."""

    config: type
    fn: Callable
    phase: str = "model"


STEPS = {"analyze": Step(STEP_CONFIGS["analyze"], _analyze), "rotate": Step(STEP_CONFIGS["rotate"], _rotate),
         "shrink": Step(STEP_CONFIGS["shrink"], _shrink), "lowrank": Step(STEP_CONFIGS["lowrank"], _lowrank),
         "prune": Step(STEP_CONFIGS["prune"], _prune), "quantize": Step(STEP_CONFIGS["quantize"], _quantize),
         "eval": Step(STEP_CONFIGS["eval"], _eval), "gguf": Step(STEP_CONFIGS["gguf"], _gguf, "file"),
         "export": Step(STEP_CONFIGS["export"], _export, "file")}


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
