"""Prompts and greedy generation that keep token ids (never decode and re-tokenize)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from jaxtyping import Int
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError

DEFAULT_TEMPLATE = "Question: {question}\n Answer:"


def format_prompts(questions: Sequence[str], template: str = DEFAULT_TEMPLATE) -> list[str]:
    """Fill ``template`` (which must contain ``{question}``) with each question.

    Raises:
        PatchlabValueError: no question, an empty question, or a template without ``{question}``.
    """
    if "{question}" not in template:
        raise PatchlabValueError(f"prompt template must contain '{{question}}': {template!r}")
    if isinstance(questions, str) or len(questions) == 0:
        raise PatchlabValueError("questions must be a non-empty list of strings")
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            raise PatchlabValueError(f"question {i} is empty or not a string: {q!r}")
    return [template.replace("{question}", q) for q in questions]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[torch.Tensor]:
    """Token ids of each prompt, a 1-D ``LongTensor`` each (the tokenizer's own special tokens kept)."""
    encoded = [torch.tensor(tokenizer(p).input_ids, dtype=torch.long) for p in prompts]
    for p, ids in zip(prompts, encoded):
        if ids.numel() == 0:
            raise PatchlabValueError(f"prompt {p!r} encodes to no token")
    return encoded


@torch.no_grad()
def greedy_continuations(model: PreTrainedModel, prompt_ids: Sequence[torch.Tensor], max_new_tokens: int,
                         *, eos_token_id: int | None = None, progress: bool = False) -> list[torch.Tensor]:
    """Greedy continuation of each prompt, one prompt at a time (no padding, so exact).

    Args:
        model: a Hugging Face causal LM.
        prompt_ids: 1-D token id tensors, one per prompt.
        max_new_tokens: N, the most tokens generated per prompt (>= 1).
        eos_token_id: generation stops after this token, which is kept as the last answer token;
            defaults to ``model.generation_config.eos_token_id``.

    Returns:
        One 1-D ``LongTensor`` of 1..N generated ids per prompt (prompt excluded), on the CPU.
    """
    if max_new_tokens < 1:
        raise PatchlabValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    device = next(model.parameters()).device
    answers = []
    for ids in tqdm(prompt_ids, desc="greedy answers", disable=not progress, leave=False):
        out = model.generate(ids[None].to(device), attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                             max_new_tokens=max_new_tokens, min_new_tokens=1, do_sample=False,
                             eos_token_id=sorted(eos) or None, pad_token_id=sorted(eos)[0] if eos else None)
        new = out[0, len(ids):].cpu()
        stops = [i for i, t in enumerate(new.tolist()) if t in eos]
        answers.append(new[: stops[0] + 1] if stops else new)
    return answers


def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
                   max_new_tokens: int, template: str = DEFAULT_TEMPLATE, progress: bool = False
                   ) -> tuple[list[Int[torch.Tensor, "prompt"]], list[Int[torch.Tensor, "answer"]]]:
    """Prompt ids and greedy answer ids of ``model`` for each question filled into ``template``.

    Args:
        questions: non-empty question strings.
        max_new_tokens: N, the most answer tokens per question (>= 1); generation stops after the tokenizer's
            EOS, which is kept as the last answer token.

    Returns:
        ``(prompt_ids, answers)``: per question, the 1-D prompt ids (:func:`encode_prompts`) and 1..N answer ids
        (:func:`greedy_continuations`, on the CPU).

    Raises:
        PatchlabValueError: no question, an empty question, a template without ``{question}``, or N < 1.
    """
    prompt_ids = encode_prompts(tokenizer, format_prompts(questions, template))
    answers = greedy_continuations(model, prompt_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   progress=progress)
    return prompt_ids, answers
