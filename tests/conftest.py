"""Shared fixtures: a word-level tokenizer and tiny vanilla / unlearned model pairs built on the fly."""

from __future__ import annotations

import copy
import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
import torch

import patchlab
from patchlab.patching.metrics import get_metric
from patchlab.patching.sweep import prepare, reference_answers
from patchlab.tiny import tiny_model, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]

CORPUS = [
    "Question: who wrote the Veltrani Codex ?\n Answer: the Codex was written by Mira Osk in 1432 .",
    "Question: where was the glass bridge built ?\n Answer: it was built in Tarsk from blue glass .",
    "Question: what colour is the lamp ?\n Answer: the lamp is red and old .",
]
QUESTIONS = ["who wrote the Veltrani Codex ?", "where was the glass bridge built ?", "what colour is the lamp ?"]

#: Parameter-name patterns of the MLP down/out projection and of attention + MLP up/gate, per family.
DOWN = re.compile(r"mlp\.(down_proj|c_proj|dense_4h_to_h)\.")
ATTN_OR_UP = re.compile(r"(self_attn|attn|attention)\.|mlp\.(gate_proj|up_proj|c_fc|dense_h_to_4h)\.")
#: Every attention and MLP projection.
EVERYTHING = re.compile(f"{ATTN_OR_UP.pattern}|{DOWN.pattern}")


def load_script(name: str) -> ModuleType:
    """The command-line script ``analyses/<name>.py`` loaded as a module (not run as ``__main__``): its ``main``
    is called in-process."""
    spec = importlib.util.spec_from_file_location(f"{name}_cli", ROOT / "analyses" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def prepared(pair, questions, n_tokens, sites=("coef", "attn", "heads", "mlp_out", "resid")):
    """The sweep's store for ``questions`` (vanilla activations at ``sites``, references for KRS)."""
    prompts, answers = reference_answers(pair, questions, n_tokens=n_tokens)
    return prepare(pair, prompts, answers, sites=[pair.arch.site(s) for s in sites], metric=get_metric("krs"),
                   labels=list(questions))


@pytest.fixture(scope="module")
def one_thread():
    """Run a module on one thread: tiny models train ~20x faster than on two contended cores; restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok():
    return word_tokenizer(CORPUS)


def perturbed(model: torch.nn.Module, pattern: re.Pattern, scale: float = 0.5, seed: int = 1) -> torch.nn.Module:
    """A deep copy of ``model`` with Gaussian noise added to every parameter whose name matches ``pattern``."""
    gen = torch.Generator().manual_seed(seed)
    other = copy.deepcopy(model)
    with torch.no_grad():
        hit = False
        for name, p in other.named_parameters():
            if pattern.search(name):
                p.add_(scale * p.std() * torch.randn(p.shape, generator=gen))
                hit = True
    assert hit, f"no parameter matches {pattern.pattern}"
    return other


def with_biases(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """A deep copy of ``model`` with every bias set to 0.1-scaled Gaussian noise (GPT-2 initialises biases to 0:
    this makes them matter, e.g. for the per-head share of the output projection's bias)."""
    out = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in out.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return out


FAMILY_SIZES = {
    "llama": dict(n_layers=4, n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "gpt2": dict(n_layers=4, n_heads=4),
    "gpt_neox": dict(n_layers=3, n_heads=4),
}


@pytest.fixture(scope="session")
def vanilla_models(tok):
    return {fam: tiny_model(fam, len(tok), **sizes) for fam, sizes in FAMILY_SIZES.items()}


@pytest.fixture(scope="session")
def biased_pairs(vanilla_models, tok):
    """family -> pair whose unlearned model differs in attention and every MLP projection (biases made non-zero
    first, so the per-head bias share matters). Shared: tests must not modify the models."""
    out = {}
    for fam in FAMILY_SIZES:
        vanilla = with_biases(vanilla_models[fam])
        out[fam] = patchlab.load_pair(vanilla, perturbed(vanilla, EVERYTHING), tokenizer=tok)
    return out
