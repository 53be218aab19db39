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

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import NonFiniteError, PatchlabValueError
from patchlab.pair.arch import layer_index
from patchlab.unlearning.data import padding_id
from patchlab.unlearning.losses import sequence_nll
from patchlab.unlearning.masks import Mask
from patchlab.unlearning.density import (DENSITY_VIEWS, DensityReport, DensityReportFile, DensityRow, density,
                                        density_figures, density_report, module_density, stack_densities)
from patchlab.unlearning.scorers import SCORERS, LossFn, Scorer, ScoreInputs, WeightScores, register_scorer

__all__ = ["DENSITY_VIEWS", "PRESETS", "SCORERS", "DensityReport", "DensityReportFile", "DensityRow", "LossFn",
           "Preset", "ScoreInputs", "Scorer", "WeightScores", "density", "density_figures", "density_report", "mask",
           "module_density", "overlap", "register_scorer", "scores", "stack_densities"]


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
