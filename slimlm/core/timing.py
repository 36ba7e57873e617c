"""Wall-clock bookkeeping for manifests: each stage records how many seconds its parts took."""
from __future__ import annotations

import contextlib
import time


@contextlib.contextmanager
def timed(timings: dict[str, float], key: str):
    """Add the seconds the ``with`` block takes to ``timings[key]`` (a part that runs several times sums up)."""
    start = time.perf_counter()
    yield
    timings[key] = timings.get(key, 0.0) + time.perf_counter() - start
