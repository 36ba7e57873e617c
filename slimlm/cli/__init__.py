"""``slimlm`` command line: a thin layer over the Python API. Every run writes a manifest."""
from __future__ import annotations

import errno
import logging
import sys

from safetensors import SafetensorError

from slimlm.cli import commands
from slimlm.cli.parser import build_parser
from slimlm.errors import SlimlmError


def _disk_full(e: Exception) -> bool:
    # safetensors reports a full disk as a SafetensorError carrying the OS message, not as an OSError
    return getattr(e, "errno", None) == errno.ENOSPC or f"os error {errno.ENOSPC})" in str(e)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.quiet:
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
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
