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
``REGEX: VALUE`` for ``override``; a missing key or ``null`` means the flag's default. Each step is read into
the same typed config as its command's flags (``config.STEP_CONFIGS``), so a recipe accepts exactly what the
command line does and is refused by the same rules; an unknown key or choice is one error naming its path
(``steps[0].prune.methd``) and the closest valid name. A recipe that slimlm writes lists every setting in
effect, defaults included, so that a later change of a default does not change its replay. Relative paths are read
from the current folder, as on the command line.

Step kinds: ``analyze`` (an analysis folder: the step's ``out``, or the recipe's when nothing is compressed),
``shrink`` and ``lowrank`` (structured: they change the model's shapes, so they come before the others that
compress), ``rotate`` (QuaRot, before any pruning or quantization), ``prune``, ``quantize``, ``eval``
(perplexity of the model as it is at that point), ``gguf`` (the model as it is, onto llama.cpp's types: one file, its ``out``; it
leaves the weights at the file's values, so only exports follow it), ``export`` (reads the saved run, so export
steps come last). ``pipeline.execute`` runs a recipe; the ``slimlm prune/quantize/shrink/lowrank/analyze/gguf``
commands build a one-step recipe from their flags (``cli.commands``), so a command and its replay share one code
path.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

import yaml

from slimlm.config import STEP_CONFIGS, Config, RunConfig, from_mapping, to_mapping
from slimlm.errors import SlimlmError, unknown

COMPRESSION = ("rotate", "prune", "quantize", "shrink", "lowrank")  # the steps that change the weights; the run folder saves them


@dataclass(frozen=True)
class Recipe:
    """A validated recipe: the run-level settings and the steps, each as its typed config."""

    run: RunConfig
    steps: tuple[tuple[str, Config], ...]  # (kind, its config) in order

    def compression(self) -> list[tuple[str, Config]]:
        return [(kind, c) for kind, c in self.steps if kind in COMPRESSION]

    def with_run(self, **changes) -> Recipe:
        """The recipe with run-level settings changed (``data_dir``, ``model``, ``out``)."""
        return Recipe(replace(self.run, **changes), self.steps)


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
    def from_args(cls, args) -> RunOptions:
        return cls(**{f.name: getattr(args, f.name, f.default) for f in fields(cls)})


def from_data(data) -> Recipe:
    """A validated recipe from its YAML data."""
    if not isinstance(data, dict):
        raise SlimlmError("a recipe is a mapping: model, dtype, device, data-dir, out, and a list of steps")
    data = dict(data)
    steps = data.pop("steps", None)
    run = from_mapping(RunConfig, data, "")
    if not isinstance(steps, list) or not steps:
        raise SlimlmError("steps: expected a list of steps, e.g. - prune: {method: wanda, sparsity: 0.5}")
    parsed = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or len(step) != 1:
            raise SlimlmError(f"steps[{i}]: expected one step kind with its settings, e.g. prune: {{sparsity: 0.5}}")
        (kind, settings), = step.items()
        if kind not in STEP_CONFIGS:
            raise SlimlmError(f"steps[{i}]: {unknown('step kind', kind, STEP_CONFIGS)}")
        parsed.append((kind, from_mapping(STEP_CONFIGS[kind], settings or {}, f"steps[{i}].{kind}")))
    return Recipe(run, tuple(parsed))


def to_data(recipe: Recipe) -> dict:
    """The recipe as YAML data: every setting in effect, defaults too, so that a later change of a default does
    not change its replay; a setting that another one makes ineffective (a depth shrink's width method) is left
    out, as its value changes nothing."""
    return {**to_mapping(recipe.run), "steps": [{kind: c.in_effect()} for kind, c in recipe.steps]}


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


def relocated(recipe: Recipe, out: str) -> Recipe:
    """The recipe with its run folder at ``out``; step outputs whose path began with the old folder's move along."""
    old = recipe.run.out

    def moved(c):
        path = getattr(c, "out", None)
        if old and path and path.startswith(old):
            return replace(c, out=out + path[len(old):])
        return c

    return Recipe(replace(recipe.run, out=out), tuple((kind, moved(c)) for kind, c in recipe.steps))


# ---------------------------------------------------------------- checks before any work

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

    if ns.method == "gptq" or ns.imatrix or ns.size is not None:
        check_data(ns.calib, run.data_dir)
    if (Path(run.model) / MANIFEST).is_file():
        check_runtime(read_manifest(run.model), "GGUF")


def check(recipe: Recipe, options: RunOptions, name_steps: bool = True) -> None:
    """Everything that can be checked before the model is loaded; errors name their step (``steps[1].prune: ``)
    unless ``name_steps`` is off (a command line has one step, named by the command)."""
    from slimlm.core.data import data_dir
    from slimlm.formats.source import check_new
    from slimlm.runs.save import check_output

    data_dir(recipe.run.data_dir)
    for i, (kind, ns) in enumerate(recipe.steps):
        try:
            if kind in ("export", "gguf"):
                run_out = Path(recipe.run.out) if recipe.run.out else None
                check_new(ns.out, (run_out, run_out.parent) if run_out else (), options.overwrite and kind == "gguf")
            if kind == "gguf":
                _check_gguf_input(recipe.run, ns)
        except SlimlmError as e:
            raise SlimlmError(f"steps[{i}].{kind}: {e}" if name_steps else str(e)) from None
        if kind == "analyze" and ns.out is not None:
            check_output(ns.out, options.overwrite)
    _check_order(recipe, options)
    if recipe.run.out is not None:
        check_output(recipe.run.out, options.overwrite)
