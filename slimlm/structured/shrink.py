"""``shrink``: a smaller dense model, by removing decoder blocks (depth), heads and MLP channels (width), or
the residual stream's weakest principal directions (SliceGPT).

The result is a dense model. Its manifest records what went, the scores that chose it and, for width, the
shape of every linear (``core.structure``), so ``slimlm.load_model`` rebuilds any per-block widths and SliceGPT's
skip matrices; where the config can say the new shapes (fewer layers; the same widths in every block of a
Llama), plain ``transformers`` loads the folder too.
"""
from __future__ import annotations

import copy
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.allocate import holdout
from slimlm.config import ShrinkConfig
from slimlm.config.keywords import configure
from slimlm.core import distributed, placement
from slimlm.core.architectures import decoder_blocks, linear_fqns
from slimlm.core.calibration import calibration_for
from slimlm.core.result import Result
from slimlm.runs.save import versions
from slimlm.structured import depth, slicegpt, width, widths


# model_type -> config switches that give every attention / MLP linear a bias (FLAP's compensation needs one on
# o_proj and down_proj; a config that cannot say so leaves the counts alone, so plain transformers refuses the
# folder rather than dropping the biases)
BIAS_FLAGS = {"llama": ("attention_bias", "mlp_bias")}


def parameter_counts(model) -> dict[str, int]:
    """Unique parameters of the whole model and of the linears inside its decoder blocks."""
    unique = {id(p): p.numel() for p in model.parameters()}
    decoder = {id(m.weight): m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)
               for m in linear_fqns(model).values()}
    return {"total": sum(unique.values()), "decoder_linears": sum(decoder.values())}


def shrink(model, tokenizer=None, config: ShrinkConfig | None = None, *, calib: torch.Tensor | None = None,
           data_dir: str | None = None, device: str = "cpu", progress: bool = True, **settings) -> Result:
    """Remove ``drop_layers`` decoder blocks (``score``: influence | loss, ``iterative``), or heads and MLP channels
    so that ``params`` of the decoder-block parameters stay (``method``: flap | fisher scores which units go,
    ``allocation``: uniform | owl | alphapruning | flap | fisher how many per block, auto the method's own,
    ``owl_m`` OWL's outlier threshold; FLAP's bias compensation unless ``no_compensate``; ``method`` slicegpt
    instead narrows the residual stream of every block alike, as SliceGPT does, so its allocation is uniform), as
    ``config`` (a ``ShrinkConfig``, or its fields as keywords) says. The model changes in place; returns the run's
    ``Result``."""
    c = configure(ShrinkConfig, config, settings)
    depth.check_llama_like(model)
    if c.drop_layers is not None:
        depth.check_drop(len(decoder_blocks(model)), c.drop_layers)
    sparsity = slicegpt.sparsity_for_params(model, c.params) if c.method == "slicegpt" and c.params else None
    torch.manual_seed(c.seed)
    start, before = time.perf_counter(), parameter_counts(model)
    calib, calib_info = calibration_for(model, tokenizer, calib, c, data_dir)
    if c.drop_layers is not None:
        removed, rounds = depth.choose_blocks(model, calib, c.drop_layers, c.score, c.iterative, device,
                                              c.batch_size, progress)
        record = {"axis": "depth", "score": c.score, "iterative": c.iterative, "removed_layers": removed,
                  "rounds": rounds}
    elif c.method == "slicegpt":
        record = _slice(model, calib, sparsity, device, c.batch_size, progress)
    else:
        calib, reference = holdout.hold_out(model, calib, calib_info,
                                            c.holdout if c.resolved_allocation != "uniform" else 0)
        record = _shrink_width(model, calib, c.params, c.method, c.resolved_allocation, not c.no_compensate,
                               c.owl_m, device, c.batch_size, progress, reference)
    after = parameter_counts(model)
    manifest = {"kind": "shrink", "method": c.score if c.drop_layers is not None else c.method, **record,
                "params_before": before, "params": after,
                "params_kept": after["decoder_linears"] / before["decoder_linears"], "config": c.in_effect(),
                "calibration": calib_info, "device": placement.describe(device), "seed": c.seed,
                **distributed.record(), "timings": {"total": time.perf_counter() - start}, "versions": versions()}
    return Result(manifest)


def _slice(model, calib, sparsity, device, batch_size, progress) -> dict:
    done = slicegpt.slice_(model, calib, sparsity, device, batch_size, progress)
    energy = [[r["attn_kept_variance"], r["mlp_kept_variance"]] for r in done["layers"]]
    return {"axis": "width", "allocation": "uniform", "sparsity": sparsity, "hidden": done["hidden"],
            "sliced_hidden": done["sliced_hidden"], "kept_energy": energy, "plain_transformers": False}


def _width_fractions(model, allocation: str, keep: float, calib, owl_m, device, batch_size,
                     progress) -> list[tuple[float, float]]:
    """Per block (attention, MLP) fractions to remove: OWL's or AlphaPruning's per-linear sparsities at the target
    ``1 - keep``, parameter-weighted over the block's attention and MLP linears."""
    from slimlm.allocate import allocate_from_metrics, allocation_metrics
    from slimlm.core.budgets import size_weighted_mean

    metrics = allocation_metrics(model, allocation, calib, device, batch_size, progress, owl_m)
    budgets = allocate_from_metrics(metrics, allocation, 1 - keep, "sparsity")
    sizes = {f: lin.weight.numel() for f, lin in linear_fqns(model).items()}
    out = []
    for i in range(len(decoder_blocks(model))):
        parts = [[f for f in budgets if f.startswith(f"model.layers.{i}.{kind}.")] for kind in ("self_attn", "mlp")]
        out.append(tuple(size_weighted_mean({f: budgets[f] for f in fs}, sizes) for fs in parts))
    return out


def _shrink_width(model, calib, keep, method, allocation, compensate, owl_m, device, batch_size, progress,
                  reference=None) -> dict:
    from slimlm.analysis.sensitivity import FISHER_WINDOWS, fisher_diagonal

    stats = width.block_statistics(model, calib, device, batch_size, progress)
    fisher = None
    if "fisher" in (method, allocation):
        fisher = fisher_diagonal(model, calib[:FISHER_WINDOWS], progress)[0]
    units = width.block_units(model, method, stats, fisher)
    ranking = units if allocation != "fisher" or method == "fisher" else width.block_units(model, "fisher", stats,
                                                                                           fisher)
    fractions = _width_fractions(model, allocation, keep, calib, owl_m, device, batch_size, progress) \
        if allocation in ("owl", "alphapruning") else None
    counts, check = widths.removal_counts(ranking, allocation, keep, fractions), None
    shrunk = BlockShrinker(units, stats, compensate)
    if reference is not None:
        counts, check = check_widths(model, counts, keep, ranking, shrunk, reference, allocation, progress)
    blocks = decoder_blocks(model)
    for i, (block, block_counts) in enumerate(zip(blocks, counts)):
        shrunk(block, i, block_counts)
    config_follows = _config_follows(model, compensate)
    return {"axis": "width", "allocation": allocation, "compensate": compensate, "allocation_check": check,
            "widths": [{"kv_heads": width.layout(b)[0], "heads": width.layout(b)[0] * width.layout(b)[1],
                        "intermediate": b.mlp.down_proj.in_features} for b in blocks],
            "plain_transformers": config_follows}


class BlockShrinker:
    """Shrinks block i in place to given (KV groups, MLP channels) removal counts: the method's lowest-scored units
    go, their mean output compensated (FLAP) if asked."""

    def __init__(self, units, stats, compensate: bool):
        self.units, self.stats, self.compensate = units, stats, compensate

    def __call__(self, block, i: int, counts: tuple[int, int]) -> None:
        o, down = self.stats[f"model.layers.{i}.self_attn.o_proj"], self.stats[f"model.layers.{i}.mlp.down_proj"]
        width.shrink_block_(block, width.lowest_kept(self.units[i].head_scores, counts[0]),
                            width.lowest_kept(self.units[i].channel_scores, counts[1]),
                            o.mean if self.compensate else None, down.mean if self.compensate else None)


def check_widths(model, counts, keep: float, ranking, shrunk: BlockShrinker, reference: holdout.Reference,
                 allocation: str, progress: bool = True) -> tuple[list, dict]:
    """(removal counts to run, the check's record): ``counts`` measured against uniform counts and, for ``fisher``,
    the points between (per-block attention and MLP fractions interpolated, then ``widths.from_fractions`` at the
    same parameters). Each candidate is measured exactly as the run makes it: every block is swapped for a shrunk
    copy, and the source blocks are put back after, also on error."""
    remove = (1 - keep) * widths.total_params(ranking)
    select = allocation in holdout.SELECTING

    def fractions(cs):
        return {(i, part): n / len(u.head_scores if part == 0 else u.channel_scores)
                for i, (u, c) in enumerate(zip(ranking, cs)) for part, n in enumerate(c)}
    uniform = widths.removal_counts(ranking, "uniform", keep)
    candidates = {"baseline": uniform} | {
        label: counts if label == "plan" else widths.from_fractions(
            ranking, [(f[(i, 0)], f[(i, 1)]) for i in range(len(ranking))], remove)
        for label, f in holdout.interpolated(fractions(uniform), fractions(counts),
                                             holdout.PATH if select else (1.0,)).items()}
    blocks = decoder_blocks(model)
    source, figures = list(blocks), {}
    try:
        for name, candidate in tqdm(candidates.items(), desc="allocation check", disable=not progress):
            for i, block_counts in enumerate(candidate):
                blocks[i] = copy.deepcopy(source[i])
                shrunk(blocks[i], i, block_counts)
            figures[name] = reference.kld(model)
    finally:
        for i, block in enumerate(source):
            blocks[i] = block
    return holdout.decide(reference, candidates, figures, select)


def _config_follows(model, compensated: bool) -> bool:
    """Where every block has the same widths and the config can hold the biases, say the new shapes in the
    config (plain transformers then loads the folder); returns whether it did."""
    blocks = decoder_blocks(model)
    shapes = {(width.layout(b), b.mlp.down_proj.in_features) for b in blocks}
    flags = BIAS_FLAGS.get(model.config.model_type)
    if len(shapes) > 1 or (compensated and flags is None):
        return False
    ((groups, per_group, head_dim), intermediate), = shapes
    config = model.config
    config.num_key_value_heads, config.num_attention_heads = groups, groups * per_group
    config.head_dim, config.intermediate_size = head_dim, intermediate
    if compensated:
        for flag in flags:
            setattr(config, flag, True)
        for block in blocks:
            for lin in (*[getattr(block.self_attn, n) for n in ("q_proj", "k_proj", "v_proj")],
                        block.mlp.gate_proj, block.mlp.up_proj):
                if lin.bias is None:
                    lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype))
    return True
