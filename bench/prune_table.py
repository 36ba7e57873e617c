"""Pruning benchmark on the built-in model (float32, CPU), the protocol of issue #2 (bench/common.py).

Rows: recipes/prune/<row>.yaml (the README table: 32 evaluation windows, 16 calibration windows per forward as
the default was then), or with ``--recipes recipes/prune-timing`` the quiet timing re-run (default batch, one
evaluation window; ``wanda-50-b16`` repeats wanda-50 with 16 calibration windows per forward). ``floor``, no
recipe, times the two block-forward passes over the calibration set that the sequential algorithm needs, with
nothing else (no statistics, no pruning); the table reports pruning time as a multiple of it.

    python bench/prune_table.py                                       # all rows -> bench/results/
    python bench/prune_table.py --recipes recipes/prune-timing --out bench/results/prune_timing.json
"""
from __future__ import annotations

import time

from common import RECIPES, RESULTS, compress_and_eval, peak_rss_mb, recipe_rows, row_recipe, table_main


def floor_row(data_dir: str, recipe, model_name: str | None = None) -> dict:
    """Two plain block passes per block over a recipe's calibration windows: the sequential lower bound."""
    import slimlm
    from slimlm.core.architectures import decoder_blocks
    from slimlm.core.engine import DEFAULT_BATCH_TOKENS, capture_inputs, run_block

    parsed = row_recipe(recipe, data_dir, model_name)
    (ns,) = [ns for kind, ns in parsed.steps if kind == "prune"]
    model, tokenizer = slimlm.load_model(parsed.run.model)
    calib = slimlm.calibration(tokenizer, ns.calib, ns.nsamples, ns.seqlen, ns.calib_sampling, ns.seed, data_dir)
    batch = max(1, DEFAULT_BATCH_TOKENS // calib.shape[1])
    start = time.perf_counter()
    captured = capture_inputs(model, calib, batch, "cpu")
    x = captured.hidden
    for i, block in enumerate(decoder_blocks(model)):
        run_block(block, x, captured.call_args[i], batch)
        x = run_block(block, x, captured.call_args[i], batch)
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb()}


def markdown(rows: list[dict]) -> str:
    floor = next((r["seconds"] for r in rows if r["row"] == "floor"), None)
    lines = ["| row | perplexity | prune s | x floor | peak RSS MB | sparsity | eval tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["row"] == "floor":
            continue
        seconds = r.get("seconds")
        ratio = f"{seconds / floor:.2f}" if seconds and floor else "-"
        lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {seconds or 0:.1f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} | {r.get('sparsity', 0):.4f} | {r['eval_tokens_per_s']:.0f} |")
    if floor:
        lines.append(f"\nFloor (two block passes over the calibration set): {floor:.1f} s.")
    return "\n".join(lines)


def run_row(name: str, args) -> dict:
    rows = recipe_rows(args.recipes)
    if name == "floor":  # calibrated like the table's Wanda row
        return floor_row(args.data_dir, rows["wanda-50"], args.model)
    return compress_and_eval(rows[name], args.data_dir, args.eval_windows, args.model)


if __name__ == "__main__":
    table_main(__file__, __doc__, RECIPES / "prune", run_row, markdown, str(RESULTS / "prune_table.json"),
               extra_rows=["floor"])
