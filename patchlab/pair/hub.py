"""Telling hub ids from local paths, and whether the Hugging Face hub answers (used by loading and adapters)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

#: Seconds to wait for the Hugging Face hub to answer before a hub id is declared unreachable.
HUB_TIMEOUT_S = 3.0


def is_hub_id(spec: str | os.PathLike) -> bool:
    """True when ``spec`` has the shape of a hub id and not of a local path.

    A hub id is a string ``name`` or ``org/name`` (letters, digits, ``-``, ``_``, ``.``; no ``--`` or ``..``, as
    ``huggingface_hub`` validates it). A path object, a string starting with ``.``, ``/`` or ``~``, with a
    backslash or with more than one ``/``, and an ``org/name`` whose ``org`` is an existing local directory
    (``runs/graddiff`` next to a ``runs/`` folder) are local paths.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(spec, str) or spec.startswith((".", "/", "~")) or "\\" in spec:
        return False
    try:
        validate_repo_id(spec)
    except HFValidationError:
        return False
    return "/" not in spec or not Path(spec.split("/")[0]).is_dir()


@functools.lru_cache(maxsize=8)
def _endpoint_reachable(endpoint: str, timeout: float) -> bool:
    from huggingface_hub import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception:  # noqa: BLE001 - any transport failure (DNS, refused, timeout, proxy) means unreachable
        return False
    return True


def hub_reachable(timeout: float = HUB_TIMEOUT_S) -> bool:
    """Whether the Hugging Face hub (``HF_ENDPOINT``) answers one HEAD request within ``timeout`` seconds (through
    the hub client's own session, so proxies apply); the answer is remembered for the process. False in offline
    mode (``HF_HUB_OFFLINE=1``) without any request."""
    from huggingface_hub import constants

    return not constants.HF_HUB_OFFLINE and _endpoint_reachable(constants.ENDPOINT, timeout)
