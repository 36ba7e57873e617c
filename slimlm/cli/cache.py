"""``slimlm cache list`` and ``slimlm cache clear``: what the GGUF conversion cache holds, and removing it."""
from __future__ import annotations


def add_cache_parser(sub) -> None:
    p = sub.add_parser("cache", help="list or clear the float32 copies of .gguf models kept in $SLIMLM_CACHE")
    actions = p.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="path, size, last use and source file of every cached copy")
    listing.set_defaults(quiet=True)
    clear = actions.add_parser("clear", help="remove cached copies (the next load converts again, ~30 s)")
    clear.add_argument("names", nargs="*", help="entry folder names (from `slimlm cache list`), .gguf files, "
                       "or built-in aliases (smollm2-135m)")
    clear.add_argument("--all", action="store_true", help="remove every entry")
    clear.set_defaults(quiet=True)


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB"


def _origin(entry) -> str:
    from slimlm.core.cache import UNFINISHED

    if entry.path.name.startswith(UNFINISHED):
        return "an unfinished conversion (running, or killed)"
    return entry.source or "a GGUF file not recorded (converted by an older slimlm)"


def cmd_cache_list(args) -> None:
    from slimlm.core.cache import cache_dir, cache_entries

    entries = cache_entries()
    for e in entries:
        print(f"{e.path}  {_mb(e.bytes)}  last used {e.last_used:%Y-%m-%d %H:%M}  from {_origin(e)}")
    count = f"{len(entries)} entr{'y' if len(entries) == 1 else 'ies'}"
    print(f"{count}, {_mb(sum(e.bytes for e in entries))} in {cache_dir()}")


def cmd_cache_clear(args) -> None:
    from slimlm.core.cache import cache_dir, clear_cache
    from slimlm.core.models import BUILTIN_MODELS, builtin_gguf

    removed = clear_cache([str(builtin_gguf(n)) if n in BUILTIN_MODELS else n for n in args.names], args.all)
    for e in removed:
        print(f"removed {e.path} ({_mb(e.bytes)})")
    print(f"freed {_mb(sum(e.bytes for e in removed))} in {cache_dir()}")
