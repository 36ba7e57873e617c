"""``slimlm report``: every run under some folders on one page.

Each folder holding a ``slimlm.json`` manifest is a run (prune, quantize, or an ``analyze`` folder whose
``metrics.json`` gives the alpha-across-depth plot). The report folder holds ``report.html`` (one
self-contained file: PNGs embedded as base64), ``report.md`` (linking the PNGs written beside it) and a
``slimlm.json`` of kind "report", so that a later report over the same folders skips it. A field missing
from a manifest shows as "–", it never stops the report.
"""
from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass
from pathlib import Path

from slimlm.report import plots
from slimlm.errors import SlimlmError, read_json
from slimlm.runs.save import MANIFEST, atomic_dir, check_output, read_manifest, versions, write_manifest

MISSING = "–"
# (header, row key, decimals; None = text); zero-shot columns are added per task
COLUMNS = [("run", "run", None), ("kind", "kind", None), ("method", "method", None), ("budget", "budget", None),
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


def collect_runs(folders) -> list[Run]:
    """Every run folder under ``folders`` (reports and atomic_dir's unfinished '.'-folders skipped), by name."""
    roots = [Path(f) for f in folders]
    for root in roots:
        if not root.is_dir():
            raise SlimlmError(f"folder not found: {root}")
    runs, seen = [], set()
    for root in roots:
        for path in sorted(root.rglob(MANIFEST)):
            rel = path.parent.relative_to(root)
            if any(part.startswith(".") for part in rel.parts) or path.parent.resolve() in seen:
                continue
            seen.add(path.parent.resolve())
            manifest = read_manifest(path.parent)
            if not isinstance(manifest, dict):
                raise SlimlmError(f"{path} is not a JSON object")
            if manifest.get("kind") == "report":
                continue
            name = (Path(root.resolve().name) / rel if len(roots) > 1 or rel == Path(".") else rel).as_posix()
            runs.append(Run(name, path.parent, manifest, _analysis_records(path.parent)))
    if not runs:
        raise SlimlmError(f"no slimlm runs (folders with {MANIFEST}) under {', '.join(map(str, roots))}")
    return sorted(runs, key=lambda r: r.name)


def _analysis_records(folder: Path) -> list[dict] | None:
    path = folder / "metrics.json"
    if not path.is_file():
        return None
    records = read_json(path)
    return [r for r in records if isinstance(r, dict)] if isinstance(records, list) else []


def _get(d, *keys):
    """``d[k1][k2]...``, or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(key)
    return d


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _finite(v) -> bool:
    return _number(v) and math.isfinite(v)


def _text(v) -> str:
    return f"{v:g}" if _number(v) else str(v)


def _budget(m: dict) -> str | None:
    """What was asked: '0.7 alphapruning', '2:4', '0.5 + w4 g128', 'w4a4 g128 rotated', 'avg 3.5 bits g128 owl'."""
    quant = m["quantization"] if isinstance(m.get("quantization"), dict) else m
    parts = []
    if "sparsity_target" in m or "pattern" in m:
        pattern = m.get("pattern")
        parts.append(pattern if pattern not in (None, "unstructured") else _text(m.get("sparsity_target")))
    if quant.get("wbits") is not None:
        avg = _get(m, "allocation", "avg_bits")
        bits = f"avg {_text(avg)} bits " if avg is not None else f"w{_text(quant['wbits'])}"
        bits += f"a{_text(m['abits'])}" if m.get("abits") else ""
        if "group_size" in quant:
            bits += f" g{_text(quant['group_size'])}" if quant["group_size"] is not None else " per-channel"
        parts += ["+", bits] if parts else [bits]
    if m.get("rotation"):
        parts.append("rotated")
    allocation = _get(m, "allocation", "name")
    if allocation not in (None, "uniform"):
        parts.append(str(allocation))
    if _get(m, "allocation", "overrides"):  # per-layer values set by --override
        parts.append("override")
    return " ".join(parts) or None


def _bits(m: dict):
    """Achieved mean bit-width: recorded by quantize as "bits"; else the uniform wbits."""
    if "bits" in m:
        return m["bits"]
    if "wbits" in m and _get(m, "allocation", "avg_bits") is None:
        return m["wbits"]
    return _get(m, "quantization", "wbits")


def _series(m: dict) -> str:
    """Which curve a run belongs to besides its method: allocation or N:M pattern, plus bits / rotation."""
    pattern = m.get("pattern")
    label = pattern if pattern not in (None, "unstructured") else str(_get(m, "allocation", "name") or MISSING)
    if _get(m, "quantization", "wbits") is not None:
        label += f" w{_text(m['quantization']['wbits'])}"
    if m.get("abits"):
        label += f" a{_text(m['abits'])}"
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
    ppl = _get(m, "metrics", "perplexity")
    protocol = None
    if isinstance(ppl, dict) and ppl.get("windows") is not None:
        protocol = f"{ppl.get('dataset', '?')} {_text(ppl['windows'])}×{_text(ppl.get('seqlen', '?'))}"
    tasks = _get(m, "metrics", "zero_shot", "tasks")
    zero_shot = {}  # "task metric" -> value
    for task, metrics in (tasks.items() if isinstance(tasks, dict) else []):
        if (acc := _accuracy(metrics)) is not None:
            zero_shot[f"{task} {acc[0]}"] = acc[1]
    return {"run": run.name, "kind": m.get("kind"), "method": m.get("method"), "budget": _budget(m),
            "sparsity": m.get("sparsity"), "bits": _bits(m),
            "bytes_per_param": _get(m, "storage", "bytes_per_param"),
            "perplexity": _get(ppl, "perplexity"), "ppl_eval": protocol, "seconds": _get(m, "timings", "total"),
            "series": _series(m), "zero_shot": zero_shot}


def rows(runs: list[Run]) -> list[dict]:
    """Results-table rows of the compression runs (analysis folders have their own table)."""
    return [row(r) for r in runs if r.analysis is None]


def analysis_row(run: Run) -> dict:
    alphas = sorted(r["alpha"] for r in run.analysis if _finite(r.get("alpha")))
    return {"run": run.name, "model": run.manifest.get("model"), "layers": len(run.analysis),
            "alpha_min": alphas[0] if alphas else None, "alpha_max": alphas[-1] if alphas else None,
            "alpha_median": (alphas[(len(alphas) - 1) // 2] + alphas[len(alphas) // 2]) / 2 if alphas else None}


def columns(table: list[dict]) -> list[tuple]:
    """The results table's columns: the fixed ones, one per zero-shot task found, seconds last."""
    tasks = sorted({name for r in table for name in r["zero_shot"]})
    return COLUMNS + [(name, ("zero_shot", name), 4) for name in tasks] + [SECONDS]


def cell(r: dict, key, decimals: int | None) -> str:
    """A row's value as table text: numbers to ``decimals`` places, "–" where missing."""
    value = r["zero_shot"].get(key[1]) if isinstance(key, tuple) else r.get(key)
    if value is None or value == "":
        return MISSING
    if decimals is not None and _number(value):
        return f"{value:.{decimals}f}"
    return str(value)


def figures(runs: list[Run], table: list[dict], folder: Path) -> list[tuple[str, str]]:
    """Draw the report's PNGs into ``folder``; returns (title, file name) of each one drawn."""
    drawn = []
    for x, subset in (("sparsity", [r for r in table if r["sparsity"] is not None]),
                      ("bits", [r for r in table if r["sparsity"] is None])):
        points = [{"method": str(r["method"] or MISSING), "allocation": r["series"], x: r[x],
                   "perplexity": r["perplexity"]} for r in subset if _finite(r[x]) and _finite(r["perplexity"])]
        if points:
            plots.sweep(points, folder / f"ppl_{x}.png", x=x)
            drawn.append((f"Perplexity vs {x} (one line per method / allocation)", f"ppl_{x}.png"))
    for unit, key in (("sparsity", "target"), ("bits", "bits")):
        maps = _layer_budgets(runs, key)
        if maps:
            plots.budgets(maps, folder / f"budgets_{unit}.png", unit, title=f"per-layer {unit} by run")
            drawn.append((f"Per-layer {unit} budgets (one line per run)", f"budgets_{unit}.png"))
    for i, run in enumerate(r for r in runs if r.analysis is not None):
        records = [r for r in run.analysis if isinstance(r.get("kind"), str) and _finite(r.get("block"))
                   and _finite(r.get("alpha"))]
        if records:
            plots.alpha_depth(dict(enumerate(records)), folder / f"alpha_depth_{i}.png")
            drawn.append((f"Alpha across depth: {run.name}", f"alpha_depth_{i}.png"))
    return drawn


def _layer_budgets(runs: list[Run], key: str) -> dict[str, dict[str, float]]:
    """Run name -> {layer: budget} from the manifests' per-layer records (prune: "target", quantize: "bits");
    empty unless some run's budgets differ across layers (uniform runs alone make flat lines only)."""
    maps = {}
    for run in runs:
        layers = run.manifest.get("layers")
        budgets = {f: rec[key] for f, rec in layers.items() if _finite(_get(rec, key))} if isinstance(
            layers, dict) else {}
        if budgets:
            maps[run.name] = budgets
    return maps if any(len(set(b.values())) > 1 for b in maps.values()) else {}


def html_table(cols: list[tuple], table: list[dict]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h, _, _ in cols)
    body = "".join("<tr>" + "".join(f'<td class="{"text" if d is None else "num"}">'
                                    f"{html.escape(cell(r, k, d))}</td>" for _, k, d in cols) + "</tr>\n"
                   for r in table)
    return f"<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n{body}</tbody>\n</table>"


def markdown_table(cols: list[tuple], table: list[dict]) -> str:
    def escape(text):
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(escape(h) for h, _, _ in cols) + " |",
             "|" + "|".join("---:" if d is not None else "---" for _, _, d in cols) + "|"]
    lines += ["| " + " | ".join(escape(cell(r, k, d)) for _, k, d in cols) + " |" for r in table]
    return "\n".join(lines)


STYLE = """body{font-family:system-ui,-apple-system,sans-serif;margin:24px;color:#222;max-width:1400px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.note{color:#555;font-size:13px}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px;white-space:nowrap}th{background:#f2f2f2;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}tbody tr:nth-child(even){background:#fafafa}
div.figures{display:flex;flex-wrap:wrap;gap:12px}figure{margin:0;max-width:100%}
figcaption{font-weight:600;font-size:14px;margin-bottom:4px}img{width:100%;border:1px solid #eee}"""
NOTE = ("Perplexities compare only between rows with the same “ppl eval” protocol "
        "(dataset, windows × tokens). "
        "“–”: not recorded in the run's manifest. Seconds: compression time, evaluation excluded.")


def page_html(title: str, sections: list[tuple[str, str]], images: list[tuple[str, str]], folder: Path) -> str:
    """One self-contained page: tables inline, each PNG embedded as a base64 data URI."""
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(NOTE)}</p>']
    body += [f"<h2>{html.escape(h)}</h2>\n{table}" for h, table in sections]
    body += ["<h2>Plots</h2>", '<div class="figures">'] if images else []
    for h, name in images:
        png = (folder / name).read_bytes()
        width = int.from_bytes(png[16:20], "big") * 2 // 3  # IHDR width; 2/3 keeps two plots side by side
        body.append(f'<figure style="width:{width}px"><figcaption>{html.escape(h)}</figcaption>\n'
                    f'<img alt="{html.escape(h)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                    "</figure>")
    body += ["</div>"] if images else []
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def page_markdown(title: str, sections: list[tuple[str, str]], images: list[tuple[str, str]]) -> str:
    parts = [f"# {title}", NOTE] + [f"## {h}\n\n{table}" for h, table in sections]
    parts += [f"## {h}\n\n![{h}]({name})" for h, name in images]
    return "\n\n".join(parts) + "\n"


def write_report(folders, out: str | Path | None = None, overwrite: bool = False) -> tuple[Path, list[Run]]:
    """Collect the runs under ``folders`` and write report.html, report.md and PNGs to ``out`` atomically
    (default ``<first folder>/report``); an existing report is replaced only with ``overwrite``."""
    folders = [Path(f) for f in folders]
    out = Path(out) if out else folders[0] / "report"
    check_output(out, overwrite)
    if out.exists() and read_manifest(out).get("kind") != "report":
        raise SlimlmError(f"refusing to replace {out}: it is a slimlm run, not a report")
    runs = collect_runs(folders)
    table = rows(runs)
    analyses = [analysis_row(r) for r in runs if r.analysis is not None]
    tables = [(h, cols, t) for h, cols, t in (("Results", columns(table), table),
                                              ("Analyses", ANALYSIS_COLUMNS, analyses)) if t]
    title = f"slimlm report: {len(runs)} runs under {', '.join(map(str, folders))}"
    with atomic_dir(out, overwrite) as tmp:
        images = figures(runs, table, tmp)
        page = page_html(title, [(h, html_table(c, t)) for h, c, t in tables], images, tmp)
        (tmp / "report.html").write_text(page, encoding="utf-8")
        page = page_markdown(title, [(h, markdown_table(c, t)) for h, c, t in tables], images)
        (tmp / "report.md").write_text(page, encoding="utf-8")
        write_manifest(tmp, {"kind": "report", "sources": [str(f) for f in folders],
                             "runs": [r.name for r in runs], "versions": versions()})
    return out, runs
