"""Plain defaults shared by the library and the command-line scripts. This module imports nothing heavy (no torch,
no transformers), so a script's parser can show them in ``--help`` before the rest of patchlab loads; the modules
that use them re-export them (``patchlab.pair.generation.DEFAULT_TEMPLATE``, ...)."""

from __future__ import annotations

#: The question-answering prompt: ``{question}`` is replaced by each question (a string with that one field).
DEFAULT_TEMPLATE = "Question: {question}\n Answer:"

#: The components a KRS sweep restores by default (:func:`patchlab.patch_sweep`).
DEFAULT_COMPONENTS = ("coef", "value", "attn", "coef+attn")

#: The weight-attribution methods of :func:`patchlab.unlearning.attribution.scores`.
ATTRIBUTION_METHODS = ("wagle", "magnitude", "wanda", "random")
