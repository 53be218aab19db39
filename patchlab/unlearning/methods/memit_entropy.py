"""MEMIT+Entropy (Patil et al. 2024): a MEMIT edit that makes the next-token distribution after each target
prompt maximally flat at every layer from the last edited one up
(:func:`patchlab.unlearning.editing.memit_entropy`)."""

from __future__ import annotations

from patchlab.unlearning.methods import Method
from patchlab.unlearning.methods._memit import SWEEP, MemitSettings, applier

METHOD = Method(name="memit_entropy", kind="editing", settings=MemitSettings,
                summary="MEMIT edit maximising the answer entropy through the logit lens",
                apply=applier("memit_entropy"), sweep=SWEEP)
