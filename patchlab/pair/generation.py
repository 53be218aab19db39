"""Prompts and greedy generation that keep token ids (never decode and re-tokenize)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from jaxtyping import Int
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase

from patchlab.defaults import DEFAULT_TEMPLATE
from patchlab.errors import PatchlabValueError
from patchlab.pair.placement import input_device

#: Named prompt templates (:func:`resolve_template`): ``"default"`` is :data:`DEFAULT_TEMPLATE`, ``"chat"`` the
#: tokenizer's own chat template.
TEMPLATE_NAMES = ("default", "chat")
_MARKER = "PATCHLABQUESTIONMARKER"


def chat_template(tokenizer: PreTrainedTokenizerBase) -> str:
    """The tokenizer's chat template as a prompt template: one user turn holding ``{question}``, then the
    assistant's generation prompt (``apply_chat_template(..., add_generation_prompt=True)``, rendered as text once;
    a BOS token text at its start is dropped when encoding adds that token itself, so it is not doubled). This is
    how open-unlearning prompts instruct models (its system prompt, if any, is not added).

    Raises:
        PatchlabValueError: the tokenizer has no chat template, or its template does not show the question once.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise PatchlabValueError(f"the tokenizer {tokenizer.name_or_path or type(tokenizer).__name__!r} has no chat "
                                 "template: --template chat needs an instruct model's tokenizer; give a template "
                                 "holding {question} instead")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARKER}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_MARKER) != 1:
        raise PatchlabValueError("the tokenizer's chat template does not show the user's message exactly once")
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x").input_ids[:1] == [tokenizer.bos_token_id]:
        text = text[len(bos):]
    return text.replace(_MARKER, "{question}")


def resolve_template(template: str, tokenizer: PreTrainedTokenizerBase | None = None) -> str:
    """A prompt template from a name of :data:`TEMPLATE_NAMES` (``"default"``, ``"chat"``: :func:`chat_template`
    of ``tokenizer``) or a template text holding ``{question}``, returned as it is.

    Raises:
        PatchlabValueError: a text without ``{question}``, or ``"chat"`` without a tokenizer that has a chat
            template.
    """
    if template == "default":
        return DEFAULT_TEMPLATE
    if template == "chat":
        if tokenizer is None:
            raise PatchlabValueError("the chat template needs the tokenizer")
        return chat_template(tokenizer)
    if not isinstance(template, str) or "{question}" not in template:
        raise PatchlabValueError(f"a prompt template is one of {', '.join(TEMPLATE_NAMES)} or a text holding "
                                 f"{{question}}, got {template!r}")
    return template


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


#: Config keys that give a model's context length (positions), in the order they are looked up.
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length", "seq_length")


def context_length(model: PreTrainedModel) -> int | None:
    """The most positions ``model`` can attend over: the first of :data:`CONTEXT_KEYS` its config (or its text
    config) sets to a positive integer; ``None`` when it declares none."""
    configs = [model.config]
    if hasattr(model.config, "get_text_config"):
        configs.append(model.config.get_text_config())
    for config in configs:
        for key in CONTEXT_KEYS:
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def check_fits(model: PreTrainedModel, prompt_ids: Int[torch.Tensor, "prompt"] | Sequence[int], n_new_tokens: int,
               label: str) -> None:
    """Raise :class:`PatchlabValueError` naming ``label`` (e.g. ``"question 3 ('who wrote ...')"``) unless the prompt
    plus ``n_new_tokens`` answer tokens fit the model's context (:func:`context_length`); models that declare no
    context length are not checked.

    Positions are counted as the model sees them: ``len(prompt_ids) + n_new_tokens`` must be at most the context.
    Call it before any model work, so that an over-long input fails at once instead of as a raw ``IndexError``
    (learned position embeddings, GPT-2) or as silently wrong numbers (rotary models run past their training
    length).
    """
    limit = context_length(model)
    total = len(prompt_ids) + n_new_tokens
    if limit is not None and total > limit:
        raise PatchlabValueError(f"{label} is too long for the model: {len(prompt_ids)} prompt tokens + "
                                 f"{n_new_tokens} answer tokens = {total} positions, but the model's context holds "
                                 f"{limit} (config max_position_embeddings / n_positions); shorten it or generate "
                                 "fewer tokens")


def question_label(index: int, question: str, width: int = 60) -> str:
    """``question 3 ('who wrote the Veltrani ...')``: how errors name a question (its index and its start)."""
    short = question if len(question) <= width else question[:width - 3] + "..."
    return f"question {index} ({short!r})"


@contextlib.contextmanager
def plain_generation(model: PreTrainedModel) -> Iterator[None]:
    """Within the block, ``model.generate`` ignores the model's own generation config (sampling, temperature,
    ``repetition_penalty``, ``no_repeat_ngram_size``, suppressed tokens...): it is swapped for a default
    ``GenerationConfig()``, which transformers fills with neutral defaults, and restored on exit."""
    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield
    finally:
        model.generation_config = saved


@torch.no_grad()
def per_prompt(max_new_tokens: int | Sequence[int], n: int) -> list[int]:
    """``max_new_tokens`` as one budget per prompt of ``n``: an integer repeated, or a sequence of ``n`` integers.

    Raises:
        PatchlabValueError: a budget below 1 or not an integer, or a sequence of another length.
    """
    budgets = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * n
    if len(budgets) != n:
        raise PatchlabValueError(f"{len(budgets)} max_new_tokens budgets for {n} prompts")
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, int) or b < 1]
    if bad:
        raise PatchlabValueError(f"max_new_tokens must be >= 1, got {bad[0]!r}")
    return budgets


def greedy_continuations(model: PreTrainedModel, prompt_ids: Sequence[torch.Tensor],
                         max_new_tokens: int | Sequence[int], *, eos_token_id: int | None = None,
                         labels: Sequence[str] | None = None, progress: bool = False) -> list[torch.Tensor]:
    """Greedy continuation of each prompt, one prompt at a time (no padding, so exact): the model's plain argmax
    continuation, whatever its generation config asks for (:func:`plain_generation`,
    :data:`patchlab.provenance.GREEDY`).

    Args:
        model: a Hugging Face causal LM (placed on one device or with a device map: ids go to its input device).
        prompt_ids: 1-D token id tensors, one per prompt.
        max_new_tokens: N, the most tokens generated per prompt (>= 1); or one N per prompt.
        eos_token_id: generation stops after this token, which is kept as the last answer token;
            defaults to ``model.generation_config.eos_token_id``.
        labels: how errors name each prompt (default ``"prompt i"``).

    Returns:
        One 1-D ``LongTensor`` of 1..N generated ids per prompt (prompt excluded), on the CPU.

    Raises:
        PatchlabValueError: N < 1, or a prompt plus N tokens longer than the model's context (:func:`check_fits`,
            checked for every prompt before generating anything).
    """
    budgets = per_prompt(max_new_tokens, len(prompt_ids))
    if labels is not None and len(labels) != len(prompt_ids):
        raise PatchlabValueError(f"{len(labels)} labels for {len(prompt_ids)} prompts")
    for i, (ids, budget) in enumerate(zip(prompt_ids, budgets)):
        check_fits(model, ids, budget, labels[i] if labels is not None else f"prompt {i}")
    if eos_token_id is None:
        eos_token_id = model.generation_config.eos_token_id
    eos = set(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]) - {None}
    device = input_device(model)
    answers = []
    for ids, budget in tqdm(list(zip(prompt_ids, budgets)), desc="greedy answers", disable=not progress, leave=False):
        with plain_generation(model):
            out = model.generate(ids[None].to(device),
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                 max_new_tokens=budget, min_new_tokens=1, do_sample=False, num_beams=1,
                                 eos_token_id=sorted(eos) or None, pad_token_id=sorted(eos)[0] if eos else None)
        new = out[0, len(ids):].cpu()
        stops = [i for i, t in enumerate(new.tolist()) if t in eos]
        answers.append(new[: stops[0] + 1] if stops else new)
    return answers


def greedy_answers(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, questions: Sequence[str], *,
                   max_new_tokens: int | Sequence[int], template: str = DEFAULT_TEMPLATE, progress: bool = False
                   ) -> tuple[list[Int[torch.Tensor, "prompt"]], list[Int[torch.Tensor, "answer"]]]:
    """Prompt ids and greedy answer ids of ``model`` for each question filled into ``template``.

    Args:
        questions: non-empty question strings.
        max_new_tokens: N, the most answer tokens per question (>= 1), or one N per question; generation stops
            after the tokenizer's EOS, which is kept as the last answer token.

    Returns:
        ``(prompt_ids, answers)``: per question, the 1-D prompt ids (:func:`encode_prompts`) and 1..N answer ids
        (:func:`greedy_continuations`, on the CPU).

    Raises:
        PatchlabValueError: no question, an empty question, a template without ``{question}``, N < 1, or a question
            whose prompt plus N tokens exceeds the model's context (named, before any generation).
    """
    prompt_ids = encode_prompts(tokenizer, format_prompts(questions, template))
    answers = greedy_continuations(model, prompt_ids, max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   labels=[question_label(i, q) for i, q in enumerate(questions)],
                                   progress=progress)
    return prompt_ids, answers
