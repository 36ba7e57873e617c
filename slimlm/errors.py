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
