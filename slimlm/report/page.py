"""``slimlm report``: every run under some folders on one page.

Each folder holding a ``slimlm.json`` manifest is a run (prune, quantize, or an ``analyze`` folder whose
``metrics.json`` gives the alpha-across-depth plot). The report folder holds ``report.html`` (one
self-contained file: PNGs embedded as base64), ``report.md`` (linking the PNGs written beside it) and a
``slimlm.json`` of kind "report", so that a later report over the same folders skips it. Tables are one
per kind of run (tables.py); a figure is drawn only where it shows more than the tables.
"""
from __future__ import annotations

import base64
import html
from collections import Counter
from pathlib import Path

from slimlm.errors import SlimlmError, read_json
from slimlm.report import plots
from slimlm.report.tables import (ANALYSIS_COLUMNS, MISSING, Run, analysis_row, by_kind, columns, finite, get,
                                  html_table, markdown_table, rows, text)
from slimlm.core.files import MANIFEST, read_manifest
from slimlm.runs.save import atomic_dir, check_output, versions, write_manifest


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


def figures(runs: list[Run], table: list[dict], folder: Path) -> tuple[list[tuple[str, str, bool]], list[str]]:
    """Draw the report's PNGs into ``folder``; returns (caption, file name, across the page) of each one,
    and notes on the plots left out. Drawn only where a figure shows more than the tables: a perplexity
    sweep needs a curve (two runs of one method and series), per-layer budgets a run whose budgets differ
    across layers."""
    sweeps, notes = [], []
    for x in ("sparsity", "bits"):
        points, ylabel = _sweep_points(table, x)
        if max(Counter((p["method"], p["allocation"]) for p in points).values(), default=0) > 1:
            sweeps.append((x, points, ylabel))
        elif points:
            notes.append(f"No perplexity-vs-{x} plot: no two of its runs share a method and series "
                         "(the tables compare them).")
    drawn = []
    for x, points, ylabel in sweeps:  # two side by side, or one across the page
        plots.sweep(points, folder / f"ppl_{x}.png", x, ylabel, plots.HALF if len(sweeps) == 2 else plots.FULL)
        drawn.append((f"Perplexity vs {x} (lines join the runs of one method and series)", f"ppl_{x}.png",
                      len(sweeps) == 1))
    for unit, key in (("sparsity", "target"), ("bits", "bits")):
        panels = _budget_panels(runs, table, key)
        if panels:
            plots.budget_panels(panels, folder / f"budgets_{unit}.png", unit)
            drawn.append((f"Per-layer {unit} of the runs whose budgets differ across layers, by allocation",
                          f"budgets_{unit}.png", True))
    for i, run in enumerate(r for r in runs if r.analysis is not None):
        records = [r for r in run.analysis if isinstance(r.get("kind"), str) and finite(r.get("block"))
                   and finite(r.get("alpha"))]
        if records:
            plots.alpha_depth(dict(enumerate(records)), folder / f"alpha_depth_{i}.png", figsize=plots.FULL)
            drawn.append((f"Alpha across depth: {run.name}", f"alpha_depth_{i}.png", True))
    return drawn, notes


def _sweep_points(table: list[dict], x: str) -> tuple[list[dict], str]:
    """Points and y label of perplexity against ``x`` (sparsity: runs that prune; bits: the others).
    A run evaluated under another protocol than most gets that protocol in its series label: its
    perplexity does not compare with theirs."""
    subset = [r for r in table if (r["sparsity"] is not None) == (x == "sparsity")
              and finite(r[x]) and finite(r["perplexity"]) and r["perplexity"] > 0]  # > 0: log axis
    common = Counter(r["ppl_eval"] for r in subset).most_common(1)[0][0] if subset else None
    points = [{"method": str(r["method"] or MISSING), x: r[x], "perplexity": r["perplexity"],
               "allocation": r["series"] + ("" if r["ppl_eval"] == common else f" ({r['ppl_eval'] or MISSING})")}
              for r in subset]
    return points, f"perplexity ({common})" if common else "perplexity"


def _budget_panels(runs: list[Run], table: list[dict], key: str) -> dict[str, dict[str, list[float]]]:
    """Series -> line label -> per-layer budgets in model order, of the runs whose per-layer records
    (prune: "target", quantize: "bits") differ across layers; uniform runs would only draw flat lines.
    A line is labelled by the budget asked (sparsity target or mean bits) and the method."""
    series = {r["run"]: (r["series"], str(r["method"] or MISSING)) for r in table}
    lines = []
    for run in (r for r in runs if r.name in series):  # analysis folders have no budgets
        layers = run.manifest.get("layers")
        budgets = [rec[key] for rec in layers.values() if finite(get(rec, key))] if isinstance(layers, dict) else []
        if len(set(budgets)) > 1:
            m = run.manifest
            target = m.get("sparsity_target") if key == "target" else get(m, "allocation", "avg_bits")
            # sort key: series, then budget asked (missing last), method, run
            lines.append(((series[run.name][0], not finite(target), target if finite(target) else 0,
                           series[run.name][1], run.name), budgets))
    panels: dict[str, dict[str, list[float]]] = {}
    for (name, missing, target, method, run_name), budgets in sorted(lines):
        label = f"{MISSING if missing else text(target)} {method}"
        panel = panels.setdefault(name, {})
        panel[run_name if label in panel else label] = budgets
    return panels


STYLE = """body{font-family:system-ui,-apple-system,sans-serif;margin:20px 24px;color:#222}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:26px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
p.note{color:#555;font-size:13px;margin:4px 0}table{border-collapse:collapse;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 8px}th{background:#f2f2f2;text-align:left;position:sticky;top:0}
td{white-space:nowrap}td.run{white-space:normal;min-width:16em;max-width:30em;overflow-wrap:anywhere}
td.num{text-align:right;font-variant-numeric:tabular-nums}
tbody tr:nth-child(even){background:#fafafa}
div.figures{margin-top:10px;display:grid;grid-template-columns:repeat(2,minmax(0,1fr));gap:18px 20px}
figure{margin:0}figure.wide{grid-column:1/-1}
figcaption{font-weight:600;font-size:14px;margin-bottom:4px}img{width:100%;height:auto;border:1px solid #eee}"""
NOTE = ("Perplexities compare only between rows with the same “ppl eval” protocol "
        "(dataset, windows × tokens). "
        "“–”: not recorded in the run's manifest; a column no run of a table records is left out. "
        "Seconds: compression time, evaluation excluded.")


def page_html(title: str, sections: list[tuple[str, str]], images: list[tuple[str, str, bool]],
              notes: list[str], folder: Path) -> str:
    """One self-contained page: tables inline, then the figures two to a row (wide ones across the page),
    each PNG embedded as a base64 data URI."""
    body = [f"<h1>{html.escape(title)}</h1>", f'<p class="note">{html.escape(NOTE)}</p>']
    body += [f"<h2>{html.escape(h)}</h2>\n{table}" for h, table in sections]
    body += ["<h2>Plots</h2>"] if images or notes else []
    body += [f'<p class="note">{html.escape(note)}</p>' for note in notes]
    body += ['<div class="figures">'] if images else []
    for h, name, wide in images:
        png = base64.b64encode((folder / name).read_bytes()).decode()
        wide = ' class="wide"' if wide else ""
        body.append(f"<figure{wide}><figcaption>{html.escape(h)}</figcaption>\n"
                    f'<img alt="{html.escape(h)}" src="data:image/png;base64,{png}"></figure>')
    body += ["</div>"] if images else []
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


def page_markdown(title: str, sections: list[tuple[str, str]], images: list[tuple[str, str, bool]],
                  notes: list[str]) -> str:
    parts = [f"# {title}", NOTE] + [f"## {h}\n\n{table}" for h, table in sections]
    parts += ["## Plots", *notes] if images or notes else []
    parts += [f"### {h}\n\n![{h}]({name})" for h, name, _ in images]
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
    tables = [(f"{title} ({len(t)})", columns(t), t) for title, t in by_kind(table)]
    tables += [(f"analyses ({len(analyses)})", ANALYSIS_COLUMNS, analyses)] if analyses else []
    title = f"slimlm report: {len(runs)} runs under {', '.join(map(str, folders))}"
    with atomic_dir(out, overwrite) as tmp:
        images, notes = figures(runs, table, tmp)
        page = page_html(title, [(h, html_table(c, t)) for h, c, t in tables], images, notes, tmp)
        (tmp / "report.html").write_text(page, encoding="utf-8")
        page = page_markdown(title, [(h, markdown_table(c, t)) for h, c, t in tables], images, notes)
        (tmp / "report.md").write_text(page, encoding="utf-8")
        write_manifest(tmp, {"kind": "report", "sources": [str(f) for f in folders],
                             "runs": [r.name for r in runs], "versions": versions()})
    return out, runs
