"""Whether the Hugging Face hub can be reached, asked once before anything downloads.

Offline, transformers, datasets and lm_eval retry each download with back-off for up to minutes before
they give up. One short TCP connect to the hub (or to the HTTPS proxy, where one is set) answers in
about a second, and slimlm then fails with one line that says what to do offline.
``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE`` / ``HF_DATASETS_OFFLINE``) skips the probe: the
libraries then read only their own caches, which they do without retries.
"""
from __future__ import annotations

import functools
import os
import socket
import threading
from urllib.parse import urlsplit

from slimlm.errors import SlimlmError

PROBE_SECONDS = 2.0
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_mode() -> bool:
    """The user asked the Hugging Face libraries to stay offline (huggingface_hub's truthy spellings)."""
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE") for v in OFFLINE_VARIABLES)


def hub_address() -> tuple[str, int]:
    """Where a download would first connect: the HTTPS proxy if one is set, else ``$HF_ENDPOINT``."""
    url = (os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
           or os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return parts.hostname or "huggingface.co", parts.port or (443 if parts.scheme == "https" else 80)


@functools.lru_cache(maxsize=4)
def can_connect(host: str, port: int, timeout: float = PROBE_SECONDS) -> bool:
    """One TCP connect, asked once per process. It runs in a thread because the name lookup before it
    ignores socket timeouts and can hang on a machine without a resolver."""
    answered = []

    def attempt():
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            answered.append(True)
        except OSError:
            pass

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def require_hub(what: str, offline_advice: str) -> None:
    """Raise one line naming ``offline_advice`` when ``what`` needs the hub and it cannot be reached."""
    if offline_mode():
        return
    host, port = hub_address()
    if not can_connect(host, port):
        raise SlimlmError(f"{what} needs the Hugging Face hub and {host}:{port} cannot be reached "
                          f"(no connection within {PROBE_SECONDS:g} s); offline, {offline_advice}, "
                          "or set HF_HUB_OFFLINE=1 to read only the Hugging Face cache")
