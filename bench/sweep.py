"""Allocation sweep (issue #3): perplexity of Wanda and SparseGPT at several sparsities with uniform, OWL,
AlphaPruning and fisher (slimlm's) budgets, under the protocol of bench/common.py. Writes one JSON, a
markdown table and the perplexity-vs-sparsity plot.

Cells: recipes/sweep/<method>-<sparsity>-<allocation>.yaml (8 evaluation windows), run by ``slimlm.sweep``
as Ray tasks (a local Ray unless ``--ray`` names a cluster), each into its run folder (the recipe's out,
runs/sweep/<cell>); finished cells are skipped on rerun. Each cell plans its budget map on the dense model inside
its run, as ``slimlm prune --allocation`` does (``allocation_seconds``; ``fisher`` prices the changes each method
makes, so SparseGPT's maps differ from Wanda's).

    python bench/sweep.py                                                        # every cell
    python bench/sweep.py --rows wanda-0.7-uniform,wanda-0.7-fisher --eval-windows 4   # a quick subset
    python bench/sweep.py --merge results/sweep_70_80.json results/sweep_60.json   # one table and plot
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import DEFAULT_DATA, RECIPES, RESULTS, recipe_rows, write_json

ALLOCATIONS = ("uniform", "owl", "alphapruning", "fisher")


def cells(args) -> dict:
    """The chosen recipes, with this machine's data folder (and --eval-windows) in place of theirs."""
    from dataclasses import replace

    from slimlm.recipe import Recipe, read_recipe

    rows = recipe_rows(args.recipes)
    chosen = {}
    for name in args.rows.split(",") if args.rows else rows:
        recipe = read_recipe(rows[name]).with_run(data_dir=args.data_dir)
        if args.eval_windows:
            recipe = Recipe(recipe.run, tuple((kind, replace(c, eval_windows=args.eval_windows) if kind == "eval"
                                               else c) for kind, c in recipe.steps))
        chosen[name] = recipe
    return chosen


def markdown(rows: list[dict], allocations) -> str:
    lines = ["| method | sparsity | " + " | ".join(allocations) + " |", "|---|---|" + "---|" * len(allocations)]
    for method, target in sorted({(r["method"], r["target"]) for r in rows}):
        cells = {r["allocation"]: f"{r['perplexity']:.2f}" + _kept(r) for r in rows
                 if (r["method"], r["target"]) == (method, target)}
        lines.append(f"| {method} | {target:g} | " + " | ".join(cells.get(a, "-") for a in allocations) + " |")
    return "\n".join(lines)


def _kept(row: dict) -> str:
    """' (kept t=0.5)' where the allocation check kept another candidate than the allocator's plan."""
    kept = row.get("allocation_check", {}).get("kept", "plan")
    return "" if kept == "plan" else f" (kept {kept})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--recipes", default=str(RECIPES / "sweep"), help="folder of the rows' recipes")
    p.add_argument("--rows", help="comma-separated rows (default: every recipe)")
    p.add_argument("--eval-windows", type=int, help="evaluation windows instead of the recipes'")
    p.add_argument("--out", default=str(RESULTS / "sweep.json"))
    p.add_argument("--merge", nargs="+", metavar="JSON",
                   help="combine earlier sweeps' rows into --out (later files win), run nothing")
    p.add_argument("--ray", metavar="auto|ADDRESS", help="Ray cluster (default: a local Ray)")
    p.add_argument("--runs", default="runs/sweep", help="folder of the cells' run folders")
    args = p.parse_args()
    if args.merge:  # a later file's row replaces an earlier one for the same method, sparsity and allocator
        rows = {(r["method"], r["target"], r["allocation"]): r
                for path in args.merge for r in json.loads(Path(path).read_text())["rows"]}
        return write_outputs(list(rows.values()), args.out)
    from slimlm.sweep import sweep

    write_outputs(sweep(cells(args), args.runs, args.ray), args.out)


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
