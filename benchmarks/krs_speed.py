"""Loop engine vs batched engine on the same KRS sweep, timed in one run; prints both times and the ratio.

Default (the CPU target): a 6-layer LLaMA (d_model 128, GQA), 10 questions x 30 answer tokens, the four paper
components, window 5. A larger config for GPU runs, e.g.:

    python benchmarks/krs_speed.py --layers 32 --d-model 2048 --d-mlp 5504 --heads 16 --kv-heads 4 \
        --vocab 32000 --device cuda --dtype bfloat16 --batch-size 128
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

import patchlab
from patchlab.cli import DTYPES, model_kwargs, parser
from patchlab.patching.sweep import reference_answers
from patchlab.tiny import tiny_model
from transformers import PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers


def numbered_tokenizer(vocab: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words ``w4 .. w{vocab-1}`` (plus the 4 special tokens)."""
    words = {t: i for i, t in enumerate(["<pad>", "<unk>", "<bos>", "<eos>"])}
    words.update({f"w{i}": i for i in range(4, vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
                                   eos_token="<eos>")


def main() -> None:
    p = parser(__doc__)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--d-mlp", type=int, default=512)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=2000)
    p.add_argument("--questions", type=int, default=10)
    p.add_argument("--n-tokens", type=int, default=30)
    p.add_argument("--window", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    args = p.parse_args()

    tok = numbered_tokenizer(args.vocab)
    vanilla = tiny_model("llama", args.vocab, n_layers=args.layers, d_model=args.d_model, d_mlp=args.d_mlp,
                         n_heads=args.heads, n_kv_heads=args.kv_heads, max_positions=512)
    unlearned = copy.deepcopy(vanilla)
    with torch.no_grad():
        for p_ in unlearned.parameters():
            p_.add_(0.05 * p_.std() * torch.randn_like(p_))
    pair = patchlab.load_pair(vanilla, unlearned, tokenizer=tok, **model_kwargs(args))
    rng = np.random.default_rng(0)
    questions = [" ".join(f"w{i}" for i in rng.integers(4, args.vocab, size=12)) for _ in range(args.questions)]
    kw = dict(window=args.window, n_tokens=args.n_tokens, batch_size=args.batch_size, progress=False)

    patchlab.krs_sweep(pair, questions[:1], **kw)  # warm-up (kernels, nnsight tracing caches)
    start = time.perf_counter()
    _, answers = reference_answers(pair, questions, n_tokens=args.n_tokens)
    generation = time.perf_counter() - start
    times, results = {}, {}
    for engine in ("loop", "batched"):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        results[engine] = patchlab.krs_sweep(pair, questions, engine=engine, answers=answers, **kw)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        times[engine] = time.perf_counter() - start
    gap = max(float(np.abs(results["loop"].per_question[c] - results["batched"].per_question[c]).max())
              for c in results["loop"].krs)
    n_restorations = len(results["loop"].krs) * len(results["loop"].windows) * len(questions)
    answer_len = np.mean([len(tok(a).input_ids) for a in results["loop"].answers])
    print(f"model: {args.layers} layers, d_model {args.d_model}, d_mlp {args.d_mlp}, vocab {args.vocab}, "
          f"{args.dtype} on {args.device}; {len(questions)} questions x ~{answer_len:.1f} answer tokens; "
          f"{n_restorations} restorations")
    print(f"reference answers (vanilla greedy generation, shared by both engines): {generation:8.2f} s")
    print(f"loop engine sweep:    {times['loop']:8.2f} s")
    print(f"batched engine sweep: {times['batched']:8.2f} s")
    print(f"speed-up of the sweep (loop / batched): {times['loop'] / times['batched']:.1f}x; "
          f"end to end with generation: {(times['loop'] + generation) / (times['batched'] + generation):.1f}x; "
          f"max |KRS difference| {gap:.2e}")


if __name__ == "__main__":
    main()
