"""Forget / retain data for fine-tuning: lists of strings, QA records, JSON/JSONL files or ``datasets.Dataset``.

Every example becomes token ids plus labels, ``-100`` wherever a token is not a training target (the QA prompt,
padding), so padding never contributes to any loss.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Int
from transformers import PreTrainedTokenizerBase

from patchlab.errors import PatchlabValueError
from patchlab.pair.generation import DEFAULT_TEMPLATE, format_prompts
from patchlab.io import read_records

IGNORE = -100


@dataclass(frozen=True)
class Example:
    """One training sequence.

    Attributes:
        input_ids: ``[seq]`` token ids.
        labels: ``[seq]``; the id itself where the token is a target, ``-100`` elsewhere.
        prompt_len: number of leading non-target tokens (the QA prompt; for plain text the first token).
    """

    input_ids: Int[torch.Tensor, "seq"]
    labels: Int[torch.Tensor, "seq"]
    prompt_len: int


def _records(data: Any) -> list[Any]:
    if isinstance(data, os.PathLike) or (isinstance(data, str) and (data.endswith((".json", ".jsonl"))
                                                                    or os.path.isdir(data))):
        return read_records(data)
    if isinstance(data, str):
        raise PatchlabValueError(f"data must be a list of texts or QA records, a .json/.jsonl file or a datasets "
                                 f"directory (save_to_disk); got {data!r}")
    try:
        import datasets
        if isinstance(data, datasets.Dataset):
            return list(data)
    except ImportError:  # datasets is a dependency, but keep plain lists usable without it
        pass
    if data is None or not isinstance(data, Sequence):
        raise PatchlabValueError(f"data must be a list, a JSON/JSONL path or a datasets.Dataset, got {type(data).__name__}")
    return list(data)


def _pair(record: Any, index: int) -> tuple[str | None, str]:
    """(question or None, target text) of one record."""
    if isinstance(record, str):
        return None, record
    if isinstance(record, dict):
        if "question" in record and "answer" in record:
            return str(record["question"]), str(record["answer"])
        if "text" in record:
            return None, str(record["text"])
    raise PatchlabValueError(f"record {index} is neither a string, a {{'text'}} nor a {{'question', 'answer'}} "
                             f"record: {record!r}")


def _qa_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + answer + eos`` and the number of prompt tokens.

    The pair is tokenized as one text, so sub-word tokenizers (SentencePiece, BPE) see the answer where it
    really stands; if that splits the prompt differently from the prompt alone, the two parts are encoded
    separately instead.
    """
    prompt_ids = tokenizer(prompt).input_ids
    ids = tokenizer(prompt + " " + answer).input_ids
    if ids[:len(prompt_ids)] != prompt_ids:
        ids = prompt_ids + tokenizer(" " + answer, add_special_tokens=False).input_ids
    if ids[-1] != tokenizer.eos_token_id:
        ids.append(tokenizer.eos_token_id)
    return ids, len(prompt_ids)


def encode_example(tokenizer: PreTrainedTokenizerBase, question: str | None, target: str, *, max_length: int,
                   template: str = DEFAULT_TEMPLATE) -> Example:
    """Tokenize one QA pair (prompt from ``template``, target ``" " + answer + eos``) or one plain text
    (every token is a target; the first, having no context, is never scored), truncated to ``max_length`` tokens."""
    if question is None:
        ids, prompt_len = tokenizer(target).input_ids, 1
    else:
        ids, prompt_len = _qa_ids(tokenizer, format_prompts([question], template)[0], target)
    ids = ids[:max_length]
    input_ids = torch.tensor(ids, dtype=torch.long)
    labels = input_ids.clone()
    labels[:prompt_len] = IGNORE
    if not (labels != IGNORE).any():
        raise PatchlabValueError(f"example {target[:40]!r} has no target token after truncation to {max_length}")
    return Example(input_ids, labels, min(prompt_len, len(ids)))


def read_data(data: Any, what: str = "data") -> list[Any]:
    """The records of a data set (texts, ``{"question", "answer"}`` / ``{"text"}`` records, a JSON/JSONL path, a
    ``datasets`` directory or ``Dataset``), each checked, without a tokenizer: a file read this way before any model
    loads fails fast. ``what`` names the set in messages (``"forget"``, ``"retain"``).

    Raises:
        PatchlabFileError: a path that does not exist.
        PatchlabValueError: unreadable JSON/JSONL, an empty set, or an unrecognised record (naming the file).
    """
    records = _records(data)
    source = f" ({data})" if isinstance(data, (str, os.PathLike)) else ""
    if not records:
        raise PatchlabValueError(f"the {what} set{source} is empty")
    try:
        for i, record in enumerate(records):
            _pair(record, i)
    except PatchlabValueError as err:
        raise PatchlabValueError(f"the {what} set{source}: {err}") from err
    return records


def to_examples(data: Any, tokenizer: PreTrainedTokenizerBase, *, max_length: int = 256,
                template: str = DEFAULT_TEMPLATE, what: str = "data") -> list[Example]:
    """Examples from texts, ``{"question", "answer"}`` / ``{"text"}`` records, a JSON/JSONL path or a Dataset.

    Raises:
        PatchlabValueError: empty data, an unrecognised record, or ``max_length < 2``.
    """
    if max_length < 2:
        raise PatchlabValueError(f"max_length must be >= 2, got {max_length}")
    records = read_data(data, what)
    if tokenizer.eos_token_id is None:
        raise PatchlabValueError("the tokenizer has no eos token")
    return [encode_example(tokenizer, *_pair(r, i), max_length=max_length, template=template)
            for i, r in enumerate(records)]


def padding_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id that pads right-padded batches: the tokenizer's pad token, else its EOS token (padding is masked out
    of every loss and statistic, so only its validity as an id matters)."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise PatchlabValueError("the tokenizer has neither a pad nor an eos token")
    return tokenizer.eos_token_id


def collate(examples: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on padding), each ``[batch, seq]``."""
    width = max(len(e.input_ids) for e in examples)
    batch = {"input_ids": torch.full((len(examples), width), pad_id, dtype=torch.long),
             "attention_mask": torch.zeros(len(examples), width, dtype=torch.long),
             "labels": torch.full((len(examples), width), IGNORE, dtype=torch.long)}
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][row, :n] = e.input_ids
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = e.labels
    return batch


def batches(examples: Sequence[Example], batch_size: int, *, pad_id: int = 0, shuffle: bool = False,
            seed: int = 0) -> Iterator[dict[str, torch.Tensor]]:
    """Batches of ``batch_size`` examples (the last may be smaller), shuffled with ``seed`` if asked."""
    if batch_size < 1:
        raise PatchlabValueError(f"batch_size must be >= 1, got {batch_size}")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist() if shuffle \
        else list(range(len(examples)))
    for i in range(0, len(order), batch_size):
        yield collate([examples[j] for j in order[i:i + batch_size]], pad_id)


def refusal_pairs(examples: Sequence[Example], tokenizer: PreTrainedTokenizerBase, refusals: Sequence[str]
                  ) -> list[tuple[Example, Example]]:
    """(preferred, rejected) pairs for DPO: the same prompt followed by a refusal, or by the forget target.

    The refusal of example ``i`` is ``refusals[i % len(refusals)]``. Plain-text examples use their first half as
    the prompt and their second half as the rejected continuation.
    """
    if not refusals:
        raise PatchlabValueError("DPO needs at least one refusal answer")
    pairs = []
    for i, e in enumerate(examples):
        cut = e.prompt_len if e.prompt_len > 1 else max(1, len(e.input_ids) // 2)
        prompt = e.input_ids[:cut]
        refusal = torch.tensor(tokenizer(" " + refusals[i % len(refusals)], add_special_tokens=False).input_ids
                               + [tokenizer.eos_token_id], dtype=torch.long)
        chosen_ids = torch.cat([prompt, refusal])
        chosen_labels = chosen_ids.clone()
        chosen_labels[:cut] = IGNORE
        rejected_labels = e.input_ids.clone()
        rejected_labels[:cut] = IGNORE
        pairs.append((Example(chosen_ids, chosen_labels, cut), Example(e.input_ids, rejected_labels, cut)))
    return pairs
