"""Data-parallel calibration over torch.distributed: ``torchrun --nproc-per-node N -m slimlm prune|quantize ...``.

Every rank runs the same block loop (``core.engine``) on its own contiguous share of the calibration batches, so
the forwards, which are most of a calibrated run's time, split N ways. After each block's statistics pass the
statistics of every distinct linear input are all-reduced: channel maxima exactly (MAX), sums (Hessians, channel
norms and totals, token counts) in float64, so every rank holds the statistics of all the
windows. The sets of linears that share an input are then dealt round-robin to the ranks; each set is compressed
once, by its owner, and its new weights and per-layer records are broadcast from there. Only rank 0 writes files.

Backends: gloo on CPU, nccl when CUDA is available (each rank on ``cuda:LOCAL_RANK``). The launcher's usual
environment (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``MASTER_PORT``, set by ``torchrun``) starts it; without it
(or with ``WORLD_SIZE=1``) everything here is a no-op and runs are exactly the one-process code.

Equality with one process: a window's forward is the same computation (the batches are the same windows in the
same shapes), the maxima are exact, and the sums are float64 sums of per-window float32 products (``core.stats``),
which the ranks add in float64 and which are rounded to float32 once. A different split changes a float64 sum by
about 2^-29 of a float32 step, so the rounded statistics, and what a method makes of them, are the same bits unless
a sum falls that close to a float32 rounding boundary (``tests/test_distributed.py`` compares the weights with
``torch.equal``).

``SLIMLM_DIST_TIMEOUT`` (seconds, default 1800) bounds how long a rank waits for the others: a rank that died
makes the rest fail instead of hanging (a closed connection already does on gloo), and ``--resume`` restarts the
run from the last block that every rank finished (``runs.resume``).
"""
from __future__ import annotations

import datetime
import hashlib
import os

import torch
import torch.distributed as dist

from slimlm.errors import SlimlmError


def launched() -> bool:
    """Whether a launcher (torchrun) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> None:
    """Join the process group that the launcher describes (no-op in a single process or if already joined)."""
    if not launched() or dist.is_initialized():
        return
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = datetime.timedelta(seconds=float(os.environ.get("SLIMLM_DIST_TIMEOUT", "1800")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)


def world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def backend() -> str | None:
    return dist.get_backend() if dist.is_initialized() else None


def record() -> dict:
    """What a manifest records about the processes that made it."""
    return {"world_size": world(), **({"backend": backend()} if world() > 1 else {})}


def local_device(device: str | torch.device) -> torch.device:
    """``cuda`` means this rank's GPU (``LOCAL_RANK``) under a launcher; any other device is kept."""
    device = torch.device(device)
    if world() > 1 and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def barrier() -> None:
    if world() > 1:
        dist.barrier()


def check_same(text: str, what: str) -> None:
    """Refuse to go on when ranks were started differently (their ``text`` differs): one line on every rank."""
    if world() == 1:
        return
    digest = hashlib.sha256(text.encode()).hexdigest()
    digests = [None] * world()
    dist.all_gather_object(digests, digest)
    odd = [r for r, d in enumerate(digests) if d != digests[0]]
    if odd:
        raise SlimlmError(f"rank {odd[0]} was started with other {what} than rank 0; every rank must run the same "
                          "command on the same model and data")


def digest(tensor: torch.Tensor) -> str:
    """A short fingerprint of a tensor's values (to compare the ranks' calibration windows)."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def shard_windows(windows: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """This rank's contiguous share of the calibration windows and the batch size to forward them with.

    The shares are whole batches, so every window is forwarded in the same batch as in one process, and differ
    by at most one batch. With fewer batches than ranks the batches shrink until every rank has one (their
    shapes then differ from the one-process run's, a float-rounding difference only)."""
    n = windows.shape[0]
    if world() == 1:
        return windows, batch_size
    if n < world():
        raise SlimlmError(f"{n} calibration windows cannot be shared by {world()} processes; raise --nsamples "
                          "to at least the number of processes")
    batch_size = min(batch_size, -(-n // world()))
    nbatches = -(-n // batch_size)
    first, last = nbatches * rank() // world(), nbatches * (rank() + 1) // world()
    return windows[first * batch_size:last * batch_size], batch_size


SUMMED = ("xtx", "sqnorm", "total", "window_sum")  # Accumulator fields that are sums over tokens


def _collective(fn, tensor: torch.Tensor, dtype=None, **kwargs) -> None:
    """``fn(tensor, **kwargs)``, through a copy where ``tensor`` is not in ``dtype`` or not on a device the backend
    can use (nccl needs CUDA tensors); the result lands in ``tensor`` in place."""
    device = torch.device("cuda", torch.cuda.current_device()) if backend() == "nccl" else tensor.device
    work = tensor.to(device=device, dtype=dtype or tensor.dtype)
    fn(work, **kwargs)
    if work is not tensor:
        tensor.copy_(work)


def sum_(tensors) -> None:
    """Every rank's tensors replaced, in place, by their sum over the ranks (added in float64, rounded once)."""
    if world() == 1:
        return
    for tensor in tensors:
        _collective(dist.all_reduce, tensor, torch.float64)


def reduce_accumulators(accumulators) -> None:
    """All-reduce each distinct ``core.stats.Accumulator`` in place, in the (identical) order of the list."""
    if world() == 1:
        return
    seen = set()
    for acc in accumulators:
        if id(acc) in seen:
            continue
        seen.add(id(acc))
        sum_(value for value in (getattr(acc, name) for name in SUMMED) if isinstance(value, torch.Tensor))
        _collective(dist.all_reduce, acc.absmax, op=dist.ReduceOp.MAX)
        counts = torch.tensor([acc.ntokens, acc.windows], dtype=torch.float64)
        sum_([counts])
        acc.ntokens, acc.windows = int(counts[0]), int(counts[1])


def owns(k: int) -> bool:
    """Whether this rank compresses the k-th set of linears of a block (round-robin)."""
    return k % world() == rank()


def share(groups: list[dict], results: tuple[dict, ...], before: list[set], changed: list[bool]) -> bool:
    """After each rank compressed the ``groups`` ({fqn: linear}) it owns (``changed[k]``: whether set k's weights
    changed, on its owner): merge into every rank's ``results`` dicts the entries their owners added (keys not in
    ``before``, the key sets taken before compressing), broadcast the changed sets' weights from their owners, and
    return whether any weight changed."""
    if world() == 1:
        return any(changed)
    mine = ([{key: d[key] for key in d.keys() - old} for d, old in zip(results, before)], changed)
    gathered = [None] * world()
    dist.all_gather_object(gathered, mine)
    for added, _ in gathered:
        for d, entries in zip(results, added):
            d.update(entries)
    changed = [gathered[k % world()][1][k] for k in range(len(groups))]
    for k, group in enumerate(groups):
        if changed[k]:
            for linear in group.values():
                _collective(dist.broadcast, linear.weight.data, src=k % world())
    return any(changed)
