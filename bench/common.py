"""The benchmark protocol shared by the bench scripts (issue #2's, on the built-in model, float32, CPU).

Calibration: the whole text of wikitext2/valid.tokens tokenized as one string (tokenizer defaults),
first 32 non-overlapping windows of 512 tokens. Evaluation: the whole text of wikitext2/test.raw the
same way, the first non-overlapping windows of 2048 tokens, as many as each row's eval_windows says (32 by the
protocol; the tables run on 2 CPU cores used 8).

Each row of a table is a recipe, ``recipes/<table>/<row>.yaml``, which says all of it (calibration, steps, the
evaluation windows), so the table and ``slimlm run recipes/<table>/<row>.yaml`` cannot drift apart. Each row runs
in its own subprocess (``run_rows``) so its peak RSS is its own; all rows of a script run in one invocation,
side by side, so their timings are comparable.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def protocol_windows(tokenizer, data_dir: str, calib_windows: int = 32, eval_windows: int = 32):
    from slimlm.core.data import calibration_windows, eval_windows as cut, load_text, tokenize

    calib = calibration_windows(tokenize(load_text("wikitext2", "calib", data_dir), tokenizer),
                                calib_windows, 512, "first")
    test = cut(tokenize(load_text("wikitext2", "test", data_dir), tokenizer), 2048, eval_windows)
    return calib, test


def recipe_rows(folder: str | Path) -> dict[str, Path]:
    """Row name -> recipe file of one table: ``<folder>/<row>.yaml`` (e.g. recipes/prune/wanda-50.yaml)."""
    return {path.stem: path for path in sorted(Path(folder).glob("*.yaml"))}


def row_recipe(path: Path, data_dir: str, model: str | None = None):
    """A row's recipe with ``data_dir`` in place of its own (a location only) and, when given, ``model`` in place
    of its model (the same table on another model)."""
    from slimlm.recipe import read_recipe

    recipe = read_recipe(path)
    return recipe.with_run(data_dir=data_dir, model=model or recipe.run.model)


def compress_and_eval(path: Path, data_dir: str, eval_windows: int | None = None, model: str | None = None) -> dict:
    """Run the recipe's compression steps on its model in memory (nothing is saved), then measure perplexity as
    its eval step says (``eval_windows``, when given, instead of its window count); ``data_dir`` and ``model``
    as ``row_recipe`` takes them."""
    import slimlm
    from slimlm.pipeline import Context, run_steps
    from slimlm.recipe import COMPRESSION, RunOptions

    recipe = row_recipe(path, data_dir, model)
    model, tokenizer = slimlm.load_model(recipe.run.model, recipe.run.dtype)
    row = {"recipe": str(path), "model": recipe.run.model,
           "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    manifests, _, _ = run_steps(recipe, Context(model, tokenizer, recipe.run, RunOptions(quiet=True)),
                                kinds=COMPRESSION)
    if manifests:
        last = manifests[-1]
        row.update(seconds=sum(m["timings"]["total"] for m in manifests), timings=last["timings"])
        row.update({key: last[key] for key in ("sparsity", "storage") if key in last})
        if last.get("calibration"):
            row["activation_bytes"] = last["calibration"]["tokens"] * model.config.hidden_size * 4
    row["peak_rss_mb"] = peak_rss_mb()  # peak while loading + compressing, before evaluation
    (ns,) = [ns for kind, ns in recipe.steps if kind == "eval"]  # the table's evaluation protocol
    ppl = slimlm.evaluate(model, tokenizer, ns.eval_dataset, ns.eval_seqlen, eval_windows or ns.eval_windows,
                          data_dir, recipe.run.device, progress=False)
    row.update(perplexity=ppl["perplexity"], eval_tokens_per_s=ppl["tokens_per_s"], eval_windows=ppl["windows"])
    return row


def run_rows(script: str, names: list[str], extra: list[str]) -> list[dict]:
    """Run ``script --row NAME`` for each name in a fresh process; each prints its row as the last line."""
    rows = []
    for name in names:
        out = subprocess.run([sys.executable, script, "--row", name, *extra], check=True,
                             capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def write_json(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    windows = sorted({r["eval_windows"] for r in rows if "eval_windows" in r})  # what the rows measured
    path.write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "eval_windows": windows, "rows": rows},
                               indent=2) + "\n")
    return path


def table_main(script: str, doc: str, recipes: Path, run_row, markdown, default_out: str, extra_rows=()) -> None:
    """The command line of a row-table benchmark: one row per recipe in ``--recipes`` (default ``recipes``) plus
    ``extra_rows`` (measurements that are no recipe), or the ``--rows`` named; each runs in its own process
    (``run_row(name, args) -> dict`` there), then the JSON and ``markdown(rows)`` are written beside it."""
    import argparse

    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--recipes", default=str(recipes), help="folder of the rows' recipes (row = file name, no .yaml)")
    p.add_argument("--rows", help="comma-separated rows (default: every row)")
    p.add_argument("--eval-windows", type=int, help="evaluation windows instead of the recipes' (timing runs)")
    p.add_argument("--model", help="every row on this model (name, folder or hub id) instead of the recipes'")
    p.add_argument("--out", default=default_out)
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    if args.row:
        print(json.dumps({"row": args.row, **run_row(args.row, args)}))
        return
    extra = ["--data-dir", args.data_dir, "--recipes", args.recipes]
    extra += ["--eval-windows", str(args.eval_windows)] if args.eval_windows else []
    extra += ["--model", args.model] if args.model else []
    names = args.rows.split(",") if args.rows else [*extra_rows, *recipe_rows(args.recipes)]
    done = run_rows(script, names, extra)
    out = write_json(args.out, done)
    out.with_suffix(".md").write_text(markdown(done) + "\n")
    print(markdown(done))
