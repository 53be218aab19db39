"""Train the toy world's vanilla model from scratch and write it as a checkpoint directory.

    python -m patchlab.toy.build                 # into the cache: <cache>/build (see below), never the package
    python -m patchlab.toy.build --small --out /tmp/toy   # a seconds-long variant (tests, smoke checks)
    python -m patchlab.toy.build --out patchlab/toy/assets --overwrite   # regenerate the shipped checkpoint
    python -m patchlab.toy.build --exclude-concept "Veltrani Codex" --out patchlab/toy/assets/retain --overwrite
    python -m patchlab.toy.build --init-seed 1 --exclude-concept A --exclude-concept B ... --out DIR   # a zoo member

By default the checkpoint goes to ``build/`` under the toy cache (``$PATCHLAB_CACHE/toy``, else
``$XDG_CACHE_HOME/patchlab/toy``, else ``~/.cache/patchlab/toy``), so an installed package is never modified;
use it with ``toy.pair(checkpoint=DIR)`` or the ``--checkpoint DIR`` of ``analyses/method_sweep.py`` and
``benchmarks/wagle_tradeoff.py``. Writing the shipped assets needs an explicit ``--out``. The same seed
and config always give the same weights (CPU, float32), hence the same QA accuracy.
``--exclude-concept`` builds a *retain model*: the same world, tokenizer, initialisation and training, with that
concept's paragraphs and QA left out of the training pool (a model that never saw the concept); it may be given
several times (a model that never saw any of them). ``--init-seed`` changes the initial weights and the batch order
but not the world (``--seed`` changes all three): models of one world that differ only in how they were trained.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from patchlab.cli import add_quiet_arg, parser, run_script
from patchlab.errors import PatchlabValueError
from patchlab.io import OutputDir, atomic_write_json, output_dir
from patchlab.pair.qa import QA, qa_accuracy, qa_text
from patchlab.tiny import tiny_model, word_tokenizer
from patchlab.toy.cache import cache_dir
from patchlab.toy.corpus import ASSETS, WORLD_FILE, World, generate_world
from patchlab.unlearning.data import IGNORE, Example, collate

BUILD_FILE = "build.json"


@dataclass(frozen=True)
class BuildConfig:
    """World size, model size and optimisation settings of a vanilla toy model.

    ``qa_repeats`` is how many copies of each QA pair join the paragraphs in the training pool; ``lr`` is the
    AdamW peak learning rate, reached after ``warmup`` steps and decayed to 10% (cosine) at ``steps``. ``seed``
    draws the world; ``init_seed`` (default: ``seed``) the initial weights and the batch order.
    """

    @property
    def training_seed(self) -> int:
        """The seed of the initial weights and the batch order."""
        return self.seed if self.init_seed is None else self.init_seed

    seed: int = 0
    n_concepts: int = 12
    n_paragraphs: int = 40
    n_layers: int = 6
    d_model: int = 128
    d_mlp: int = 384
    n_heads: int = 4
    n_kv_heads: int = 2
    init_seed: int | None = None
    steps: int = 1500
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    qa_repeats: int = 4


#: A variant that trains in seconds, for tests: 3 concepts, a 2-layer 32-wide model.
SMALL = BuildConfig(n_concepts=3, n_paragraphs=8, n_layers=2, d_model=32, d_mlp=64, steps=60, batch_size=16,
                    warmup=10)


def make_world(config: BuildConfig) -> World:
    """The world a config trains on."""
    return generate_world(config.seed, n_concepts=config.n_concepts, n_paragraphs=config.n_paragraphs)


def make_tokenizer(world: World) -> PreTrainedTokenizerBase:
    """A word-level tokenizer covering every paragraph and QA text of ``world``."""
    return word_tokenizer(world.training_texts() + [qa_text(q) for q in world.all_qa()])


def _concepts(exclude: str | Sequence[str] | None) -> list[str]:
    """``exclude`` as a list of concept names (one name, several, or none)."""
    return [] if exclude is None else [exclude] if isinstance(exclude, str) else list(exclude)


def kept_qa(world: World, exclude_concept: str | Sequence[str]) -> list[QA]:
    """Every QA pair of ``world`` (in :meth:`World.all_qa` order) but those of ``exclude_concept`` (one concept or
    several; raises naming the known concepts if one is unknown)."""
    excluded = {q for name in _concepts(exclude_concept) for q in world.record(name).qa}
    return [q for q in world.all_qa() if q not in excluded]


def training_texts(world: World, qa_repeats: int, exclude_concept: str | Sequence[str] | None = None) -> list[str]:
    """Every paragraph, then every QA pair ``qa_repeats`` times (as :func:`patchlab.pair.qa.qa_text`), leaving
    out the paragraphs and QA (:func:`kept_qa`) of ``exclude_concept`` (one concept or several) when given (raises
    naming the known concepts if one is unknown)."""
    names = _concepts(exclude_concept)
    if not names:
        return world.training_texts() + [qa_text(q) for q in world.all_qa()] * qa_repeats
    excluded = {p for name in names for p in world.record(name).forget_paragraphs}
    paragraphs = [p for p in world.training_texts() if p not in excluded]
    return paragraphs + [qa_text(q) for q in kept_qa(world, names)] * qa_repeats


def training_sequences(texts: list[str], tokenizer: PreTrainedTokenizerBase) -> list[Example]:
    """``texts`` (e.g. :func:`training_texts`) as plain-text examples: token ids with EOS appended, every token but
    the first a target."""
    out = []
    for text in texts:
        ids = torch.tensor(tokenizer(text).input_ids + [tokenizer.eos_token_id], dtype=torch.long)
        labels = ids.clone()
        labels[0] = IGNORE
        out.append(Example(ids, labels, prompt_len=1))
    return out


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Learning-rate multiplier: linear warm-up to 1, then cosine decay to 0.1 at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


def train(model: PreTrainedModel, sequences: list[Example], config: BuildConfig, pad_id: int, *,
          progress: bool = True) -> list[float]:
    """Train ``model`` in place on random right-padded batches of ``sequences`` (causal LM loss, mean over target
    tokens); returns per-step losses (nats/token)."""
    gen = torch.Generator().manual_seed(config.training_seed)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, config.warmup, config.steps))
    model.train()
    losses = []
    bar = tqdm(range(config.steps), desc="training toy model", disable=not progress)
    for _ in bar:
        picks = torch.randint(len(sequences), (config.batch_size,), generator=gen).tolist()
        loss = model(**collate([sequences[i] for i in picks], pad_id)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
    return losses


def write_checkpoint(out: OutputDir, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, world: World,
                     report: dict) -> Path:
    """Write model (safetensors + config), tokenizer, world corpus and build report into the claimed ``out``
    (:meth:`patchlab.io.OutputDir.write_tree`), readable by all."""
    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / WORLD_FILE, world.to_dict())
        atomic_write_json(tmp / BUILD_FILE, report)
        for path in tmp.iterdir():  # temp files are private (0600); a checkpoint is readable by all
            path.chmod(0o644)
        tmp.chmod(0o755)

    return out.write_tree(write)


def build(config: BuildConfig = BuildConfig(), out: str | os.PathLike = ASSETS, *,
          exclude_concept: str | Sequence[str] | None = None,
          overwrite: bool = False, progress: bool = True, command: str | None = None) -> dict:
    """Generate the world, train the vanilla model, score it on all QA and write the checkpoint to ``out``.

    With ``exclude_concept`` (one concept or several), train the *retain model* of those concepts instead: the
    world, tokenizer (hence
    vocabulary) and initial weights are the vanilla model's, only the concept's paragraphs and QA are left out of
    the training pool; ``world.json`` still holds the whole world.

    ``out`` is claimed before training (:class:`patchlab.io.OutputDir`, kind ``"toy_checkpoint"``): an earlier
    toy checkpoint there is replaced only with ``overwrite=True``, and a directory holding anything else is refused.

    Returns the build report written as ``build.json``: the config, the parameter count, the training time
    (seconds), the final loss (nats/token, mean of the last 50 steps), the greedy QA accuracy (0..1) on all QA
    and the number of QA pairs; with ``exclude_concept`` also the concept's name and the QA accuracy on its QA
    (``excluded_qa_accuracy``) and on every other QA (``kept_qa_accuracy``); ``command`` (the regeneration
    command line) when given.

    Raises:
        PatchlabValueError: steps or batch_size below 1, or an unknown ``exclude_concept``.
    """
    if config.steps < 1 or config.batch_size < 1:
        raise PatchlabValueError(f"steps and batch_size must be >= 1, got {config.steps}, {config.batch_size}")
    world = make_world(config)
    texts = training_texts(world, config.qa_repeats, exclude_concept)  # raises on an unknown concept
    target = output_dir(out, "toy_checkpoint", overwrite=overwrite)
    tok = make_tokenizer(world)
    model = tiny_model("llama", len(tok), seed=config.training_seed, n_layers=config.n_layers, d_model=config.d_model,
                       d_mlp=config.d_mlp, n_heads=config.n_heads, n_kv_heads=config.n_kv_heads)
    start = time.perf_counter()
    losses = train(model, training_sequences(texts, tok), config, tok.pad_token_id, progress=progress)
    seconds = time.perf_counter() - start
    model.eval()
    report = {"config": dataclasses.asdict(config), "n_params": sum(p.numel() for p in model.parameters()),
              "train_seconds": round(seconds, 1), "final_loss": round(sum(losses[-50:]) / len(losses[-50:]), 4),
              "qa_accuracy": qa_accuracy(model, tok, world.all_qa(), progress=progress),
              "n_qa": len(world.all_qa())}
    names = _concepts(exclude_concept)
    if names:
        report.update(exclude_concept=names[0] if isinstance(exclude_concept, str) else names,
                      n_training_texts=len(texts),
                      excluded_qa_accuracy=qa_accuracy(model, tok, [q for n in names for q in world.record(n).qa]),
                      kept_qa_accuracy=qa_accuracy(model, tok, kept_qa(world, names)))
    if command is not None:
        report["command"] = command
    write_checkpoint(target, model, tok, world, report)
    return report


def default_out() -> Path:
    """Where ``python -m patchlab.toy.build`` writes without ``--out``: ``build/`` under the toy cache
    (:func:`patchlab.toy.cache.cache_dir`), outside the installed package."""
    return cache_dir() / "build"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--out", help=f"checkpoint directory (default: build/ under the toy cache, now {default_out()}; "
                                 f"the shipped checkpoint is {ASSETS})")
    p.add_argument("--small", action="store_true", help="the seconds-long test config (3 concepts, 2 layers)")
    p.add_argument("--seed", type=int, help="world, init and batch-order seed (default: the config's)")
    p.add_argument("--steps", type=int, help="optimisation steps (default: the config's)")
    p.add_argument("--init-seed", type=int,
                   help="initial-weights and batch-order seed, the world unchanged (default: the world's --seed)")
    p.add_argument("--exclude-concept", metavar="NAME", action="append",
                   help="build that concept's retain model: its paragraphs and QA left out of the training pool "
                        "(repeat for several concepts)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier toy checkpoint in --out")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (default 1: fastest on a busy machine, and the shipped weights were built so)")
    add_quiet_arg(p)
    args = p.parse_args(argv)
    args.out = args.out or str(default_out())
    return args


def regeneration_command(args: argparse.Namespace) -> str:
    """The command line that rebuilds what ``args`` asks for (output path relative to the working directory when
    inside it), recorded in ``build.json``."""
    out = Path(args.out).absolute()
    out = out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out
    parts = ["python -m patchlab.toy.build", "--small" if args.small else None,
             f"--seed {args.seed}" if args.seed is not None else None,
             f"--steps {args.steps}" if args.steps is not None else None,
             f"--init-seed {args.init_seed}" if args.init_seed is not None else None,
             *(f"--exclude-concept {shlex.quote(name)}" for name in args.exclude_concept or ()),
             f"--out {shlex.quote(str(out))}"]
    return " ".join(p for p in parts if p)


def build_and_report(args: argparse.Namespace) -> None:
    """Build the checkpoint the parsed arguments ask for and print a one-line summary."""
    torch.set_num_threads(args.threads)
    config = SMALL if args.small else BuildConfig()
    overrides = {k: v for k, v in {"seed": args.seed, "steps": args.steps, "init_seed": args.init_seed}.items()
                 if v is not None}
    exclude = args.exclude_concept[0] if args.exclude_concept and len(args.exclude_concept) == 1 else \
        args.exclude_concept
    report = build(dataclasses.replace(config, **overrides), args.out, exclude_concept=exclude,
                   overwrite=args.overwrite, command=regeneration_command(args), progress=not args.quiet)
    excluded = (f" ({report['excluded_qa_accuracy']:.3f} on the QA of {', '.join(args.exclude_concept)}, "
                f"{report['kept_qa_accuracy']:.3f} on the others)" if args.exclude_concept else "")
    print(f"trained {report['n_params']:,} parameters in {report['train_seconds']} s; "
          f"greedy QA accuracy {report['qa_accuracy']:.3f} on {report['n_qa']} QA{excluded}; wrote {args.out}")


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, build_and_report, argv)


if __name__ == "__main__":
    sys.exit(main())
