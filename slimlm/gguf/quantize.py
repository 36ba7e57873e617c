"""Any model we load, quantized onto llama.cpp's own weight types and written as one GGUF file.

``to_gguf(model, tokenizer, out, mix="Q4_K_M", method="gptq")``: per-tensor types from llama.cpp's named mix
(``gguf.mixes``), every matrix quantized by our code onto exactly the grid the file stores
(``gguf.types.fit``: RTN with the format's scale search; ``quant.gptq.gptq_gguf``: GPTQ whose rounding targets
that grid, block by block on calibration data), packed (``gguf.blocks``) and written with the model's
llama metadata and tokenizer (``gguf.writer``). The model's weights are left at the values the file
decodes to, so slimlm's own evaluation of the model measures the file.
"""
from __future__ import annotations

import time
from pathlib import Path

import gguf
import torch
from tqdm.auto import tqdm

from slimlm.allocate import holdout
from slimlm.analysis.sensitivity import FISHER_WINDOWS, fisher_diagonal
from slimlm.config import GGUFConfig
from slimlm.config.keywords import configure
from slimlm.core.architectures import decoder_blocks, linear_fqns
from slimlm.core.calibration import calibration_for
from slimlm.core.engine import compress_blocks
from slimlm.errors import SlimlmError
from slimlm.formats.source import check_new
from slimlm.gguf.blocks import pack
from slimlm.gguf.mixes import block_size, named_mix
from slimlm.gguf.sizing import (check_size_fits, cost_table, departures, parse_size, refine, rule_for_size,
                                solve, tensor_bytes)
from slimlm.gguf.types import TYPES, Fitted, fit
from slimlm.gguf.writer import NORM_SHIFT, T, check_architecture, rope_interleave, rope_rows, tensor_names, write_gguf
from slimlm.quant.gptq import gptq_gguf
from slimlm.runs.save import versions



def to_gguf(model, tokenizer, out: str | Path, mix: str | None = None, config: GGUFConfig | None = None, *,
            calib: torch.Tensor | None = None, data_dir: str | None = None, source: str | None = None,
            recipe: str | None = None, progress: bool = True, overwrite: bool = False, **settings) -> Path:
    """Quantize ``model`` (a llama, qwen2, qwen3 or gemma3 text causal LM, float weights) onto the GGUF types of
    llama.cpp's file type ``mix`` (``config.type``) and write ``out`` (a new ``.gguf`` file, or a new folder
    holding model.gguf), as ``config`` (a ``GGUFConfig``, or its fields as keywords) says; returns the file.

    ``method``: 'rtn' (each weight rounded onto its stored grid after the format's weighted scale search; with
    ``imatrix`` the search weighs input j by its mean squared activation on calibration data, as llama-imatrix
    does) or 'gptq' (calibrated, block by block; importance is the Hessian diagonal). The token embedding and
    output matrix are rounded without data (llama-imatrix skips them too). Defaults follow llama-imatrix's
    protocol: 32 windows of 512 tokens. ``source`` names the model in the file's record.

    ``size`` ('3.5bpw', '70MB', ...: ``gguf.sizing.parse_size``) replaces the mix's rule for the decoder
    blocks' matrices by our own choice of types at that size, from measured Fisher costs (``gguf.sizing``);
    the embedding, output and norms keep the mix's types.
    """
    c = configure(GGUFConfig, config, {**settings, **({"type": mix} if mix is not None else {}), "out": str(out)})
    out = check_new(c.out, replace_file=overwrite)  # a replaced file is swapped only once the new one is whole
    model_config = model.config.to_dict()
    check_architecture(model_config)
    _check_plain_linears(model)
    start = time.perf_counter()
    weights, gguf_name = _file_tensors(model, model_config), tensor_names(model_config)
    types, calib, calib_info, check = _plan_types(model, tokenizer, c, weights, model_config, calib, data_dir,
                                                  progress)
    fitted = _quantize_tensors(model, c, weights, types, gguf_name, calib, progress)
    tensors = [_encode(name, W, fitted.get(name), types[gguf_name(name)], model_config, gguf_name)
               for name, W in weights.items()]
    nbytes = sum(data.nbytes for _, data, _ in tensors)
    params = sum(W.numel() for W in weights.values())
    float_mix = c.type in ("F16", "F32")
    record = {"format": "gguf", "source": source, "mix": c.type, "method": None if float_mix else c.method,
              "imatrix": c.imatrix, "size": None if c.size is None else {
                  "target": c.size, "allocation": "fisher", "check": check,
                  "fisher_windows": min(FISHER_WINDOWS, calib_info["nsamples"] - calib_info.get("held_out", 0))},
              "act_order": c.act_order, "config": c.in_effect(), "calibration": calib_info, "types": types,
              "tensor_bytes": nbytes, "bits_per_weight": 8 * nbytes / params, "seconds": time.perf_counter() - start,
              "versions": versions()}
    file_type = gguf.LlamaFileType.ALL_F32 if c.type == "F32" else gguf.LlamaFileType[f"MOSTLY_{c.type}"]
    return write_gguf(out, model_config, tokenizer, source, tensors, file_type, record, recipe,
                      Path(str(source or "model")).name, progress, layer_widths(model))


def _plan_types(model, tokenizer, c: GGUFConfig, weights, model_config, calib, data_dir, progress):
    """GGUF name -> type (the mix's rule, or the size mix for the blocks), and the calibration windows and their
    record where the method, the imatrix or the size mix reads data."""
    gguf_name = tensor_names(model_config)
    heads = model_config["num_attention_heads"]
    gqa = heads // (model_config.get("num_key_value_heads") or heads)
    float_mix = c.type in ("F16", "F32")  # nothing to round: GPTQ has no work and needs no data
    uses_data = (c.method == "gptq" and not float_mix) or c.imatrix or c.size is not None
    types = named_mix(c.type, {gguf_name(n): tuple(W.shape) for n, W in weights.items()},
                      model_config["num_hidden_layers"], gqa, has_imatrix=uses_data)
    if c.token_embedding_type is not None:  # before the size mix, which counts the embedding's bytes as fixed
        width = next(W.shape[-1] for n, W in weights.items() if gguf_name(n) == "token_embd.weight")
        if width % block_size(c.token_embedding_type):
            raise SlimlmError(f"--token-embedding-type {c.token_embedding_type}: its blocks of "
                              f"{block_size(c.token_embedding_type)} do not divide the embedding's {width}-wide rows")
        types["token_embd.weight"] = c.token_embedding_type
    if c.size is not None:  # from the shapes alone, in a second, before any calibration
        check_size_fits(c.size, {n: tuple(W.shape) for n, W in weights.items()}, types, _sized_names(model, weights),
                        gguf_name)
    calib_info, check = None, None
    if uses_data:
        calib, calib_info = calibration_for(model, tokenizer, calib, c, data_dir)
    if c.size is not None:
        calib, reference = holdout.hold_out(model, calib, calib_info, c.holdout)
        shapes = {gguf_name(n): tuple(W.shape) for n, W in weights.items()}
        sized, check = _sized_types(model, weights, types, parse_size(c.size), calib, reference,
                                    lambda mix: named_mix(mix, shapes, model_config["num_hidden_layers"], gqa,
                                                          has_imatrix=True), gguf_name, progress)
        types |= sized
    return types, calib, calib_info, check


def _sized_names(model, weights) -> list[str]:
    """HF names of the matrices the size mix chooses types for: the decoder blocks' linears, in model order."""
    return [f"{fqn}.weight" for fqn in linear_fqns(model) if f"{fqn}.weight" in weights]


def _quantize_tensors(model, c: GGUFConfig, weights, types, gguf_name, calib, progress) -> dict:
    """HF name -> ``Fitted`` for every tensor of a quantized type: GPTQ or the imatrix-weighted search block by
    block on calibration data, then plain RTN for the rest; weights left at the values the file decodes to."""
    kinds, fitted = {n: TYPES.get(types[gguf_name(n)]) for n in weights}, {}  # None: a float type
    if (c.method == "gptq" and c.type not in ("F16", "F32")) or c.imatrix:
        linears = linear_fqns(model)
        compress = _compress_fn(c.method, kinds, fitted, c.act_order, c.blocksize, c.damp)
        compress_blocks(model, calib, compress, {f for f in linears if f"{f}.weight" in weights},
                        hessian=c.method == "gptq", batch_size=c.batch_size, progress=progress, results=(fitted,))
    for name, W in tqdm(weights.items(), desc="rtn", disable=not progress):
        if name not in fitted and kinds[name] is not None:
            fitted[name] = fit(kinds[name], W.detach().float())
            W.data.copy_(fitted[name].values())
    return fitted


def _check_plain_linears(model) -> None:
    """llama.cpp's graphs hold one matrix per projection and identity skip connections: low-rank factors and
    SliceGPT's skip matrices have no GGUF form."""
    from slimlm.core.structure import SHORTCUTS, describe

    record = describe(model)
    if any("rank" in spec for spec in record.values()):
        raise SlimlmError("GGUF holds one matrix per projection and this model has low-rank factors: "
                          "run lowrank with --merge to write a GGUF")
    if any(fqn.rpartition(".")[2] in SHORTCUTS for fqn in record):
        raise SlimlmError("GGUF cannot hold SliceGPT's skip matrices (llama.cpp's skip connections are identities)")


def layer_widths(model) -> list[tuple[int, int, int]] | None:
    """Per decoder layer (heads, KV heads, MLP width) read from the weights, where layers differ
    (``slimlm shrink`` with a non-uniform allocation); None when the config's single values hold."""
    widths = []
    for block in decoder_blocks(model):
        attn, mlp = block.self_attn, block.mlp
        widths.append((attn.q_proj.out_features // attn.head_dim, attn.k_proj.out_features // attn.head_dim,
                       mlp.gate_proj.out_features if hasattr(mlp, "gate_proj") else mlp.up_proj.out_features))
    return widths if len(set(widths)) > 1 else None


def _checked_mix(model, reference, costs, nbytes, budget, rule, importance, progress) -> tuple[dict, dict]:
    """(types, the check's record): llama.cpp's ``rule`` (mix name, types), the departures from it towards the
    cost-optimal mix (``sizing.departures``) and the greedy moves by tensor kind from the best of them
    (``sizing.refine``), all measured on the held-out windows (``allocate.holdout``, the importance-weighted scale
    search standing in for the method); the lowest is kept."""
    def stand_in(fqn, W, kind):
        return fit(TYPES[kind], W.float(), importance[f"{fqn}.weight"]).values().to(W.dtype)

    def by_fqn(plan):
        return {n.removesuffix(".weight"): kind for n, kind in plan.items()}
    path = {label: by_fqn(p) for label, p in departures(costs, nbytes, budget, rule[1]).items()}
    kept, check = holdout.choose(model, reference, by_fqn(rule[1]), path, stand_in, True, progress)
    plan = {f"{f}.weight": kind for f, kind in kept.items()}
    refined, moves = refine(costs, nbytes, budget, rule[1], check["kept"],
                            holdout.candidate_figures(check)[check["kept"]],
                            lambda plans: holdout.measure(model, reference, {k: by_fqn(p) for k, p in plans.items()},
                                                          stand_in, progress))
    if moves:
        plan, check["kept"], check["path"]["refined"] = refined, "refined", moves[-1]["kld"]
    return plan, check | {"refined": moves, "baseline_mix": rule[0], "bytes": {
        "baseline": sum(nbytes[n][rule[1][n]] for n in costs), "kept": sum(nbytes[n][plan[n]] for n in costs),
        "budget": budget}}


def _sized_types(model, weights, types, target, calib, reference, rule_types, gguf_name, progress):
    """(GGUF name -> type for the decoder blocks' matrices at the ``target`` size, the held-out check's record or
    None): the Fisher-cost mix (``gguf.sizing``), checked against llama.cpp's mix that fits the size
    (``allocate.holdout``, the importance-weighted scale search standing in for the method) when ``reference``."""
    fisher, sqnorms = fisher_diagonal(model, calib[:FISHER_WINDOWS], progress)
    fisher = {name: fisher[name.removesuffix(".weight")] for name in _sized_names(model, weights)}
    tokens = calib[:FISHER_WINDOWS].numel()
    importance = {f"{fqn}.weight": s / tokens for fqn, s in sqnorms.items()}
    costs = cost_table(weights, fisher, importance, progress)
    nbytes = {n: {k: tensor_bytes(k, tuple(weights[n].shape)) for k in costs[n]} for n in costs}
    fixed = sum(tensor_bytes(types[gguf_name(n)], tuple(W.shape)) for n, W in weights.items() if n not in costs)
    budget = target.budget(sum(W.numel() for W in weights.values())) - fixed
    def sized_rule(mix):
        types_of_mix = rule_types(mix)  # the whole file's types, computed once per mix
        return {n: types_of_mix[gguf_name(n)] for n in costs}
    rule = rule_for_size(sized_rule, nbytes, budget)
    plan, check = solve(costs, nbytes, budget), None
    if reference is not None and rule is not None:
        plan, check = _checked_mix(model, reference, costs, nbytes, budget, rule, importance, progress)
    elif reference is not None:
        check = {"baseline_mix": None, "reason": "no llama.cpp mix fits the size"}
    return {gguf_name(n): kind for n, kind in plan.items()}, check


def _file_tensors(model, config: dict) -> dict[str, torch.Tensor]:
    """HF name -> parameter, in the order llama.cpp's converter writes them; a tied output matrix is dropped
    (llama.cpp reads token_embd in its place)."""
    weights = dict(model.named_parameters())
    if config.get("tie_word_embeddings"):
        weights.pop("lm_head.weight", None)
    return weights


def _compress_fn(method, kinds, fitted, act_order, blocksize, damp):
    """The per-block step of ``compress_blocks``: each linear onto its type, by GPTQ or by RTN weighted with the
    layer input's mean squares (the imatrix); weights left at the decoded values."""
    def compress(group, stats):
        for fqn, linear in group.items():
            name, W = f"{fqn}.weight", linear.weight.data
            kind = kinds.get(name)
            if kind is None:
                continue
            if method == "gptq":
                fitted[name], _ = gptq_gguf(W, stats.hessian, kind, blocksize, damp, act_order)
            else:
                fitted[name] = fit(kind, W.float(), stats.sqnorm / max(stats.ntokens, 1))
            W.copy_(fitted[name].values())
        return True
    return compress


def _encode(name: str, W: torch.Tensor, fitted: Fitted | None, kind: str, config: dict, gguf_name):
    """(GGUF name, bytes or array, type) of one tensor; q/k rows reordered to ggml's rotary layout, gemma's
    norm weights stored as 1 + w."""
    head_dim = rope_rows(config).get(name.rpartition(".")[0].rpartition(".")[2])
    heads = W.shape[0] // head_dim if head_dim else None
    if fitted is not None:
        data = torch.from_numpy(pack(fitted))
        data = rope_interleave(data, heads) if heads else data
        return gguf_name(name), data.numpy(), T[kind]
    W = W.detach().float() + (NORM_SHIFT.get(config["model_type"], 0.0) if name.endswith("norm.weight") else 0.0)
    W = rope_interleave(W, heads) if heads else W
    dtype = torch.float16 if kind == "F16" else torch.float32
    if W.dim() > 1 and kind not in ("F16", "F32"):
        raise SlimlmError(f"internal error: {name} has type {kind} but no fitted grid")
    return gguf_name(name), W.to(dtype if W.dim() > 1 else torch.float32).numpy(), T[kind]
