"""Quantization benchmark on the built-in model (float32, CPU), the protocol of bench/common.py (issue #4).

Weight-only RTN and GPTQ (symmetric grids) at W4 g128, W3 g128 and W2 g64; W4A4 (4-bit weights in groups of
128, 4-bit per-token activations, no clipping) with RTN, with RTN after the Hadamard rotation and with GPTQ
after it; mixed precision at 3.5 average bits from the uniform, alphapruning and fisher allocators (GPTQ g128);
joint Wanda / SparseGPT 50% + W4 g128. ``bytes/param`` is the packed storage of the whole model
(``quant.packing.storage_report``: codes, scales, zero points, masks, and the float embeddings and norms).

The built-in model's weights were dequantized from a Q4_1 GGUF (asymmetric 4-bit, blocks of 32), so an
asymmetric 4-bit grid with groups of 32 would reproduce them almost exactly; these rows use symmetric grids
with groups of 64/128 and lower bit-widths, where that accident does not help.

Rows: recipes/quant/<row>.yaml (8 evaluation windows).

    python bench/quant_table.py                                        # all rows -> bench/results/
    python bench/quant_table.py --rows dense,rtn-w4g128 --eval-windows 1 --out /tmp/q.json
"""
from __future__ import annotations

from common import RECIPES, RESULTS, compress_and_eval, recipe_rows, table_main


def markdown(rows: list[dict]) -> str:
    lines = ["| row | perplexity | compress s | peak RSS MB | bytes/param (model) | bytes/param (linears) | "
             "eval tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        storage = r.get("storage") or {"bytes_per_param": 4.0, "quantized_linear_bytes_per_param": 4.0}  # float32
        lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {r.get('seconds', 0):.1f} | {r['peak_rss_mb']:.0f} | "
                     f"{storage['bytes_per_param']:.3f} | {storage['quantized_linear_bytes_per_param']:.3f} | "
                     f"{r['eval_tokens_per_s']:.0f} |")
    return "\n".join(lines)


def run_row(name: str, args) -> dict:
    return compress_and_eval(recipe_rows(args.recipes)[name], args.data_dir, args.eval_windows,
                             args.model)


if __name__ == "__main__":
    table_main(__file__, __doc__, RECIPES / "quant", run_row, markdown, str(RESULTS / "quant_table.json"))
