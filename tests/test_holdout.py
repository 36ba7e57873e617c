"""The allocation check (``allocate.holdout``): a planted trap is caught, the kept plan never measures worse than the
baseline on the held-out windows, and the manifest's figures equal an independent re-measurement."""
import copy

import pytest
import torch

import slimlm
from slimlm.allocate import holdout
from slimlm.core.architectures import linear_fqns
from slimlm.errors import SlimlmError
from tests.conftest import held_out_kld, tiny_llama, trapped_llama

SPARSITY = 0.6


def ids(n=8, seqlen=64, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


def planted_fisher_tables(model, fisher, sqnorms, levels, progress=False):
    """Fisher tables that call block 0 free to prune (a small estimate where the measured damage is large)."""
    return {f: {float(s): s * (1e-6 if ".layers.0." in f else 1.0) for s in levels} for f in linear_fqns(model)}


def independent_kld(source, budgets, planning, held):
    """Held-out KLD of ``source`` Wanda-pruned at ``budgets``: input norms, masks and KL computed here, not with
    ``allocate.holdout``."""
    model = copy.deepcopy(source)
    linears = linear_fqns(model)
    norms = {f: torch.zeros(lin.in_features) for f, lin in linears.items()}
    def hook_for(f):
        def hook(module, args):
            norms[f] += args[0].reshape(-1, args[0].shape[-1]).square().sum(0)
        return hook
    hooks = [lin.register_forward_pre_hook(hook_for(f)) for f, lin in linears.items()]
    with torch.no_grad():
        for w in planning[:16]:
            model(input_ids=w[None])
        for h in hooks:
            h.remove()
        for f, lin in linears.items():
            W = lin.weight
            k = int(W.shape[1] * budgets[f])
            order = torch.argsort(W.abs() * norms[f].sqrt(), dim=1, stable=True)
            W.scatter_(1, order[:, :k], 0.0)
    return held_out_kld(source, model, held)


def test_a_planted_trap_is_caught_and_the_figures_equal_a_re_measurement(monkeypatch):
    monkeypatch.setattr("slimlm.allocate.metrics.fisher_tables", planted_fisher_tables)
    source, calib = trapped_llama(), ids()
    model = copy.deepcopy(source)
    manifest = slimlm.prune(model, method="wanda", sparsity=SPARSITY, allocation="fisher", calib=calib,
                            progress=False).manifest
    check = manifest["allocation"]["check"]
    assert check["plan"] > check["baseline"]  # the trap works: the planted plan measures worse than uniform
    figures = {"baseline": check["baseline"], "plan": check["plan"], **check["path"]}
    assert check["kept"] != "plan" and figures[check["kept"]] == min(figures.values()) <= check["baseline"]
    targets = {f: layer["target"] for f, layer in manifest["layers"].items()}
    assert targets["model.layers.0.mlp.down_proj"] < 0.99  # the trap's 99% was not applied
    planning, held = calib[:-4], calib[-4:]
    assert manifest["calibration"]["held_out"] == 4 and manifest["allocation"]["fisher_windows"] == 4
    assert independent_kld(source, dict.fromkeys(targets, SPARSITY), planning, held) == pytest.approx(
        check["baseline"], rel=1e-4)
    assert independent_kld(source, targets, planning, held) == pytest.approx(figures[check["kept"]], rel=1e-4)


def test_owl_is_kept_as_published_and_reports_the_comparison():
    manifest = slimlm.prune(tiny_llama(layers=4), method="wanda", sparsity=SPARSITY, allocation="owl", calib=ids(),
                            progress=False).manifest
    check = manifest["allocation"]["check"]
    assert check["kept"] == "plan" and check["path"] == {} and check["baseline"] > 0 and check["plan"] > 0


def test_mixed_bits_never_measure_worse_than_uniform_bits():
    manifest = slimlm.quantize(trapped_llama(), method="rtn", avg_bits=3.5, allocation="fisher", group_size=32,
                               calib=ids(), progress=False).manifest
    check = manifest["allocation"]["check"]
    figures = {"baseline": check["baseline"], "plan": check["plan"], **check["path"]}
    assert figures[check["kept"]] == min(figures.values()) <= check["baseline"]
    assert manifest["bits"] <= 3.5 + 1e-9


def test_the_source_weights_come_back_after_the_check():
    model = tiny_llama()
    before = {f: lin.weight.clone() for f, lin in linear_fqns(model).items()}
    reference = holdout.Reference(model, ids(2))
    holdout.measure(model, reference, {"a": dict.fromkeys(before, 0.9)},
                    lambda f, W, s: torch.zeros_like(W), progress=False)
    assert all(torch.equal(before[f], lin.weight) for f, lin in linear_fqns(model).items())
    assert reference.kld(model) == pytest.approx(0.0, abs=1e-6)  # the source against itself


def test_too_few_windows_or_no_data_is_refused_in_one_line():
    with pytest.raises(SlimlmError, match="--nsamples 2 or more, or --holdout 0"):
        slimlm.prune(tiny_llama(), method="wanda", allocation="owl", calib=ids(1), progress=False)
    with pytest.raises(SlimlmError, match="holdout=0 to skip"):
        slimlm.quantize(tiny_llama(), method="rtn", avg_bits=3.5, allocation="alphapruning", progress=False)
    skipped = slimlm.prune(tiny_llama(), method="wanda", allocation="owl", calib=ids(1), holdout=0, progress=False)
    assert "check" not in skipped.manifest["allocation"] and "held_out" not in skipped.manifest["calibration"]
