"""Tiny models and word-level tokenizers built from scratch, for tests, benchmarks and the toy world.

Nothing here downloads anything: the tokenizer is built with the ``tokenizers`` library from a
list of texts, the model from a ``transformers`` config with random (seeded) weights.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerFast

from patchlab.defaults import SHAPES
from patchlab.errors import PatchlabValueError

SPECIAL_TOKENS = ("<pad>", "<unk>", "<bos>", "<eos>")

#: Families :func:`tiny_model` can build, mapped to the config keys that differ from LLaMA's.
_GPT2_KEYS = {"hidden_size": "n_embd", "num_hidden_layers": "n_layer", "num_attention_heads": "n_head",
              "intermediate_size": "n_inner", "max_position_embeddings": "n_positions"}
TINY_FAMILIES = ("llama", "mistral", "qwen2", "gemma", "olmo", "olmo2", "gpt2", "gpt_neox")

_WORD = re.compile(r"\w+|[^\w\s]")


def word_tokenizer(texts: Iterable[str], *, lowercase: bool = False) -> PreTrainedTokenizerFast:
    """A word-level tokenizer whose vocabulary is every word and punctuation mark in ``texts``.

    Special tokens ``<pad> <unk> <bos> <eos>`` take ids 0-3; other ids follow in sorted order,
    so the same texts always give the same ids. Decoding joins words with single spaces.
    """
    words = sorted({w.lower() if lowercase else w for t in texts for w in _WORD.findall(t)})
    if not words:
        raise PatchlabValueError("word_tokenizer: the texts contain no word")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({w: i + len(SPECIAL_TOKENS) for i, w in enumerate(words)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    if lowercase:
        tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<bos>", eos_token="<eos>")


def numbered_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words ``w4 .. w{vocab_size-1}`` (ids 4..) after the 4 special tokens: random
    "text" for benchmarks on random models of any vocabulary size."""
    if vocab_size <= len(SPECIAL_TOKENS):
        raise PatchlabValueError(f"vocab_size must exceed {len(SPECIAL_TOKENS)}, got {vocab_size}")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIAL_TOKENS), vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def random_questions(vocab_size: int, n: int, *, words: int = 12, seed: int = 0) -> list[str]:
    """``n`` random "questions" of ``words`` words each for a :func:`numbered_tokenizer` of ``vocab_size``: word ids
    drawn uniformly from ``4 .. vocab_size-1`` (never a special token) by ``numpy.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{i}" for i in rng.integers(len(SPECIAL_TOKENS), vocab_size, size=words)) for _ in range(n)]


def tiny_config(family: str, vocab_size: int, *, n_layers: int = 4, d_model: int = 32, d_mlp: int = 64,
                n_heads: int = 4, n_kv_heads: int | None = None, max_positions: int = 128,
                tie_embeddings: bool = False, **extra):
    """A ``transformers`` config of ``family`` with the given sizes (LLaMA key names, mapped per family)."""
    if family not in TINY_FAMILIES:
        raise PatchlabValueError(f"tiny_config: unknown family {family!r}; choose from {TINY_FAMILIES}")
    kw = dict(hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
              intermediate_size=d_mlp, max_position_embeddings=max_positions)
    if family == "gpt2":
        kw = {_GPT2_KEYS[k]: v for k, v in kw.items()}
        kw.update(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family != "gpt_neox":
        kw["num_key_value_heads"] = n_kv_heads or n_heads
    if family == "gemma":
        kw["head_dim"] = d_model // n_heads
    kw.update(vocab_size=vocab_size, tie_word_embeddings=tie_embeddings, bos_token_id=2, eos_token_id=3,
              pad_token_id=0, **extra)
    return AutoConfig.for_model(family, **kw)


def shape_config(shape: str, *, max_positions: int = 512, **overrides: int):
    """The LLaMA config of benchmark shape ``shape`` (:data:`patchlab.defaults.SHAPES`), with ``overrides`` of its sizes.

    Raises:
        PatchlabValueError: an unknown shape or size name.
    """
    if shape not in SHAPES:
        raise PatchlabValueError(f"unknown shape {shape!r}; choose from {', '.join(SHAPES)}")
    sizes = dict(SHAPES[shape])
    unknown = set(overrides) - set(sizes)
    if unknown:
        raise PatchlabValueError(f"unknown size {sorted(unknown)}; the shapes have {', '.join(sizes)}")
    sizes.update({k: v for k, v in overrides.items() if v is not None})
    vocab = sizes.pop("vocab")
    return tiny_config("llama", vocab, max_positions=max_positions, **sizes)


def tiny_model(family: str, vocab_size: int, *, seed: int = 0, **sizes) -> PreTrainedModel:
    """A randomly initialised causal LM of ``family`` (see :func:`tiny_config`), in eval mode, float32."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(family, vocab_size, **sizes), dtype=torch.float32)
    return model.eval()


def noisy_pair(config, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               noise: float = 0.05, seed: int = 0) -> tuple[PreTrainedModel, PreTrainedModel]:
    """A random causal LM of ``config`` (``torch.manual_seed(seed)``) built directly on ``device`` in ``dtype``, in
    eval mode, and a copy of it with Gaussian noise added to every tensor (standard deviation ``noise`` times the
    tensor's own): a stand-in vanilla / unlearned pair for benchmarks."""
    torch.manual_seed(seed)
    with torch.device(device):
        vanilla = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    unlearned = copy.deepcopy(vanilla)
    with torch.no_grad():
        for p in unlearned.parameters():
            p.add_(noise * p.float().std().to(p.dtype) * torch.randn_like(p))
    return vanilla, unlearned
