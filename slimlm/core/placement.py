"""``--device-map``: one decoder block spread over several devices while it is calibrated and compressed.

A block of a 400B model, with the Hessians of its linears, does not fit one GPU. Inside ``with spread_over(spec)``
(the CLI's ``--device-map``, or from Python ``with slimlm.spread_over("auto"): slimlm.quantize(...)``) the engine
places each block, in its turn, over the given devices with accelerate's ``dispatch_model``, whose hooks move
the activations from device to device; the rest of the model stays where it is (CPU, or disk with
``--offload disk``). Each linear's statistics accumulate on its own device (the hook of ``core.engine`` sees
its input there) and its compression runs there.

The split (``plan``) keeps the block's modules in their registration order (Llama: attention, MLP, then the two
norms) and cuts it into contiguous pieces of about equal cost: a linear costs its weights plus, for methods that
need one, its input's Hessian (in_features² float32) and a second copy of it for the method's work; other
modules cost their parameters. Activations are small next to a block's weights, so the extra hops of a norm
placed away from its linear cost little.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from slimlm.errors import SlimlmError

_DEVICES: list[torch.device] = []  # the current spread_over devices; empty: the engine's single device


def parse(spec: str) -> list[torch.device]:
    """``auto`` (every visible GPU) or a comma-separated list of devices (``cuda:0,cuda:1``)."""
    if spec == "auto":
        if not torch.cuda.is_available():
            raise SlimlmError("--device-map auto spreads a block over GPUs, and none is visible; run without it")
        return [torch.device("cuda", i) for i in range(torch.cuda.device_count())]
    try:
        devices = [torch.device(part.strip()) for part in spec.split(",")]
    except RuntimeError as e:
        raise SlimlmError(f"--device-map: {e}; give auto or devices such as cuda:0,cuda:1") from None
    for device in devices:
        if device.type == "cuda" and (device.index is None or device.index >= torch.cuda.device_count()):
            raise SlimlmError(f"--device-map: {device} is not a visible GPU (give each as cuda:N; "
                              f"{torch.cuda.device_count()} visible)")
    return devices


@contextlib.contextmanager
def spread_over(spec: str | None):
    """Within this context the engine spreads each block over ``parse(spec)`` (None: no change)."""
    if spec is None:
        yield
        return
    from slimlm.core import distributed

    if distributed.world() > 1:
        raise SlimlmError("--device-map spreads a block over one process's GPUs; under torchrun each rank "
                          "uses its own GPU: use one or the other")
    _DEVICES[:] = parse(spec)
    try:
        yield
    finally:
        _DEVICES.clear()


def devices() -> list[torch.device]:
    return list(_DEVICES)


def describe(device) -> str:
    """The device(s) a run computed on, for its manifest: ``cuda:0,cuda:1`` inside ``spread_over``."""
    return ",".join(map(str, _DEVICES)) if _DEVICES else str(device)


def _owners(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """The block's modules that hold parameters or buffers of their own, in forward (registration) order."""
    return [(name, m) for name, m in block.named_modules()
            if name and (any(True for _ in m.parameters(recurse=False)) or any(True for _ in m.buffers(False)))]


def _cost(module: nn.Module, hessian: bool) -> int:
    size = sum(t.numel() * t.element_size() for t in [*module.parameters(recurse=False), *module.buffers(False)])
    if hessian and isinstance(module, nn.Linear):
        size += 2 * module.in_features ** 2 * 4  # the Hessian and the method's working copy (float32)
    return size


def plan(block: nn.Module, devices: list[torch.device], hessian: bool) -> dict[str, str]:
    """Module name -> device: contiguous pieces of the block, in forward order, of about equal cost."""
    owners = _owners(block)
    costs = [_cost(m, hessian) for _, m in owners]
    total, running, device_map = sum(costs) or 1, 0, {}
    for (name, _), cost in zip(owners, costs):
        piece = min(len(devices) - 1, running * len(devices) // total)
        device_map[name] = str(devices[piece])
        running += cost
    return device_map


def dispatch_(block: nn.Module, devices: list[torch.device], hessian: bool) -> dict[str, str]:
    """Place ``block`` over ``devices`` (hooks move its inputs); returns the map used."""
    from accelerate import dispatch_model

    device_map = plan(block, devices, hessian)
    dispatch_model(block, device_map, main_device=str(devices[0]), force_hooks=True)
    return device_map


def release_(block: nn.Module) -> None:
    """Undo ``dispatch_``: hooks removed, every tensor of the block back on the CPU."""
    from accelerate.hooks import remove_hook_from_module

    remove_hook_from_module(block, recurse=True)
    block.__dict__.pop("hf_device_map", None)
    block.to("cpu")
