"""The one exception type slimlm raises for bad input; the CLI prints it as a single line."""
import json
from pathlib import Path


class SlimlmError(ValueError):
    """A user-facing error: bad arguments, unreadable model or data, non-finite activations."""


def read_json(path: str | Path, advice: str = ""):
    """A JSON file's content; an unreadable or invalid file is a SlimlmError naming it (``advice`` appended)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise SlimlmError(f"cannot read JSON file {path}: {e}{advice}") from e


def closest(value, choices) -> str:
    """' (did you mean 'X'?)' for the valid choice nearest to ``value`` (difflib), or '' when none is near."""
    import difflib

    near = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
    return f" (did you mean '{near[0]}'?)" if near else ""


def unknown(what: str, value, choices) -> SlimlmError:
    """The error for a name that is not one of ``choices``, naming the closest valid one."""
    return SlimlmError(f"unknown {what} '{value}'{closest(value, choices)}; choose one of "
                       f"{', '.join(map(str, choices))}")


def lookup(registry: dict, name, what: str):
    """``registry[name]``. Every registry of plug-ins (pruning methods, quantizers, allocators, width and low-rank
    methods) is a dict name -> entry read through here, so an unknown name is one error naming the closest valid
    one, and a new plug-in is one function plus one entry."""
    if name not in registry:
        raise unknown(what, name, registry)
    return registry[name]
