"""Every error patchlab raises on bad input derives from :class:`PatchlabError`.

The subclasses also derive from the built-in exception a Python user would expect
(``ValueError``, ``FileNotFoundError``, ...) so generic handlers keep working.
"""

from __future__ import annotations


class PatchlabError(Exception):
    """Base class of every error raised by patchlab on invalid input or state."""


class PatchlabValueError(PatchlabError, ValueError):
    """An argument has an invalid value (empty set, bad window, unknown name, ...)."""


class PatchlabFileError(PatchlabError, FileNotFoundError):
    """A path given to patchlab does not exist or does not hold what it should."""


class PairMismatchError(PatchlabValueError):
    """The vanilla and unlearned models (or tokenizers) are not compatible."""


class UnsupportedArchitectureError(PatchlabValueError):
    """The model family has no entry in the architecture registry."""


class NonFiniteError(PatchlabValueError):
    """A tensor that patchlab relies on contains NaN or infinite values."""


class DegenerateMetricError(PatchlabValueError):
    """A recovery metric's denominator is zero for some question (the models agree there): its score is undefined."""


class DegenerateKRSError(DegenerateMetricError):
    """MSE(l_u, l_v) is zero: the unlearned model equals the vanilla one, KRS is undefined."""


class MissingDependencyError(PatchlabError, ImportError):
    """An optional dependency (e.g. TransformerLens for :mod:`patchlab.patching.lens`) is not installed."""
