"""What every compressing stage returns (``prune``, ``quantize``, ``shrink``, ``lowrank``) and ``save`` writes."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Result:
    """What a compression run produced: a JSON-able manifest, and tensors (by safetensors file name) and text files
    (by file name, e.g. recipe.yaml) to save beside the model."""

    manifest: dict
    tensors: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
