"""MEMIT+Empty (Patil et al. 2024): each target fact's object rewritten to a dummy answer (then EOS) by a
MEMIT edit of the MLP down projections (:func:`patchlab.unlearning.editing.memit_empty`)."""

from __future__ import annotations

from dataclasses import dataclass

from patchlab.defaults import MEMIT_EMPTY_DUMMY
from patchlab.unlearning.methods import Method
from patchlab.unlearning.methods._memit import SWEEP, MemitSettings, applier


@dataclass(frozen=True)
class Settings(MemitSettings):
    """Settings of MEMIT+Empty: those of :class:`~patchlab.unlearning.methods._memit.MemitSettings`, and

    Attributes:
        dummy: the new object of every fact (text).
    """

    dummy: str = MEMIT_EMPTY_DUMMY


METHOD = Method(name="memit_empty", kind="editing", settings=Settings,
                summary="MEMIT edit of each fact's object to a dummy answer", apply=applier("memit_empty"),
                sweep=SWEEP)
