"""Weight, activation and KV-cache quantization of the built-in model with the outlier-aware methods (issue #15):
RTN, SmoothQuant, QuaRot (RTN, GPTQ), DuQuant, FlatQuant (RTN, GPTQ), each with and without IntactKV.

Protocol (bench/common.py): calibration = the first 32 windows of 512 tokens of wikitext2/valid.tokens (FlatQuant:
the first 16, its CPU budget: 15 epochs of block training on the paper's 128 x 2048 would take ~13 h here);
perplexity on the first 8 windows of 2048 tokens of test.raw. Weights per output channel (symmetric; DuQuant
asymmetric with its 0.8 clip), activations per token (symmetric; DuQuant asymmetric, clip 0.9), KV cache per head
and token (asymmetric), every method at its paper's defaults. Each row's quantized model is evaluated twice: with
IntactKV (the full-precision [BOS] cache prepended to every window, never quantized) and with that hook removed,
the same weights. ``calib s`` is the whole quantize step (statistics, transforms, training, rounding); peak RSS is
the row's process before evaluation.

Rows: recipes/outliers/<row>.yaml.

    python bench/outlier_table.py                                     # all rows -> bench/results/
    python bench/outlier_table.py --rows w4a4kv4-duquant --eval-windows 1 --out /tmp/o.json
    python bench/outlier_table.py --model MODEL_FOLDER --out /tmp/other.json     # the same rows on another model

Another model (``--model``) needs a tokenizer with a BOS token: the rows keep [BOS] intact.
"""
from __future__ import annotations

from common import RECIPES, RESULTS, peak_rss_mb, recipe_rows, row_recipe, table_main


def _without_intact_kv(model) -> None:
    from slimlm.hooks import intactkv
    from slimlm.hooks.kvcache import KV_ATTR, attention_modules

    intactkv.detach_(model)
    for module in attention_modules(model):
        if getattr(module, KV_ATTR, None) is not None:
            getattr(module, KV_ATTR).intact = 0


def run_row(name: str, args) -> dict:
    import slimlm
    from slimlm.pipeline import Context, run_steps
    from slimlm.hooks import intactkv
    from slimlm.recipe import COMPRESSION, RunOptions

    path = recipe_rows(args.recipes)[name]
    recipe = row_recipe(path, args.data_dir, args.model)
    model, tokenizer = slimlm.load_model(recipe.run.model, recipe.run.dtype)
    manifests, _, _ = run_steps(recipe, Context(model, tokenizer, recipe.run, RunOptions(quiet=True)),
                                kinds=COMPRESSION)
    row = {"recipe": str(path), "model": recipe.run.model, "peak_rss_mb": peak_rss_mb()}
    if manifests:
        row.update(calibration_s=manifests[-1]["timings"]["total"], timings=manifests[-1]["timings"])
        training = (manifests[-1].get("transform") or {}).get("training")
        if training:
            row["training"] = training
    else:  # the dense model: IntactKV's cache is its own, so both measurements should agree
        intactkv.attach_(model, intactkv.pivot_cache(model, intactkv.pivot_tokens(tokenizer, "bos")))
    (ns,) = [ns for kind, ns in recipe.steps if kind == "eval"]
    windows = args.eval_windows or ns.eval_windows

    def ppl():
        return slimlm.evaluate(model, tokenizer, ns.eval_dataset, ns.eval_seqlen, windows, args.data_dir,
                               progress=False)["perplexity"]
    row["perplexity_intact_kv"] = ppl()
    _without_intact_kv(model)
    row.update(perplexity=ppl(), eval_windows=windows)
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| row | perplexity | + IntactKV | calib s | peak RSS MB |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['row']} | {r['perplexity']:.2f} | {r['perplexity_intact_kv']:.2f} | "
                     f"{r.get('calibration_s', 0):.0f} | {r['peak_rss_mb']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    table_main(__file__, __doc__, RECIPES / "outliers", run_row, markdown, str(RESULTS / "outlier_table.json"))
