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

#: The settings of a MEMIT-style edit (:func:`patchlab.unlearning.editing.memit`, whose keyword defaults these are,
#: as are those of the registry's MEMIT settings): edited layers (``None``: the default layers), covariance weight
#: (dimensionless), Adam steps and learning rate of each target ``delta``, largest ``||delta||`` as a multiple of
#: ``||h||``, and the weight of the ``||delta|| / ||h||^2`` penalty.
MEMIT_DEFAULTS = {"layers": None, "cov_weight": 10.0, "steps": 25, "lr": 0.5, "clamp_norm": 4.0, "weight_decay": 0.5}

#: The dummy object MEMIT+Empty rewrites every fact to (:func:`patchlab.unlearning.editing.memit_empty`).
MEMIT_EMPTY_DUMMY = "nothing"
