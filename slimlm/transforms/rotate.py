"""QuaRot-style rotations that make activations easier to quantize without changing the model's function.

Reference: Ashkboos et al., "QuaRot: Outlier-Free 4-Bit Inference in Rotated LLMs", NeurIPS 2024
(arXiv 2404.00456), §3 and §4. QuaRot builds on SliceGPT's "computational invariance" (Ashkboos et al.,
ICLR 2024, §3): in a pre-norm transformer whose RMSNorms have unit scale, the residual stream can be
multiplied by any orthogonal Q, because every write into it and every read from it can absorb Q.

Order of use: ``rotate_`` (which calls ``fuse_norms_``), then ``quantize_activations_`` to simulate
W4A4/W4A8 inference. Weights are (out, in) as in ``nn.Linear``; a layer computes y = x Wᵀ on row vectors,
so rotating its input by Q (x -> x Q) is absorbed by W -> W Q, and rotating its output is W -> Qᵀ W.

Supported: Llama-family models (llama, mistral, qwen2, qwen3), whose RMSNorm computes w * x / rms(x).
Gemma's RMSNorm computes (1 + w) * x / rms(x) and scales the embeddings; it is rejected for now.

The online down_proj rotation is a forward pre-hook, not a weight: it is part of the compressed model. A saved
model keeps the rotated weights but loses the hook; record ``rotate_``'s returned dict in the run manifest and
call ``attach_online_down_(model, seed)`` after reloading it, or down_proj receives unrotated inputs.

Not done (QuaRot §4): the online Hadamard across heads before o_proj (only the offline per-head part, fused
into v_proj/o_proj, is applied), and the query/key rotation after RoPE used for KV-cache quantization.
"""

import torch
from torch import nn
from tqdm.auto import tqdm

from slimlm.core.architectures import decoder_blocks, linear_fqns
from slimlm.errors import SlimlmError
from slimlm.quant.grids import QuantGrid
from slimlm.transforms.hadamard import has_hadamard, random_hadamard
from slimlm.transforms.ops import set_activation_quant_

ROTATABLE = ("llama", "mistral", "qwen2", "qwen3")
ONLINE_ATTR = "_slimlm_online_rotation"  # set on each down_proj that carries the online hook (its handle)
# rotate_(seed) draws three independent rotations: residual stream, value heads, down_proj input.
VALUE_SEED_OFFSET, DOWN_SEED_OFFSET = 1, 2


def _check_architecture(model: nn.Module) -> None:
    model_type = getattr(model.config, "model_type", None)
    if str(model_type).startswith("gemma"):
        raise SlimlmError(
            f"rotation does not support '{model_type}' yet: Gemma's RMSNorm scales by (1 + w) and its embeddings "
            "are multiplied by sqrt(hidden), so folding its norms needs its own rule"
        )
    if model_type not in ROTATABLE:
        raise SlimlmError(f"rotation supports {', '.join(ROTATABLE)}; got '{model_type}'")


def _update_(param: torch.Tensor, fn) -> None:
    """param <- fn(param) computed in float64 and cast back once, so a chain of folds and rotations keeps the
    full-precision function to float64 accuracy before the single rounding to the model dtype."""
    with torch.no_grad():
        param.copy_(fn(param.to(torch.float64)))


def _untie_lm_head_(model: nn.Module) -> None:
    """Give lm_head its own weight when it shares the embedding matrix (tie_word_embeddings, e.g. SmolLM2).

    The final norm's scale must be folded into lm_head only, and the residual rotation enters the embedding as
    E Q but lm_head as W Q on a differently scaled matrix, so one shared matrix cannot hold both. The config is
    updated so save_pretrained writes both tensors and from_pretrained does not re-tie them.
    """
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head.weight is emb.weight:
        head.weight = nn.Parameter(emb.weight.detach().clone())
    model.config.tie_word_embeddings = False
    model.all_tied_weights_keys = model.get_expanded_tied_weights_keys(all_submodels=True)


def _fold_(norm: nn.Module, linears: list[nn.Linear]) -> None:
    """W (w ⊙ x̂) = (W diag(w)) x̂: move the norm's scale w into the columns of every reader, set w to 1."""
    w = norm.weight.to(torch.float64)
    for lin in linears:
        _update_(lin.weight, lambda W: W * w)
    with torch.no_grad():
        norm.weight.fill_(1.0)


def fuse_norms_(model: nn.Module) -> nn.Module:
    """Fold every RMSNorm scale into the linears that read its output (QuaRot §3, SliceGPT §3.2), in place.

    input_layernorm -> q/k/v_proj, post_attention_layernorm -> gate/up_proj, final norm -> lm_head; the norms
    are left with unit scale. The function is unchanged up to float rounding. Unties lm_head from the
    embeddings first (see ``_untie_lm_head_``). Idempotent. Raises SlimlmError for unsupported architectures.
    """
    _check_architecture(model)
    _untie_lm_head_(model)
    for block in decoder_blocks(model):
        attn, mlp = block.self_attn, block.mlp
        _fold_(block.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_(block.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
    _fold_(model.get_submodule("model.norm"), [model.get_output_embeddings()])
    return model


def _kind(n: int) -> str:
    return "randomized_hadamard" if has_hadamard(n) else "random_orthogonal"


def _rotate_residual_(block: nn.Module, Q: torch.Tensor) -> None:
    """Residual stream h -> h Q, one block's part: every writer (o_proj, down_proj) produces h Q, every reader
    (q/k/v, gate/up) absorbs Qᵀ; the embedding and lm_head do the same (``rotate_``). Unit-scale RMSNorm
    between them commutes with Q (‖h Q‖ = ‖h‖)."""
    attn, mlp = block.self_attn, block.mlp
    for lin in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
        _update_(lin.weight, lambda W: W @ Q)
    for lin in (attn.o_proj, mlp.down_proj):
        _update_(lin.weight, lambda W: Q.T @ W)
        if lin.bias is not None:
            _update_(lin.bias, lambda b: b @ Q)


def _rotate_value_heads_(attn: nn.Module, R: torch.Tensor) -> None:
    """Rotate every value head v_h -> v_h R (v_proj's rows) and undo it in o_proj's input columns (QuaRot §4).

    Attention mixes one head's value vectors with scalar weights, Σ_t a_t (v_t R) = (Σ_t a_t v_t) R, so the
    rotation passes through attention (GQA's shared KV heads included) and o_proj absorbs it as W_o,h R.
    It spreads outliers of the value cache and of o_proj's input within each head.
    """
    d = R.shape[0]
    _update_(attn.v_proj.weight, lambda W: (R.T @ W.unflatten(0, (-1, d))).flatten(0, 1))
    if attn.v_proj.bias is not None:
        _update_(attn.v_proj.bias, lambda b: (b.unflatten(0, (-1, d)) @ R).flatten())
    _update_(attn.o_proj.weight, lambda W: (W.unflatten(1, (-1, d)) @ R).flatten(1))


def _down_projs(model: nn.Module) -> list[nn.Linear]:
    """Every block's down_proj; SlimlmError if one already carries an online rotation (a second one would be
    applied in the wrong order by the hooks, and rotate_ must refuse before it changes any weight)."""
    downs = [block.mlp.down_proj for block in decoder_blocks(model)]
    if any(hasattr(down, ONLINE_ATTR) for down in downs):
        raise SlimlmError("this model's down_proj already has an online rotation; rotate a fresh model")
    return downs


def _down_rotation(n: int, seed: int) -> torch.Tensor:
    return random_hadamard(n, seed + DOWN_SEED_OFFSET, torch.float64)


def _rotate_input(H: torch.Tensor):
    def hook(module, args):
        return (args[0] @ H,) + args[1:]

    return hook


def attach_online_down_(model: nn.Module, seed: int = 0) -> list:
    """Multiply every down_proj input by H online (QuaRot §4, "FFN": the activation after SwiGLU has outliers
    no offline rotation can reach, since the elementwise product sits between up_proj and down_proj).

    H is the down_proj rotation ``rotate_(model, seed, online_down=True)`` fused as W_down H (orthogonal, so
    (x H)(W_down H)ᵀ = x W_downᵀ). Call it again on a reloaded rotated model: hooks are not saved. Registered
    with prepend=True so it runs before every other pre-hook: activation quantization and calibration captures
    then see the rotated input, the one the rotated weight expects. Returns the hook handles; each handle is
    also kept on its module as ``_slimlm_online_rotation``.
    """
    _check_architecture(model)
    downs = _down_projs(model)
    H = _down_rotation(downs[0].in_features, seed)
    handles = []
    for down in downs:
        handle = down.register_forward_pre_hook(_rotate_input(H.to(down.weight)), prepend=True)
        setattr(down, ONLINE_ATTR, handle)
        handles.append(handle)
    return handles


def rotate_(model: nn.Module, seed: int = 0, online_down: bool = True, value_heads: bool = True,
            progress: bool = False) -> dict:
    """QuaRot's rotation (§3-4), in place: the same function, with activations that have no outlier channels.

    1. ``fuse_norms_``. RMSNorm computes w ⊙ h / rms(h); rms is rotation-invariant, but the per-channel scale
       diag(w) does not commute with an orthogonal Q (diag(w) Q ≠ Q diag(w) unless w is constant), so the
       scales are first moved into the next linears and the norms are left as pure h / rms(h).
    2. Residual rotation by a seeded randomized Hadamard Q (random orthogonal when the hidden size has no
       Hadamard construction): E <- E Q; readers q/k/v, gate/up, lm_head W <- W Q; writers o_proj, down_proj
       W <- Qᵀ W. Outlier channels of the residual stream are spread over all channels.
    3. ``value_heads``: a per-head rotation of v_proj's output undone in o_proj's input (offline).
    4. ``online_down``: W_down <- W_down H and an online x -> x H hook on down_proj (``attach_online_down_``).

    All folds and rotations run in float64 and are cast back to the model dtype once per step; steps 2-4 go
    block by block (``progress`` shows a bar over them: ~25 s on the built-in model). Returns a JSON-able
    record for the run manifest (each rotation's kind, or None when skipped); a reloaded model needs
    ``attach_online_down_(model, seed)`` when record["online_down"] is not None.
    """
    _check_architecture(model)
    downs = _down_projs(model) if online_down else []
    blocks = decoder_blocks(model)
    hidden, head_dim = model.get_input_embeddings().weight.shape[1], blocks[0].self_attn.head_dim
    Q = random_hadamard(hidden, seed, torch.float64)
    R = random_hadamard(head_dim, seed + VALUE_SEED_OFFSET, torch.float64) if value_heads else None
    H = _down_rotation(downs[0].in_features, seed) if online_down else None
    with tqdm(total=len(blocks) + 3, desc="rotate", disable=not progress) as bar:
        fuse_norms_(model)
        _update_(model.get_input_embeddings().weight, lambda E: E @ Q)
        bar.update(2)
        for block in blocks:
            _rotate_residual_(block, Q)
            if R is not None:
                _rotate_value_heads_(block.self_attn, R)
            if H is not None:
                _update_(block.mlp.down_proj.weight, lambda W: W @ H)
            bar.update()
        _update_(model.get_output_embeddings().weight, lambda W: W @ Q)
        bar.update()
    if online_down:
        attach_online_down_(model, seed)
    return {"method": "quarot", "seed": seed, "residual": _kind(hidden),
            "value_heads": _kind(head_dim) if value_heads else None,
            "online_down": _kind(downs[0].in_features) if online_down else None}


def quantize_activations_(model: nn.Module, bits: int, clip_ratio: float = 1.0, targets=None,
                          symmetric: bool = True) -> list:
    """Fake-quantize the inputs of decoder-block linears per token (one scale per token computed on the fly,
    symmetric as in QuaRot §3, or asymmetric as in DuQuant), to simulate W4A4/W4A8 inference. Returns the hook
    handles (``.remove()`` undoes it).

    ``targets``: names of linears to hook, fully qualified (``model.layers.0.mlp.down_proj``) or as a suffix
    (``mlp.down_proj``, ``q_proj``); None hooks every linear inside the decoder blocks. The quantizer runs after
    the linear's online transform (``transforms.ops``) and after QuaRot's online rotation, whatever the call
    order, so the transformed input is what gets quantized.
    """
    try:
        QuantGrid(bits, symmetric, clip_ratio=clip_ratio)
    except SlimlmError as e:
        raise SlimlmError(f"activation quantization: {e}") from e
    targets = [targets] if isinstance(targets, str) else targets
    chosen = [lin for name, lin in linear_fqns(model).items()
              if targets is None or any(name == t or name.endswith("." + t) for t in targets)]
    if not chosen:
        raise SlimlmError(f"no decoder linear matches targets {targets!r}")
    return [set_activation_quant_(lin, bits, clip_ratio, symmetric) for lin in chosen]
