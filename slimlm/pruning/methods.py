"""The pruning methods by name. A method is ``fn(W, stats, sparsity, spec) -> (new W, keep mask, permutation)``:
``W`` the (out, in) weight, ``stats`` the ``core.stats.LayerStats`` of its input. A new method is one module in
this package plus one entry in ``METHODS``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from slimlm.errors import lookup
from slimlm.pruning.scores import magnitude_scores, ria_scores, score_method, wanda
from slimlm.pruning.sparsegpt import sparsegpt


@dataclass(frozen=True)
class Method:
    fn: Callable
    needs_hessian: bool
    needs_data: bool
    default_group: str


METHODS = {
    "magnitude": Method(score_method(magnitude_scores, "matrix"), False, False, "matrix"),
    "wanda": Method(score_method(wanda, "row"), False, True, "row"),
    "ria": Method(score_method(ria_scores, "matrix"), False, True, "matrix"),
    "sparsegpt": Method(sparsegpt, True, True, "block"),
}


def get_method(name: str) -> Method:
    return lookup(METHODS, name, "pruning method")
