"""Each command's flags, generated from the typed configs (``slimlm.config``): a step's flags are its config's
fields, so the command line, a recipe step and the Python API take the same settings with the same defaults and
refuse the same combinations (the config's rules, checked when the command builds it)."""
from __future__ import annotations

from slimlm.config import (STEP_CONFIGS, AllocationConfig, CalibrationConfig, EvalConfig, RunConfig,
                           from_namespace)
from slimlm.config.schema import add_arguments


def add_load_settings(p) -> None:
    """How the model is loaded and where its blocks compute: the run-level settings of a recipe."""
    add_arguments(p, RunConfig, skip=("model", "out"))


def add_eval_settings(p) -> None:
    add_arguments(p, EvalConfig)


def add_calib_settings(p, skip=()) -> None:
    add_arguments(p, CalibrationConfig, skip=skip)


def add_allocation_settings(p) -> None:
    add_arguments(p, AllocationConfig)


def add_step_settings(p, kind: str, skip=("out",)) -> None:
    """A recipe step kind's settings as flags (its ``out``, when it has one, is the command's own)."""
    add_arguments(p, STEP_CONFIGS[kind], skip=skip)


def step_config(kind: str, args):
    """The config of step ``kind`` from a parsed command line (its rules are checked here)."""
    return from_namespace(STEP_CONFIGS[kind], args)


def eval_config(args):
    return from_namespace(EvalConfig, args)


def run_config(args, out: str | None):
    return RunConfig(model=args.model, dtype=args.dtype, device=args.device, data_dir=args.data_dir, out=out)
