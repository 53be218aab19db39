"""Weight-attribution scorers (WAGLE, magnitude, Wanda, random) and their registry :data:`SCORERS`.

:func:`patchlab.unlearning.attribution.scores` resolves its settings (preset applied) into a :class:`ScoreInputs`
and calls the chosen scorer; :func:`register_scorer` adds one.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.sites import hooks
from patchlab.registry import Registry
from patchlab.unlearning.data import Example, batches, to_examples


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



@contextlib.contextmanager
def _gradient_mode(model: PreTrainedModel) -> Iterator[None]:
    """Eval mode (no dropout) with gradients on every parameter; restores mode, flags and ``.grad`` afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    grads = [p.grad for p in model.parameters()]
    model.eval()
    model.requires_grad_(True)
    try:
        yield
    finally:
        for p, flag, grad in zip(model.parameters(), flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)


def _accumulate_gradients(model: PreTrainedModel, examples: list[Example], loss: LossFn, *, batch_size: int,
                          reduction: str, pad_id: int, desc: str, progress: bool) -> None:
    """Leave ``∇ℓ(θ)`` in every ``p.grad``, with ``ℓ = Σ_b w_b · loss(θ, batch_b)`` over batches of ``n_b`` of the
    ``N`` sequences: ``w_b = n_b / N`` (``reduction="mean"``: the mean of the batch losses weighted by batch size)
    or ``w_b = 1`` (``"sum"``). One batch in memory at a time; gradients accumulate in ``.grad`` batch by batch."""
    for p in model.parameters():
        p.grad = None
    n_batches = math.ceil(len(examples) / batch_size)
    for batch in tqdm(batches(examples, batch_size, pad_id=pad_id), total=n_batches, desc=desc, disable=not progress):
        value = loss(model, batch)
        if not torch.isfinite(value):
            raise NonFiniteError(f"the {desc} loss is {value.item()} on a batch")
        (value * (batch["input_ids"].shape[0] / len(examples)) if reduction == "mean" else value).backward()


def _wagle(model: PreTrainedModel, forget: list[Example], retain: list[Example], *, gamma: float, loss: LossFn,
           forget_sign: float, batch_size: int, reduction: str, pad_id: int, progress: bool) -> WeightScores:
    """WAGLE scores with ``ℓ_f = forget_sign · loss`` on ``forget``; peak memory: the model, its gradients and
    one stored gradient (3x the model)."""
    params = dict(model.named_parameters())
    grads = {"batch_size": batch_size, "reduction": reduction, "pad_id": pad_id, "progress": progress}
    with _gradient_mode(model):
        _accumulate_gradients(model, forget, loss, desc="forget gradient", **grads)
        grad_f = {}
        for name, p in params.items():
            grad_f[name] = p.grad.float().mul_(forget_sign) if p.grad is not None \
                else torch.zeros_like(p, dtype=torch.float32)
            p.grad = None
        _accumulate_gradients(model, retain, loss, desc="retain gradient", **grads)
        out = {}
        for name, p in params.items():
            g_r = p.grad.float() if p.grad is not None else torch.zeros_like(p, dtype=torch.float32)
            p.grad = None
            out[name] = g_r.div_(-gamma).add_(p.detach().float()).mul_(grad_f.pop(name))
    return out


def _input_norms(model: PreTrainedModel, examples: list[Example], *, batch_size: int, pad_id: int,
                 progress: bool) -> dict[str, Float[torch.Tensor, "d_in"]]:
    """``‖X_j‖₂`` per input channel ``j`` of every linear (or GPT-2 Conv1D) layer whose weight is a named
    parameter, over all non-padding tokens of ``examples`` (in eval mode: no dropout); keyed by the weight's
    parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    sums: dict[str, torch.Tensor] = {}
    current: dict[str, torch.Tensor] = {}

    def accumulate(name: str) -> Callable:
        def read(x: torch.Tensor) -> None:
            x = x.detach().double() * current["keep"][..., None]
            sums[name] = sums.get(name, 0) + x.pow(2).flatten(0, -2).sum(0)
        return read

    reads = [(m, "input", accumulate(names[id(m.weight)]))
             for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) and id(m.weight) in names]
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), hooks(reads):
            for batch in tqdm(batches(examples, batch_size, pad_id=pad_id), total=math.ceil(len(examples) / batch_size),
                              desc="wanda calibration", disable=not progress):
                current["keep"] = batch["attention_mask"].to(device, torch.float64)
                model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    finally:
        model.train(was_training)
    return {name: s.sqrt().float() for name, s in sums.items()}


def _wanda(model: PreTrainedModel, calibration: list[Example], *, batch_size: int, pad_id: int,
           progress: bool) -> WeightScores:
    """``|W_ij| · ‖X_j‖₂`` for linear weights (Sun et al., 2024); other parameters are not scored."""
    norms = _input_norms(model, calibration, batch_size=batch_size, pad_id=pad_id, progress=progress)
    conv = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    out = {}
    for name, p in model.named_parameters():
        if name in norms:
            # nn.Linear stores [d_out, d_in], Conv1D [d_in, d_out]: broadcast the norm along the input axis.
            norm = norms[name][:, None] if name.rpartition(".")[0] in conv else norms[name][None, :]
            out[name] = p.detach().float().abs() * norm
    return out


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


def _magnitude_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    return {n: p.detach().float().abs() for n, p in model.named_parameters()}


def _random_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    gen = torch.Generator().manual_seed(inputs.seed)
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in model.named_parameters()}


def _wanda_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    if inputs.calibration is None and inputs.retain is None:
        raise PatchlabValueError("wanda needs a calibration set (calibration=... or retain=...)")
    calibration = inputs.examples("calibration" if inputs.calibration is not None else "retain")
    return _wanda(model, calibration, batch_size=inputs.batch_size, pad_id=inputs.pad_id, progress=inputs.progress)


def _wagle_scores(model: PreTrainedModel, inputs: ScoreInputs) -> WeightScores:
    if inputs.forget is None or inputs.retain is None:
        raise PatchlabValueError("wagle needs both a forget and a retain set")
    if not inputs.gamma > 0:
        raise PatchlabValueError(f"gamma must be > 0, got {inputs.gamma}")
    return _wagle(model, inputs.examples("forget"), inputs.examples("retain"), gamma=inputs.gamma, loss=inputs.loss,
                  forget_sign=inputs.forget_sign, batch_size=inputs.batch_size, reduction=inputs.reduction,
                  pad_id=inputs.pad_id, progress=inputs.progress)


def _check_scorer(name: str, scorer: Any) -> None:
    if not callable(scorer):
        raise PatchlabValueError(f"an attribution scorer is a function scorer(model, inputs) -> scores, "
                                 f"got {type(scorer).__name__}")


#: The weight-attribution scorers of :func:`scores` by name (built-ins: ``wagle``, ``magnitude``, ``wanda``,
#: ``random``); :func:`register_scorer` adds one.
SCORERS: Registry[Scorer] = Registry("attribution method", check=_check_scorer)
for _name, _scorer in (("wagle", _wagle_scores), ("magnitude", _magnitude_scores), ("wanda", _wanda_scores),
                       ("random", _random_scores)):
    SCORERS.register(_scorer, _name)


def register_scorer(name: str, scorer: Scorer, *, replace: bool = False) -> Scorer:
    """Register ``scorer(model, inputs: ScoreInputs) -> scores`` as attribution method ``name`` of :func:`scores`
    (and of ``analyses/wagle_density.py --methods``); returns it.

    Raises:
        PatchlabValueError: ``scorer`` is not callable, or ``name`` is taken (without ``replace``).
    """
    return SCORERS.register(scorer, name, replace=replace)
