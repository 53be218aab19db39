"""Each audit probe's cost in forward-pass equivalents of the pair, measured in one run: the probe's wall time as the
audit runs it, against the least work the probe must do, priced in unit costs measured in the same run on the same
pair. The ratio (measured / ideal) holds on any machine; target <= 1.3 for every probe.

    python benchmarks/probe_cost.py                                   # the toy world's audit case (CPU, seconds)
    python benchmarks/probe_cost.py --probes relearning,quantization --out results/probe_cost.json
    python benchmarks/probe_cost.py --vanilla HUB_ID --unlearned CKPT --retain RETAIN --questions target.jsonl \\
        --unrelated unrelated.jsonl --device cuda --dtype bfloat16

Times are this process's CPU time when the pair is on the CPU (steady while other jobs share the machine), else
wall time with CUDA synchronised. Units (seconds each, medians of --repeats timings, on the vanilla model unless
said):

* forward: one no-grad forward pass of one question's prompt + vanilla answer, unpadded (the probes score each
  question alone, so the numbers do not depend on padding); it also prices a generation's prompt pass;
* token:   one greedy generation step of one question (one new token over its KV cache);
* decode:  one logit-lens read-out of one question at one layer (final norm, unembedding, log-softmax, ranks);
* row:     one row of a batched patching pass over every layer (a plain batched forward of UDS ``batch_size``
  question sequences of the unlearned model, divided by that number);
* train:   one relearning step (forward, backward and AdamW step on one batch of ``batch_size`` QA examples);
* copy:    one deep copy of the model;
* quantize@b, forward@b, token@b: copying and quantizing the model to b bits, and the quantized model's forward and
  token step (the quantization probe's scoring runs on quantized models).

Required work, counted from each probe's settings (questions Q, layers L, windows, components, steps, widths):

* scoring a model on questions I (accuracy and log-probability): per question one teacher-forced forward, and a
  greedy generation (a prompt forward, then one token step per answer token after the first), the answer lengths
  being that model's own, measured here with the probe's budget (relearned copies priced at the unlearned model's,
  retain-model copies at the retain model's, quantized models at their full-precision model's);
* baseline (shared by every probe of an audited pair; its own row): the vanilla reference generation (n_tokens)
  and scoring the vanilla and the unlearned model;
* krs: a caching forward per question of each model, then Q x components x windows rows, each from its window's
  first layer up ((L - first) / L of a row); logit_lens: per model (vanilla, unlearned, retain) a forward and L
  decodes per question; uds: 3 caching forwards per question, then 2 x Q x L rows (layer l: (L - l) / L of a row);
* relearning: per fine-tuned copy (held-out, false-answer control, retain control: two halves each; benign: one) a
  copy, max(steps) training steps and a scoring of its evaluated questions at every step count (0 included: a
  half's correctness budget is its own longest answer's, so the full-set scores do not stand in for it); the
  control's and the retain model's starting scorings; the unrelated questions' references (vanilla generation of
  n_tokens);
* quantization: per width, two quantized copies and their scorings; behavior: greedy answers (n_tokens) of both
  models to the target and unrelated questions.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from patchlab.cli import add_model_args, comma_list, output_file, parser, print_written, run
from patchlab.cli_pairs import add_pair_args, check_checkpoint_flags, check_toy_world_flags

if TYPE_CHECKING:
    import torch

    from patchlab.probes import AuditCase


def parse_args(argv: list[str] | None = None) -> Any:
    p = parser(__doc__)
    add_pair_args(p, placement=False)
    p.add_argument("--retain", help="retain checkpoint (with --vanilla; uds and the relearning control need one)")
    p.add_argument("--questions", help="JSON/JSONL target questions (with --vanilla)")
    p.add_argument("--unrelated", help="JSON/JSONL unrelated questions (with --vanilla)")
    p.add_argument("--probes", help="comma-separated probes (default: all of patchlab.probes.PROBES)")
    p.add_argument("--repeats", type=int, default=5, help="timings per unit cost, median kept (default 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as analyses/audit.py)")
    p.add_argument("--out", help="also write the table and the unit costs to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace --out")
    add_model_args(p)
    return p.parse_args(argv)


def clock(device: Any) -> Callable[[], float]:
    """The clock of a run on ``device``: this process's CPU time on the CPU (steady on a machine other jobs share;
    threads summed), else wall time with CUDA synchronised before each reading."""
    import torch

    if torch.device(device).type == "cpu":
        return time.process_time

    def wall() -> float:
        torch.cuda.synchronize()
        return time.perf_counter()

    return wall


def median_time(fn: Callable[[], Any], repeats: int, now: Callable[[], float]) -> float:
    """The median time of ``fn()`` (s, on the clock ``now``) over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = now()
        fn()
        times.append(now() - start)
    return statistics.median(times)


def audit_case(args: Any) -> AuditCase:
    """The toy world's audit case, or the checkpoints' (flags checked as ``analyses/audit.py`` checks them)."""
    import patchlab
    from patchlab.cli import model_kwargs
    from patchlab.io import read_records
    from patchlab.pair import load_model
    from patchlab.probes import AuditCase

    if args.vanilla is None:
        check_toy_world_flags(args)
        if args.unlearned or args.questions or args.unrelated:
            raise patchlab.PatchlabValueError("--unlearned, --questions and --unrelated need --vanilla")
        from patchlab.cli_pairs import toy_model_kwargs
        from patchlab.toy.audit import toy_cases

        return toy_cases(progress=False, **toy_model_kwargs(args))[0]
    check_checkpoint_flags(args)
    if not (args.unlearned and args.questions):
        raise patchlab.PatchlabValueError("--vanilla needs --unlearned and --questions")
    kwargs = model_kwargs(args)
    pair = patchlab.load_pair(args.vanilla, args.unlearned, tokenizer=args.tokenizer,
                              adapter_base=args.adapter_base, **kwargs)
    return AuditCase("unlearned", pair, read_records(args.questions),
                     read_records(args.unrelated) if args.unrelated else None,
                     load_model(args.retain, **kwargs) if args.retain else None)


class Costs:
    """The unit costs of one pair (module docstring), measured on the audited questions, and the answer lengths each
    model generates, from which the required work of every probe is priced."""

    def __init__(self, case: AuditCase, settings: Mapping[str, Mapping[str, Any]], repeats: int) -> None:
        from patchlab.pair.generation import resolve_template
        from patchlab.probes.registry import probe_settings
        from patchlab.probes.scoring import references

        self.case, self.settings, self.repeats, self.now = case, settings, repeats, clock(case.pair.device)
        common = probe_settings(settings, "common")
        self.common = {**common, "template": resolve_template(common["template"], case.pair.tokenizer)}
        self.refs = references(case.pair.vanilla_hf, case.pair.tokenizer, case.questions, self.common)
        self.units: dict[str, float] = {}
        self.lengths: dict[tuple[str, str, int], list[int]] = {}

    # ------------------------------------------------------------------------------------------ answer lengths
    def models(self) -> dict[str, Any]:
        case = self.case
        return {"vanilla": case.pair.vanilla_hf, "unlearned": case.pair.unlearned_hf,
                **({"retain": case.retain} if case.retain is not None else {})}

    def answer_lengths(self, who: str, which: str, budget: int | tuple[int, ...]) -> list[int]:
        """The lengths (tokens) of model ``who``'s greedy answers to the ``which`` (target / unrelated) questions
        with at most ``budget`` tokens (one for all, or one per question), generated once and kept."""
        from patchlab.pair.generation import greedy_answers

        key = (who, which, budget)
        if key not in self.lengths:
            questions = self.case.questions if which == "target" else self.case.unrelated
            _, answers = greedy_answers(self.models()[who], self.case.pair.tokenizer, [q.question for q in questions],
                                        max_new_tokens=budget, template=self.common["template"])
            self.lengths[key] = [len(a) for a in answers]
        return self.lengths[key]

    def correctness_budgets(self) -> tuple[int, ...]:
        """The per-question generation budgets of a correctness check (:func:`patchlab.pair.qa.answers_correct`)."""
        from patchlab.pair.qa import correctness_budgets

        return tuple(correctness_budgets(self.case.pair.tokenizer, self.refs.qa()))

    def generation(self, who: str, which: str, budget: int | tuple[int, ...], idx: Sequence[int] | None = None,
                   suffix: str = "") -> Counter:
        """The work of ``who``'s greedy answers (a prompt forward, then a token step per answer token after the
        first) to the questions ``idx`` (default all) of ``which``; ``suffix`` names quantized units."""
        lengths = self.answer_lengths(who, which, budget)
        idx = range(len(lengths)) if idx is None else idx
        return Counter({f"forward{suffix}": len(idx), f"token{suffix}": sum(lengths[i] - 1 for i in idx)})

    def scoring(self, who: str, idx: Sequence[int] | None = None, suffix: str = "") -> Counter:
        """The work of scoring ``who`` on the target questions ``idx`` (default all): a teacher-forced forward and a
        correctness generation per question."""
        idx = range(len(self.case.questions)) if idx is None else idx
        return self.generation(who, "target", self.correctness_budgets(), idx, suffix) + \
            Counter({f"forward{suffix}": len(idx)})

    # ------------------------------------------------------------------------------------------ unit costs
    def measure(self, names: set[str]) -> None:
        """Measure the units among ``names`` not measured yet."""
        for name in sorted(names - self.units.keys()):
            self.units[name] = self.unit(name)

    def unit(self, name: str) -> float:
        import torch

        pair, refs = self.case.pair, self.refs
        unit, _, bits = name.partition("@")
        if unit == "quantize":
            return median_time(lambda: self.quantized(int(bits)), self.repeats, self.now)
        model = self.quantized(int(bits)) if bits else pair.vanilla_hf
        device = pair.device
        sequences = [torch.cat([p, a]).to(device)[None] for p, a in zip(refs.prompt_ids, refs.answer_ids)]
        with torch.no_grad():
            if unit == "forward":
                return statistics.median(median_time(lambda s=s: model(input_ids=s), self.repeats, self.now)
                                         for s in sequences)
            if unit == "token":
                return statistics.median(self.token_step(model, s) for s in sequences)
            if unit == "decode":
                return self.decode_unit()
            if unit == "row":
                return self.row_unit()
        if unit == "train":
            return self.train_unit()
        if unit == "copy":
            return median_time(lambda: copy.deepcopy(pair.unlearned_hf), self.repeats, self.now)
        raise KeyError(name)

    def quantized(self, bits: int) -> Any:
        from patchlab.probes import PROBES
        from patchlab.probes.quantization import quantized, resolve_quantizer
        from patchlab.probes.registry import probe_settings

        own = probe_settings(self.settings, PROBES["quantization"].name)
        return quantized(self.case.pair.vanilla_hf, bits, resolve_quantizer(own, own["bits"]))

    def token_step(self, model: Any, sequence: torch.Tensor) -> float:
        """The median time of one greedy step of ``sequence`` (batch 1) over its KV cache."""
        import inspect

        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        state = {"out": model(input_ids=sequence, use_cache=True)}

        def step() -> None:
            out = state["out"]
            state["out"] = model(input_ids=out.logits[:, -1:].argmax(-1), use_cache=True, **{key: out[key]})

        return median_time(step, self.repeats, self.now)

    def decode_unit(self) -> float:
        import torch

        from patchlab.probes.logit_lens import decode, read_answer

        pair, refs = self.case.pair, self.refs
        model = pair.vanilla_hf
        width = model.get_input_embeddings().weight.shape[1]
        times = []
        for answer in refs.answer_ids:
            hidden = torch.randn(len(answer), width, dtype=model.dtype, device=pair.device)
            times.append(median_time(lambda: read_answer(decode(model, pair.arch, hidden), answer), self.repeats,
                                     self.now))
        return statistics.median(times)

    def row_unit(self) -> float:
        import torch

        from patchlab.probes import PROBES
        from patchlab.probes.registry import probe_settings

        pair, refs = self.case.pair, self.refs
        batch = probe_settings(self.settings, PROBES["uds"].name)["batch_size"]
        sequences = [torch.cat([p, a]) for p, a in zip(refs.prompt_ids, refs.answer_ids)]
        rows = [sequences[i % len(sequences)] for i in range(batch)]
        ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True).to(pair.device)
        mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True).to(pair.device)
        return median_time(lambda: pair.unlearned_hf(input_ids=ids, attention_mask=mask), self.repeats,
                           self.now) / batch

    def train_unit(self) -> float:
        import torch

        from patchlab.probes import PROBES
        from patchlab.probes.registry import probe_settings
        from patchlab.probes.relearning import batch_stream
        from patchlab.unlearning import nll

        own = probe_settings(self.settings, PROBES["relearning"].name)
        model = copy.deepcopy(self.case.pair.unlearned_hf)
        optimizer = torch.optim.AdamW(model.parameters(), lr=own["lr"], weight_decay=0.0)
        stream = batch_stream(self.refs.records(), self.case.pair.tokenizer, own)
        model.train()

        def step() -> None:
            loss = nll(model, next(stream))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        return median_time(step, self.repeats, self.now)

    # ------------------------------------------------------------------------------------------ required work
    def baseline_work(self) -> Counter:
        """The shared baseline: vanilla references, vanilla and unlearned scorings."""
        n_tokens = self.common["n_tokens"]
        return self.generation("vanilla", "target", n_tokens) + self.scoring("vanilla") + self.scoring("unlearned")

    def work(self, probe: str) -> Counter:
        """The least work of ``probe`` on this case, in units (module docstring)."""
        from patchlab.probes.registry import probe_settings

        return getattr(self, f"work_{probe}")(probe_settings(self.settings, probe))

    def work_krs(self, own: Mapping[str, Any]) -> Counter:
        from patchlab.patching.sweep import resolve_windows

        q, n_layers = len(self.case.questions), self.case.pair.n_layers
        windows = resolve_windows(self.case.pair, own["window"], window_mode=own["window_mode"])
        rows = q * len(own["components"]) * sum((n_layers - start) / n_layers for start, _ in windows)
        return Counter({"forward": 2 * q, "row": rows})

    def work_logit_lens(self, own: Mapping[str, Any]) -> Counter:
        q, models = len(self.case.questions), len(self.models())
        return Counter({"forward": models * q, "decode": models * q * self.case.pair.n_layers})

    def work_uds(self, own: Mapping[str, Any]) -> Counter:
        q, n_layers = len(self.case.questions), self.case.pair.n_layers
        return Counter({"forward": 3 * q, "row": 2 * q * sum((n_layers - layer) / n_layers for layer in
                                                             range(n_layers))})

    def work_relearning(self, own: Mapping[str, Any]) -> Counter:
        from patchlab.probes.relearning import answer_halves, check_settings

        steps = check_settings(own)
        halves = answer_halves(self.refs.expected, own["seed"])
        curves = [("unlearned", half) for half in halves] * (2 if own["false_control"] else 1)
        work = Counter()
        if own["false_control"]:
            work += self.scoring("unlearned")
        if self.case.unrelated is not None:
            curves.append(("unlearned", None))
            work += self.generation("vanilla", "unrelated", self.common["n_tokens"])
        if self.case.retain is not None:
            curves += [("retain", half) for half in halves]
            work += self.scoring("retain")
        for who, held in curves:
            work += Counter({"copy": 1, "train": max(steps)})
            for _ in steps:
                work += self.scoring(who, held)
        return work

    def work_quantization(self, own: Mapping[str, Any]) -> Counter:
        from patchlab.probes.quantization import check_bits

        work = Counter()
        for bits in check_bits(own):
            work += Counter({f"quantize@{bits}": 2})
            work += self.scoring("unlearned", suffix=f"@{bits}") + self.scoring("vanilla", suffix=f"@{bits}")
        return work

    def work_behavior(self, own: Mapping[str, Any]) -> Counter:
        n_tokens = own["n_tokens"]
        return sum((self.generation(who, which, n_tokens) for who in ("vanilla", "unlearned")
                    for which in ("target", "unrelated")), Counter())

    def ideal(self, work: Counter) -> float:
        """The seconds ``work`` costs at the measured unit costs."""
        self.measure(set(work))
        return sum(count * self.units[name] for name, count in work.items())


def probe_table(case: AuditCase, names: Sequence[str], settings: Mapping[str, Mapping[str, Any]],
                repeats: int) -> tuple[list[dict[str, Any]], dict[str, float]]:
    """Per probe (and the shared baseline): its required work, measured and ideal seconds and their ratio; the
    probes run as the audit runs them (one case, shared baselines, each timed alone after the baseline)."""
    from patchlab.pair.generation import resolve_template
    from patchlab.probes import PROBES
    from patchlab.probes.registry import probe_settings
    from patchlab.probes.scoring import Baselines

    costs = Costs(case, settings, repeats)
    rows = []

    def row(name: str, seconds: float, work: Callable[[], Counter]) -> None:
        work = work()
        ideal = costs.ideal(work)
        rows.append({"probe": name, "work": {k: round(v, 2) for k, v in sorted(work.items())},
                     "measured_s": seconds, "ideal_s": ideal, "ratio": seconds / ideal})

    baselines = Baselines()
    start = costs.now()
    baselines.get(case.pair, case.questions, costs.common)
    row("baseline", costs.now() - start, costs.baseline_work)
    for name in names:
        own = probe_settings(settings, name)
        own["template"] = resolve_template(own["template"], case.pair.tokenizer)
        start = costs.now()
        PROBES[name].run(case.pair, case.questions, unrelated=case.unrelated, retain=case.retain, settings=own,
                         progress=False, baselines=baselines)
        row(name, costs.now() - start, lambda name=name: costs.work(name))
    return rows, costs.units


def report(args: Any) -> None:
    """Measure and print the table (module docstring); write it to --out when given."""
    import torch

    import patchlab
    from patchlab.io import atomic_write_json
    from patchlab.probes import PROBES, resolve_settings
    from patchlab.probes.registry import select

    if args.repeats < 1 or args.threads < 1:
        raise patchlab.PatchlabValueError("--repeats and --threads must be >= 1")
    out = output_file(args.out, overwrite=args.overwrite) if args.out else None
    torch.set_num_threads(args.threads)
    names = [p.name for p in select(comma_list(args.probes))]
    settings = {}
    if args.vanilla is None:
        from patchlab.toy.audit import TOY_SETTINGS

        settings = TOY_SETTINGS
    resolved = resolve_settings(list(PROBES.values()), settings)
    case = audit_case(args)
    names = [n for n in names if not case.missing(PROBES[n])]
    rows, units = probe_table(case, names, resolved, args.repeats)
    print(f"{len(case.questions)} target questions, {case.pair.n_layers} layers; unit costs (ms): " +
          ", ".join(f"{k} {v * 1e3:.2f}" for k, v in sorted(units.items())))
    print(f"{'probe':<13} {'measured s':>10} {'ideal s':>9} {'ratio':>6}  required work (units)")
    for r in rows:
        work = ", ".join(f"{k} {v:g}" for k, v in r["work"].items())
        print(f"{r['probe']:<13} {r['measured_s']:10.2f} {r['ideal_s']:9.2f} {r['ratio']:6.2f}  {work}")
    if out is not None:
        atomic_write_json(out, {"units_s": units, "probes": rows})
        print_written([out])


def main(argv: list[str] | None = None) -> int:
    return run(lambda: report(parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
