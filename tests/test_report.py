"""`slimlm report` over hand-written run folders: table values equal the manifests', images are real PNGs,
markdown links resolve, errors are one line, nothing is overwritten without --overwrite; and, where
Chromium is installed, the page renders to a non-blank screenshot."""
import base64
import json
import re
import shutil
import statistics
import subprocess
from html.parser import HTMLParser

import pytest

from slimlm.cli import main

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
    """Tables as lists of rows of cell texts, and the attributes of every <img>."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._cell = [], [], None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "img":
            self.images.append(dict(attrs))

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self.tables[-1][-1].append("".join(self._cell))
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


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """One report shared by the tests that only read it."""
    return _report(tmp_path_factory.mktemp("report"))


def test_table_values_equal_the_manifests(report):
    page = Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    results, analyses = (_by_run(t) for t in page.tables)
    assert set(results) == {"wanda50", "wanda70-owl", "rtn-w4", "gptq-mixed", "old/bare"}
    w = results["wanda50"]
    assert (w["kind"], w["method"], w["budget"], w["ppl eval"]) == ("prune", "wanda", "0.5", "wikitext2 1×256")
    assert _close(w["sparsity"], WANDA50["sparsity"], 4) and _close(w["perplexity"], 40.1234, 2)
    assert _close(w["piqa acc"], 0.6123, 4) and _close(w["arc_easy acc_norm"], 0.4567, 4)
    assert _close(w["seconds"], 12.34, 1) and w["bits"] == "–" and w["bytes/param"] == "–"
    assert results["wanda70-owl"]["budget"] == "0.7 owl" and _close(results["wanda70-owl"]["perplexity"], 300.5, 2)
    q = results["rtn-w4"]
    assert q["budget"] == "w4 g128" and _close(q["bits"], 4.0, 2) and _close(q["bytes/param"], 1.23456, 3)
    assert q["sparsity"] == q["seconds"] == q["piqa acc"] == "–" and _close(q["perplexity"], 25.0, 2)
    g = results["gptq-mixed"]  # mixed precision: the achieved mean bits, not the target or wbits
    assert g["budget"] == "avg 3.5 bits a4 per-channel rotated alphapruning" and _close(g["bits"], 3.4, 2)
    assert g["ppl eval"] == "wikitext2 2×128" and _close(g["seconds"], 99.96, 1) and g["seconds"] == "100.0"
    assert set(results["old/bare"].values()) == {"old/bare", "sparsegpt", "–"}
    a = analyses["analysis"]
    assert a["layers"] == str(len(ANALYSIS)) and _close(a["alpha median"], statistics.median(ALPHAS), 2)
    assert _close(a["alpha min"], min(ALPHAS), 2) and _close(a["alpha max"], max(ALPHAS), 2)
    # the markdown table shows the same cells
    md = (report / "report.md").read_text(encoding="utf-8")
    row = next(line for line in md.splitlines() if line.startswith("| wanda50 |"))
    assert [c.strip() for c in row.strip("|").split(" | ")] == list(w.values())


def test_images_are_embedded_pngs_and_markdown_links_resolve(report):
    page = Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    # ppl vs sparsity, ppl vs bits, per-layer sparsity (owl) and bits (gptq-mixed), alpha across depth
    assert len(page.images) == 5
    for img in page.images:
        prefix = "data:image/png;base64,"
        assert img["src"].startswith(prefix) and img["alt"]
        png = base64.b64decode(img["src"][len(prefix):], validate=True)
        assert png.startswith(PNG_MAGIC) and len(png) > 1000
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", (report / "report.md").read_text(encoding="utf-8"))
    assert len(links) == 5
    for link in links:
        assert (report / link).read_bytes().startswith(PNG_MAGIC)
    embedded = {base64.b64decode(img["src"].split(",", 1)[1]) for img in page.images}
    assert embedded == {(report / link).read_bytes() for link in links}


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
    page = Page()
    page.feed((report / "report.html").read_text(encoding="utf-8"))
    results = _by_run(page.tables[0])
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
    import slimlm
    from slimlm.core.architectures import linear_fqns

    manifest = slimlm.quantize(llama, method="rtn", wbits=4, avg_bits=3.5, allocation="alphapruning",
                               progress=False).manifest
    sizes = {f: lin.weight.numel() for f, lin in linear_fqns(llama).items()}
    bits = {f: rec["bits"] for f, rec in manifest["layers"].items()}
    assert len(set(bits.values())) > 1  # really mixed
    assert manifest["bits"] == pytest.approx(sum(bits[f] * sizes[f] for f in sizes) / sum(sizes.values()))
    assert manifest["bits"] <= 3.5 + 1e-9
