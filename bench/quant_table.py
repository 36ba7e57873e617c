"""Quantization benchmark on the built-in model (float32, CPU), the protocol of bench/common.py (issue #4).

Weight-only RTN and GPTQ (symmetric grids) at W4 g128, W3 g128 and W2 g64; W4A4 (4-bit weights in groups of
128, 4-bit per-token activations, no clipping) with RTN, with RTN after the Hadamard rotation and with GPTQ
after it; mixed precision at 3.5 average bits from the uniform, alphapruning and fisher allocators (GPTQ g128);
joint Wanda / SparseGPT 50% + W4 g128. ``bytes/param`` is the packed storage of the whole model
(``api.storage_report``: codes, scales, zero points, masks, and the float embeddings and norms).

The built-in model's weights were dequantized from a Q4_1 GGUF (asymmetric 4-bit, blocks of 32), so an
asymmetric 4-bit grid with groups of 32 would reproduce them almost exactly; these rows use symmetric grids
with groups of 64/128 and lower bit-widths, where that accident does not help.

    python bench/quant_table.py --eval-windows 8                       # all rows -> bench/results/
    python bench/quant_table.py --rows dense,rtn-w4g128 --eval-windows 1 --out /tmp/q.json
"""
from __future__ import annotations

from common import RESULTS, compress_and_eval, table_main

W4A4 = dict(wbits=4, abits=4)
ROWS = {  # name -> (slimlm function, keyword arguments); None: dense
    "dense": None,
    "rtn-w4g128": ("quantize", dict(method="rtn", wbits=4, group_size=128)),
    "gptq-w4g128": ("quantize", dict(method="gptq", wbits=4, group_size=128)),
    "rtn-w3g128": ("quantize", dict(method="rtn", wbits=3, group_size=128)),
    "gptq-w3g128": ("quantize", dict(method="gptq", wbits=3, group_size=128)),
    "rtn-w2g64": ("quantize", dict(method="rtn", wbits=2, group_size=64)),
    "gptq-w2g64": ("quantize", dict(method="gptq", wbits=2, group_size=64)),
    "w4a4-rtn": ("quantize", dict(method="rtn", **W4A4)),
    "w4a4-rtn-hadamard": ("quantize", dict(method="rtn", rotate="hadamard", **W4A4)),
    "w4a4-gptq-hadamard": ("quantize", dict(method="gptq", rotate="hadamard", **W4A4)),
    "mixed-3.5-uniform": ("quantize", dict(method="gptq", avg_bits=3.5, allocation="uniform")),
    "mixed-3.5-alphapruning": ("quantize", dict(method="gptq", avg_bits=3.5, allocation="alphapruning")),
    "mixed-3.5-fisher": ("quantize", dict(method="gptq", avg_bits=3.5, allocation="fisher")),
    "wanda-50-w4": ("prune", dict(method="wanda", sparsity=0.5, wbits=4)),
    "sparsegpt-50-w4": ("prune", dict(method="sparsegpt", sparsity=0.5, wbits=4)),
}


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
    spec = ROWS[name]
    return compress_and_eval(spec and spec[1], args.data_dir, args.calib_windows, args.eval_windows,
                             kind=spec[0] if spec else "prune")


if __name__ == "__main__":
    table_main(__file__, __doc__, list(ROWS), run_row, markdown, str(RESULTS / "quant_table.json"))
