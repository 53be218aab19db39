"""Progress output: :func:`quiet` turns off the progress bars of transformers and huggingface_hub (patchlab's own
bars follow each function's ``progress=`` argument). Used by the library and by the scripts (re-exported by
:mod:`patchlab.cli`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator



@contextlib.contextmanager
def quiet(enabled: bool = True) -> Iterator[None]:
    """Inside the block (when ``enabled``), transformers' and huggingface_hub's own progress bars (loading and
    writing weights, downloads) are off; they are restored on exit. patchlab's own bars follow each function's
    ``progress=`` argument. Disabled, it does nothing (transformers is not even imported, so scripts answer
    ``--help`` before it loads)."""
    if not enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
