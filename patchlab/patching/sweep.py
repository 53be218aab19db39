"""Patching sweeps: restore components of the vanilla model inside the unlearned one over layer windows, and score
each restoration with a metric (Hong et al., section 3; :mod:`patchlab.patching.metrics`).

For a question with vanilla greedy answer ``a`` (N tokens, ids kept), the models are run teacher-forced on
``prompt + a``; the metric compares the restored model's logits at the N positions that predict the answer tokens
with the vanilla and unlearned models' own. :func:`krs_sweep` is the paper's case, ``metric="krs"``::

    KRS = 1 - MSE(l_r, l_v) / MSE(l_u, l_v)

with MSE averaged over the N positions and the vocabulary. A sweep reports, for every component and layer window,
the mean score over questions and the per-question scores (:class:`PatchResult`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Bool
from transformers import PreTrainedModel
from tqdm.auto import tqdm

from patchlab.defaults import DEFAULT_COMPONENTS, DEFAULT_MEMORY_BUDGET
from patchlab.errors import NonFiniteError, PatchlabFileError, PatchlabValueError
from patchlab.pair.arch import ArchSpec
from patchlab.pair.generation import (DEFAULT_TEMPLATE, check_fits, encode_prompts, format_prompts, greedy_answers,
                                      question_label)
from patchlab.pair.arch import n_heads
from patchlab.pair.loading import ModelPair
from patchlab.pair.sequential import SequentialPair
from patchlab.pair.sites import Component, Site, parse_component
from patchlab.patching.engine import PatchStore, Row, WeightSource, capture, question_cache_bytes, run_rows
from patchlab.patching.loop import restore
from patchlab.patching.metrics import Metric, MetricFn, References, get_metric
from patchlab.patching.result import PatchResult
from patchlab.patching.windows import Window, sliding_windows
from patchlab.io import OutputDir, atomic_write_json, output_dir, read_json
from patchlab.provenance import pair_provenance, settings_key
from patchlab.results import results_record

ENGINES = ("batched", "loop")
POSITIONS = ("all", "answer", "last_prompt", "scored")

_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def memory_bytes(budget: int | str | None) -> int | None:
    """A memory budget in bytes: an integer, or a string such as ``"2GiB"``, ``"512MiB"``, ``"8GB"``; ``None``
    stays ``None`` (unbounded).

    Raises:
        PatchlabValueError: not positive, or not of that form.
    """
    if budget is None:
        return None
    if isinstance(budget, str):
        text = budget.strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), None)
        try:
            value = float(text[:-len(unit)]) * _UNITS[unit] if unit else float(text)
        except ValueError:
            value = None
    else:
        value = budget if isinstance(budget, int) and not isinstance(budget, bool) else None
    if value is None or value < 1:
        raise PatchlabValueError(f"memory_budget must be a positive number of bytes or a size such as '2GiB', "
                                 f"'512MiB', got {budget!r}")
    return int(value)


def plan_chunks(sizes: Sequence[int], budget: int | None, cap: int | None = None) -> list[list[int]]:
    """Consecutive indices of ``sizes`` (bytes each item needs) cut into chunks of at most ``budget`` bytes and
    ``cap`` items (``None``: no bound); an item larger than the budget gets a chunk of its own."""
    chunks: list[list[int]] = []
    used = 0
    for i, size in enumerate(sizes):
        if chunks and (budget is None or used + size <= budget) and (cap is None or len(chunks[-1]) < cap):
            chunks[-1].append(i)
            used += size
        else:
            chunks.append([i])
            used = size
    return chunks


def position_mask(positions: str, prompt_len: int, total_len: int) -> Bool[torch.Tensor, "seq"]:
    """Which sequence positions are restored.

    ``"all"``: every position (the paper). ``"answer"``: the answer tokens' positions ``prompt_len..total_len-1``.
    ``"last_prompt"``: only the last prompt position ``prompt_len-1`` (the one predicting the first answer token).
    ``"scored"``: the positions whose logits predict the answer tokens, ``prompt_len-1..total_len-2`` (the span the
    Unlearning Depth Score patches).
    """
    if positions not in POSITIONS:
        raise PatchlabValueError(f"positions must be one of {POSITIONS}, got {positions!r}")
    if not 0 < prompt_len <= total_len:
        raise PatchlabValueError(f"prompt length {prompt_len} must be in 1..{total_len}")
    mask = torch.zeros(total_len, dtype=torch.bool)
    if positions == "all":
        mask[:] = True
    elif positions == "answer":
        mask[prompt_len:] = True
    elif positions == "scored":
        mask[prompt_len - 1:total_len - 1] = True
    else:
        mask[prompt_len - 1] = True
    return mask


def question_chunks(pair: ModelPair | SequentialPair, sites: Sequence[Site], prompt_lens: Sequence[int],
                    answer_lens: Sequence[int], budget: int | None, cap: int | None = None) -> list[list[int]]:
    """Question indices cut into the chunks a sweep prepares together (:func:`plan_chunks`): each question's
    :func:`~patchlab.patching.engine.question_cache_bytes` (``prompt + answer`` tokens, at the cached ``sites``, in
    the pair's dtype) within ``budget`` bytes, at most ``cap`` questions."""
    dtype = getattr(pair, "dtype", None) or next(pair.skeleton.parameters()).dtype
    sizes = [question_cache_bytes(pair.skeleton, pair.arch, sites, p + a, a, dtype)
             for p, a in zip(prompt_lens, answer_lens)]
    return plan_chunks(sizes, budget, cap)


def reference_answers(pair: ModelPair | SequentialPair, questions: Sequence[str], *, n_tokens: int = 30,
                      prompt_template: str = DEFAULT_TEMPLATE, progress: bool = False
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt ids and the vanilla model's greedy answer ids (at most ``n_tokens``, stopping at EOS) per question."""
    with pair.using("vanilla") as model:
        return greedy_answers(model, pair.tokenizer, questions, max_new_tokens=n_tokens, template=prompt_template,
                              progress=progress)


def _cached_sites(pair: ModelPair, components: Sequence[Component]) -> list[Site]:
    """The sites whose source activations the components need cached."""
    names = sorted({s for c in components for s in c.sites})
    return [site for site in (pair.arch.site(n) for n in names) if site.cached is not None]


@torch.no_grad()
def _checked(logits: torch.Tensor, label: str, which: str) -> torch.Tensor:
    if not torch.isfinite(logits).all():
        raise NonFiniteError(f"{label}: {which} logits contain NaN or infinite values")
    return logits.float()


@torch.no_grad()
def prepare_source(model: PreTrainedModel, spec: ArchSpec, prompt_ids: Sequence[torch.Tensor],
                   answers: Sequence[torch.Tensor], *, sites: Sequence[Site], labels: Sequence[str],
                   progress: bool = False) -> tuple[PatchStore, list[torch.Tensor]]:
    """Run the source (vanilla) model once per question on ``prompt + answer``: a store holding the ids and its
    activations at ``sites``, and its logits at the answer-predicting positions (float32), per question.

    Raises:
        NonFiniteError: NaN or infinite logits.
    """
    store = PatchStore(spec=spec, ids=[torch.cat([p, a]).long() for p, a in zip(prompt_ids, answers)],
                       prompt_lens=[len(p) for p in prompt_ids], answer_lens=[len(a) for a in answers])
    store.source, logits, _ = capture(model, spec, store.ids, sites,
                                      [store.scored_positions(q) for q in range(len(store.ids))])
    return store, [_checked(l_v, label, "vanilla") for l_v, label in zip(logits, labels)]


@torch.no_grad()
def prepare_target(model: PreTrainedModel, store: PatchStore, source_logits: Sequence[torch.Tensor],
                   answers: Sequence[torch.Tensor], *, metric: Metric, labels: Sequence[str],
                   progress: bool = False) -> PatchStore:
    """Run the target (unlearned) model once per question: cache its residual stream after every layer, and set
    the metric's references, checking that ``metric`` is defined for every question (:meth:`Metric.check`).

    Raises:
        DegenerateMetricError: for some question the models agree, so the metric is undefined.
        NonFiniteError: NaN or infinite logits.
    """
    cache, logits, store.resid_tuple = capture(model, store.spec, store.ids, [],
                                               [store.scored_positions(q) for q in range(len(store.ids))], resid=True)
    for q, l_u in enumerate(logits):
        refs = References(source=source_logits[q].to(l_u.device), target=_checked(l_u, labels[q], "unlearned"),
                          answer_ids=answers[q].to(l_u.device))
        store.weights.append(metric.check(refs, labels[q]))
        store.refs.append(refs)
    store.target_resid = {int(key.split("@")[1]): value for key, value in cache.items()}
    return store


@contextlib.contextmanager
def prepared(pair: ModelPair | SequentialPair, prompt_ids: Sequence[torch.Tensor],
             answers: Sequence[torch.Tensor] | Callable[[PreTrainedModel], Sequence[torch.Tensor]], *,
             sites: Sequence[Site], metric: Metric, labels: Sequence[str], source_weights: WeightSource | None = None,
             progress: bool = False) -> Iterator[tuple[PatchStore, PreTrainedModel]]:
    """A sweep's preparation, the one path of :func:`patch_sweep`, :func:`prepare`, tests and benchmarks: with the
    vanilla model, the reference answers (``answers``, or ``answers(vanilla_model)`` computed while it is loaded)
    and :func:`prepare_source`; with the unlearned one, :func:`prepare_target`. Yields ``(store, unlearned
    model)`` while the unlearned model is in use, ready for :func:`patchlab.patching.engine.run_rows`.
    ``source_weights``: where recompute / per-head sites read the vanilla parameters (default
    ``pair.source_weights()``); the answers are then ``store.refs[q].answer_ids``.
    """
    with pair.using("vanilla") as model:
        answers = answers(model) if callable(answers) else answers
        store, source_logits = prepare_source(model, pair.arch, prompt_ids, answers, sites=sites, labels=labels,
                                              progress=progress)
    del model  # released before the unlearned model is loaded (one-model-at-a-time pairs)
    store.source_weights = source_weights if source_weights is not None else pair.source_weights()
    with pair.using("unlearned") as model:
        yield prepare_target(model, store, source_logits, answers, metric=metric, labels=labels,
                             progress=progress), model


def prepare(pair: ModelPair | SequentialPair, prompt_ids: Sequence[torch.Tensor], answers: Sequence[torch.Tensor],
            *, sites: Sequence[Site], metric: Metric, labels: Sequence[str], progress: bool = False) -> PatchStore:
    """The store of :func:`prepared` (the unlearned model must be at hand again to run its rows)."""
    with prepared(pair, prompt_ids, answers, sites=sites, metric=metric, labels=labels, progress=progress) as (store, _):
        return store


def expand_heads(components: Sequence[Component], heads: Any, spec_sites: Sequence[Site], n_head: int
                 ) -> list[Component]:
    """``heads=None``: the components as given. ``heads="each"`` or a list of head indices: every component with a
    per-head site and no head list of its own becomes one component per head (``"heads"`` -> ``"heads[0]"``, ...)."""
    if heads is None:
        return list(components)
    picked = list(range(n_head)) if heads == "each" else list(heads) if not isinstance(heads, str) else None
    if picked is None or not picked or not all(isinstance(h, int) and 0 <= h < n_head for h in picked):
        raise PatchlabValueError(f"heads must be None, 'each' or head indices in 0..{n_head - 1}, got {heads!r}")
    per_head = {s.name for s in spec_sites if s.rule.heads}
    out = []
    for comp in components:
        if comp.sites & per_head and comp.heads is None:
            out += [Component(comp.sites, frozenset([h]), f"{comp.label}[{h}]") for h in picked]
        else:
            out.append(comp)
    return out


def resolve_components(pair: ModelPair, components: Sequence[str], heads: Any = None) -> list[Component]:
    """The parsed ``components`` of a sweep on ``pair`` (each head of ``heads`` a component of its own).

    Raises:
        PatchlabValueError: an empty or repeated list, an unknown site, heads out of range.
    """
    if isinstance(components, str) or len(components) == 0:
        raise PatchlabValueError("components must be a non-empty list such as ['coef', 'attn', 'coef+attn']")
    if len(set(components)) != len(components):
        raise PatchlabValueError(f"components contain duplicates: {list(components)}")
    for comp in components:
        if not isinstance(comp, str):
            raise PatchlabValueError(f"a component is a name such as 'coef+attn', got {comp!r}")
    parsed = [parse_component(c, pair.arch.sites) for c in components]
    if heads is None:
        return parsed
    return expand_heads(parsed, heads, pair.arch.sites, n_heads(pair.skeleton))


def resolve_windows(pair: ModelPair, window: int | None, windows: Sequence[Window] | None = None,
                    window_mode: str = "centered") -> list[Window]:
    """The layer windows of a sweep on ``pair``: sliding windows of ``window`` layers or explicit ``windows``.

    Raises:
        PatchlabValueError: a width outside ``1..n_layers``, both or malformed ``windows``, an unknown mode.
    """
    if windows is None:
        return sliding_windows(pair.n_layers, 5 if window is None else window, mode=window_mode)
    if window is not None:
        raise PatchlabValueError("pass either window= (a width) or windows= (explicit layer ranges), not both")
    out = [tuple(w) for w in windows] if not isinstance(windows, str) else []
    if not out or not all(len(w) == 2 and all(isinstance(x, int) for x in w) and 0 <= w[0] < w[1] <= pair.n_layers
                          for w in out):
        raise PatchlabValueError(f"windows must be (start, stop) layer ranges with 0 <= start < stop <= "
                                 f"{pair.n_layers}, got {windows!r}")
    return out


def _scores_loop(pair: ModelPair, store: PatchStore, rows: Sequence[Row], metric: Metric) -> torch.Tensor:
    """The plain path: one restoration per forward pass (:func:`patchlab.patching.loop.restore`)."""
    out = torch.empty(len(rows))
    for r, row in enumerate(rows):
        logits = restore(pair, store.ids[row.question], row.component, row.window, row.positions,
                         source_weights=store.source_weights)
        restored = logits[0, store.scored_positions(row.question)]
        out[r] = metric(restored, store.refs[row.question].to(restored.device))[0].cpu()
    return out


def patch_sweep(pair: ModelPair, questions: Sequence[str], *, components: Sequence[str] = DEFAULT_COMPONENTS,
                window: int | None = None, windows: Sequence[Window] | None = None, window_mode: str = "centered",
                heads: Any = None, metric: str | Metric | MetricFn = "krs", n_tokens: int = 30,
                prompt_template: str = DEFAULT_TEMPLATE, positions: str = "all", engine: str = "batched",
                batch_size: int = 64, answers: Sequence[torch.Tensor] | None = None, resume: Any = None,
                chunk: int | None = None, memory_budget: int | str | None = DEFAULT_MEMORY_BUDGET,
                progress: bool = True) -> PatchResult:
    """Score restoring each component over each layer window with ``metric``, per question.

    Args:
        pair: the vanilla / unlearned pair.
        questions: K questions about the unlearned concept (the paper uses 10).
        components: sites or ``+``-combinations from the family's site table, e.g. ``("coef", "value", "attn",
            "coef+attn")``; per-head sites take a head list (``"heads[0,3]"``).
        window: layers per sliding window (default 5, the paper); see :func:`patchlab.sliding_windows`.
        windows: explicit ``(start, stop)`` layer ranges instead of sliding windows.
        window_mode: ``"centered"`` (one window per layer, clipped; the paper) or ``"fixed"``.
        heads: the head axis: ``None``, ``"each"`` (every head) or head indices; each component holding a per-head
            site without a head list becomes one row per head (``"heads[3]"``).
        metric: a registered metric name (``"krs"``, ``"logprob"``, ``"kl"``, ``"top1"``), a
            :class:`~patchlab.patching.metrics.Metric`, or a function ``fn(restored, refs) -> [row]``.
        n_tokens: N, the vanilla greedy answer length in tokens (the paper: 30; shorter if EOS comes first).
        prompt_template: must contain ``{question}``.
        positions: ``"all"`` (the paper), ``"answer"`` or ``"last_prompt"`` (:func:`position_mask`).
        engine: ``"batched"`` runs restorations of all questions as rows of few forward passes
            (:mod:`patchlab.patching.engine`); ``"loop"`` runs one nnsight forward pass per restoration. Both give
            the same numbers.
        batch_size: rows per forward pass of the batched engine.
        answers: precomputed vanilla reference answers (1-D token id tensors, one per question, e.g. from
            :func:`reference_answers`), to share them between sweeps; default: generated here.
        resume: an output directory (path or claimed :class:`~patchlab.io.OutputDir`) where each question's
            scores are saved as soon as its chunk is done (:class:`SweepProgress`); a rerun with the same settings,
            checkpoints and questions skips the questions already there. ``None``: nothing is saved.
        chunk: at most this many questions prepared and scored together (their restorations share forward
            passes; default: as many as ``memory_budget`` allows, and at most 8 with ``resume``, whose progress is
            saved after each chunk). The scores do not depend on it.
        memory_budget: bytes (or a size such as ``"2GiB"``) the cache of the questions prepared together may hold
            (default 2 GiB): per question, :func:`patchlab.patching.engine.question_cache_bytes` of its prompt and
            ``n_tokens`` answer tokens (the source activations at the restored sites and the target residual stream
            per layer and token in the models' dtype, and two float32 ``[answer, vocab]`` reference logits). The
            restored logits of one forward pass are held to a quarter of it (the LM head and the metric then run
            on a few rows at a time). ``None``: every question at once, logits unbounded. The scores do not
            depend on it.

    Raises:
        PatchlabValueError: empty questions or components, unknown component/engine/positions/metric, window
            larger than the model, ``n_tokens < 1``.
        DegenerateMetricError: for some question the unlearned logits equal the vanilla ones (the metric is
            undefined; :class:`~patchlab.errors.DegenerateKRSError` for KRS).
        NonFiniteError: NaN/inf logits.
    """
    if engine not in ENGINES:
        raise PatchlabValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    chosen_metric = get_metric(metric)
    comps = resolve_components(pair, components, heads)
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise PatchlabValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PatchlabValueError(f"batch_size must be >= 1, got {batch_size}")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise PatchlabValueError(f"chunk must be a positive integer, got {chunk!r}")
    budget = memory_bytes(memory_budget)
    if engine == "loop" and not isinstance(pair, ModelPair):
        raise PatchlabValueError("the loop engine traces both models with nnsight: it needs a pair held in memory "
                                 "(load_pair without sequential=True)")
    wins = resolve_windows(pair, window, windows, window_mode)
    position_mask(positions, 1, 1)  # validates the name before any model work
    prompt_ids = encode_prompts(pair.tokenizer, format_prompts(questions, prompt_template))
    if answers is not None and (len(answers) != len(prompt_ids) or any(
            a.ndim != 1 or not 1 <= len(a) <= n_tokens for a in answers)):
        raise PatchlabValueError(f"answers must be {len(prompt_ids)} 1-D token id tensors of 1..{n_tokens} tokens")
    settings = {"n_tokens": n_tokens, "window": None if windows is not None else 5 if window is None else window,
                "window_mode": window_mode if windows is None else "explicit", "positions": positions,
                "prompt_template": prompt_template, "engine": engine, "n_layers": pair.n_layers,
                "metric": chosen_metric.name, "heads": heads if heads is None or isinstance(heads, str) else list(heads)}
    provenance = {**pair_provenance(pair), "settings": settings}
    progress_file = SweepProgress.open(resume, settings, provenance, questions, comps, wins)
    todo = [q for q in range(len(questions)) if q not in progress_file.done]
    sites = _cached_sites(pair, comps)
    chunks = question_chunks(pair, sites, [len(prompt_ids[q]) for q in todo],
                             [n_tokens if answers is None else len(answers[q]) for q in todo], budget,
                             chunk or (None if resume is None else 8))
    chunks = [[todo[i] for i in c] for c in chunks]
    source_weights = pair.source_weights()  # needs no model loaded: one for every chunk, its cache kept
    for part in tqdm(chunks, desc="question chunks", disable=not progress or len(chunks) <= 1):
        labels = [question_label(q, questions[q]) for q in part]

        def vanilla_answers(model_v: PreTrainedModel) -> Sequence[torch.Tensor]:
            found = [answers[q] for q in part] if answers is not None else greedy_answers(
                model_v, pair.tokenizer, [questions[q] for q in part], max_new_tokens=n_tokens,
                template=prompt_template, progress=progress)[1]
            for q, a in zip(part, found):
                check_fits(model_v, prompt_ids[q], len(a), question_label(q, questions[q]))
            return found

        with prepared(pair, [prompt_ids[q] for q in part], vanilla_answers, sites=sites, metric=chosen_metric,
                      labels=labels, source_weights=source_weights, progress=progress) as (store, model_u):
            rows = [Row(k, c, w, position_mask(positions, store.prompt_lens[k], len(store.ids[k])))
                    for k in range(len(part)) for c in comps for w in wins]
            if engine == "batched":
                scores = run_rows(model_u, store, rows, chosen_metric, batch_size=batch_size, progress=progress,
                                  desc=f"{chosen_metric.name} sweep",
                                  max_logits_bytes=None if budget is None else budget // 4)
            else:
                scores = _scores_loop(pair, store, tqdm(rows, desc=f"{chosen_metric.name} sweep (loop)",
                                                        disable=not progress), chosen_metric)
        del model_u
        for k, q in enumerate(part):
            progress_file.add(q, scores.reshape(len(part), len(comps), len(wins))[k].numpy(),
                              pair.tokenizer.decode(store.refs[k].answer_ids.cpu(), skip_special_tokens=True),
                              store.weights[k])
        del store  # freed before the next chunk is prepared
    stacked = np.stack([progress_file.done[q]["scores"] for q in range(len(questions))])
    weights = None if chosen_metric.denominator is None else \
        np.asarray([progress_file.done[q]["weight"] for q in range(len(questions))], dtype=np.float64)
    progress_file.finish()
    return PatchResult(
        scores={c.label: stacked[:, j].mean(axis=0) for j, c in enumerate(comps)},
        per_question={c.label: stacked[:, j] for j, c in enumerate(comps)},
        windows=wins, questions=list(questions), answers=[progress_file.done[q]["answer"] for q in range(len(questions))],
        weights=weights, metric=chosen_metric.name, settings=settings, provenance=provenance)


class SweepProgress:
    """The per-question results of a sweep written into its output directory as they come (``sweep_progress.json``,
    ``"partial": true`` until the last question), so an interrupted sweep resumes at the next unfinished question.

    The file is keyed by the settings, the checkpoints' weight digests, the questions, components and windows: a
    directory holding another sweep's progress is refused (pass ``overwrite=True`` when claiming it to start over).
    Without a directory the results are only kept in memory.
    """

    FILE = "sweep_progress.json"

    def __init__(self, out: OutputDir | None, key: str, done: dict[int, dict[str, Any]]):
        self.out, self.key, self.done = out, key, done

    @classmethod
    def open(cls, resume: Any, settings: dict[str, Any], provenance: dict[str, Any], questions: Sequence[str],
             comps: Sequence[Component], wins: Sequence[Window]) -> SweepProgress:
        """The progress of this sweep in ``resume`` (a directory or a claimed :class:`~patchlab.io.OutputDir`;
        ``None``: in memory only).

        Raises:
            PatchlabFileError: the directory holds another sweep's progress.
        """
        key = settings_key(settings, provenance["vanilla"]["weights"], provenance["unlearned"]["weights"],
                           list(questions), [c.label for c in comps], [list(w) for w in wins])
        if resume is None:
            return cls(None, key, {})
        out = output_dir(resume, "krs", resume=True)
        path = out.path / cls.FILE
        done: dict[int, dict[str, Any]] = {}
        if path.is_file():
            data = read_json(path, what="sweep progress file")
            if data.get("key") != key and not out.overwrite:
                raise PatchlabFileError(f"{out.path} holds a sweep with other settings, questions or checkpoints; "
                                        "choose another directory, or overwrite it (--overwrite)")
            if data.get("key") == key:
                done = {int(q): {**v, "scores": np.asarray(v["scores"])} for q, v in data["done"].items()}
        return cls(out, key, done)

    def add(self, question: int, scores: np.ndarray, answer: str, weight: float | None) -> None:
        """Record one question's ``[component, window]`` scores, and save (partial)."""
        self.done[question] = {"scores": scores, "answer": answer, "weight": weight}
        self._save(partial=True)

    def finish(self) -> None:
        """Mark the saved progress complete."""
        self._save(partial=False)

    def _save(self, *, partial: bool) -> None:
        if self.out is None:
            return
        done = {str(q): {**v, "scores": np.asarray(v["scores"]).tolist()} for q, v in sorted(self.done.items())}
        record = results_record({"key": self.key, "done": done}, partial=partial)
        self.out.write(self.FILE, lambda path: atomic_write_json(path, record))


def krs_sweep(pair: ModelPair, questions: Sequence[str], *, components: Sequence[str] = DEFAULT_COMPONENTS,
              window: int = 5, **kwargs: Any) -> PatchResult:
    """The paper's sweep: :func:`patch_sweep` with ``metric="krs"`` (Knowledge Recovery Score) over sliding
    windows of ``window`` layers (default 5). Other keyword arguments as :func:`patch_sweep`."""
    if "metric" in kwargs:
        raise PatchlabValueError("krs_sweep scores KRS; use patch_sweep(..., metric=...) for another metric")
    return patch_sweep(pair, questions, components=components, window=window, metric="krs", **kwargs)
