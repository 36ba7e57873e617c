"""Pruning benchmark on the built-in model (float32, CPU), the protocol of issue #2 (bench/common.py).

``floor`` times the two block-forward passes over the calibration set that the sequential algorithm
needs, with nothing else (no statistics, no pruning); the table reports pruning time as a multiple of it.
``wanda-50-b16`` repeats wanda-50 with 16 calibration windows per forward instead of the default 4.

    python bench/prune_table.py                                       # all rows -> bench/results/
    python bench/prune_table.py --rows floor,wanda-50 --eval-windows 1 --out /tmp/t.json   # timing only
"""
from __future__ import annotations

import time

from common import RESULTS, compress_and_eval, peak_rss_mb, protocol_windows, table_main

ROWS = {  # name -> prune() keyword arguments (None: dense, no pruning)
    "dense": None,
    "magnitude-50": dict(method="magnitude", sparsity=0.5),
    "wanda-50": dict(method="wanda", sparsity=0.5),
    "sparsegpt-50": dict(method="sparsegpt", sparsity=0.5),
    "ria-50": dict(method="ria", sparsity=0.5),
    "wanda-2:4": dict(method="wanda", pattern="2:4"),
    "sparsegpt-2:4": dict(method="sparsegpt", pattern="2:4"),
    "ria-2:4": dict(method="ria", pattern="2:4"),
    "ria-2:4-perm": dict(method="ria", pattern="2:4", permute=True),
    "wanda-70": dict(method="wanda", sparsity=0.7),
    "sparsegpt-70": dict(method="sparsegpt", sparsity=0.7),
    "wanda-50-b16": dict(method="wanda", sparsity=0.5, batch_size=16),
}


def floor_row(data_dir: str, calib_windows: int) -> dict:
    """Two plain block passes per block over the calibration windows: the sequential lower bound."""
    import slimlm
    from slimlm.core.engine import DEFAULT_BATCH_TOKENS, capture_inputs, run_block
    from slimlm.core.architectures import decoder_blocks

    model, tokenizer = slimlm.load_model("smollm2-135m")
    calib, _ = protocol_windows(tokenizer, data_dir, calib_windows, 1)
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
    if name == "floor":
        return floor_row(args.data_dir, args.calib_windows)
    return compress_and_eval(ROWS[name], args.data_dir, args.calib_windows, args.eval_windows)


if __name__ == "__main__":
    table_main(__file__, __doc__, ["floor", *ROWS], run_row, markdown, str(RESULTS / "prune_table.json"))
