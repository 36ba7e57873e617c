"""Allocation sweep (issue #3): perplexity of Wanda and SparseGPT at several sparsities with uniform, OWL,
AlphaPruning and fisher (slimlm's) budgets, under the protocol of bench/common.py. Writes one JSON, a
markdown table and the perplexity-vs-sparsity plot.

Budgets depend on the allocator and the target, so each (allocator, target) map is planned once on the dense
model (``--plan``, its time recorded) and every method's row prunes with it; only ``fisher`` plans SparseGPT's
maps separately, since it prices the changes each method makes (``plan_key``).

    python bench/sweep.py --eval-windows 8                                       # 2 methods x 3 sparsities x 4
    python bench/sweep.py --methods wanda --sparsities 0.7 --eval-windows 4       # a quick subset
    python bench/sweep.py --merge results/sweep_70_80.json results/sweep_60.json   # one table and plot
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from common import DEFAULT_DATA, RESULTS, compress_and_eval, protocol_windows, run_rows, write_json

ALLOCATIONS = ("uniform", "owl", "alphapruning", "fisher")


def plan_key(allocation: str, method: str) -> str:
    """Which planned maps a row uses: ``fisher`` prices SparseGPT's changes separately (``fisher-sparsegpt``);
    every other allocator's map is the same for all methods."""
    return f"{allocation}-{method}" if (allocation, method) == ("fisher", "sparsegpt") else allocation


def plan(key: str, targets: list[float], data_dir: str, calib_windows: int, folder: Path) -> None:
    """Plan the budget maps of one ``plan_key`` on the dense built-in model, measuring its metrics once for every
    target; each file records the metric time plus that target's solve time."""
    import torch

    import slimlm
    from slimlm.allocate import allocate_from_metrics

    torch.manual_seed(0)
    model, tokenizer = slimlm.load_model("smollm2-135m")
    calib, _ = protocol_windows(tokenizer, data_dir, calib_windows, 1)
    start = time.perf_counter()
    allocation, _, method = key.partition("-")
    metrics = slimlm.api.allocation_metrics(model, allocation, calib, progress=False, method=method or None)
    measured = time.perf_counter() - start
    for target in targets:
        start = time.perf_counter()
        budgets = allocate_from_metrics(metrics, allocation, target)
        seconds = measured + time.perf_counter() - start
        budgets_file(folder, key, target).write_text(json.dumps(
            {"allocation": allocation, "target": target, "seconds": seconds, "budgets": budgets}, indent=1) + "\n")


def budgets_file(folder: Path, key: str, target: float) -> Path:
    return folder / f"{key}-{target:g}.json"


def markdown(rows: list[dict], allocations) -> str:
    lines = ["| method | sparsity | " + " | ".join(allocations) + " |", "|---|---|" + "---|" * len(allocations)]
    for method, target in sorted({(r["method"], r["target"]) for r in rows}):
        cells = {r["allocation"]: r["perplexity"] for r in rows if (r["method"], r["target"]) == (method, target)}
        lines.append(f"| {method} | {target:g} | " + " | ".join(
            f"{cells[a]:.2f}" if a in cells else "-" for a in allocations) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--methods", default="wanda,sparsegpt")
    p.add_argument("--sparsities", default="0.6,0.7,0.8")
    p.add_argument("--allocations", default=",".join(ALLOCATIONS))
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "sweep.json"))
    p.add_argument("--budgets-dir", default=str(RESULTS / "sweep_budgets"), help="planned budget maps (reused)")
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier sweeps' rows into --out (later files win), run nothing")
    p.add_argument("--row", help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args()
    folder = Path(args.budgets_dir)
    common = ["--data-dir", args.data_dir, "--calib-windows", str(args.calib_windows), "--out", args.out,
              "--budgets-dir", args.budgets_dir]
    if args.merge:  # a later file's row replaces an earlier one for the same method, sparsity and allocator
        rows = {(r["method"], r["target"], r["allocation"]): r
                for path in args.merge for r in json.loads(Path(path).read_text())["rows"]}
        return write_outputs(list(rows.values()), args.out, args.allocations.split(","))
    if args.plan:
        key, targets = args.plan.split("/")
        plan(key, [float(t) for t in targets.split(",")], args.data_dir, args.calib_windows, folder)
        return
    if args.row:
        method, target, allocation = args.row.split("/")
        kwargs = dict(method=method, sparsity=float(target))
        planned = None
        if allocation != "uniform":
            planned = json.loads(budgets_file(folder, plan_key(allocation, method), float(target)).read_text())
            kwargs["budgets"] = planned["budgets"]
        row = compress_and_eval(kwargs, args.data_dir, args.calib_windows, args.eval_windows)
        row["allocation_seconds"] = planned["seconds"] if planned else 0.0
        print(json.dumps({"row": args.row, "method": method, "allocation": allocation, "target": float(target),
                          **{k: v for k, v in row.items()}}))
        return
    allocations = args.allocations.split(",")
    folder.mkdir(parents=True, exist_ok=True)
    for key in sorted({plan_key(a, m) for a in allocations for m in args.methods.split(",") if a != "uniform"}):
        missing = [t for t in args.sparsities.split(",") if not budgets_file(folder, key, float(t)).exists()]
        if missing:
            subprocess.run([sys.executable, __file__, "--plan", f"{key}/{','.join(missing)}", *common], check=True)
    names = [f"{m}/{s}/{a}" for m in args.methods.split(",") for s in args.sparsities.split(",") for a in allocations]
    write_outputs(run_rows(__file__, names, [*common, "--eval-windows", str(args.eval_windows)]), args.out,
                  allocations)


def write_outputs(rows: list[dict], path: str, allocations: list[str]) -> None:
    """The JSON, its markdown table and the perplexity-vs-sparsity plot."""
    from slimlm.report import plots

    out = write_json(path, rows)
    plots.sweep(rows, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(rows, allocations) + "\n")
    print(markdown(rows, allocations))


if __name__ == "__main__":
    main()
