"""SliceGPT: rotate the residual stream into its principal components, then delete the weakest directions.

Reference: Ashkboos et al., "SliceGPT: Compress Large Language Models by Deleting Rows and Columns", ICLR 2024
(arXiv 2401.15024). Weights are (out, in) as in ``nn.Linear``; activations are row vectors, y = x Wᵀ.

  1. §3.2 computational invariance: with every RMSNorm scale folded into the linears that read it
     (``transforms.rotate.fuse_norms_``), RMSNorm(x Q) = RMSNorm(x) Q for any orthogonal Q, so the residual stream
     may be expressed in any orthonormal basis as long as every writer and reader absorbs it.
  2. §3.4 a transformation per block: each RMSNorm gets its own basis, the eigenvectors of C = Σ_t x_t x_tᵀ of
     the signal entering it (float64, decreasing eigenvalue). A decoder layer therefore has two: A_l before
     attention and M_l before the MLP; A_{l+1} is the next layer's (after the last layer, the final norm's).
     Readers absorb their basis (q/k/v: W A_l; gate/up: W M_l), writers the next one (o_proj: M_lᵀ W;
     down_proj: A_{l+1}ᵀ W), the embedding E A_0 and lm_head W A_L. The skip connections must change basis
     too: attention's becomes M_lᵀ A_l, the MLP's A_{l+1}ᵀ M_l (``SlicedLayer``).
  3. §3.3 slicing: keep the first d' columns of every basis (the principal components), which deletes rows and
     columns of every weight above, the embedding's columns and both skip matrices' to d' x d'. Projecting onto
     the top-d' components loses the least signal energy of any d'-dimensional subspace (PCA), exactly the sum of
     the dropped eigenvalues.
Calibration is sequential, as SliceGPT does: each basis is computed from the signals of the model whose earlier
parts are already rotated and sliced, so later bases see (and absorb) the losses of earlier slicing. A PCA in d
dimensions needs many more calibration tokens than d (the paper uses 1024 x 2048): on SmolLM2-135M (d = 576) at
20% slicing, 8 x 256 calibration tokens gave WikiText-2 perplexity 87 and 32 x 256 gave 50 (dense 27; two
windows of 512 tokens, measured during development, not a bench row).

The sliced residual has d' coordinates but RMSNorm must still average over the original d: its weight becomes
the constant sqrt(d/d') and its epsilon eps·d/d', which is exactly w·x/sqrt(‖x‖²/d + eps) with standard modules.
The model's config keeps the dense hidden size d; a saved run records the sliced sizes in its manifest
(``core.structure``), which ``slimlm.load_model`` follows and plain transformers refuses.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.core.architectures import block_linears, decoder_blocks
from slimlm.core.engine import DEFAULT_BATCH_TOKENS, _batches, capture_inputs
from slimlm.core.structure import SlicedLayer, attention_branch, mlp_branch
from slimlm.errors import SlimlmError
from slimlm.transforms.rotate import ROTATABLE, fuse_norms_

ROUND_TO = 8  # SliceGPT keeps d' a multiple of 8 (GPU-friendly shapes); applied when d >= 64
PCA_DTYPE = torch.float64


def _linear(weight: torch.Tensor) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, dtype=weight.dtype, device=weight.device)
    with torch.no_grad():
        lin.weight.copy_(weight)
    return lin


def sliced_dim(d: int, sparsity: float) -> int:
    """d' = (1 − sparsity)·d rounded to the nearest multiple of 8 when d >= 64 (SliceGPT's shapes), at least 1."""
    step = ROUND_TO if d >= 64 else 1
    return min(d, max(step, step * round((1 - sparsity) * d / step)))


def pca(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, eigenvectors as columns) of a symmetric C = Σ_t x_t x_tᵀ (§3.4)."""
    values, vectors = torch.linalg.eigh(cov.to(PCA_DTYPE))
    return values.flip(0), vectors.flip(1)


def _set_weight_(lin: nn.Module, W: torch.Tensor) -> None:
    """Replace a linear's weight by float64 ``W`` cast to its dtype; in/out sizes follow."""
    lin.weight = nn.Parameter(W.to(lin.weight.dtype))
    lin.out_features, lin.in_features = W.shape


def _read_(lin: nn.Linear, basis: torch.Tensor) -> None:
    """A reader of a residual now given in ``basis`` (d x d') coordinates: x W → (x Bᵀ) W, so W ← W B."""
    _set_weight_(lin, lin.weight.to(basis) @ basis)


def _write_(lin: nn.Linear, basis: torch.Tensor) -> None:
    """A writer into a residual kept in ``basis`` coordinates: y → y B, so W ← Bᵀ W and b ← b B."""
    _set_weight_(lin, basis.T @ lin.weight.to(basis))
    if lin.bias is not None:
        lin.bias = nn.Parameter(_project(lin.bias, basis))


def _shrink_norm_(norm: nn.Module, d: int, kept: int) -> None:
    """Unit-scale RMSNorm over ``kept`` = d' sliced coordinates that still averages over the original d (module
    docstring): w·x/sqrt(Σx²/d' + eps·d/d') with w = sqrt(d/d') equals x/sqrt(Σx²/d + eps)."""
    weight = norm.weight
    norm.weight = nn.Parameter(torch.full((kept,), math.sqrt(d / kept), dtype=weight.dtype, device=weight.device))
    norm.variance_epsilon = norm.variance_epsilon * d / kept


def _project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x B in float64, returned in x's dtype: coordinates in ``basis`` (B = Q) or back from them (B = Qᵀ)."""
    return (x.to(basis) @ basis).to(x.dtype)


def _covariance(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Σ_t x_t x_tᵀ over every token of ``x`` (n, T, d), accumulated in float64."""
    cov = torch.zeros(x.shape[-1], x.shape[-1], dtype=PCA_DTYPE, device=x.device)
    for s, e in _batches(x.shape[0], batch_size):
        flat = x[s:e].reshape(-1, x.shape[-1]).to(PCA_DTYPE)
        cov += flat.T @ flat
    return cov


def _basis(x: torch.Tensor, kept: int, batch_size: int, timing: dict) -> tuple[torch.Tensor, float]:
    """The top-``kept`` principal directions (d x d', float64) of the signal ``x`` and the fraction of its energy
    Σλ they keep."""
    start = time.perf_counter()
    values, vectors = pca(_covariance(x, batch_size))
    timing["pca"] += time.perf_counter() - start
    return vectors[:, :kept], (values[:kept].sum() / values.sum()).item()


def _run(fn, x: torch.Tensor, call_args: dict, batch_size: int, width: int, timing: dict) -> torch.Tensor:
    """``fn(batch, layer keyword arguments)`` over every window, as (n, T, width) in x's dtype."""
    start = time.perf_counter()
    out = torch.empty(*x.shape[:-1], width, dtype=x.dtype, device=x.device)
    for s, e in _batches(x.shape[0], batch_size):
        out[s:e] = fn(x[s:e], call_args[e - s][1])
    timing["forward"] += time.perf_counter() - start
    if not torch.isfinite(out).all():
        raise SlimlmError("non-finite activations while slicing; check the model and dtype")
    return out


def _slice_layer(layer: nn.Module, z: torch.Tensor, A: torch.Tensor, call_args: dict, batch_size: int,
                 timing: dict) -> tuple[SlicedLayer, torch.Tensor, torch.Tensor, tuple[float, float]]:
    """Rotate and slice one decoder layer whose input ``z`` (n, T, d') is in basis ``A`` (d x d').

    Both PCAs see the signal this sliced model really produces (§3.4, sequential): M from the residual after
    the sliced attention, A_next from the residual after the sliced MLP, both mapped back to d coordinates.
    Returns the wrapped layer, its output in basis A_next, A_next, and the energy fractions M and A_next keep.
    """
    attn, mlp = layer.self_attn, layer.mlp
    d, kept = A.shape
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
        _read_(lin, A)
    _shrink_norm_(layer.input_layernorm, d, kept)
    r = _run(lambda x, kw: _project(x, A.T) + attention_branch(layer, x, kw), z, call_args, batch_size, d, timing)
    M, mlp_kept = _basis(r, kept, batch_size, timing)
    _write_(attn.o_proj, M)
    u = _project(r, M)
    for lin in (mlp.gate_proj, mlp.up_proj):
        _read_(lin, M)
    _shrink_norm_(layer.post_attention_layernorm, d, kept)
    s = _run(lambda x, kw: _project(x, M.T) + mlp_branch(layer, x), u, call_args, batch_size, d, timing)
    A_next, next_kept = _basis(s, kept, batch_size, timing)
    _write_(mlp.down_proj, A_next)
    dtype = attn.o_proj.weight.dtype
    sliced = SlicedLayer(layer, _linear((M.T @ A).to(dtype)), _linear((A_next.T @ M).to(dtype)))
    return sliced, _project(s, A_next), A_next, (mlp_kept, next_kept)


def param_counts(model: nn.Module) -> dict[str, int]:
    """Parameters by part: embedding, lm_head (0 while tied to the embedding), the decoder layers' linears,
    SliceGPT's skip matrices, and the total (every parameter once)."""
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    linears, shortcuts = 0, 0
    for layer in decoder_blocks(model):
        for name, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                count = sum(p.numel() for p in module.parameters())
                shortcuts += count if name.endswith("_shortcut") else 0
                linears += 0 if name.endswith("_shortcut") else count
    return {"embedding": emb.numel(), "lm_head": 0 if head is emb else head.numel(), "decoder_linears": linears,
            "shortcuts": shortcuts, "total": sum(p.numel() for p in model.parameters())}


READERS, WRITERS = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), ("o_proj", "down_proj")


def sliced_params(model: nn.Module, kept: int) -> int:
    """Decoder-block parameters once the residual is ``kept`` wide: readers lose input columns, writers output
    rows (and bias entries), and every block gains two kept x kept skip matrices (§3.4)."""
    total = 0
    for layer in decoder_blocks(model):
        for name, lin in block_linears(layer).items():
            leaf = name.rpartition(".")[2]
            rows = kept if leaf in WRITERS else lin.out_features
            cols = kept if leaf in READERS else lin.in_features
            total += rows * cols + (rows if lin.bias is not None else 0)
    return total + 2 * len(decoder_blocks(model)) * kept * kept


def sparsity_for_params(model: nn.Module, keep: float) -> float:
    """The smallest slicing (d' a multiple of 8, ``sliced_dim``) that keeps at most ``keep`` of the decoder
    blocks' parameters, counting the skip matrices it adds; refused when even the narrowest residual does not."""
    d = model.get_input_embeddings().embedding_dim
    dense, step = sliced_params(model, d) - 2 * len(decoder_blocks(model)) * d * d, ROUND_TO if d >= 64 else 1
    for kept in range(d - d % step, 0, -step):
        if sliced_params(model, kept) <= keep * dense:
            return 1 - kept / d
    raise SlimlmError(f"SliceGPT cannot keep only {keep:g} of the decoder parameters: even a {step}-wide residual "
                      "keeps more")


def _check(model: nn.Module, calib, sparsity) -> None:
    """Every input error before anything changes."""
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ROTATABLE:
        raise SlimlmError(f"SliceGPT supports Llama-family models ({', '.join(ROTATABLE)}: RMSNorm, q/k/v/o, "
                          f"gate/up/down); got '{model_type}'")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity < 1:
        raise SlimlmError(f"SliceGPT sparsity is the fraction of the hidden size removed, in [0, 1); got {sparsity!r}")
    if not isinstance(calib, torch.Tensor) or calib.ndim != 2 or calib.numel() == 0 or calib.is_floating_point():
        raise SlimlmError("SliceGPT calibration must be a non-empty (windows, tokens) tensor of token ids")
    if int(calib.max()) >= model.get_input_embeddings().num_embeddings or int(calib.min()) < 0:
        raise SlimlmError("a calibration token id is outside the model's vocabulary")
    if any(isinstance(layer, SlicedLayer) for layer in decoder_blocks(model)):
        raise SlimlmError("this model is already sliced; slice a freshly loaded model")


@torch.no_grad()
def slice_(model: nn.Module, calib: torch.Tensor, sparsity: float, device: str | torch.device = "cpu",
           batch_size: int | None = None, progress: bool = True) -> dict:
    """SliceGPT in place: fuse norms, rotate every RMSNorm's input into its PCA basis, keep d' directions.

    ``calib``: (n, T) token ids. ``sparsity``: fraction of the hidden size d removed, d' = ``sliced_dim``.
    Each decoder layer becomes a ``SlicedLayer``; lm_head is untied from the embedding (the final norm's scale
    and basis differ from the embedding's). One layer at a time is on ``device``. Returns a JSON-able record:
    d, d', each basis' shape and kept energy fraction, parameter counts before and after, timings (s).
    """
    _check(model, calib, sparsity)
    home, start = next(model.parameters()).device, time.perf_counter()
    batch_size = batch_size or max(1, DEFAULT_BATCH_TOKENS // calib.shape[1])
    before = param_counts(model)
    captured = capture_inputs(model, calib, batch_size, torch.device(device))
    timing = {"capture": time.perf_counter() - start, "forward": 0.0, "pca": 0.0}
    fuse_norms_(model)
    d = captured.hidden.shape[-1]
    kept = sliced_dim(d, sparsity)
    A, attn_kept = _basis(captured.hidden, kept, batch_size, timing)
    emb = model.get_input_embeddings()
    emb.weight = nn.Parameter(_project(emb.weight, A.to(home)))
    emb.embedding_dim = kept
    z, layers, records = _project(captured.hidden, A), decoder_blocks(model), []
    captured.hidden = None  # block 0's inputs live on as z
    for i in tqdm(range(len(layers)), desc="slicegpt", disable=not progress):
        sliced, z, A, (mlp_kept, next_kept) = _slice_layer(layers[i].to(device), z, A, captured.call_args[i],
                                                           batch_size, timing)
        layers[i] = sliced.to(home)
        records.append({"attn_basis": [d, kept], "attn_kept_variance": attn_kept, "mlp_basis": [d, kept],
                        "mlp_kept_variance": mlp_kept})
        attn_kept = next_kept
    _shrink_norm_(model.get_submodule("model.norm"), d, kept)
    _read_(model.get_output_embeddings(), A.to(home))
    after = param_counts(model)
    timing["total"] = time.perf_counter() - start
    return {"method": "slicegpt", "sparsity": sparsity, "hidden": d, "sliced_hidden": kept, "layers": records,
            "head_basis": [d, kept], "head_kept_variance": attn_kept,
            "calibration": {"nsamples": calib.shape[0], "seqlen": calib.shape[1], "sequential": True},
            "params": {"before": before, "after": after, "total_ratio": after["total"] / before["total"],
                       "decoder_ratio": (after["decoder_linears"] + after["shortcuts"]) / before["decoder_linears"]},
            "timing": timing}
