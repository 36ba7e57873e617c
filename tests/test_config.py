"""Typed step configs: one schema for the command line, recipes, the Python API and manifests. The same settings
give the same config by every route; an option that would change nothing is refused by every route; a manifest
records the config that ran and what the engine did."""
from dataclasses import fields

import pytest
import torch

import slimlm
from slimlm.cli.parser import build_parser
from slimlm.config import STEP_CONFIGS, PruneConfig, QuantizeConfig, from_mapping, to_mapping
from slimlm.config.keywords import configure
from slimlm.config.schema import from_namespace, never
from slimlm.errors import SlimlmError
from tests.conftest import tiny_llama


def ids(n=4, seqlen=16):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("argv,mapping,keywords", [
    (["prune", "m", "--method", "sparsegpt", "--pattern", "2:4", "--blocksize", "64", "--calib-sampling", "first"],
     {"method": "sparsegpt", "pattern": "2:4", "blocksize": 64, "calib_sampling": "first"},
     {"method": "sparsegpt", "pattern": "2:4", "blocksize": 64, "sampling": "first"}),
    (["quantize", "m", "--method", "gptq", "--asym", "--group-size", "-1", "--one-pass", "--override", "down=3"],
     {"method": "gptq", "asym": True, "group-size": -1, "one-pass": True, "override": {"down": 3}},
     {"method": "gptq", "symmetric": False, "group_size": None, "sequential": False, "overrides": {"down": 3}}),
])
def test_command_line_recipe_and_keywords_give_one_config(argv, mapping, keywords):
    kind = argv[0]
    from_cli = from_namespace(STEP_CONFIGS[kind], build_parser().parse_args(argv))
    from_recipe = from_mapping(STEP_CONFIGS[kind], mapping)
    from_python = configure(STEP_CONFIGS[kind], None, keywords)
    assert from_cli == from_recipe == from_python
    assert from_mapping(STEP_CONFIGS[kind], to_mapping(from_cli)) == from_cli  # a written recipe replays it


def test_every_field_is_a_flag_with_help_and_its_default():
    parser = build_parser()
    commands = {a.dest: a for a in parser._actions if a.dest == "command"}["command"].choices
    for kind in ("prune", "quantize", "shrink", "lowrank", "analyze", "gguf", "export"):
        actions = {a.dest: a for a in commands[kind]._actions}
        kept_for_old_recipes = {n for r in STEP_CONFIGS[kind].RULES if r.applies is never for n in r.options}
        for f in fields(STEP_CONFIGS[kind]):
            if (f.name == "out" and kind in ("analyze",)) or f.name in kept_for_old_recipes:
                continue  # the command's own --out is the analysis folder; no flag for what never applies
            assert f.name in actions, (kind, f.name)
            assert actions[f.name].help == f.metadata["help"] and actions[f.name].help
            assert actions[f.name].required or actions[f.name].default == f.default


@pytest.mark.parametrize("call,message", [
    # each of these was accepted from Python and written into the manifest while the CLI refused it
    (lambda m: slimlm.quantize(m, method="rtn", act_order=True, progress=False),
     "--act-order only applies with --method gptq"),
    (lambda m: slimlm.quantize(m, method="rtn", allocation="fisher", progress=False),
     "allocation 'fisher' spreads an average bit-width"),
    (lambda m: slimlm.prune(m, method="wanda", ria_alpha=0.9, calib=ids(), progress=False),
     "--ria-alpha only applies with --method ria"),
    (lambda m: slimlm.prune(m, method="wanda", blocksize=7, calib=ids(), progress=False),
     "--blocksize only applies with --method sparsegpt"),
    (lambda m: slimlm.shrink(m, drop_layers=1, method="fisher", calib=ids(), progress=False),
     "--method only applies with --params"),
    (lambda m: slimlm.quantize(m, method="rtn", kv_clip=0.9, progress=False), "--kv-clip only applies with --kvbits"),
    (lambda m: slimlm.quantize(m, method="rtn", nonsense=1, progress=False), "unknown setting 'nonsense'"),
])
def test_python_refuses_what_the_command_line_refuses(call, message):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SlimlmError, match=message):
        call(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_config_object_and_keywords_run_the_same():
    a, b = tiny_llama(), tiny_llama()
    config = PruneConfig(method="wanda", sparsity=0.5)
    first = slimlm.prune(a, config=config, calib=ids(), progress=False)
    second = slimlm.prune(b, method="wanda", sparsity=0.5, calib=ids(), progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert first.manifest["config"] == second.manifest["config"]


def test_manifest_records_the_settings_in_effect_only():
    manifest = slimlm.prune(tiny_llama(), method="wanda", calib=ids(), progress=False).manifest
    assert manifest["config"]["method"] == "wanda" and manifest["config"]["nsamples"] == 128
    for ignored in ("ria-alpha", "blocksize", "damp", "owl-m", "owl-lambda", "group-size", "asym"):
        assert ignored not in manifest["config"]
    ria = slimlm.prune(tiny_llama(), method="ria", calib=ids(), progress=False).manifest
    assert ria["config"]["ria-alpha"] == 0.5


@pytest.mark.parametrize("settings,block_inputs", [
    ({"method": "gptq"}, "compressed"),
    ({"method": "gptq", "one_pass": True}, "dense"),
    ({"method": "rtn"}, None),
    # FlatQuant trains each block against the full-precision block: the engine calibrates on dense activations,
    # whatever one_pass says, and the manifest says so
    ({"method": "rtn", "abits": 8, "transform": "flatquant", "epochs": 1}, "dense"),
])
def test_manifest_says_which_activations_each_block_was_calibrated_on(settings, block_inputs):
    config = QuantizeConfig(**settings)  # valid as given
    result = slimlm.quantize(tiny_llama(), None, config, wbits=8, group_size=None, calib=ids(), progress=False)
    assert result.manifest["block_inputs"] == block_inputs
    assert result.manifest["config"].get("one-pass", False) == settings.get("one_pass", False)


def test_a_setting_kept_for_old_recipes_is_no_flag_but_reads_at_its_default():
    from slimlm.config import GGUFConfig

    assert from_mapping(QuantizeConfig, {"owl-m": 5.0}) == QuantizeConfig()  # as recipes written before list it
    with pytest.raises(SlimlmError, match="owl-m only applies with prune or analyze"):
        from_mapping(GGUFConfig, {"out": "x.gguf", "owl-m": 3})
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "m", "--owl-m", "3"])


def test_a_config_is_immutable_and_checked_once():
    config = QuantizeConfig(method="rtn")
    with pytest.raises(Exception):
        config.wbits = 3  # frozen: what ran is what was checked
    with pytest.raises(SlimlmError, match="bits must be an integer in 2..8"):
        QuantizeConfig(wbits=9)


def test_manifest_says_how_many_windows_the_fisher_allocator_read():
    from slimlm.analysis.sensitivity import FISHER_WINDOWS

    n = FISHER_WINDOWS + 6  # 4 held out for the allocation check leave 18 to plan on, of which the Fisher reads 16
    manifest = slimlm.prune(tiny_llama(layers=4), method="wanda", sparsity=0.5, allocation="fisher",
                            calib=ids(n), progress=False).manifest
    assert manifest["calibration"]["nsamples"] == n and manifest["calibration"]["held_out"] == 4
    assert manifest["allocation"]["fisher_windows"] == FISHER_WINDOWS
    uniform = slimlm.prune(tiny_llama(), method="wanda", calib=ids(), progress=False).manifest
    assert "fisher_windows" not in uniform["allocation"]


def test_joint_pruning_quantizes_on_the_group_size_asked():
    """PruneConfig's comparison ``group`` and the grid's ``group_size`` are two settings: the grid is grouped."""
    config = PruneConfig(method="sparsegpt", sparsity=0.5, wbits=4, group_size=64)
    assert config.grid(4).group_size == 64 and config.group is None
    manifest = slimlm.prune(tiny_llama(), None, config, calib=ids(), progress=False).manifest
    assert manifest["quantization"]["group_size"] == 64


def test_no_field_shadows_a_method_or_property_of_its_bases():
    import types

    for cls in STEP_CONFIGS.values():
        for f in fields(cls):
            clashes = [base.__name__ for base in cls.__mro__
                       if isinstance(vars(base).get(f.name), (property, types.FunctionType))]
            assert not clashes, (cls.__name__, f.name, clashes)
