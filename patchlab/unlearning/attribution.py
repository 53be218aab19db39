"""Weight attribution for unlearning: which weights to update (WAGLE, Jia et al., NeurIPS 2024) and baselines.

Pipeline::

    s = attribution.scores(model, forget, retain, tokenizer=tok, method="wagle", gamma=1.0)
    m = attribution.mask(s, 0.8)                       # top-80% weights, global
    unlearn(model, forget, retain, tokenizer=tok, method="graddiff", mask=m)
    attribution.density(m, model)                      # selected fraction per module type and layer
    attribution.density_report({"wagle": ..., "random": ...}, model=model).write_report(out)   # side by side

Scores and masks are ``dict[str, Tensor]`` keyed by ``model.named_parameters()`` names, each tensor the shape
of its parameter. A mask holds only the parameters that were scored; the unlearning layer freezes the others.

``preset="authors"`` (in :func:`scores` and :func:`mask`) reproduces the ranking of the WAGLE authors' code
(OPTML-Group/WAGLE, ``src/unlearn/generate_mask.py``, ``snip_advanced``); see :data:`PRESETS`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from pydantic import Field, model_validator
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from patchlab.pair.arch import MODULE_ORDER, arch_spec, layer_index
from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.sites import hooks
from patchlab.provenance import checkpoint_record, environment
from patchlab.registry import Registry
from patchlab.results import Result, register_result
from patchlab.schema import Count, Provenance, Schema, Unit, bad
from patchlab.unlearning.data import Example, batches, padding_id, to_examples
from patchlab.unlearning.losses import sequence_nll
from patchlab.unlearning.masks import Mask

#: Per-weight attribution scores keyed by parameter name.
WeightScores = dict[str, torch.Tensor]
LossFn = Callable[[PreTrainedModel, dict[str, torch.Tensor]], torch.Tensor]


#: Sign of ``ℓ_f`` relative to ``loss`` on the forget set, per WAGLE convention (see :func:`scores`).
_FORGET_SIGN = {"ascent": -1.0, "nll": 1.0}

@dataclass(frozen=True)
class Preset:
    """How WAGLE gradients are taken and masks drawn: one entry of :data:`PRESETS`.

    Attributes:
        gamma: the default γ (``gamma=None`` in :func:`scores`).
        reduction: ``"mean"`` (each batch's loss weighted by its share of the sequences) or ``"sum"`` (batch
            losses summed as they are).
        batch_size: the default batch size; ``fixed_batch_size`` makes it the only one allowed.
        forget_loss: the default ``ℓ_f`` convention; ``fixed_forget_loss`` makes it the only one allowed.
        fixed_loss: only the default loss (:func:`~patchlab.unlearning.losses.sequence_nll`, the plain NLL) is allowed.
        floor_count: a mask selects ``floor(ratio · n)`` weights instead of ``round(ratio · n)``, and only globally
            by ``|S|``.
    """

    gamma: float
    reduction: str
    batch_size: int
    fixed_batch_size: bool
    forget_loss: str
    fixed_forget_loss: bool
    fixed_loss: bool
    floor_count: bool


#: ``"patchlab"``: mean gradients over batches of 8 (so scores do not depend on the batch size), γ = 1, ℓ_f the
#: gradient-ascent objective (the paper's reading), masks of ``round(ratio · n)`` weights, per layer or global,
#: by ``|S|`` or signed ``S``.
#:
#: ``"authors"``: the WAGLE authors' ``snip_advanced`` exactly: the model in eval mode; one sequence per batch;
#: the gradients of each batch's plain NLL (:func:`~patchlab.unlearning.losses.sequence_nll` on one sequence is
#: the Hugging Face ``outputs.loss`` they use) **summed** over the forget set and over the retain set, the forget
#: gradient from the plain NLL whatever unlearning method follows (``forget_loss="nll"``); their ``mu`` as γ
#: (1e-6 in every shipped config); ``S = (θ − G_r/μ) ⊙ G_f``, ranked by ``|S|`` globally over every parameter
#: (embeddings, norms, LM head included), the top ``int(len(S) · ratio)`` weights selected (ties to the earliest,
#: as a stable ``argsort``; theirs is unstable at exact ties). Their masking multiplies gradients after clipping:
#: :func:`patchlab.unlearning.masks.apply_mask` with ``after_clipping=True``.
#:
#: γ under sums vs means: with ``N_f`` forget and ``N_r`` retain sequences, ``G_f = N_f·ḡ_f`` and ``G_r = N_r·ḡ_r``
#: (``ḡ`` the mean gradients), so ``S_sum(μ) = N_f · (θ − ḡ_r/(μ/N_r)) ⊙ ḡ_f = N_f · S_mean(γ = μ/N_r)``: the
#: authors' ranking at ``mu`` is the mean-gradient ranking at ``γ = mu / N_r`` (e.g. 1e-6 / 400 = 2.5e-9 on TOFU
#: forget10 with 400 sampled retain sequences). At such γ the ``θ`` term is negligible and the ranking is that of
#: ``|G_r ⊙ G_f|``.
PRESETS: dict[str, Preset] = {
    "patchlab": Preset(gamma=1.0, reduction="mean", batch_size=8, fixed_batch_size=False, forget_loss="ascent",
                       fixed_forget_loss=False, fixed_loss=False, floor_count=False),
    "authors": Preset(gamma=1e-6, reduction="sum", batch_size=1, fixed_batch_size=True, forget_loss="nll",
                      fixed_forget_loss=True, fixed_loss=True, floor_count=True),
}


def _preset(name: str) -> Preset:
    if name not in PRESETS:
        raise PatchlabValueError(f"unknown attribution preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]


def _setting(preset_name: str, preset_value: Any, given: Any, fixed: bool, what: str) -> Any:
    """``given`` (or the preset's value when ``None``); raises when the preset fixes it to another value."""
    if given is None:
        return preset_value
    if fixed and given != preset_value:
        raise PatchlabValueError(f"the {preset_name!r} preset fixes {what} to {preset_value!r}, got {given!r}")
    return given

# ----------------------------------------------------------------------------------------------------- scores --

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


def scores(model: PreTrainedModel, forget: Any = None, retain: Any = None, *, method: str = "wagle",
           preset: str = "patchlab", gamma: float | None = None, loss: LossFn | None = None,
           forget_loss: str | None = None, tokenizer: PreTrainedTokenizerBase | None = None, calibration: Any = None,
           batch_size: int | None = None, max_length: int = 256, seed: int = 0, progress: bool = True) -> WeightScores:
    """Per-weight attribution scores (float32, same shapes as the parameters); larger = more worth updating.

    Methods:

    * ``wagle`` - the closed-form bi-level attribution of WAGLE (Jia et al., 2024, Eq. 8). The unlearning
      problem is read as ``min_ε ℓ_f(θ*(ε))`` s.t. ``θ*(ε) = argmin_θ ℓ_r(θ, ε)`` where ``ε`` masks the
      weights; with the lower-level Hessian approximated by ``γ·I`` (γ the Hessian-diagonal parameter), the
      first-order influence of weight ``i`` on the forget loss is

          ``S_i = [θ]_i · [∇ℓ_f(θ)]_i − (1/γ) · [∇ℓ_r(θ)]_i · [∇ℓ_f(θ)]_i``,   i.e.  ``S = (θ − ∇ℓ_r(θ)/γ) ⊙ ∇ℓ_f(θ)``

      at the starting weights ``θ``, with ``ℓ_r = loss`` averaged over ``retain`` and ``ℓ_f`` the unlearning
      objective on ``forget``: ``−loss`` for ``forget_loss="ascent"`` (the paper's reading: ℓ_f is minimised
      to forget, as in gradient ascent), ``+loss`` for ``forget_loss="nll"``. The two conventions give opposite
      ``S``; :func:`mask` ranks by ``|S|`` by default, as the authors' code does, where they agree.
      Gradients are accumulated over batches (one batch in memory at a time), as means (``preset="patchlab"``)
      or sums (``preset="authors"``, see :data:`PRESETS` for the γ equivalence); peak memory is about 3x the
      model (weights, gradients, the stored forget gradient). The model is in eval mode (no dropout).
    * ``magnitude`` - ``|θ|``.
    * ``wanda`` - ``|W_ij| · ‖X_j‖₂`` of every linear layer weight, ``‖X_j‖₂`` the norm of input channel ``j``
      over the tokens of ``calibration`` (default: ``retain``). Other parameters (embeddings, norms, biases)
      are not scored, so its mask leaves them frozen; an embedding tied to the LM head is scored as the head.
    * ``random`` - i.i.d. uniform ``[0, 1)`` from ``seed``.

    Args:
        model: a Hugging Face causal LM (not modified; its mode, gradient flags and ``.grad`` are restored).
        forget, retain: texts, ``{"question", "answer"}`` / ``{"text"}`` records, a JSON/JSONL path or saved
            ``datasets`` directory, a ``datasets.Dataset`` (encoded with ``tokenizer``) or a list of
            :class:`~patchlab.unlearning.data.Example`.
        preset: ``"patchlab"`` or ``"authors"`` (:data:`PRESETS`): the defaults of ``gamma``, ``forget_loss``,
            ``batch_size`` and how batch gradients combine; ``"authors"`` fixes batch size 1, ``forget_loss="nll"``
            and the default loss, and refuses other values.
        gamma: γ > 0, the Hessian-diagonal parameter of WAGLE (default: the preset's, 1.0 or the authors' 1e-6).
        loss: ``loss(model, batch) -> scalar``, a mean over the batch's sequences; default
            :func:`~patchlab.unlearning.losses.sequence_nll` (each sequence's NLL per target token, nats).
            Under ``"patchlab"`` batches are weighted by their number of sequences, so such a loss gives scores
            that do not depend on ``batch_size``.
        forget_loss: ``"ascent"`` or ``"nll"``, the sign convention of ``ℓ_f`` (WAGLE only, see above; default:
            the preset's).
        batch_size: sequences per forward/backward pass (default: the preset's, 8 or 1). max_length: truncation,
            in tokens.

    Raises:
        PatchlabValueError: unknown method, preset or ``forget_loss``, missing data or tokenizer, ``gamma <= 0``,
            ``batch_size < 1``, a setting the preset fixes to another value.
        NonFiniteError: a loss or a score is NaN/inf.
    """
    scorer = SCORERS.get(method)
    chosen = _preset(preset)
    gamma = chosen.gamma if gamma is None else gamma
    forget_loss = _setting(preset, chosen.forget_loss, forget_loss, chosen.fixed_forget_loss, "forget_loss")
    batch_size = _setting(preset, chosen.batch_size, batch_size, chosen.fixed_batch_size, "batch_size")
    if loss is not None and chosen.fixed_loss and loss is not sequence_nll:
        raise PatchlabValueError(f"the {preset!r} preset takes its gradients from the plain NLL: leave loss= unset")
    loss = sequence_nll if loss is None else loss
    if forget_loss not in _FORGET_SIGN:
        raise PatchlabValueError(f"forget_loss must be one of {', '.join(_FORGET_SIGN)}, got {forget_loss!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PatchlabValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    pad = padding_id(tokenizer) if tokenizer is not None else 0  # pre-encoded examples: padding is masked anyway
    out = scorer(model, ScoreInputs(forget, retain, calibration, tokenizer, max_length, gamma, loss,
                                    _FORGET_SIGN[forget_loss], batch_size, chosen.reduction, pad, seed, progress))
    for name, s in out.items():
        if not torch.isfinite(s).all():
            raise NonFiniteError(f"{method} scores of {name} contain NaN or inf")
    return out


# ------------------------------------------------------------------------------------------------------- mask --

def mask(scores: WeightScores, ratio: float, *, per_layer: bool = False, by: str = "abs", preset: str = "patchlab") -> Mask:
    """Select the top-``ratio`` fraction of weights by score: a bool tensor per scored parameter (True = update).

    Exactly ``round(ratio · n)`` weights (``preset="authors"``: ``int(n · ratio)``, as the WAGLE authors' code,
    global and by ``|S|`` only) are selected among the ``n`` weights ranked together: all scored
    weights (``per_layer=False``), or separately within each decoder layer and within the non-layer parameters
    (``per_layer=True``; layer from :func:`patchlab.pair.arch.layer_index`). ``by="abs"`` ranks by ``|score|``
    (WAGLE's ``|S|``, as in the authors' code; identical for the non-negative baselines), ``by="value"`` by the
    signed score. Ties at the cut go to the earliest weights (in the order of ``scores``, then flattened order),
    so a mask is deterministic. WeightScores are read in chunks and never concatenated (an exact radix select in four
    passes), so a global mask over a 7B model needs only a few small temporaries besides the masks.

    Raises:
        PatchlabValueError: empty scores, ``ratio`` outside ``(0, 1]``, unknown ``by`` or preset, ``per_layer`` or
            ``by="value"`` under the ``"authors"`` preset.
        NonFiniteError: a score is NaN/inf.
    """
    floor_count = _preset(preset).floor_count
    if floor_count and (per_layer or by != "abs"):
        raise PatchlabValueError(f"the {preset!r} preset ranks globally by |S|: per_layer=True and by='value' do "
                                 "not apply")
    if not isinstance(scores, dict) or not scores:
        raise PatchlabValueError("scores must be a non-empty dict {parameter name: tensor}")
    if not 0.0 < ratio <= 1.0:
        raise PatchlabValueError(f"ratio must be in (0, 1], got {ratio}")
    if by not in ("abs", "value"):
        raise PatchlabValueError(f"by must be 'abs' or 'value', got {by!r}")
    groups: dict[int | None, list[str]] = {}
    for name in scores:
        groups.setdefault(layer_index(name) if per_layer else None, []).append(name)
    out: Mask = {}
    for group in groups.values():
        for name in group:
            if not torch.isfinite(scores[name]).all():
                raise NonFiniteError(f"scores of {name} contain NaN or inf")
        tensors = [scores[n].detach() for n in group]
        n = sum(t.numel() for t in tensors)
        k = int(n * ratio) if floor_count else round(ratio * n)
        out.update(zip(group, _select_top(tensors, k, absolute=by == "abs")))
    return out


def _order_keys(scores: torch.Tensor, absolute: bool) -> Int[torch.Tensor, "n"]:
    """int32 keys ordered like the (absolute) float32 scores (flattened, a temporary): the IEEE bit pattern, with
    negative numbers' magnitude bits flipped so that larger floats get larger keys. ``key + 2**31`` is the unsigned
    order key in ``[0, 2**32)`` that the radix select of :func:`_select_top` reads digit by digit."""
    bits = (scores.float().abs() if absolute else scores.float()).flatten().view(torch.int32)
    return bits if absolute else torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


_DIGITS = ((21, 11), (10, 11), (0, 10))  # (shift, width) of the radix digits of a 32-bit unsigned key, top first


def _digit(keys: torch.Tensor, shift: int, width: int) -> torch.Tensor:
    """The unsigned key's digit at ``shift`` (``width`` bits) from signed int32 ``keys`` (``unsigned = key + 2**31``:
    only bit 31 differs, so the top digit has that bit flipped)."""
    digit = (keys >> shift) & ((1 << width) - 1)
    return digit ^ (1 << (31 - shift)) if shift + width == 32 else digit


def _select_top(tensors: Sequence[torch.Tensor], k: int, *, absolute: bool) -> list[torch.Tensor]:
    """Bool masks (shaped like ``tensors``) selecting exactly the ``k`` largest scores among all of them; ties at
    the cut go to the earliest entries (tensor order, then flattened order), so the selection is deterministic.

    A radix select over the 32-bit order keys of :func:`_order_keys`: three passes of histograms over 11-, 11- and
    10-bit digits find the ``k``-th largest key, reading the scores in chunks of :data:`_CHUNK` entries, so memory
    stays at a few 16 MiB temporaries besides the masks (a global mask over a 7B model never concatenates its
    scores).
    """
    prefix, remaining = 0, k  # prefix: the unsigned key's digits found so far; remaining: top entries sharing them
    if k > 0:
        for shift, width in _DIGITS:
            hist = torch.zeros(1 << width, dtype=torch.long)
            above_bits = shift + width  # keep keys whose bits from here up are the prefix's (u >> m = s >> m + 2**(31-m))
            for chunk in _chunks(tensors):
                keys = _order_keys(chunk, absolute)
                if above_bits < 32:
                    keys = keys[(keys >> above_bits) == (prefix >> above_bits) - (1 << (31 - above_bits))]
                hist += torch.bincount(_digit(keys, shift, width), minlength=1 << width).cpu()
            above = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) - hist  # counts in higher buckets
            bucket = int(((above < remaining) & (above + hist >= remaining)).nonzero()[-1])
            remaining -= int(above[bucket])
            prefix |= bucket << shift
    cut = prefix - 2**31  # the k-th largest key, signed
    out = []
    for t in tensors:
        chosen = torch.zeros(t.numel(), dtype=torch.bool, device=t.device)
        if k > 0:
            start = 0
            for chunk in _chunks([t]):
                keys, part = _order_keys(chunk, absolute), chosen[start:start + chunk.numel()]
                torch.gt(keys, cut, out=part)
                if remaining > 0:
                    ties = (keys == cut).nonzero().flatten()[:remaining]
                    part[ties] = True
                    remaining -= len(ties)
                start += chunk.numel()
        out.append(chosen.view(t.shape))
    return out


_CHUNK = 1 << 22  # scores read per step of the radix select: 16 MiB temporaries, reused instead of re-mapped


def _chunks(tensors: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The flattened ``tensors`` in order, in views of at most :data:`_CHUNK` entries."""
    for t in tensors:
        flat = t.detach().flatten()
        yield from flat.split(_CHUNK)


def overlap(mask_a: Mask, mask_b: Mask) -> float:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` (0..1) of the weights two masks select (a missing parameter selects
    nothing); 1.0 when both select nothing.

    Raises:
        PatchlabValueError: a parameter has different shapes in the two masks.
    """
    inter = union = 0
    for name in mask_a.keys() | mask_b.keys():
        a, b = mask_a.get(name), mask_b.get(name)
        if a is not None and b is not None and a.shape != b.shape:
            raise PatchlabValueError(f"the masks disagree on the shape of {name}: {tuple(a.shape)} vs {tuple(b.shape)}")
        a = a.cpu() if a is not None else torch.zeros_like(b.cpu())
        b = b.cpu() if b is not None else torch.zeros_like(a)
        inter += int((a & b).sum())
        union += int((a | b).sum())
    return inter / union if union else 1.0


# ---------------------------------------------------------------------------------------------------- density --

def density(mask: Mask, model: PreTrainedModel) -> pd.DataFrame:
    """Selected weights per (module type, layer): columns ``module``, ``layer`` (``<NA>`` outside the decoder
    layers), ``selected``, ``total``, ``scored`` (weight counts; ``scored``: those the mask holds, i.e. that the
    method scored) and ``density = selected / total`` (0..1; 0 also where nothing was scored, which the figures
    show as "not scored").

    Module types from the family's :attr:`~patchlab.pair.arch.ArchSpec.module_types` (a tied LM head is the
    embedding); parameters of ``model`` absent from the mask count as not selected.

    Raises:
        PatchlabValueError: a mask tensor does not have its parameter's shape.
    """
    spec = arch_spec(model)
    rows: dict[tuple[str, int | None], list[int]] = {}  # (module, layer) -> [selected, total, scored]
    for name, p in model.named_parameters():
        m = mask.get(name)
        if m is not None and tuple(m.shape) != tuple(p.shape):
            raise PatchlabValueError(f"mask for {name} has shape {tuple(m.shape)}, the parameter {tuple(p.shape)}")
        cell = rows.setdefault((spec.module_type(name), layer_index(name, spec)), [0, 0, 0])
        cell[0] += int(m.sum()) if m is not None else 0
        cell[1] += p.numel()
        cell[2] += p.numel() if m is not None else 0
    frame = pd.DataFrame([(k, layer, s, t, n) for (k, layer), (s, t, n) in rows.items()],
                         columns=["module", "layer", "selected", "total", "scored"])
    frame["layer"] = frame["layer"].astype("Int64")
    frame["density"] = frame["selected"] / frame["total"]
    return frame


def module_density(frame: pd.DataFrame) -> pd.DataFrame:
    """A :func:`density` frame summed over layers: one row per module type (display order), same columns
    but ``layer``; keeps a ``method`` column if there is one."""
    keys = ["method", "module"] if "method" in frame else ["module"]
    counts = [c for c in ("selected", "total", "scored") if c in frame]  # results saved before "scored" lack it
    agg = frame.groupby(keys, as_index=False, sort=False)[counts].sum()
    agg["density"] = agg["selected"] / agg["total"]
    rank = {m: i for i, m in enumerate(MODULE_ORDER)}
    return agg.sort_values(keys, key=lambda c: c.map(rank) if c.name == "module" else c, kind="stable",
                           ignore_index=True)


def stack_densities(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The :func:`density` frames of ``{method: frame}`` as one long frame with a ``method`` column, methods in
    the mapping's order.

    Raises:
        PatchlabValueError: no frame given.
    """
    if not isinstance(frames, Mapping) or not frames:
        raise PatchlabValueError("no density frame given: pass a non-empty {method: density frame} mapping")
    return pd.concat([f.assign(method=name) for name, f in frames.items()], ignore_index=True)


#: The views of :meth:`DensityReport.figure`: WAGLE's bars per module type, and layer x module heatmaps.
DENSITY_VIEWS = ("modules", "layers")


class DensityRow(Schema):
    """One row of a :class:`DensityReport` file: a method's selected weights of a module type in a layer (``null``
    outside the decoder layers); ``scored``, the weights the method scored, is absent from files written before it
    was recorded."""

    module: Annotated[str, Field(min_length=1)]
    layer: Count | None
    selected: Count
    total: Annotated[int, Field(ge=1, lt=2**63)]
    scored: Count | None = None
    density: Unit
    method: Annotated[str, Field(min_length=1)]


class DensityReportFile(Schema):
    """A :class:`DensityReport` file: one row per (method, module type, layer), ``selected <= total`` and
    ``density = selected / total``, some row in a decoder layer."""

    format: Literal["patchlab.DensityReport/1"]
    provenance: Provenance
    densities: Annotated[list[DensityRow], Field(min_length=1)]

    @model_validator(mode="after")
    def _consistent(self) -> DensityReportFile:
        seen: set[tuple[str, str, int | None]] = set()
        for i, row in enumerate(self.densities):
            if row.selected > row.total:
                raise bad(f"densities[{i}].selected", "{selected} weights selected of {total}",
                          selected=row.selected, total=row.total)
            if row.scored is not None and not row.selected <= row.scored <= row.total:
                raise bad(f"densities[{i}].scored", "{scored} weights scored, {selected} selected of {total}",
                          scored=row.scored, selected=row.selected, total=row.total)
            if row.density != row.selected / row.total:
                raise bad(f"densities[{i}].density", "{density} is not selected / total = {selected} / {total}",
                          density=row.density, selected=row.selected, total=row.total)
            key = (row.method, row.module, row.layer)
            if key in seen:
                raise bad(f"densities[{i}]", "a second row for method {method!r}, module {module!r}, layer {layer}",
                          method=row.method, module=row.module, layer=row.layer)
            seen.add(key)
        if all(row.layer is None for row in self.densities):
            raise bad("densities", "no row of a decoder layer (every layer is null)")
        return self


@register_result
@dataclass(frozen=True)
class DensityReport(Result):
    """Densities of several methods' masks, side by side (:func:`density_report`).

    Attributes:
        table: per method, module type and layer (:func:`stack_densities`): ``module``, ``layer``, ``selected``,
            ``total``, ``density`` (0..1), ``method`` (also :meth:`to_frame`).
        provenance: the scored model (source and weights digest), the settings, the library versions.
    """

    kind = "density"
    format = "patchlab.DensityReport/1"
    schema = DensityReportFile

    table: pd.DataFrame
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        """The methods, in the order they were given."""
        return list(dict.fromkeys(self.table["method"]))

    @property
    def per_module(self) -> pd.DataFrame:
        """Per method and module type (:func:`module_density` of :attr:`table`)."""
        return module_density(self.table)

    def by_method(self) -> pd.DataFrame:
        """Density (0..1) per module type (rows, display order) and method (columns, given order)."""
        per_module = self.per_module
        return (per_module.pivot(index="module", columns="method", values="density")
                .reindex(index=list(dict.fromkeys(per_module["module"])), columns=self.methods))

    def to_frame(self) -> pd.DataFrame:
        """:attr:`table`: one row per method, module type and layer."""
        return self.table

    def figure(self, view: str = "modules") -> go.Figure:
        """One of WAGLE's figures, methods side by side: ``view="modules"``, grouped bars of the density per module
        type over all layers (:func:`patchlab.reports.figures.density_bars`); ``"layers"``, one layer x module
        heatmap per method, decoder layers only, on a shared 0..1 colour scale
        (:func:`patchlab.reports.figures.density_heatmaps`).

        Raises:
            PatchlabValueError: an unknown view; ``"layers"`` with no decoder-layer parameter in the table.
        """
        if view not in DENSITY_VIEWS:
            raise PatchlabValueError(f"view must be one of {DENSITY_VIEWS}, got {view!r}")
        return super().figure(view=view)

    def tables(self) -> dict[str, pd.DataFrame]:
        """``density`` (:attr:`table`) and ``density_modules`` (:attr:`per_module`)."""
        return {self.kind: self.table, f"{self.kind}_modules": self.per_module}

    def figures(self) -> dict[str, go.Figure]:
        """``density_modules`` and ``density_layers``: the two views of :meth:`figure`."""
        return {f"{self.kind}_{view}": self.figure(view) for view in DENSITY_VIEWS}

    def to_dict(self) -> dict[str, Any]:
        rows = self.table.astype({"layer": object}).to_dict("records")
        counts = [c for c in ("layer", "scored") if c in self.table]  # integer columns that may lack values
        return {"provenance": self.provenance,
                "densities": [{**r, **{c: None if pd.isna(r[c]) else int(r[c]) for c in counts}} for r in rows]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DensityReport:
        return cls(pd.DataFrame(data["densities"]).astype({"layer": "Int64"}), provenance=data["provenance"])


def density_report(frames: Mapping[str, pd.DataFrame], *, model: PreTrainedModel | None = None,
                   source: Any = None, settings: Mapping[str, Any] | None = None) -> DensityReport:
    """The densities of ``{method: density frame}`` (:func:`density`) side by side, with their per-module densities
    and WAGLE's two figures (:meth:`DensityReport.figure`).

    Args:
        model: the model the masks were drawn for; recorded in the provenance (its weights digest, and ``source``:
            how it was given, a checkpoint directory or hub id; default: the model itself) with ``settings`` (how
            the masks were drawn: method settings, ratio...) and the library versions.

    Raises:
        PatchlabValueError: no frame given, or no decoder-layer parameter in the frames.
    """
    table = stack_densities(frames)
    if table["layer"].isna().all():
        raise PatchlabValueError("the density frames have no decoder-layer parameter")
    provenance: dict[str, Any] = {"settings": dict(settings or {}), "environment": environment()}
    if model is not None:
        provenance["model"] = checkpoint_record(model if source is None else source, model)
    return DensityReport(table, provenance)


def density_figures(frames: Mapping[str, pd.DataFrame]) -> tuple[go.Figure, go.Figure]:
    """WAGLE's two figures from ``{method: density frame}``, methods side by side.

    Returns:
        (bars, heatmaps): grouped bars of the density per module type (over all layers), one bar per method;
        and one layer x module-type heatmap per method (decoder layers only) on a shared 0..1 colour scale
        (:meth:`DensityReport.figure`, views ``"modules"`` and ``"layers"``).

    Raises:
        PatchlabValueError: no frame given, or no decoder-layer parameter in the frames.
    """
    report = density_report(frames)
    return report.figure("modules"), report.figure("layers")
