"""Plain defaults shared by the library and the command-line scripts. This module imports nothing heavy (no torch,
no transformers), so a script's parser can show them in ``--help`` before the rest of patchlab loads; the modules
that use them re-export them (``patchlab.pair.generation.DEFAULT_TEMPLATE``, ...)."""

from __future__ import annotations

#: The question-answering prompt: ``{question}`` is replaced by each question (a string with that one field).
DEFAULT_TEMPLATE = "Question: {question}\n Answer:"

#: The components a KRS sweep restores by default (:func:`patchlab.patch_sweep`).
DEFAULT_COMPONENTS = ("coef", "value", "attn", "coef+attn")

#: Default ``memory_budget`` of a KRS sweep (:func:`patchlab.patch_sweep`): the questions prepared together hold at
#: most 2 GiB of cache.
DEFAULT_MEMORY_BUDGET = "2GiB"

#: LLaMA shapes for benchmarks (:func:`patchlab.tiny.tiny_config` keyword arguments plus ``vocab``): the toy world's
#: model, a LLaMA-3.2-1B-like, a LLaMA-2-7B-like and a LLaMA-2-70B-like shape (32k vocabulary), and a
#: Llama-3-8B-like shape (128,256-token vocabulary).
SHAPES: dict[str, dict[str, int]] = {
    "toy": {"n_layers": 6, "d_model": 128, "d_mlp": 384, "n_heads": 4, "n_kv_heads": 2, "vocab": 319},
    "1b": {"n_layers": 16, "d_model": 2048, "d_mlp": 8192, "n_heads": 32, "n_kv_heads": 8, "vocab": 32000},
    "7b": {"n_layers": 32, "d_model": 4096, "d_mlp": 11008, "n_heads": 32, "n_kv_heads": 32, "vocab": 32000},
    "8b": {"n_layers": 32, "d_model": 4096, "d_mlp": 14336, "n_heads": 32, "n_kv_heads": 8, "vocab": 128256},
    "70b": {"n_layers": 80, "d_model": 8192, "d_mlp": 28672, "n_heads": 64, "n_kv_heads": 8, "vocab": 32000},
}

#: The weight-attribution methods of :func:`patchlab.unlearning.attribution.scores`.
ATTRIBUTION_METHODS = ("wagle", "magnitude", "wanda", "random")

#: The settings of a MEMIT-style edit (:func:`patchlab.unlearning.editing.memit`, whose keyword defaults these are,
#: as are those of the registry's MEMIT settings): edited layers (``None``: the default layers), covariance weight
#: (dimensionless), Adam steps and learning rate of each target ``delta``, largest ``||delta||`` as a multiple of
#: ``||h||``, and the weight of the ``||delta|| / ||h||^2`` penalty.
MEMIT_DEFAULTS = {"layers": None, "cov_weight": 10.0, "steps": 25, "lr": 0.5, "clamp_norm": 4.0, "weight_decay": 0.5}

#: The dummy object MEMIT+Empty rewrites every fact to (:func:`patchlab.unlearning.editing.memit_empty`).
MEMIT_EMPTY_DUMMY = "nothing"
