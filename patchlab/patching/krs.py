"""Knowledge Recovery Score sweeps (Hong et al., section 3, Eq. 3).

For a question with vanilla greedy answer ``a`` (N tokens, ids kept), the models are run teacher-forced on
``prompt + a``; ``l_v``, ``l_u``, ``l_r`` are the N raw full-vocabulary next-token logit vectors predicting the
answer tokens (float32) of the vanilla, unlearned and restored-unlearned models, and

    KRS = 1 - MSE(l_r, l_v) / MSE(l_u, l_v)

with MSE averaged over the N positions and the vocabulary. A sweep reports, for every component and layer
window, the mean KRS over questions (``KRSResult.krs``), and the paper's pooled form, ``1 - mean_q MSE(l_r, l_v) /
mean_q MSE(l_u, l_v)`` with both losses averaged over the K questions first (``KRSResult.pooled()``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm

from patchlab.errors import DegenerateKRSError, PatchlabFileError, PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, encode_prompts, format_prompts, greedy_answers
from patchlab.patching.interventions import (ActivationCache, Restoration, batched_restore, check_finite, parse_component,
                                    position_mask, restore, run_with_cache)
from patchlab.io import OutputDir, atomic_write_json, output_dir, write_csv, write_html
from patchlab.pair import ModelPair
from patchlab.patching.windows import Window, sliding_windows

DEFAULT_COMPONENTS = ("coef", "value", "attn", "coef+attn")
ENGINES = ("batched", "loop")
AGGREGATES = ("mean", "pooled")


def scored_logits(logits: Float[torch.Tensor, "row kept vocab"], answer_len: int) -> Float[torch.Tensor, "row answer vocab"]:
    """The ``answer_len`` logit vectors predicting the answer tokens, in float32.

    ``logits`` are over ``prompt + answer`` (or its last ``kept >= answer_len + 1`` positions): the logit at the
    last prompt position predicts the first answer token, the one at the last answer token predicts nothing.
    """
    return logits[:, -(answer_len + 1):-1].float()


def mse(a: Float[torch.Tensor, "row answer vocab"], b: Float[torch.Tensor, "row answer vocab"]
        ) -> Float[torch.Tensor, "row"]:
    """Mean squared error per row, averaged over answer positions and vocabulary (float32)."""
    return (a.float() - b.float()).pow(2).mean(dim=(1, 2))


@dataclass
class PreparedQuestion:
    """One question ready for scoring: ids of prompt + vanilla answer and the vanilla/unlearned references."""

    ids: Int[torch.Tensor, "seq"]
    prompt_len: int
    cache: ActivationCache
    unlearned_cache: ActivationCache
    vanilla_logits: Float[torch.Tensor, "1 answer vocab"]
    mse_unlearned: float

    @property
    def answer_len(self) -> int:
        return len(self.ids) - self.prompt_len

    def krs(self, logits: Float[torch.Tensor, "row seq vocab"]) -> Float[torch.Tensor, "row"]:
        """KRS of each row of restored logits over ``ids``."""
        restored = scored_logits(logits, self.answer_len)
        check_finite(restored, "restored logits")
        return 1.0 - mse(restored, self.vanilla_logits).cpu() / self.mse_unlearned


@torch.no_grad()
def prepare_question(pair: ModelPair, prompt_ids: Int[torch.Tensor, "prompt"], answer_ids: Int[torch.Tensor, "answer"],
                     *, label: str = "question") -> PreparedQuestion:
    """Cache the vanilla activations on ``prompt + answer`` and the unlearned model's MSE to vanilla.

    Raises:
        DegenerateKRSError: the unlearned logits equal the vanilla ones (MSE(l_u, l_v) is zero up to float32
            rounding), so KRS would divide by zero.
    """
    ids = torch.cat([prompt_ids, answer_ids]).long()
    prompt_len, answer_len = len(prompt_ids), len(answer_ids)
    cache = run_with_cache(pair, ids[None], which="vanilla")
    unlearned_cache = run_with_cache(pair, ids[None], which="unlearned")
    l_v = scored_logits(cache["logits"], answer_len)
    l_u = scored_logits(unlearned_cache["logits"], answer_len)
    mse_u = float(mse(l_u, l_v)[0])
    if mse_u <= torch.finfo(torch.float32).eps * float(l_v.pow(2).mean()):
        raise DegenerateKRSError(
            f"{label}: the unlearned model's logits equal the vanilla model's (MSE(l_u, l_v) = {mse_u:.3g}); "
            "KRS is undefined. Is the unlearned checkpoint really different?")
    return PreparedQuestion(ids=ids, prompt_len=prompt_len, cache=cache, unlearned_cache=unlearned_cache,
                            vanilla_logits=l_v, mse_unlearned=mse_u)


def reference_answers(pair: ModelPair, questions: Sequence[str], *, n_tokens: int = 30,
                      prompt_template: str = DEFAULT_TEMPLATE, progress: bool = False
                      ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Prompt ids and the vanilla model's greedy answer ids (at most ``n_tokens``, stopping at EOS) per question."""
    return greedy_answers(pair.vanilla_hf, pair.tokenizer, questions, max_new_tokens=n_tokens,
                          template=prompt_template, progress=progress)


@dataclass
class KRSResult:
    """A KRS sweep: mean and per-question KRS for each component and layer window.

    Attributes:
        krs: component -> ``[n_windows]`` mean KRS over questions (indexed like ``windows``; for centred windows
            index ``c`` is the window centred on layer ``c``).
        per_question: component -> ``[n_questions, n_windows]``.
        windows: half-open layer ranges ``(start, stop)``.
        questions: the questions, in order.
        answers: the vanilla reference answers, decoded (the sweep itself used their token ids).
        mse_unlearned: ``[n_questions]`` MSE(l_u, l_v), the denominator of each question's KRS.
        settings: n_tokens, window, window_mode, positions, prompt_template, engine, n_layers.
    """

    krs: dict[str, np.ndarray]
    per_question: dict[str, np.ndarray]
    windows: list[Window]
    questions: list[str]
    answers: list[str]
    mse_unlearned: np.ndarray
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def components(self) -> list[str]:
        return list(self.krs)

    def pooled(self) -> dict[str, np.ndarray]:
        """The paper's Eq. 3 with both losses averaged over the questions before the ratio: component ->
        ``[n_windows]`` of ``1 - mean_q MSE(l_r, l_v) / mean_q MSE(l_u, l_v)``.

        Exact from the stored numbers, since ``MSE(l_r, l_v) = (1 - KRS_q) * MSE(l_u, l_v)`` per question. Questions
        whose unlearned model moved further from the vanilla one weigh more than in the plain mean :attr:`krs`.
        """
        weights = self.mse_unlearned[:, None]
        return {c: 1.0 - ((1.0 - v) * weights).sum(axis=0) / weights.sum() for c, v in self.per_question.items()}

    def aggregated(self, aggregate: str = "mean") -> dict[str, np.ndarray]:
        """:attr:`krs` (``"mean"``, the mean of per-question KRS) or :meth:`pooled` (``"pooled"``)."""
        if aggregate not in AGGREGATES:
            raise PatchlabValueError(f"aggregate must be one of {AGGREGATES}, got {aggregate!r}")
        return self.krs if aggregate == "mean" else self.pooled()

    def window_labels(self) -> list[int]:
        """x-axis labels: the centre layer (centred windows) or the first layer (fixed windows)."""
        if self.settings.get("window_mode", "centered") == "centered":
            return list(range(len(self.windows)))
        return [start for start, _ in self.windows]

    def to_frame(self) -> pd.DataFrame:
        """Long table: one row per (component, window) with the mean KRS, its std over questions, the pooled KRS
        (:meth:`pooled`) and the question count."""
        rows = []
        pooled = self.pooled()
        for comp, values in self.per_question.items():
            for w, ((start, stop), label) in enumerate(zip(self.windows, self.window_labels())):
                rows.append({"component": comp, "window": label, "start": start, "stop": stop,
                             "krs": float(self.krs[comp][w]), "krs_std": float(values[:, w].std()),
                             "krs_pooled": float(pooled[comp][w]), "n_questions": values.shape[0]})
        return pd.DataFrame(rows)

    def to_dict(self) -> dict[str, Any]:
        return {"format": "patchlab.KRSResult/1", "settings": self.settings, "windows": [list(w) for w in self.windows],
                "questions": self.questions, "answers": self.answers, "mse_unlearned": self.mse_unlearned.tolist(),
                "krs": {c: v.tolist() for c, v in self.krs.items()},
                "per_question": {c: v.tolist() for c, v in self.per_question.items()}}

    def save(self, path: str | os.PathLike) -> Path:
        """Write the result as JSON, atomically (temp file + rename)."""
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> KRSResult:
        """Read a result written by :meth:`save`."""
        path = Path(path)
        if not path.is_file():
            raise PatchlabFileError(f"no such KRS result file: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if data.get("format") != "patchlab.KRSResult/1":
                raise KeyError("format")
            return cls(krs={c: np.asarray(v) for c, v in data["krs"].items()},
                       per_question={c: np.asarray(v) for c, v in data["per_question"].items()},
                       windows=[tuple(w) for w in data["windows"]], questions=data["questions"],
                       answers=data["answers"], mse_unlearned=np.asarray(data["mse_unlearned"]),
                       settings=data["settings"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
            raise PatchlabValueError(f"{path} is not a patchlab KRS result file ({err!r})") from err

    def write_report(self, out_dir: str | os.PathLike | OutputDir, name: str = "krs", *, aggregate: str = "mean",
                     overwrite: bool = False) -> dict[str, Path]:
        """Write ``{name}.json`` (the result), ``{name}.csv`` (:meth:`to_frame`, both aggregates) and ``{name}.html``
        (the heatmap of ``aggregate``) into ``out_dir``, each atomically. Returns the paths by kind.

        ``out_dir`` is claimed as a ``"krs"`` output (:class:`patchlab.io.OutputDir`): an earlier one is replaced
        only with ``overwrite=True``, a directory holding files patchlab did not write is refused."""
        figure = self.heatmap(aggregate=aggregate)  # validates aggregate before anything is written
        out = output_dir(out_dir, "krs", overwrite=overwrite)
        return {"json": self.save(out.file(f"{name}.json")), "csv": write_csv(self.to_frame(), out.file(f"{name}.csv")),
                "html": write_html(figure, out.file(f"{name}.html"))}

    def heatmap(self, title: str | None = None, *, aggregate: str = "mean") -> go.Figure:
        """Interactive plotly heatmap, component x layer window; hover shows the window and the KRS.

        ``aggregate``: ``"mean"`` (mean of per-question KRS) or ``"pooled"`` (:meth:`pooled`, the paper's Eq. 3).
        """
        labels = self.window_labels()
        values = self.aggregated(aggregate)
        z = np.stack([values[c] for c in self.components])
        hover = [[f"{c}<br>layers {s}-{e - 1}<br>KRS {v:.4f}" for (s, e), v in zip(self.windows, row)]
                 for c, row in zip(self.components, z)]
        fig = go.Figure(go.Heatmap(z=z, x=labels, y=self.components, text=hover, hoverinfo="text",
                                   colorscale="Viridis", zmin=min(0.0, float(z.min())), zmax=max(1.0, float(z.max())),
                                   colorbar={"title": "KRS"}))
        mode = self.settings.get("window_mode", "centered")
        fig.update_layout(
            title=title or f"Knowledge Recovery Score, {aggregate} over {len(self.questions)} questions "
                           f"(window {self.settings.get('window')}, {self.settings.get('n_tokens')} tokens)",
            xaxis_title="centre layer of the window" if mode == "centered" else "first layer of the window",
            yaxis_title="restored component", yaxis={"autorange": "reversed"})
        return fig


def _restorations(components: Sequence[str], windows: Sequence[Window], positions: torch.Tensor) -> list[Restoration]:
    return [Restoration(parse_component(c), w, positions) for c in components for w in windows]


def _score_batched(pair: ModelPair, q: PreparedQuestion, restorations: list[Restoration], batch_size: int
                   ) -> torch.Tensor:
    """KRS of each restoration, ``batch_size`` rows per forward pass.

    Rows are sorted by their first restored layer, so each forward pass can start from the unlearned model's
    cached state below the lowest first layer of its rows (exact: nothing differs there).
    """
    order = sorted(range(len(restorations)), key=lambda r: restorations[r].layers[0])
    krs = torch.empty(len(restorations))
    for i in range(0, len(order), batch_size):
        chunk = order[i:i + batch_size]
        logits = batched_restore(pair, q.ids, q.cache, [restorations[r] for r in chunk],
                                 unlearned_cache=q.unlearned_cache, keep_last=q.answer_len + 1)
        krs[chunk] = q.krs(logits)
    return krs


def _score_loop(pair: ModelPair, q: PreparedQuestion, restorations: list[Restoration], batch_size: int) -> torch.Tensor:
    return torch.cat([q.krs(restore(pair, q.ids, r.sites, r.layers, r.positions)) for r in restorations])


def krs_sweep(pair: ModelPair, questions: Sequence[str], *, components: Sequence[str] = DEFAULT_COMPONENTS,
              window: int = 5, window_mode: str = "centered", n_tokens: int = 30,
              prompt_template: str = DEFAULT_TEMPLATE, positions: str = "all", engine: str = "batched",
              batch_size: int = 64, answers: Sequence[torch.Tensor] | None = None, progress: bool = True
              ) -> KRSResult:
    """KRS of restoring each component over each sliding layer window, averaged over ``questions``.

    Args:
        pair: the vanilla / unlearned pair.
        questions: K questions about the unlearned concept (the paper uses 10).
        components: sites or ``+``-combinations, e.g. ``("coef", "value", "attn", "coef+attn")``.
        window: layers per window (the paper: 5); see :func:`patchlab.patching.windows.sliding_windows`.
        window_mode: ``"centered"`` (one window per layer, clipped; the paper) or ``"fixed"``.
        n_tokens: N, the vanilla greedy answer length in tokens (the paper: 30; shorter if EOS comes first).
        prompt_template: must contain ``{question}``.
        positions: ``"all"`` (the paper), ``"answer"`` or ``"last_prompt"``; see
            :func:`patchlab.patching.interventions.position_mask`.
        engine: ``"batched"`` runs all restorations of a question as rows of one masked forward pass
            (``batch_size`` rows at a time); ``"loop"`` runs one forward pass per restoration. Both give the
            same numbers.
        answers: precomputed vanilla reference answers (1-D token id tensors, one per question, e.g. from
            :func:`reference_answers`), to share them between sweeps; default: generated here.

    Raises:
        PatchlabValueError: empty questions or components, unknown component/engine/positions, window larger
            than the model, ``n_tokens < 1``.
        DegenerateKRSError: for some question the unlearned logits equal the vanilla ones.
        NonFiniteError: NaN/inf logits.
    """
    if engine not in ENGINES:
        raise PatchlabValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    if isinstance(components, str) or len(components) == 0:
        raise PatchlabValueError("components must be a non-empty list such as ['coef', 'attn', 'coef+attn']")
    if len(set(components)) != len(components):
        raise PatchlabValueError(f"components contain duplicates: {list(components)}")
    for comp in components:
        if not isinstance(comp, str):
            raise PatchlabValueError(f"a component is a name such as 'coef+attn', got {comp!r}")
        parse_component(comp)
    if not isinstance(n_tokens, int) or n_tokens < 1:
        raise PatchlabValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if batch_size < 1:
        raise PatchlabValueError(f"batch_size must be >= 1, got {batch_size}")
    windows = sliding_windows(pair.n_layers, window, mode=window_mode)
    position_mask(positions, 1, 1)  # validates the name before any model work
    if answers is None:
        prompt_ids, answers = reference_answers(pair, questions, n_tokens=n_tokens, prompt_template=prompt_template,
                                                progress=progress)
    else:
        prompt_ids = encode_prompts(pair.tokenizer, format_prompts(questions, prompt_template))
        if len(answers) != len(prompt_ids) or any(a.ndim != 1 or not 1 <= len(a) <= n_tokens for a in answers):
            raise PatchlabValueError(f"answers must be {len(prompt_ids)} 1-D token id tensors of 1..{n_tokens} tokens")
    score = _score_batched if engine == "batched" else _score_loop
    per_question, mse_u = [], []
    for k, (p_ids, a_ids) in enumerate(tqdm(list(zip(prompt_ids, answers)), desc=f"KRS sweep ({engine})",
                                            disable=not progress)):
        q = prepare_question(pair, p_ids, a_ids, label=f"question {k} ({questions[k]!r})")
        restorations = _restorations(components, windows, position_mask(positions, q.prompt_len, len(q.ids)))
        per_question.append(score(pair, q, restorations, batch_size).reshape(len(components), len(windows)))
        mse_u.append(q.mse_unlearned)
    stacked = torch.stack(per_question).numpy()  # [question, component, window]
    return KRSResult(
        krs={c: stacked[:, j].mean(axis=0) for j, c in enumerate(components)},
        per_question={c: stacked[:, j] for j, c in enumerate(components)},
        windows=windows, questions=list(questions),
        answers=[pair.tokenizer.decode(a, skip_special_tokens=True) for a in answers],
        mse_unlearned=np.asarray(mse_u),
        settings={"n_tokens": n_tokens, "window": window, "window_mode": window_mode, "positions": positions,
                  "prompt_template": prompt_template, "engine": engine, "n_layers": pair.n_layers})
