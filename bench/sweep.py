"""Allocation sweep (issue #3): perplexity of Wanda and SparseGPT at several sparsities with uniform,
OWL, AlphaPruning and errortable budgets, under the protocol of bench/common.py. Writes one JSON, a
markdown table and the perplexity-vs-sparsity plot.

    python bench/sweep.py                                              # 2 methods x 3 sparsities x 4
    python bench/sweep.py --methods wanda --sparsities 0.7 --eval-windows 4   # a quick subset
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DEFAULT_DATA, RESULTS, compress_and_eval, run_rows, write_json

ALLOCATIONS = ("uniform", "owl", "alphapruning", "errortable")


def parse_row(name: str) -> dict:
    method, sparsity, allocation = name.split("/")
    return dict(method=method, sparsity=float(sparsity), allocation=allocation)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | sparsity | " + " | ".join(ALLOCATIONS) + " |", "|---|---|" + "---|" * len(ALLOCATIONS)]
    keys = sorted({(r["method"], r["target"]) for r in rows})
    for method, target in keys:
        cells = {r["allocation"]: r["perplexity"] for r in rows if (r["method"], r["target"]) == (method, target)}
        lines.append(f"| {method} | {target:g} | " + " | ".join(
            f"{cells[a]:.2f}" if a in cells else "-" for a in ALLOCATIONS) + " |")
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
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.row:
        kwargs = parse_row(args.row)
        row = compress_and_eval(kwargs, args.data_dir, args.calib_windows, args.eval_windows)
        print(json.dumps({"row": args.row, **kwargs, "target": kwargs["sparsity"], **row}))
        return
    names = [f"{m}/{s}/{a}" for m in args.methods.split(",") for s in args.sparsities.split(",")
             for a in args.allocations.split(",")]
    rows = run_rows(__file__, names, ["--data-dir", args.data_dir, "--calib-windows", str(args.calib_windows),
                                      "--eval-windows", str(args.eval_windows)])
    out = write_json(args.out, rows)
    from slimlm import plots
    plots.sweep(rows, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
