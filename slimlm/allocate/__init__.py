"""Allocate: where in the model to spend a global budget (sparsity, bits, kept rank).

``allocators``: the allocators themselves (uniform, OWL, AlphaPruning, errortable, fisher: per-FQN scores ->
per-FQN budgets at the target) and bit rounding; ``metrics``: measuring on a model what an allocator reads, and
the sparsity map ``plan_budgets``; ``holdout``: every plan measured against its baseline on held-out calibration
windows before a run commits to it. The budget maps themselves are plain data (``core.budgets``).
"""
from slimlm.allocate.allocators import (ALLOCATOR_METRIC, ALLOCATORS, BIT_LEVELS, allocate_from_metrics, alphapruning,
                                        block_mean, clip_and_renormalize, errortable, fisher, owl, parse_target,
                                        round_bits, solve_error_table, uniform)
from slimlm.allocate import holdout
from slimlm.allocate.metrics import allocation_metrics, fisher_metrics, plan_budgets

__all__ = ["ALLOCATOR_METRIC", "ALLOCATORS", "BIT_LEVELS", "allocate_from_metrics", "allocation_metrics", "alphapruning",
           "block_mean", "clip_and_renormalize", "errortable", "fisher", "fisher_metrics", "holdout", "owl", "parse_target",
           "plan_budgets", "round_bits", "solve_error_table", "uniform"]
