"""Pruning benchmark on the built-in model (float32, CPU), the protocol of issue #2.

Calibration: the whole text of wikitext2/valid.tokens tokenized as one string (tokenizer defaults),
first 32 non-overlapping windows of 512 tokens. Evaluation: the whole text of wikitext2/test.raw the
same way, first 32 non-overlapping windows of 2048 tokens.

Each row runs in its own subprocess so its peak RSS is its own; all rows run in one invocation, side
by side, so the timings are comparable. ``floor`` times the two block-forward passes over the
calibration set that the sequential algorithm needs, with nothing else (no statistics, no pruning).

    python bench/prune_table.py --data-dir ../shared/data            # all rows -> bench/results/
    python bench/prune_table.py --rows dense,wanda-50 --eval-windows 2  # a quick subset
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

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
}
RESULTS = Path(__file__).parent / "results"


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def windows(tokenizer, data_dir, calib_windows, eval_windows):
    from slimlm.data import calibration_windows, eval_windows as cut, load_text, tokenize

    calib = calibration_windows(tokenize(load_text("wikitext2", "calib", data_dir), tokenizer),
                                calib_windows, 512, "first")
    test = cut(tokenize(load_text("wikitext2", "test", data_dir), tokenizer), 2048, eval_windows)
    return calib, test


def run_row(name: str, data_dir: str, calib_windows: int, eval_windows: int) -> dict:
    import torch

    import slimlm
    from slimlm.evaluate import perplexity

    torch.manual_seed(0)
    model, tokenizer = slimlm.load_model("smollm2-135m")
    calib, test = windows(tokenizer, data_dir, calib_windows, eval_windows)
    row = {"row": name, "model_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "activation_bytes": calib.numel() * model.config.hidden_size * 4}
    if name == "floor":
        row["prune_s"] = floor_seconds(model, calib)
        row["peak_rss_mb"] = peak_rss_mb()
        return row
    if ROWS[name] is not None:
        result = slimlm.prune(model, tokenizer, calib=calib, progress=False, **ROWS[name])
        row.update(prune_s=result.manifest["timings"]["total"], sparsity=result.manifest["sparsity"],
                   timings=result.manifest["timings"])
    row["peak_rss_mb"] = peak_rss_mb()  # peak while loading + pruning, before evaluation
    ppl = perplexity(model, test, progress=False)
    row.update(perplexity=ppl.perplexity, eval_tokens_per_s=ppl.tokens_per_s, eval_windows=ppl.windows)
    return row


def floor_seconds(model, calib) -> float:
    """Two plain block passes per block over the calibration windows: the sequential lower bound."""
    from slimlm.engine import DEFAULT_BATCH_TOKENS, capture_inputs, run_block
    from slimlm.models import decoder_blocks

    batch = max(1, DEFAULT_BATCH_TOKENS // calib.shape[1])
    start = time.perf_counter()
    captured = capture_inputs(model, calib, batch, "cpu")
    x = captured.hidden
    for i, block in enumerate(decoder_blocks(model)):
        run_block(block, x, captured.call_args[i], batch)
        x = run_block(block, x, captured.call_args[i], batch)
    return time.perf_counter() - start


def markdown(rows: list[dict]) -> str:
    floor = next((r["prune_s"] for r in rows if r["row"] == "floor"), None)
    lines = ["| row | perplexity | prune s | x floor | peak RSS MB | sparsity | eval tok/s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["row"] == "floor":
            continue
        prune_s = r.get("prune_s")
        ratio = f"{prune_s / floor:.2f}" if prune_s and floor else "-"
        lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {prune_s or 0:.1f} | {ratio} | "
                     f"{r['peak_rss_mb']:.0f} | {r.get('sparsity', 0):.4f} | {r['eval_tokens_per_s']:.0f} |")
    if floor:
        lines.append(f"\nFloor (two block passes over the calibration set): {floor:.1f} s.")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    p.add_argument("--rows", default="floor," + ",".join(ROWS))
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--out", default=str(RESULTS / "prune_table.json"))
    p.add_argument("--row", help=argparse.SUPPRESS)  # internal: run one row in this process
    args = p.parse_args()
    if args.row:
        print(json.dumps(run_row(args.row, args.data_dir, args.calib_windows, args.eval_windows)))
        return
    rows = []
    for name in args.rows.split(","):
        cmd = [sys.executable, __file__, "--row", name, "--data-dir", args.data_dir,
               "--calib-windows", str(args.calib_windows), "--eval-windows", str(args.eval_windows)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"protocol": __doc__.split("\n\n")[1], "rows": rows}, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(rows) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
