"""The block loop: exact replay, statistics against closed forms, one pass when nothing changes."""
import pytest
import torch

from slimlm.core.engine import capture_inputs, compress_blocks, run_block
from slimlm.errors import SlimlmError
from slimlm.core.architectures import decoder_blocks, linear_fqns


def windows(n=6, seqlen=16, vocab=128, seed=0):
    return torch.randint(0, vocab, (n, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_block_replay_reproduces_full_model_exactly(tiny_model):
    ids = windows()
    expected = tiny_model.base_model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    captured = capture_inputs(tiny_model, ids, batch_size=3, device="cpu")
    x = captured.hidden
    assert torch.equal(x, expected[0])
    for i, block in enumerate(decoder_blocks(tiny_model)):
        x = run_block(block, x, captured.call_args[i], batch_size=3)
        if i + 1 < len(expected) - 1:  # the last hidden state has the final norm applied
            assert torch.equal(x, expected[i + 1]), f"block {i} differs"


def linear_inputs(model, ids) -> dict[str, torch.Tensor]:
    """Every linear's inputs in one plain forward, as (tokens, in_features) float64."""
    recorded = {}
    hooks = [lin.register_forward_hook(lambda m, i, o, n=n: recorded.setdefault(n, []).append(i[0].detach()))
             for n, lin in linear_fqns(model).items()]
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs).reshape(-1, xs[0].shape[-1]).double() for n, xs in recorded.items()}


def test_stats_match_closed_form(llama):
    ids = windows()
    fqns = linear_fqns(llama)
    inputs = linear_inputs(llama, ids)
    seen = {}

    groups = []

    def compress(group, stats):
        seen.update(dict.fromkeys(group, stats))
        groups.append(tuple(name.rsplit(".", 1)[1] for name in group))
        return False

    compress_blocks(llama, ids, compress, set(fqns), hessian=True, batch_size=6, progress=False)
    for fqn, X in inputs.items():
        st = seen[fqn]
        assert st.ntokens == X.shape[0]
        torch.testing.assert_close(st.sqnorm.double(), X.square().sum(0), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(st.hessian.double(), 2 * X.T @ X / X.shape[0], rtol=1e-4, atol=1e-5)
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert seen[q] is seen[k]  # q/k/v share one input: its statistics are computed once
    # and the method gets the linears that read one input together
    assert groups[:4] == [("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",)]


def test_unchanged_weights_cost_one_pass_per_block(llama):
    calls = []
    for block in decoder_blocks(llama):  # a block pass runs its down_proj once per batch
        block.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))
    ids = windows()
    compress_blocks(llama, ids, lambda group, stats: False, set(linear_fqns(llama)), batch_size=6, progress=False)
    assert len(calls) == len(decoder_blocks(llama))
    calls.clear()
    compress_blocks(llama, ids, lambda group, stats: True, set(linear_fqns(llama)), batch_size=6, progress=False)
    assert len(calls) == 2 * len(decoder_blocks(llama))


def test_non_finite_activations_are_reported(llama):
    def poison(group, stats):
        for linear in group.values():
            linear.weight.data.fill_(float("nan"))
        return True

    with pytest.raises(SlimlmError, match="non-finite activations after block 0"):
        compress_blocks(llama, windows(), poison, {"model.layers.0.mlp.down_proj"}, progress=False)


def test_one_pass_calibrates_every_block_on_dense_activations(llama):
    import copy

    ids = windows()
    X = linear_inputs(copy.deepcopy(llama), ids)["model.layers.1.mlp.down_proj"]
    fqns = linear_fqns(llama)
    calls, seen = [], {}
    for block in decoder_blocks(llama):
        block.mlp.down_proj.register_forward_pre_hook(lambda m, a: calls.append(1))

    def halve(group, stats):  # a change that alters every later activation
        for fqn, linear in group.items():
            seen[fqn] = stats
            linear.weight.data.mul_(0.5)
        return True

    compress_blocks(llama, ids, halve, set(fqns), hessian=True, batch_size=6, progress=False, sequential=False)
    assert len(calls) == len(decoder_blocks(llama))  # one pass per block although weights changed
    # the dense model's inputs, not the halved model's
    torch.testing.assert_close(seen["model.layers.1.mlp.down_proj"].hessian.double(), 2 * X.T @ X / X.shape[0],
                               rtol=1e-4, atol=1e-5)
