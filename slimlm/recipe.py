"""Recipes: the whole pipeline of a run as YAML, written beside every run and replayed by ``slimlm run``.

    # written by slimlm 0.1.0; replay: slimlm run <this file> [--out DIR]
    model: smollm2-135m
    dtype: float32
    device: cpu
    data-dir: ../shared/data
    out: runs/wanda50
    steps:
    - prune: {method: wanda, sparsity: 0.5, calib-sampling: first, nsamples: 32, seqlen: 512}
    - eval: {eval-windows: 4}
    - export: {format: gguf, out: runs/wanda50.gguf}

The run-level keys say which model, how it is loaded and where the run folder goes; each step is one mapping
``kind: settings``. Keys are the flag names of the matching command without ``--`` (``eval_windows`` is read
as ``eval-windows`` too); values are what the flag takes, ``true``/``false`` for switches and a mapping
``REGEX: VALUE`` for ``override``; a missing key or ``null`` means the flag's default. Each step is parsed by a
parser built from the same settings function as its command (``cli.settings.STEP_SETTINGS``), so a recipe accepts
exactly what the command line does; an unknown key or choice is one error naming its path
(``steps[0].prune.methd``) and the closest valid name. A recipe that slimlm writes lists every setting,
defaults included, so that a later change of a default does not change its replay. Relative paths are read
from the current folder, as on the command line.

Step kinds: ``analyze`` (an analysis folder: the step's ``out``, or the recipe's when nothing is compressed),
``shrink`` and ``lowrank`` (structured: they change the model's shapes, so they come before the others that
compress), ``rotate`` (QuaRot, before any pruning or quantization), ``prune``, ``quantize``, ``eval``
(perplexity of the model as it is at that point), ``gguf`` (the model as it is, onto llama.cpp's types: one file, its ``out``; it
leaves the weights at the file's values, so only exports follow it), ``export`` (reads the saved run, so export
steps come last). ``pipeline.execute`` runs a recipe; ``from_args`` turns a ``slimlm prune/quantize/shrink/lowrank/
analyze/gguf`` command line into a recipe, so the command and its replay share one code path.
"""
from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from slimlm.cli.parser import ineffective_option
from slimlm.cli.settings import STEP_SETTINGS, add_load_settings
from slimlm.errors import SlimlmError, read_json, unknown

COMPRESSION = ("rotate", "prune", "quantize", "shrink", "lowrank")  # the steps that change the weights; the run folder saves them


@dataclass
class Recipe:
    """A validated recipe: the run-level settings and the steps, each as its parser's namespace."""

    run: argparse.Namespace  # model, dtype, device, data_dir, out
    steps: list[tuple[str, argparse.Namespace]]  # (kind, its settings by argparse dest) in order

    def compression(self) -> list[tuple[str, argparse.Namespace]]:
        return [(kind, ns) for kind, ns in self.steps if kind in COMPRESSION]


@dataclass
class RunOptions:
    """How a recipe runs, not what it computes: none of these changes the weights, so none is in a recipe."""

    overwrite: bool = False
    offload: str | None = None
    resume: bool = False
    device_map: str | None = None
    quiet: bool = False
    allow_pickle: bool = False
    no_cache: bool = False

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> RunOptions:
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # a recipe's bad value is an error of the recipe, not a usage message and exit
        raise SlimlmError(message)


def parser_for(kind: str | None) -> argparse.ArgumentParser:
    """The parser of a step kind's settings, or of the run-level keys (``kind=None``)."""
    p = _Parser(prog=kind or "recipe", add_help=False, allow_abbrev=False)
    if kind is None:
        p.add_argument("--model", required=True)
        add_load_settings(p)
        p.add_argument("--out")
    else:
        STEP_SETTINGS[kind](p)
        if kind == "analyze":  # the command line's --out is the run-level one
            p.add_argument("--out")
        if kind == "gguf":  # the file it writes (the command line's --out)
            p.add_argument("--out", required=True)
    return p


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Flag name without '--' -> its action."""
    return {a.option_strings[0][2:]: a for a in parser._actions if a.option_strings}


def _argv(parser, settings, path: str) -> list[str]:
    """A recipe mapping as the command-line arguments the parser takes; unknown keys and choices fail here."""
    if not isinstance(settings, dict):
        raise SlimlmError(f"{path or 'recipe'}: expected a mapping of settings, got {settings!r}")
    options, argv = _options(parser), []
    for key, value in settings.items():
        name, where = str(key).replace("_", "-"), f"{path}.{key}" if path else str(key)
        if name not in options:
            raise SlimlmError(f"{where}: {unknown('key', key, options)}")
        action = options[name]
        if value is None:
            continue
        if action.nargs == 0:  # a switch
            if not isinstance(value, bool):
                raise SlimlmError(f"{where}: expected true or false, got {value!r}")
            if value:
                argv.append(f"--{name}")
        elif isinstance(action, argparse._AppendAction):  # override: a mapping REGEX -> VALUE
            if not isinstance(value, dict):
                raise SlimlmError(f"{where}: expected a mapping REGEX: VALUE, got {value!r}")
            argv += [f"--{name}={regex}={v}" for regex, v in value.items()]
        elif isinstance(value, (dict, list)):
            raise SlimlmError(f"{where}: expected a single value, got {value!r}")
        elif action.choices is not None and str(value) not in action.choices:
            raise SlimlmError(f"{where}: {unknown('value', value, action.choices)}")
        else:
            argv.append(f"--{name}={value}")
    return argv


def _parse(parser, settings, path: str) -> argparse.Namespace:
    argv = _argv(parser, settings, path)
    try:
        return parser.parse_args(argv)
    except SlimlmError as e:  # argparse's message, e.g. "argument --sparsity: invalid float value: 'x'"
        found = re.match(r"argument --([\w-]+): (.*)", str(e))
        if found is None:
            raise SlimlmError(f"{path or 'recipe'}: {str(e).replace('--', '')}") from None
        raise SlimlmError(f"{path + '.' if path else ''}{found[1]}: {found[2]}") from None


def from_data(data) -> Recipe:
    """A validated recipe from its YAML data."""
    if not isinstance(data, dict):
        raise SlimlmError("a recipe is a mapping: model, dtype, device, data-dir, out, and a list of steps")
    data = dict(data)
    steps = data.pop("steps", None)
    run = _parse(parser_for(None), data, "")
    if not isinstance(steps, list) or not steps:
        raise SlimlmError("steps: expected a list of steps, e.g. - prune: {method: wanda, sparsity: 0.5}")
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise SlimlmError(f"steps[{i}]: expected one step kind with its settings, e.g. prune: {{sparsity: 0.5}}")
        (kind, settings), = step.items()
        if kind not in STEP_SETTINGS:
            raise SlimlmError(f"steps[{i}]: {unknown('step kind', kind, STEP_SETTINGS)}")
        parser = parser_for(kind)
        ns = _parse(parser, settings or {}, f"steps[{i}].{kind}")
        problem = ineffective_option(kind, ns, parser.get_default)  # as the command line refuses it
        if problem:
            raise SlimlmError(f"steps[{i}].{kind}: {problem.replace('--', '')}")
        parsed.append((kind, ns))
    return Recipe(run, parsed)


def to_data(recipe: Recipe) -> dict:
    """The recipe as YAML data, every setting listed (defaults too)."""
    def mapping(kind, ns):
        return {name: dict(getattr(ns, a.dest) or {}) if isinstance(a, argparse._AppendAction)
                else getattr(ns, a.dest) for name, a in _options(parser_for(kind)).items()}

    return {**mapping(None, recipe.run), "steps": [{kind: mapping(kind, ns)} for kind, ns in recipe.steps]}


class _Loader(yaml.SafeLoader):
    def construct_yaml_int(self, node):
        # YAML 1.1 reads 2:4 as the base-60 integer 124; in a recipe it is an N:M pattern
        return node.value if ":" in node.value else super().construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)


def loads(text: str, source: str = "recipe") -> Recipe:
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise SlimlmError(f"cannot read {source}: {' '.join(str(e).split())}") from None
    return from_data(data)


def read_recipe(path: str | Path) -> Recipe:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise SlimlmError(f"cannot read recipe {path}: {e}") from None
    return loads(text, str(path))


def dumps(recipe: Recipe) -> str:
    from slimlm.version import __version__

    return (f"# written by slimlm {__version__}; replay: slimlm run <this file> [--out DIR]\n"
            + yaml.safe_dump(to_data(recipe), sort_keys=False))


def settings_from(kind: str | None, args: argparse.Namespace) -> argparse.Namespace:
    """A step kind's settings (or the run-level ones) picked from a command line's parsed arguments."""
    return argparse.Namespace(**{a.dest: getattr(args, a.dest, None) for a in _options(parser_for(kind)).values()})


def from_args(kind: str, args: argparse.Namespace) -> Recipe:
    """The one-step recipe of a ``slimlm prune/quantize/analyze/gguf`` command line (plus ``eval`` for
    ``--eval``)."""
    steps = [(kind, settings_from(kind, args))]
    run = settings_from(None, args)
    if kind == "analyze":
        steps[0][1].out = None  # the analysis goes to the recipe's out
    if kind == "gguf":
        run.out = None  # no run folder: the file is the gguf step's out
    if getattr(args, "eval", False):
        steps.append(("eval", settings_from("eval", args)))
    return Recipe(run, steps)


def relocated(recipe: Recipe, out: str) -> Recipe:
    """The recipe with its run folder at ``out``; step outputs whose path began with the old folder's move along."""
    old = recipe.run.out

    def moved(ns):
        path = getattr(ns, "out", None)
        if old and path and path.startswith(old):
            return argparse.Namespace(**{**vars(ns), "out": out + path[len(old):]})
        return ns

    return Recipe(argparse.Namespace(**{**vars(recipe.run), "out": out}),
                  [(kind, moved(ns)) for kind, ns in recipe.steps])


# ---------------------------------------------------------------- what a step's settings mean

def runtime_options(ns) -> dict:
    """A quantize step's outlier, KV-cache and IntactKV settings as ``slimlm.quantize`` keywords."""
    return {"transform": None if ns.transform == "none" else ns.transform, "alpha": ns.alpha,
            "weight_clip": ns.weight_clip, "act_symmetric": None if ns.act_grid is None else ns.act_grid == "sym",
            "kvbits": ns.kvbits, "kv_clip": ns.kv_clip, "intact_kv": ns.intact_kv, "intact_prefix": ns.intact_prefix,
            "lwc": ns.lwc}


def grid_group(ns) -> int | None:
    """The ``group_size`` a step's ``group-size`` means (-1: per output channel)."""
    return None if ns.group_size in (-1, 0) else ns.group_size


def allocation_options(ns) -> dict:
    """The options of a step's allocator, from its ``owl-lambda`` and ``alpha-epsilon``."""
    return {"owl": {"lamda": ns.owl_lambda}, "alphapruning": {"epsilon": ns.alpha_epsilon}}.get(ns.allocation, {})


def override_map(ns) -> dict | None:
    """REGEX -> value of a step's ``override`` (None without one)."""
    return dict(ns.override) if ns.override else None


def budgets_map(ns) -> dict | None:
    """FQN -> sparsity read from a prune step's ``budgets`` file (None without one)."""
    return read_json(ns.budgets) if ns.budgets else None


# ---------------------------------------------------------------- checks before any work

def _check_allocation(ns) -> None:
    from slimlm.allocate import ALLOCATORS

    if ns.allocation not in ALLOCATORS:
        raise unknown("allocation", ns.allocation, ALLOCATORS)


def _check_step(kind: str, ns) -> None:
    from slimlm.allocate import parse_target
    from slimlm.core.data import check_source
    from slimlm.formats.source import check_new
    from slimlm.pruning.methods import get_method
    from slimlm.pruning.spec import check_budget_options, check_sparsity, parse_pattern
    from slimlm.gguf.sizing import parse_size
    from slimlm.quant.grids import QuantGrid
    from slimlm.hooks.runtime import Runtime

    if kind in ("prune", "quantize", "analyze", "shrink", "lowrank"):
        check_source(ns.calib)
    if kind == "prune":
        get_method(ns.method), _check_allocation(ns)
        if ns.sparsity is not None:
            check_sparsity(ns.sparsity)
        check_budget_options(ns.pattern, parse_pattern(ns.pattern), ns.sparsity, ns.allocation, budgets_map(ns),
                             override_map(ns))
        if ns.wbits is not None:
            QuantGrid(ns.wbits, not ns.asym, grid_group(ns), scale_dtype=ns.scale_dtype)
    elif kind == "quantize":
        QuantGrid(ns.wbits, not ns.asym, grid_group(ns), scale_dtype=ns.scale_dtype)
        Runtime(**{k: v for k, v in runtime_options(ns).items() if k != "kvbits"}, abits=ns.abits,
                act_clip=ns.act_clip, kvbits=ns.kvbits).resolved().validate()
        _check_allocation(ns)
        if ns.allocation != "uniform" and ns.avg_bits is None:
            raise SlimlmError(f"allocation '{ns.allocation}' spreads an average bit-width: give avg-bits too")
    elif kind == "shrink":
        _check_shrink(ns)
    elif kind == "lowrank":
        from slimlm.structured.widths import check_keep
        check_keep(ns.params)
    elif kind == "analyze":
        parse_target(ns.target)
    elif kind == "eval":
        check_source(ns.eval_dataset)
    elif kind == "export":
        check_new(ns.out)
    elif kind == "gguf":
        check_new(ns.out)
        if ns.size is not None:
            parse_size(ns.size)


def _check_shrink(ns) -> None:
    from slimlm.structured.widths import check_keep

    if (ns.drop_layers is None) == (ns.params is None):
        raise SlimlmError("give --drop-layers N (depth) or --params FRACTION (width), one of the two")
    if ns.drop_layers is not None and ns.drop_layers < 1:
        raise SlimlmError(f"--drop-layers must be at least 1, got {ns.drop_layers}")
    if ns.params is not None:
        check_keep(ns.params)


def _check_order(recipe: Recipe, options: RunOptions) -> None:
    """The steps' order and the run options fit together (see the module docstring)."""
    kinds = [kind for kind, _ in recipe.steps]
    compression = [k for k in kinds if k in COMPRESSION]
    for i, (kind, ns) in enumerate(recipe.steps):
        where = f"steps[{i}].{kind}"
        if kind != "export" and "export" in kinds[:i]:
            raise SlimlmError(f"{where}: comes after an export step; exports read the saved run, so they come last")
        if kind == "export" and not compression:
            raise SlimlmError(f"{where}: nothing to export; the recipe has no rotate, prune, quantize or shrink step")
        if kind == "eval" and compression and not set(compression) & set(kinds[:i]):
            raise SlimlmError(f"{where}: evaluates the model of the run, so it comes after a compression step "
                              "(evaluate the dense model with a recipe of its own)")
        if kind == "analyze" and ns.out is None and (compression or recipe.run.out is None):
            raise SlimlmError(f"{where}: needs an out of its own" + (
                " (the recipe's out is the compressed run's folder)" if compression else " or the recipe's"))
        if kind == "rotate" and ("rotate" in kinds[:i] or {"prune", "quantize"} & set(kinds[:i])):
            raise SlimlmError(f"{where}: rotate once, before any prune or quantize step")
        if kind in ("shrink", "lowrank") and set(kinds[:i]) & {"rotate", "prune", "quantize", "lowrank"}:
            raise SlimlmError(f"{where}: shrink first: the other steps' rotations, masks and grids would not "
                              "survive removing heads, channels or layers")
        if kind == "quantize" and ns.rotate != "none" and "rotate" in kinds:
            raise SlimlmError(f"{where}: rotate is '{ns.rotate}' but the recipe has a rotate step already")
        if kind == "gguf" and set(kinds[i + 1:]) - {"export"}:
            raise SlimlmError(f"{where}: leaves the model at the file's values, so only export steps may follow it")
        if kind == "gguf" and recipe.run.device != "cpu":
            raise SlimlmError(f"{where}: computes on the CPU; load the model with device: cpu")
        if kind == "gguf" and any(_runtime_hook(k, step) for k, step in recipe.steps[:i]):
            raise SlimlmError(f"{where}: an earlier step adds what GGUF cannot hold (QuaRot's online down_proj "
                              "Hadamard or activation quantization); rotate with no-online-down, no abits")
    if not compression and recipe.run.out is not None and not any(
            kind == "analyze" and ns.out is None for kind, ns in recipe.steps):
        raise SlimlmError("out: nothing is compressed, so there is no run folder to write; drop out")
    if (options.offload or options.resume) and compression not in (["prune"], ["quantize"]):
        raise SlimlmError("--offload and --resume run one prune or quantize step; this recipe has "
                          f"{', '.join(compression) or 'none'}")
    if options.offload and "eval" in kinds:
        raise SlimlmError("--eval needs the whole model in memory; evaluate the saved run with `slimlm eval`")
    if options.offload and "analyze" in kinds:
        raise SlimlmError("analyze needs the whole model in memory; run it without --offload")
    if options.offload and "gguf" in kinds:
        raise SlimlmError("gguf needs the whole model in memory; run it without --offload")


def _runtime_hook(kind: str, ns) -> bool:
    """Whether a step leaves hooks that run at inference (see ``api.apply_runtime``)."""
    return (kind == "rotate" and not ns.no_online_down) or (
        kind == "quantize" and (ns.rotate == "hadamard" or ns.abits is not None or ns.kvbits is not None
                                or ns.transform != "none" or ns.intact_kv is not None))


def _check_gguf_input(run, ns) -> None:
    """A gguf step's calibration text is readable (in about a second, before loading), and a model that is a run
    needing QuaRot's online Hadamard at inference is refused: GGUF cannot carry it."""
    from slimlm.core.data import check_data
    from slimlm.formats.source import check_runtime
    from slimlm.core.files import MANIFEST, read_manifest

    if ns.method == "gptq" or ns.imatrix or ns.size:
        check_data(ns.calib, run.data_dir)
    if (Path(run.model) / MANIFEST).is_file():
        check_runtime(read_manifest(run.model), "GGUF")


def check(recipe: Recipe, options: RunOptions, name_steps: bool = True) -> None:
    """Everything that can be checked before the model is loaded; errors name their step (``steps[1].prune: ``)
    unless ``name_steps`` is off (a command line has one step, named by the command)."""
    from slimlm.core.data import data_dir
    from slimlm.runs.save import check_output

    data_dir(recipe.run.data_dir)
    for i, (kind, ns) in enumerate(recipe.steps):
        try:
            _check_step(kind, ns)
            if kind == "gguf":
                _check_gguf_input(recipe.run, ns)
        except SlimlmError as e:
            raise SlimlmError(f"steps[{i}].{kind}: {e}" if name_steps else str(e)) from None
        if kind == "analyze" and ns.out is not None:
            check_output(ns.out, options.overwrite)
    _check_order(recipe, options)
    if recipe.run.out is not None:
        check_output(recipe.run.out, options.overwrite)
