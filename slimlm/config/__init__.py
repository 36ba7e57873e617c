"""Typed step configs: the one schema of every setting (``config.schema``). The command line's flags and --help,
a recipe step's keys, the Python API's keywords and a run's manifest all come from these dataclasses.

``STEP_CONFIGS``: recipe step kind -> its config type (``steps.STEPS`` pairs each with the function that runs
it)."""
from slimlm.config.compress import (AllocationConfig, CalibrationConfig, GGUFConfig, GridConfig, PruneConfig,
                                    QuantizeConfig, SmallCalibrationConfig)
from slimlm.config.run import AnalyzeConfig, EvalConfig, ExportConfig, RunConfig
from slimlm.config.schema import Config, from_mapping, from_namespace, to_mapping
from slimlm.config.structure import LowrankConfig, RotateConfig, ShrinkConfig

STEP_CONFIGS = {"analyze": AnalyzeConfig, "rotate": RotateConfig, "prune": PruneConfig, "quantize": QuantizeConfig,
                "eval": EvalConfig, "export": ExportConfig, "gguf": GGUFConfig, "shrink": ShrinkConfig,
                "lowrank": LowrankConfig}

__all__ = ["STEP_CONFIGS", "AllocationConfig", "AnalyzeConfig", "CalibrationConfig", "Config", "EvalConfig", "ExportConfig", "GGUFConfig",
           "GridConfig", "LowrankConfig", "PruneConfig", "QuantizeConfig", "RotateConfig", "RunConfig", "ShrinkConfig",
           "SmallCalibrationConfig", "from_mapping", "from_namespace", "to_mapping"]
