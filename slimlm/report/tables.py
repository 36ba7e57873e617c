"""The report's tables: one row per run read from its manifest, grouped by kind, as HTML or markdown.

A field missing from a manifest shows as "–", it never stops the report; a column missing from every
run of a table is left out of that table.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass
from pathlib import Path

MISSING = "–"
# (header, row key, decimals; None = text); zero-shot columns are added per task
COLUMNS = [("run", "run", None), ("method", "method", None), ("budget", "budget", None),
           ("sparsity", "sparsity", 4), ("bits", "bits", 2), ("bytes/param", "bytes_per_param", 3),
           ("perplexity", "perplexity", 2), ("ppl eval", "ppl_eval", None)]
SECONDS = ("seconds", "seconds", 1)
ANALYSIS_COLUMNS = [("run", "run", None), ("model", "model", None), ("layers", "layers", None),
                    ("alpha min", "alpha_min", 2), ("alpha median", "alpha_median", 2),
                    ("alpha max", "alpha_max", 2)]


@dataclass
class Run:
    name: str  # folder relative to the searched folder
    folder: Path
    manifest: dict
    analysis: list[dict] | None  # the metrics.json records of an `analyze` folder


def get(d, *keys):
    """``d[k1][k2]...``, or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def finite(v) -> bool:
    return _number(v) and math.isfinite(v)


def text(v) -> str:
    return f"{v:g}" if _number(v) else str(v)


def _grid(quant: dict) -> str:
    """' g128' or ' per-channel' (empty where the manifest does not say)."""
    if "group_size" not in quant:
        return ""
    return f" g{text(quant['group_size'])}" if quant["group_size"] is not None else " per-channel"


def _quant(m: dict) -> dict:
    """Where the quantization grid is recorded: a joint prune + quantize run's "quantization", else the top level."""
    return m["quantization"] if isinstance(m.get("quantization"), dict) else m


def _budget(m: dict) -> str | None:
    """What was asked: '0.7 alphapruning', '2:4', '0.5 + w4 g128', 'w4a4 g128 rotated', 'avg 3.5 bits g128 owl'."""
    quant = _quant(m)
    parts = []
    if "sparsity_target" in m or "pattern" in m:
        pattern = m.get("pattern")
        parts.append(pattern if pattern not in (None, "unstructured") else text(m.get("sparsity_target")))
    if quant.get("wbits") is not None:
        avg = get(m, "allocation", "avg_bits")
        bits = f"avg {text(avg)} bits " if avg is not None else f"w{text(quant['wbits'])}"
        bits += (f"a{text(m['abits'])}" if m.get("abits") else "") + _grid(quant)
        parts += ["+", bits] if parts else [bits]
    if m.get("rotation"):
        parts.append("rotated")
    allocation = get(m, "allocation", "name")
    if allocation not in (None, "uniform"):
        parts.append(str(allocation))
    if get(m, "allocation", "overrides"):  # per-layer values set by --override
        parts.append("override")
    return " ".join(parts) or None


def _bits(m: dict):
    """Achieved mean bit-width: recorded by quantize as "bits"; else the uniform wbits."""
    if "bits" in m:
        return m["bits"]
    if "wbits" in m and get(m, "allocation", "avg_bits") is None:
        return m["wbits"]
    return get(m, "quantization", "wbits")


def _series(m: dict) -> str:
    """Which curve a run belongs to besides its method: allocation or N:M pattern, plus the quantization
    grid (bits of a joint prune + quantize run, activation bits, group size, rotation)."""
    pattern = m.get("pattern")
    label = pattern if pattern not in (None, "unstructured") else str(get(m, "allocation", "name") or MISSING)
    quant = _quant(m)
    if quant is not m and quant.get("wbits") is not None:
        label += f" w{text(quant['wbits'])}"
    if m.get("abits"):
        label += f" a{text(m['abits'])}"
    if quant.get("wbits") is not None:
        label += _grid(quant)
    return label + (" rotated" if m.get("rotation") else "")


def _accuracy(metrics) -> tuple[str, float] | None:
    """The accuracy to show for one zero-shot task: acc, else acc_norm, else its first plain metric."""
    if not isinstance(metrics, dict):
        return None
    names = [k for k in metrics if _number(metrics[k]) and "stderr" not in k and k != "samples"]
    name = next((n for n in ("acc", "acc_norm") if n in names), names[0] if names else None)
    return None if name is None else (name, metrics[name])


def row(run: Run) -> dict:
    """One results-table row with the manifest's raw values (None where missing)."""
    m = run.manifest
    ppl = get(m, "metrics", "perplexity")
    protocol = None
    if isinstance(ppl, dict) and ppl.get("windows") is not None:
        protocol = f"{ppl.get('dataset', '?')} {text(ppl['windows'])}×{text(ppl.get('seqlen', '?'))}"
    tasks = get(m, "metrics", "zero_shot", "tasks")
    zero_shot = {}  # "task metric" -> value
    for task, metrics in (tasks.items() if isinstance(tasks, dict) else []):
        if (acc := _accuracy(metrics)) is not None:
            zero_shot[f"{task} {acc[0]}"] = acc[1]
    return {"run": run.name, "kind": m.get("kind"), "method": m.get("method"), "budget": _budget(m),
            "sparsity": m.get("sparsity"), "bits": _bits(m),
            "bytes_per_param": get(m, "storage", "bytes_per_param"),
            "perplexity": get(ppl, "perplexity"), "ppl_eval": protocol, "seconds": get(m, "timings", "total"),
            "series": _series(m), "zero_shot": zero_shot}


def rows(runs: list[Run]) -> list[dict]:
    """Results-table rows of the compression runs (analysis folders have their own table)."""
    return [row(r) for r in runs if r.analysis is None]


def _order(r: dict) -> tuple:
    """Rows of one curve together, by budget: method, series, sparsity or bits, name."""
    x = next((v for v in (r["sparsity"], r["bits"]) if finite(v)), -math.inf)
    return str(r["method"]), r["series"], x, r["run"]


def by_kind(table: list[dict]) -> list[tuple[str, list[dict]]]:
    """(title, rows) per kind of run (prune, quantize, ...; runs without a kind last), rows in curve order."""
    kinds = sorted({str(r["kind"]) for r in table if r["kind"] is not None})
    groups = [(f"{kind} runs", [r for r in table if str(r["kind"]) == kind]) for kind in kinds]
    groups.append(("runs of no recorded kind", [r for r in table if r["kind"] is None]))
    return [(title, sorted(group, key=_order)) for title, group in groups if group]


def analysis_row(run: Run) -> dict:
    alphas = sorted(r["alpha"] for r in run.analysis if finite(r.get("alpha")))
    return {"run": run.name, "model": run.manifest.get("model"), "layers": len(run.analysis),
            "alpha_min": alphas[0] if alphas else None, "alpha_max": alphas[-1] if alphas else None,
            "alpha_median": (alphas[(len(alphas) - 1) // 2] + alphas[len(alphas) // 2]) / 2 if alphas else None}


def cell(r: dict, key, decimals: int | None) -> str:
    """A row's value as table text: numbers to ``decimals`` places, "–" where missing."""
    value = r["zero_shot"].get(key[1]) if isinstance(key, tuple) else r.get(key)
    if value is None or value == "":
        return MISSING
    if decimals is not None and _number(value):
        return f"{value:.{decimals}f}"
    return str(value)


def columns(table: list[dict]) -> list[tuple]:
    """A results table's columns: the fixed ones, one per zero-shot task found, seconds last; a column
    that no row of this table has is left out (the run's name always stays)."""
    tasks = sorted({name for r in table for name in r["zero_shot"]})
    cols = COLUMNS + [(name, ("zero_shot", name), 4) for name in tasks] + [SECONDS]
    return [c for c in cols if c[1] == "run" or any(cell(r, c[1], c[2]) != MISSING for r in table)]


def html_table(cols: list[tuple], table: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    body = "".join("<tr>" + "".join(f'<td class="{"run" if k == "run" else "text" if d is None else "num"}">'
                                    f"{html.escape(cell(r, k, d))}</td>" for _, k, d in cols) + "</tr>\n"
                   for r in table)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def markdown_table(cols: list[tuple], table: list[dict]) -> str:
    def escape(t):
        return t.replace("|", "\\|")

    lines = ["| " + " | ".join(escape(h) for h, _, _ in cols) + " |",
             "|" + "|".join("---:" if d is not None else "---" for _, _, d in cols) + "|"]
    lines += ["| " + " | ".join(escape(cell(r, k, d)) for _, k, d in cols) + " |" for r in table]
    return "\n".join(lines)
