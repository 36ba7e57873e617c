"""Allocation sweep (issue #3): perplexity of Wanda and SparseGPT at several sparsities with uniform, OWL,
AlphaPruning and fisher (slimlm's) budgets, under the protocol of bench/common.py. Writes one JSON, a
markdown table and the perplexity-vs-sparsity plot.

Rows: recipes/sweep/<method>-<sparsity>-<allocation>.yaml (8 evaluation windows). Each row plans its budget map
on the dense model inside its run, as ``slimlm prune --allocation`` does (``timings.allocation`` of the row;
``fisher`` prices the changes each method makes, so SparseGPT's maps differ from Wanda's).

    python bench/sweep.py                                                        # every row
    python bench/sweep.py --rows wanda-0.7-uniform,wanda-0.7-fisher --eval-windows 4   # a quick subset
    python bench/sweep.py --merge results/sweep_70_80.json results/sweep_60.json   # one table and plot
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DEFAULT_DATA, RECIPES, RESULTS, compress_and_eval, recipe_rows, run_rows, write_json

ALLOCATIONS = ("uniform", "owl", "alphapruning", "fisher")


def run_row(name: str, args) -> dict:
    from slimlm.recipe import read_recipe

    path = recipe_rows(args.recipes)[name]
    (ns,) = [ns for kind, ns in read_recipe(path).steps if kind == "prune"]
    row = compress_and_eval(path, args.data_dir, args.eval_windows)
    return {"method": ns.method, "allocation": ns.allocation, "target": ns.sparsity,
            "allocation_seconds": row["timings"].get("allocation", 0.0), **row}


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
    p.add_argument("--recipes", default=str(RECIPES / "sweep"), help="folder of the rows' recipes")
    p.add_argument("--rows", help="comma-separated rows (default: every recipe)")
    p.add_argument("--eval-windows", type=int, help="evaluation windows instead of the recipes'")
    p.add_argument("--out", default=str(RESULTS / "sweep.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier sweeps' rows into --out (later files win), run nothing")
    p.add_argument("--row", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.merge:  # a later file's row replaces an earlier one for the same method, sparsity and allocator
        rows = {(r["method"], r["target"], r["allocation"]): r
                for path in args.merge for r in json.loads(Path(path).read_text())["rows"]}
        return write_outputs(list(rows.values()), args.out)
    if args.row:
        print(json.dumps({"row": args.row, **run_row(args.row, args)}))
        return
    extra = ["--data-dir", args.data_dir, "--recipes", args.recipes]
    extra += ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    names = args.rows.split(",") if args.rows else list(recipe_rows(args.recipes))
    write_outputs(run_rows(__file__, names, extra), args.out)


def write_outputs(rows: list[dict], path: str) -> None:
    """The JSON, its markdown table and the perplexity-vs-sparsity plot."""
    from slimlm.report import plots

    allocations = [a for a in ALLOCATIONS if any(r["allocation"] == a for r in rows)]
    out = write_json(path, rows)
    plots.sweep(rows, out.with_suffix(".png"))
    out.with_suffix(".md").write_text(markdown(rows, allocations) + "\n")
    print(markdown(rows, allocations))


if __name__ == "__main__":
    main()
