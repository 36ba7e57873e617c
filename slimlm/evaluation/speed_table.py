"""``slimlm speed``'s result as a text table: the figures, their ratios to the baseline with the rounds' range,
and which direction is better for each column."""
from __future__ import annotations


def format_table(result: dict) -> str:
    """``measure_speed``'s result as a small text table, one row per model, the baseline first. The 'x' columns
    are ratios to the baseline; '-' is not measured (or the baseline's own ratio)."""
    s = result["settings"]
    batches, peak = s["batches"], "peak_cuda_bytes" if s["device"] != "cpu" else "peak_rss_bytes"
    head = ["model", "params", "nonzero", "MB", "prefill tok/s", *[f"decode b{b}" for b in batches], "TTFT s",
            "peak MB", "x prefill", *[f"x b{b}" for b in batches], "x TTFT", "x peak"]
    rows = [head] + [_row(entry, batches, peak) for entry in result["models"]]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    title = (f"{s['engine']} on {s['device']}, threads={s['threads']}: {s['prompt_tokens']}-token prompt, "
             f"{s['new_tokens']} new tokens, median of {s['repeats']} alternating rounds; x = ratio to "
             f"{result['baseline']} (rounds' range in brackets)")
    legend = ("higher is better: prefill and decode tok/s (decode bN: N sequences' tokens/s together); lower is "
              "better: TTFT s, MB, peak MB")
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    return "\n".join([title, *lines, legend, *(f"warning: {w}" for w in result.get("warnings", []))])


def _row(entry: dict, batches: list[int], peak: str) -> list[str]:
    ratios, ranges = entry.get("ratios", {}), entry.get("round_ranges", {})
    decode, x_decode = entry["decode_tok_s"], ratios.get("decode_tok_s", {})
    r_decode = ranges.get("decode_tok_s", {})
    mega = [None if entry[k] is None else entry[k] / 1e6 for k in ("params", "nonzero_params", "size_bytes", peak)]
    return [entry["model"], _cell(mega[0], ".2f", "M"), _cell(mega[1], ".2f", "M"), _cell(mega[2], ".1f"),
            _cell(entry["prefill_tok_s"], ".1f"), *[_cell(decode[str(b)], ".1f") for b in batches],
            _cell(entry["ttft_s"], ".3f"), _cell(mega[3], ".0f"),
            _ratio_cell(ratios.get("prefill_tok_s"), ranges.get("prefill_tok_s")),
            *[_ratio_cell(x_decode.get(str(b)), r_decode.get(str(b))) for b in batches],
            _ratio_cell(ratios.get("ttft_s"), ranges.get("ttft_s")), _cell(ratios.get(peak), ".2f")]


def _ratio_cell(value, span) -> str:
    """'1.19' or, with more than one round, '1.19[1.05-1.30]'."""
    if value is None or not span or span[0] == span[1]:
        return _cell(value, ".2f")
    return f"{value:.2f}[{span[0]:.2f}-{span[1]:.2f}]"


def _cell(value, spec: str, unit: str = "") -> str:
    return "-" if value is None else format(value, spec) + unit


