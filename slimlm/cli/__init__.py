"""``slimlm`` command line: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import contextlib
import errno
import functools
import logging
import sys

from safetensors import SafetensorError

from slimlm.cli import commands
from slimlm.cli.parser import build_parser
from slimlm.errors import SlimlmError


def _disk_full(e: Exception) -> bool:
    # safetensors reports a full disk as a SafetensorError carrying the OS message, not as an OSError
    return getattr(e, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(e)


@contextlib.contextmanager
def _bars_off():
    """--quiet: no progress bars while the command runs. slimlm's own bars are switched off by ``progress=False``
    and transformers' by its switch; bars that other libraries open with no switch (transformers' GGUF
    conversion, lm_eval's request building) start disabled, since ``disable=True`` becomes tqdm's default
    (a bar given ``disable=`` explicitly keeps it)."""
    from tqdm import std
    from transformers.utils import logging as hf_logging

    init, hf_bars = std.tqdm.__dict__["__init__"], hf_logging.is_progress_bar_enabled()
    std.tqdm.__init__ = functools.partialmethod(init, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        std.tqdm.__init__ = init
        if hf_bars:
            hf_logging.enable_progress_bar()


DATA_PARALLEL = ("prune", "quantize", "shrink", "lowrank", "run")  # commands whose calibration torchrun splits


def _join_ranks(args) -> None:
    """Under torchrun: join the other ranks (``core.distributed``); rank 0 alone shows progress."""
    from slimlm.core import distributed  # here: it imports torch, which --help and --version do not need
    if distributed.launched() and args.command not in DATA_PARALLEL:
        raise SlimlmError(f"torchrun splits the calibration of slimlm {', '.join(DATA_PARALLEL)}; run "
                          f"'slimlm {args.command}' as one process")
    distributed.init_from_env()
    args.quiet = args.quiet or not distributed.is_main()


class _Format(logging.Formatter):
    """One style for everything slimlm says on stderr, as its errors: ``slimlm: ...``, ``slimlm: warning: ...``;
    other libraries' warnings keep their name."""

    def format(self, record):
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        who = "slimlm" if record.name.startswith("slimlm") else record.name
        return f"{who}: {level}{record.getMessage()}"


def _log_like_errors(quiet: bool) -> None:
    """slimlm's progress messages at INFO (none with --quiet); other libraries' only from WARNING up (the gguf
    writer's INFO lines name its temporary file, which says nothing to a user)."""
    handler = logging.StreamHandler()
    handler.setFormatter(_Format())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    logging.getLogger("slimlm").setLevel(logging.WARNING if quiet else logging.INFO)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        _join_ranks(args)
        _log_like_errors(args.quiet)
        with _bars_off() if args.quiet else contextlib.nullcontext():
            getattr(commands, f"cmd_{args.command}")(args)
    except SlimlmError as e:
        print(f"slimlm: error: {e}", file=sys.stderr)
        return 2
    except (OSError, SafetensorError) as e:
        if not _disk_full(e):
            raise
        print(f"slimlm: error: no space left on device ({e}); free some space and rerun with --resume",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("slimlm: interrupted; no output was written (runs with --resume or --offload disk keep their "
              "finished blocks: rerun with --resume)", file=sys.stderr)
        return 130
    return 0
