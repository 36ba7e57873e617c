"""Do the allocators' costs predict measured damage, and does each allocation beat its baseline? (issue #25)

Part 1, costs against damage: for a sample of layers (every linear of ``--blocks`` evenly spaced blocks), each
compressed alone at a few levels, the cost model's prediction against the measured loss increase: the mean
per-token KLD from the source model on held-out windows (``allocate.holdout.Reference``; windows the costs never
read). Cost models: ``fisher`` sparsity tables (Optimal Brain Damage on the weights Wanda removes),
``errortable`` (the layer's own relative output error), ``fisher_bits`` (RTN at each bit-width, group 128) and
the GGUF type costs of ``--size`` (``gguf.sizing.cost_table``). The same stand-ins as the check compress the layer
(Wanda masks, RTN, the imatrix-weighted scale search). Reported: Spearman's rank correlation over every
(layer, level) pair, and the mean over levels of the correlation across layers at one level (what an allocator
needs: which layers cost more at the same budget). ``--parts structure`` does the same for the ``fisher`` rank
costs (each sampled linear alone factorized by SVD-LLM) and width costs (each sampled block alone losing MLP
channels or KV groups), measured as those runs make them.

Part 2, the held-out check: per allocator and budget, the baseline's and the plan's held-out KLD and the plan the
run keeps, as ``slimlm prune/quantize --allocation`` and ``slimlm gguf --size`` compute them (sparsity: Wanda
stand-in; bits: RTN; GGUF sizes: the byte size of llama.cpp's named mixes, baseline the rule's own types).
``--exclude-types Q4_1`` removes a type from the size mix's choices (the built-in model was a Q4_1 file).

Protocol: the first 20 windows of 512 tokens of wikitext2/valid.tokens; the first 16 plan (Fisher, norms,
importance), the last 4 are held out, as a ``--nsamples 20`` run holds them out.

    python bench/allocation_check.py [--model smollm2-135m] [--blocks 3] [--out bench/results/allocation_check.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path

import torch

from common import DEFAULT_DATA, RESULTS, protocol_windows

SPARSITY_LEVELS = (0.5, 0.7, 0.9)
BIT_LEVELS = (2, 3, 4)
SPARSITIES = (0.7, 0.8)
AVG_BITS = (3.0, 3.5)
GGUF_SIZES = ("Q4_K_M", "Q3_K_M", "Q2_K")
RANK_KEEPS = (0.2, 0.4, 0.6)  # fractions of a matrix's parameters its factors keep
WIDTH_LEVELS = ((0.25, 0.5, 0.75), (1, 2))  # fractions of a block's MLP channels; numbers of its KV groups


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties share their mean rank)."""
    def ranks(v):
        t = torch.tensor(v, dtype=torch.float64)
        order = t.argsort()
        r = torch.empty_like(t)
        r[order] = torch.arange(len(v), dtype=torch.float64)
        for value in t.unique():
            same = t == value
            r[same] = r[same].mean()
        return r
    a, b = ranks(x), ranks(y)
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-30)).item()


def sampled_layers(model, blocks: int) -> list[str]:
    from slimlm.core.architectures import linear_fqns

    fqns = list(linear_fqns(model))
    n = len({f.split(".layers.")[1].split(".")[0] for f in fqns})
    chosen = {round(i * (n - 1) / max(blocks - 1, 1)) for i in range(blocks)}
    return [f for f in fqns if int(f.split(".layers.")[1].split(".")[0]) in chosen]


def correlations(predicted: dict[str, dict], measured: dict[str, dict]) -> dict:
    """Pooled and per-level Spearman of predicted vs measured over the sampled layers."""
    pairs = [(predicted[f][lv], measured[f][lv]) for f in measured for lv in measured[f]]
    levels = sorted({lv for f in measured for lv in measured[f]}, key=str)
    per_level = {str(lv): spearman([predicted[f][lv] for f in measured if lv in measured[f]],
                                   [measured[f][lv] for f in measured if lv in measured[f]]) for lv in levels}
    return {"pooled": spearman(*zip(*pairs)), "across_layers": sum(per_level.values()) / len(per_level),
            "per_level": per_level, "pairs": len(pairs)}


def part1(model, planning, reference, layers) -> dict:
    from slimlm.allocate import allocation_metrics, holdout
    from slimlm.analysis.sensitivity import fisher_bit_tables, fisher_diagonal, fisher_tables
    from slimlm.pruning.masks import topk_mask
    from slimlm.pruning.scores import wanda_scores
    from slimlm.quant.grids import QuantGrid
    from slimlm.quant.rtn import rtn

    fisher, sqnorms = fisher_diagonal(model, planning, progress=False)
    errors = allocation_metrics(model, "errortable", planning, progress=False)
    models = {"fisher": fisher_tables(model, fisher, sqnorms, SPARSITY_LEVELS),
              "errortable": {f: {lv: errors[f]["errors"][lv] for lv in SPARSITY_LEVELS} for f in layers},
              "fisher_bits": fisher_bit_tables(model, fisher, lambda b: QuantGrid(b, True, 128), BIT_LEVELS)}
    stand_ins = {
        "sparsity": lambda f, W, s: W * topk_mask(wanda_scores(W, sqnorms[f]), s, "row"),
        "bits": lambda f, W, b: rtn(W, QuantGrid(b, True, 128))}
    measured = {"sparsity": {}, "bits": {}}
    for f in layers:
        for unit, levels in (("sparsity", SPARSITY_LEVELS), ("bits", BIT_LEVELS)):
            measured[unit][f] = holdout.measure(model, reference, {lv: {f: lv} for lv in levels}, stand_ins[unit],
                                                progress=False)
    out = {name: correlations(models[name], measured[unit]) for name, unit in
           (("fisher", "sparsity"), ("errortable", "sparsity"), ("fisher_bits", "bits"))}
    out["measured"] = {u: {f: {str(k): v for k, v in t.items()} for f, t in m.items()} for u, m in measured.items()}
    return out | gguf_costs(model, planning, reference, layers, (fisher, sqnorms))


def gguf_costs(model, planning, reference, layers, fisher_pass=None) -> dict:
    """The GGUF type costs of ``--size`` (``gguf.sizing.cost_table``) against the held-out KLD of each sampled
    linear alone fitted to each of its types (the imatrix-weighted scale search), with the scale between them
    (measured / predicted, median per type: a constant scale does not change the mix, a type whose scale stands
    out is mispriced) and ``ffn_down`` at Q2_K on its own."""
    from slimlm.allocate import holdout
    from slimlm.analysis.sensitivity import fisher_diagonal
    from slimlm.core.architectures import linear_fqns
    from slimlm.gguf import sizing
    from slimlm.gguf.types import TYPES, fit

    fisher, sqnorms = fisher_pass or fisher_diagonal(model, planning, progress=False)
    importance = {f: s / planning.numel() for f, s in sqnorms.items()}
    table = sizing.cost_table({f"{f}.weight": m.weight for f, m in linear_fqns(model).items() if f in layers},
                              {f"{f}.weight": fisher[f] for f in layers},
                              {f"{f}.weight": importance[f] for f in layers}, progress=False)
    predicted = {k.removesuffix(".weight"): v for k, v in table.items()}
    measured = {f: holdout.measure(model, reference, {k: {f: k} for k in predicted[f]},
                                   lambda fqn, W, k: fit(TYPES[k], W.float(), importance[fqn]).values(),
                                   progress=False) for f in layers}
    scale = {}
    for f in layers:
        for k, p in predicted[f].items():
            if p > 0 and measured[f][k] > 0:
                scale.setdefault(k, []).append(measured[f][k] / p)
    down = [f for f in layers if f.endswith("down_proj") and "Q2_K" in predicted[f]]
    return {"gguf_types": correlations(predicted, measured),
            "gguf_scale": {k: {"median": float(torch.tensor(v).median()), "min": min(v), "max": max(v),
                               "pairs": len(v)} for k, v in sorted(scale.items())},
            "ffn_down_q2k": {f: {"predicted": predicted[f]["Q2_K"], "measured": measured[f]["Q2_K"]} for f in down},
            "gguf_measured": {f: {"predicted": predicted[f], "measured": measured[f]} for f in layers}}


def part1_structure(model, planning, reference, layers) -> dict:
    """Ranks and widths: the ``fisher`` rank costs (``structured.factorize._fisher_losses`` on SVD-LLM's whitened
    spectra) against the held-out KLD of each sampled linear alone truncated to keep RANK_KEEPS of its parameters
    (the run's own factors); the ``fisher`` unit scores of width (sum of the lowest-scored units a block loses)
    against the KLD of each sampled block alone losing WIDTH_LEVELS of its MLP channels or KV groups (shrunk as
    the run shrinks it, FLAP's compensation included)."""
    from slimlm.allocate import holdout
    from slimlm.analysis.sensitivity import fisher_diagonal
    from slimlm.core.architectures import decoder_blocks, linear_fqns
    from slimlm.structured import factorize, width
    from slimlm.structured import lowrank as lr
    from slimlm.structured.shrink import BlockShrinker

    linears = linear_fqns(model)
    hessians = lr.collect_hessians(model, planning, progress=False)
    spectra = {f: lr.whitened_singular_values(linears[f].weight.data, hessians[f]) for f in layers}
    losses = factorize._fisher_losses(model, planning, spectra, True, progress=False)
    ranks = {f: {keep: int(keep * math.prod(linears[f].weight.shape) / sum(linears[f].weight.shape))
                 for keep in RANK_KEEPS} for f in layers}
    predicted_ranks = {f: {keep: float(losses[f][r]) for keep, r in ranks[f].items()} for f in layers}
    measured_ranks = {f: holdout.measure(model, reference, {keep: {f: r} for keep, r in ranks[f].items()},
                                         lambda fqn, W, r: factorize.truncated(W, r, hessians[fqn]), progress=False)
                      for f in layers}
    stats = width.block_statistics(model, planning, progress=False)
    units = width.block_units(model, "fisher", stats, fisher_diagonal(model, planning[:16], progress=False)[0])
    shrinker, blocks = BlockShrinker(units, stats, True), decoder_blocks(model)
    predicted_widths, measured_widths = {}, {}
    for i in sorted({int(f.split(".layers.")[1].split(".")[0]) for f in layers}):
        levels = {f"mlp {x}": (0, int(x * len(units[i].channel_scores))) for x in WIDTH_LEVELS[0]} | {
            f"groups {g}": (g, 0) for g in WIDTH_LEVELS[1] if g < len(units[i].head_scores)}
        predicted_widths[i] = {lv: float(units[i].head_scores.sort().values[:h].sum()
                                         + units[i].channel_scores.sort().values[:c].sum())
                               for lv, (h, c) in levels.items()}
        measured_widths[i], source = {}, blocks[i]
        try:
            for lv, counts in levels.items():
                blocks[i] = copy.deepcopy(source)
                shrinker(blocks[i], i, counts)
                measured_widths[i][lv] = reference.kld(model)
        finally:
            blocks[i] = source
    return {"fisher_ranks": correlations(predicted_ranks, measured_ranks),
            "fisher_widths": correlations(predicted_widths, measured_widths),
            "structure_measured": {"ranks": {f: {str(k): v for k, v in m.items()} for f, m in measured_ranks.items()},
                                   "widths": {str(i): m for i, m in measured_widths.items()}}}


def part2_sparsity_and_bits(model, planning, reference) -> list[dict]:
    from slimlm.allocate import allocate_from_metrics, allocation_metrics, holdout
    from slimlm.quant.grids import QuantGrid

    rows = []
    for allocation in ("owl", "alphapruning", "fisher"):
        grid = QuantGrid(4, True, 128)
        metrics = allocation_metrics(model, allocation, planning, progress=False, grid=grid, method="wanda")
        for target in SPARSITIES:
            start = time.perf_counter()
            budgets = allocate_from_metrics(metrics, allocation, target, "sparsity")
            _, check = holdout.check_sparsity(model, budgets, target, planning, reference,
                                              allocation in holdout.SELECTING, progress=False)
            rows.append({"unit": "sparsity", "allocation": allocation, "target": target, **check,
                         "seconds": time.perf_counter() - start})
        for target in AVG_BITS:
            start = time.perf_counter()
            continuous = allocate_from_metrics(metrics, allocation, target, "bits")
            _, check = holdout.check_bits(model, continuous, target, lambda b: QuantGrid(b, True, 128), reference,
                                          allocation in holdout.SELECTING, progress=False)
            rows.append({"unit": "bits", "allocation": allocation, "target": target, **check,
                         "seconds": time.perf_counter() - start})
    return rows


def part2_gguf(model, tokenizer, calib, exclude) -> list[dict]:
    """The size mix at the bytes of each named mix's file (RTN onto the types: only the check's record is read)."""
    import gguf

    import slimlm
    from slimlm.gguf import sizing

    sizing.LEGACY_CHOICES = tuple(k for k in sizing.LEGACY_CHOICES if k not in exclude)
    sizing.K_CHOICES = tuple(k for k in sizing.K_CHOICES if k not in exclude)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mix in GGUF_SIZES:
            rule = slimlm.to_gguf(copy.deepcopy(model), tokenizer, Path(tmp) / f"{mix}.gguf", mix, method="rtn",
                                  progress=False)
            size = sum(int(t.n_bytes) for t in gguf.GGUFReader(rule).tensors)
            start = time.perf_counter()
            path = slimlm.to_gguf(copy.deepcopy(model), tokenizer, Path(tmp) / f"{mix}-size.gguf", mix,
                                  method="rtn", size=str(size), calib=calib, progress=False)
            record = json.loads(gguf.GGUFReader(path).get_field("slimlm.export").contents())
            rows.append({"unit": "gguf", "allocation": "fisher", "target": f"{mix} bytes ({size})",
                         "excluded": list(exclude), **record["size"]["check"],
                         "seconds": time.perf_counter() - start})
    return rows


def markdown(result: dict) -> str:
    lines = ["| cost model | pairs | Spearman, pooled | Spearman across layers (mean over levels) |", "|---|---|---|---|"]
    for name in ("fisher", "errortable", "fisher_bits", "gguf_types", "fisher_ranks", "fisher_widths"):
        if name in result["correlations"]:
            c = result["correlations"][name]
            lines.append(f"| {name} | {c['pairs']} | {c['pooled']:.3f} | {c['across_layers']:.3f} |")
    lines += ["", "| unit | allocation | target | baseline KLD | plan KLD | kept | kept KLD |", "|---|---|---|---|---|---|---|"]
    for r in result["checks"]:
        figures = {"baseline": r["baseline"], "plan": r["plan"], **r["path"]}
        lines.append(f"| {r['unit']} | {r['allocation']} | {r['target']} | {r['baseline']:.4g} | {r['plan']:.4g} | "
                     f"{r['kept']} | {figures[r['kept']]:.4g} |")
    return "\n".join(lines)


def write(out: str, result: dict, start: float) -> None:
    """The JSON and its markdown tables, rewritten after each part (a long run keeps what it finished)."""
    result["seconds"] = time.perf_counter() - start
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    Path(out).with_suffix(".md").write_text(markdown(result) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=DEFAULT_DATA)
    p.add_argument("--blocks", type=int, default=3, help="evenly spaced blocks whose linears part 1 samples")
    p.add_argument("--parts", default="1,2,gguf", help="which parts to run: 1, gguf_costs (part 1's GGUF costs alone), "
                   "structure (ranks, widths), 2 (sparsity, bits), gguf")
    p.add_argument("--exclude-types", default="", help="GGUF types the size mix may not choose, e.g. Q4_1")
    p.add_argument("--out", default=str(RESULTS / "allocation_check.json"))
    args = p.parse_args()

    import slimlm
    from slimlm.allocate import holdout

    torch.manual_seed(0)
    model, tokenizer = slimlm.load_model(args.model)
    calib, _ = protocol_windows(tokenizer, args.data_dir, calib_windows=20, eval_windows=1)
    planning, held = holdout.split(calib, 4)
    reference = holdout.Reference(model, held)
    parts = set(args.parts.split(","))
    result = {"model": args.model, "protocol": "20x512 first windows of valid.tokens: 16 plan, 4 held out",
              "sampled_blocks": args.blocks, "correlations": {}, "checks": []}
    start = time.perf_counter()
    if "1" in parts:
        result["correlations"] = part1(model, planning, reference, sampled_layers(model, args.blocks))
        write(args.out, result, start)
    if "gguf_costs" in parts:
        result["correlations"] |= gguf_costs(model, planning, reference, sampled_layers(model, args.blocks))
        write(args.out, result, start)
    if "structure" in parts:
        result["correlations"] |= part1_structure(model, planning, reference, sampled_layers(model, args.blocks))
        write(args.out, result, start)
    if "2" in parts:
        result["checks"] += part2_sparsity_and_bits(model, planning, reference)
        write(args.out, result, start)
    if "gguf" in parts:
        exclude = tuple(t for t in args.exclude_types.split(",") if t)
        result["checks"] += part2_gguf(model, tokenizer, calib, exclude)
        write(args.out, result, start)
    print(json.dumps({k: v for k, v in result.items() if k != "correlations"} | {
        "correlations": {k: v for k, v in result["correlations"].items() if "measured" not in k}}, indent=1))


if __name__ == "__main__":
    main()
