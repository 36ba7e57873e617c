"""`slimlm report` over hand-written run folders: table values equal the manifests', images are real PNGs,
markdown links resolve, errors are one line, nothing is overwritten without --overwrite; log axes read as
plain decimals, a lone run is no line, 50 runs give one table row each and every figure; and, where
Chromium is installed, the page renders to a non-blank screenshot."""
import base64
import importlib.util
import json
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from slimlm.cli import main
from slimlm.report import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
LAYERS = [f"model.layers.{b}.{kind}" for b in range(3) for kind in ("self_attn.q_proj", "mlp.down_proj")]

def _ppl(value, windows=1, seqlen=256):
    return {"dataset": "wikitext2", "perplexity": value, "windows": windows, "seqlen": seqlen}


WANDA50 = {"kind": "prune", "method": "wanda", "pattern": "unstructured", "sparsity_target": 0.5,
           "sparsity": 0.49987, "allocation": {"name": "uniform"}, "timings": {"total": 12.34},
           "layers": {f: {"target": 0.5, "sparsity": 0.5} for f in LAYERS},
           "metrics": {"perplexity": _ppl(40.1234),
                       "zero_shot": {"tasks": {"piqa": {"acc": 0.6123, "acc_stderr": 0.01, "acc_norm": 0.6},
                                               "arc_easy": {"acc_norm": 0.4567}}}}}
WANDA70_OWL = {"kind": "prune", "method": "wanda", "pattern": "unstructured", "sparsity_target": 0.7,
               "sparsity": 0.7001, "allocation": {"name": "owl", "lamda": 0.08}, "timings": {"total": 20.0},
               "layers": {f: {"target": 0.62 + 0.03 * i, "sparsity": 0.62 + 0.03 * i}
                          for i, f in enumerate(LAYERS)},
               "metrics": {"perplexity": _ppl(300.5)}}
RTN4 = {"kind": "quantize", "method": "rtn", "wbits": 4, "group_size": 128, "abits": None, "rotation": None,
        "bits": 4.0, "allocation": {"name": "uniform", "avg_bits": None},
        "layers": {f: {"bits": 4} for f in LAYERS}, "storage": {"bytes_per_param": 1.23456},
        "metrics": {"perplexity": _ppl(25.0)}}
GPTQ_MIXED = {"kind": "quantize", "method": "gptq", "wbits": 4, "group_size": None, "abits": 4,
              "rotation": {"online_down": True}, "bits": 3.4,
              "allocation": {"name": "alphapruning", "avg_bits": 3.5},
              "layers": {f: {"bits": 3 + i % 2} for i, f in enumerate(LAYERS)}, "storage": {"bytes_per_param": 0.9},
              "timings": {"total": 99.96}, "metrics": {"perplexity": _ppl(80.0, windows=2, seqlen=128)}}
BARE = {"method": "sparsegpt"}  # an old or hand-made manifest: everything else missing
ALPHAS = [3.1, 2.4, 5.0, 4.2, 2.9, 3.6]
ANALYSIS = [{"name": f, "block": i // 2, "kind": f.split(".", 3)[3], "alpha": a} for i, (f, a) in
            enumerate(zip(LAYERS, ALPHAS))]


def _write_runs(root):
    for name, manifest in {"wanda50": WANDA50, "wanda70-owl": WANDA70_OWL, "rtn-w4": RTN4,
                           "gptq-mixed": GPTQ_MIXED, "old/bare": BARE,
                           "analysis": {"kind": "analysis", "model": "tiny"}}.items():
        (root / name).mkdir(parents=True)
        (root / name / "slimlm.json").write_text(json.dumps(manifest))
    (root / "analysis" / "metrics.json").write_text(json.dumps(ANALYSIS))
    (root / ".wanda90.tmp-abc").mkdir()  # an unfinished run of atomic_dir: skipped
    (root / ".wanda90.tmp-abc" / "slimlm.json").write_text("{")
    return root


class Page(HTMLParser):
    """Tables as lists of rows of cell texts, the <h2> headings, the attributes of every <img> and the
    class of every <figure>."""

    def __init__(self):
        super().__init__()
        self.tables, self.headings, self.images, self.figures, self._cell = [], [], [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th", "h2"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))
        elif tag == "figure":
            self.figures.append(dict(attrs).get("class"))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
            self._cell = None
        elif tag == "h2":
            self.headings.append("".join(self._cell))
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def _by_run(table):
    header, *body = table
    return {r[0]: dict(zip(header, r)) for r in body}


def _close(text, value, decimals):
    return abs(float(text) - value) <= 0.5 * 10 ** -decimals + 1e-12


def _report(root):
    runs = _write_runs(root / "runs")
    assert main(["report", str(runs)]) == 0
    return runs / "report"


def _page(report):
    page = Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report shared by the tests that only read it."""
    return _report(tmp_path_factory.mktemp("report"))


def test_table_values_equal_the_manifests(report):
    page = _page(report)
    # one table per kind of run, then the analyses
    assert page.headings[:4] == ["prune runs (2)", "quantize runs (2)", "runs of no recorded kind (1)",
                                 "analyses (1)"]
    prune, quantize, bare, analyses = (_by_run(t) for t in page.tables)
    assert set(prune) == {"wanda50", "wanda70-owl"} and set(quantize) == {"rtn-w4", "gptq-mixed"}
    w = prune["wanda50"]
    assert (w["method"], w["budget"], w["ppl eval"]) == ("wanda", "0.5", "wikitext2 1×256")
    assert _close(w["sparsity"], WANDA50["sparsity"], 4) and _close(w["perplexity"], 40.1234, 2)
    assert _close(w["piqa acc"], 0.6123, 4) and _close(w["arc_easy acc_norm"], 0.4567, 4)
    assert _close(w["seconds"], 12.34, 1)
    assert "bits" not in w and "bytes/param" not in w  # no prune run records them: columns left out
    assert prune["wanda70-owl"]["budget"] == "0.7 owl" and _close(prune["wanda70-owl"]["perplexity"], 300.5, 2)
    assert prune["wanda70-owl"]["piqa acc"] == "–"  # another run of the table records it
    q = quantize["rtn-w4"]
    assert q["budget"] == "w4 g128" and _close(q["bits"], 4.0, 2) and _close(q["bytes/param"], 1.23456, 3)
    assert q["seconds"] == "–" and "sparsity" not in q and _close(q["perplexity"], 25.0, 2)
    g = quantize["gptq-mixed"]  # mixed precision: the achieved mean bits, not the target or wbits
    assert g["budget"] == "avg 3.5 bits a4 per-channel rotated alphapruning" and _close(g["bits"], 3.4, 2)
    assert g["ppl eval"] == "wikitext2 2×128" and _close(g["seconds"], 99.96, 1) and g["seconds"] == "100.0"
    assert bare == {"old/bare": {"run": "old/bare", "method": "sparsegpt"}}
    a = analyses["analysis"]
    assert a["layers"] == str(len(ANALYSIS)) and _close(a["alpha median"], statistics.median(ALPHAS), 2)
    assert _close(a["alpha min"], min(ALPHAS), 2) and _close(a["alpha max"], max(ALPHAS), 2)
    # the markdown table shows the same cells
    md = (report / "report.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| wanda50 |"))
    assert [c.strip() for c in row.strip("|").split(" | ")] == list(w.values())


def test_images_are_embedded_pngs_and_markdown_links_resolve(report):
    page = _page(report)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report / "report.md").read_text(encoding="utf-8"))
    # every run here is alone in its (method, series): no perplexity plot, the table says it all;
    # per-layer sparsity (owl), per-layer bits (gptq-mixed) and alpha across depth remain, across the page
    assert sorted(links) == ["alpha_depth_0.png", "budgets_bits.png", "budgets_sparsity.png"]
    html = (report / "report.html").read_text(encoding="utf-8")
    assert "No perplexity-vs-sparsity plot" in html and "No perplexity-vs-bits plot" in html
    assert len(page.images) == 3 and page.figures == ["wide"] * 3
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix) and img["alt"]
        png = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    for link in links:
        assert (report / link).read_bytes().startswith(PNG_MAGIC)
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images}
    assert embedded == {(report / link).read_bytes() for link in links}


PLAIN = re.compile(r"^[0-9]+(\.[0-9]+)?$")


@pytest.mark.parametrize("lo, hi", [(24.6, 25.3), (24.6, 31.0), (24.6, 80.0), (24.6, 3300.0), (20.0, 2e5)])
def test_log_axis_ticks_read_as_plain_decimals(lo, hi):
    """Matplotlib's own labels on these ranges read "2.46×10¹" or "10²"; ours are plain numbers at the ticks."""
    plt = plots._pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1, 2], [lo, (lo * hi) ** 0.5, hi])
    plots.log_axis(ax, [lo, hi])
    fig.canvas.draw()
    labels = [(t.get_position()[1], t.get_text()) for t in ax.get_yticklabels()]
    minor = [t.get_text() for t in ax.get_yticklabels(minor=True)]
    plt.close(fig)
    assert len(labels) >= 3 and all(PLAIN.match(text) for _, text in labels), labels
    assert all(float(text) == pytest.approx(y, rel=1e-6) for y, text in labels)
    assert [y for y, _ in labels] == sorted(y for y, _ in labels) and set(minor) <= {""}
    bottom, top = ax.get_ylim()
    assert bottom < lo and top > hi and all(bottom <= y <= top for y, _ in labels)


def test_sweep_draws_lone_runs_as_markers():
    rows = [{"method": "wanda", "allocation": "uniform", "sparsity": s, "perplexity": p}
            for s, p in ((0.5, 40.0), (0.6, 70.0), (0.7, 300.0))]
    rows += [{"method": "sparsegpt", "allocation": "2:4", "sparsity": 0.5, "perplexity": 60.0},
             {"method": "wanda", "allocation": "owl", "sparsity": 0.7, "perplexity": 200.0}]
    fig = plots.sweep_figure(rows)
    (ax,) = fig.axes
    drawn = {(len(line.get_xdata()), line.get_linestyle()) for line in ax.lines}
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    plots._pyplot().close(fig)
    assert drawn == {(3, "-"), (1, "None")} and len(ax.lines) == 3
    assert legend == ["method", "sparsegpt", "wanda", "series", "2:4", "owl", "uniform"]


def _sample_module():
    path = Path(__file__).resolve().parents[1] / "bench" / "report_sample.py"
    spec = importlib.util.spec_from_file_location("report_sample", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fifty_runs_one_row_each_and_every_figure(tmp_path):
    sample = _sample_module()
    assert sample.write_sample(tmp_path / "runs") == 50
    assert main(["report", str(tmp_path / "runs")]) == 0
    page = _page(tmp_path / "runs" / "report")
    names = [row[0] for table in page.tables for row in table[1:]]
    expected = sorted([*sample.runs(), "analysis/" + sample.MODEL])
    assert sorted(names) == expected and len(names) == 50
    kinds = {h.split(" (")[0]: t for h, t in zip(page.headings, page.tables)}
    assert {r[0] for r in kinds["prune runs"][1:]} == {n for n, m in sample.runs().items() if m.get("kind") == "prune"}
    # two sweeps side by side, per-layer sparsity (4 allocations) and bits, alpha across depth across the page
    assert page.figures == [None, None, "wide", "wide", "wide"]
    assert [img["alt"].split(" ")[:3] for img in page.images] == [
        ["Perplexity", "vs", "sparsity"], ["Perplexity", "vs", "bits"], ["Per-layer", "sparsity", "of"],
        ["Per-layer", "bits", "of"], ["Alpha", "across", "depth:"]]


def test_no_runs_is_one_line_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("slimlm: error: no slimlm runs") and err.count("\n") == 1
    assert list((tmp_path / "empty").iterdir()) == []
    assert main(["report", str(tmp_path / "missing")]) == 2


def test_existing_report_replaced_only_with_overwrite(tmp_path, capsys):
    report = _report(tmp_path)
    runs = report.parent
    before = (report / "report.html").read_bytes()
    (runs / "wanda50" / "slimlm.json").write_text(json.dumps(WANDA50 | {"method": "sparsegpt"}))
    assert main(["report", str(runs)]) == 2
    assert "already exists" in capsys.readouterr().err and (report / "report.html").read_bytes() == before
    assert main(["report", str(runs), "--overwrite"]) == 0
    page = _page(report)
    results = {name: r for t in page.tables for name, r in _by_run(t).items()}
    assert results["wanda50"]["method"] == "sparsegpt" and "report" not in results  # its own manifest skipped
    # --overwrite never replaces a run folder
    assert main(["report", str(runs), "--out", str(runs / "rtn-w4"), "--overwrite"]) == 2
    assert json.loads((runs / "rtn-w4" / "slimlm.json").read_text()) == RTN4


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_chromium_renders_a_nonblank_page(report, tmp_path):
    shot = tmp_path / "shot.png"
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1200,1600",
                    (report / "report.html").resolve().as_uri()], capture_output=True, timeout=120, check=True)
    import matplotlib.image

    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (1600, 1200) and pixels.var() > 0


def test_quantize_records_the_achieved_mean_bits(llama):
    """The report's bits column for mixed precision: the parameter-weighted mean of the per-layer bits."""
    import torch

    import slimlm
    from slimlm.core.architectures import linear_fqns

    calib = torch.randint(0, llama.config.vocab_size, (4, 16), generator=torch.Generator().manual_seed(0))
    manifest = slimlm.quantize(llama, method="rtn", wbits=4, avg_bits=3.5, allocation="alphapruning", calib=calib,
                               progress=False).manifest
    sizes = {f: lin.weight.numel() for f, lin in linear_fqns(llama).items()}
    bits = {f: rec["bits"] for f, rec in manifest["layers"].items()}
    assert len(set(bits.values())) > 1  # really mixed
    assert manifest["bits"] == pytest.approx(sum(bits[f] * sizes[f] for f in sizes) / sum(sizes.values()))
    assert manifest["bits"] <= 3.5 + 1e-9
