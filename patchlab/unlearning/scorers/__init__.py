"""Weight-attribution scorers and their registry :data:`SCORERS`: one file per scorer in this package, each
defining ``SCORER``, the scorer function; the file's name is the scorer's name (built-ins: ``wagle``, ``magnitude``,
``wanda``, ``random``)::

    # patchlab/unlearning/scorers/my_scorer.py
    def my_scorer(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
        return {n: p.detach().float().abs() for n, p in model.named_parameters()}

    SCORER = my_scorer

:func:`patchlab.unlearning.attribution.scores` resolves its settings (preset applied) into a :class:`ScoreInputs`
and calls the chosen scorer; scorers defined elsewhere join with :func:`register_scorer`. Built-in files are
imported on first use of the registry; modules whose name starts with ``_`` are shared helpers, not scorers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.registry import Registry
from patchlab.unlearning.data import Example, to_examples


#: Per-weight attribution scores keyed by parameter name.
WeightScores = dict[str, torch.Tensor]
LossFn = Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor]


def _examples(data: Any, tokenizer: PreTrainedTokenizerBase | None, max_length: int, what: str) -> list[Example]:
    """Already-encoded examples as they are; anything else through :func:`patchlab.unlearning.data.to_examples`."""
    if isinstance(data, Sequence) and not isinstance(data, str) and data and all(isinstance(e, Example) for e in data):
        return list(data)
    if tokenizer is None:
        raise PatchlabValueError(f"the {what} set is not encoded: pass tokenizer=... to encode texts or records")
    return to_examples(data, tokenizer, max_length=max_length, what=what)


@dataclass(frozen=True)
class ScoreInputs:
    """What :func:`scores` hands every scorer, its settings resolved (preset applied).

    Attributes:
        forget, retain, calibration: the data as given to :func:`scores` (``None`` when not given); read them as
            encoded examples with :meth:`examples`.
        tokenizer: encodes texts and records (``None`` for pre-encoded examples). max_length: truncation, tokens.
        gamma: WAGLE's Hessian-diagonal parameter γ. loss: the per-batch loss (default the plain NLL).
        forget_sign: sign of ``ℓ_f`` relative to ``loss`` (-1 ascent, +1 nll). batch_size: sequences per pass.
        reduction: ``"mean"`` or ``"sum"`` of batch gradients (the preset's). pad_id: the padding token id.
        seed: seed of random scores. progress: show progress bars.
    """

    forget: Any
    retain: Any
    calibration: Any
    tokenizer: PreTrainedTokenizerBase | None
    max_length: int
    gamma: float
    loss: LossFn
    forget_sign: float
    batch_size: int
    reduction: str
    pad_id: int
    seed: int
    progress: bool

    def examples(self, what: str) -> list[Example]:
        """The ``what`` set (``"forget"``, ``"retain"`` or ``"calibration"``) as encoded examples.

        Raises:
            PatchlabValueError: the set was not given, or texts without a tokenizer.
        """
        data = getattr(self, what)
        if data is None:
            raise PatchlabValueError(f"this attribution scorer needs a {what} set ({what}=...)")
        return _examples(data, self.tokenizer, self.max_length, what)


#: A scorer: ``scorer(model, inputs) -> {parameter name: float32 scores of its shape}`` (larger = more worth
#: updating); parameters left out are not scored (their mask stays frozen).
Scorer = Callable[[PreTrainedModel, ScoreInputs], WeightScores]


def _check_scorer(name: str, scorer: Any) -> None:
    if not callable(scorer):
        raise PatchlabValueError(f"an attribution scorer is a function scorer(model, inputs) -> scores, "
                                 f"got {type(scorer).__name__}")


#: Where the built-in scorers stand in :data:`SCORERS` (and in error messages); any other scorer file follows them,
#: by name.
BUILTIN_ORDER = ("wagle", "magnitude", "wanda", "random")


def _file_name(scorer: Scorer) -> str:
    """A built-in scorer's name: the name of the file (module) that defines it."""
    return scorer.__module__.rpartition(".")[2]


def _builtin_rank(name: str) -> tuple[int, str]:
    return (BUILTIN_ORDER.index(name) if name in BUILTIN_ORDER else len(BUILTIN_ORDER), name)


#: The weight-attribution scorers of :func:`patchlab.unlearning.attribution.scores` by name: the ``SCORER`` of each
#: module of this package (found on first use, named after its file), then those added by :func:`register_scorer`.
SCORERS: Registry[Scorer] = Registry("attribution method", package=__name__, attribute="SCORER", name_of=_file_name,
                                     check=_check_scorer, strict=True, order=_builtin_rank)


def register_scorer(name: str, scorer: Scorer, *, replace: bool = False) -> Scorer:
    """Register ``scorer(model, inputs: ScoreInputs) -> scores`` as attribution method ``name`` of :func:`scores`
    (and of ``analyses/wagle_density.py --methods``); returns it.

    Raises:
        PatchlabValueError: ``scorer`` is not callable, or ``name`` is taken (without ``replace``).
    """
    return SCORERS.register(scorer, name, replace=replace)
