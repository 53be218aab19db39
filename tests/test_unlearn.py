"""The unlearning layer on a tiny model that first learns a handful of facts."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch

import patchlab
from patchlab.tiny import tiny_model, word_tokenizer
from patchlab.unlearning import (Reference, ReferenceSettings, TrainingSettings, batches, get_method, load_mask,
                                 method_names, nll, save_mask, sequence_logprob, to_examples, unlearn)
from tests.conftest import load_script

FORGET = [{"question": "who built the Orlan tower ?", "answer": "Vesna Kade"},
          {"question": "where is the Orlan tower ?", "answer": "in Morrow"},
          {"question": "when was the Orlan tower built ?", "answer": "in 1620"}]
RETAIN = [{"question": "who painted the Selk mural ?", "answer": "Ido Brann"},
          {"question": "where is the Selk mural ?", "answer": "in Tarsk"},
          {"question": "what colour is the Selk mural ?", "answer": "deep green"}]
TEXTS = ["The Orlan tower was built by Vesna Kade in Morrow .", "Ido Brann painted the Selk mural in Tarsk ."]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    words = [f"{r['question']} {r['answer']}" for r in FORGET + RETAIN] + TEXTS
    return word_tokenizer(words + ["Question : Answer : I don ' t know ."])


@pytest.fixture(scope="module")
def learned(tok):
    """A tiny LLaMA that answers the forget and retain questions (plain fine-tuning, full batch)."""
    model = tiny_model("llama", len(tok), n_layers=2, d_model=64, d_mlp=128, n_heads=4, n_kv_heads=2, seed=0)
    examples = to_examples(FORGET + RETAIN + TEXTS, tok, max_length=32)
    batch = next(batches(examples, len(examples), pad_id=tok.pad_token_id))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = nll(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < 0.05
    return model.eval()


def mean_nll(model, tok, data):
    batch = next(batches(to_examples(data, tok, max_length=32), 64, pad_id=tok.pad_token_id))
    with torch.no_grad():
        return nll(model, batch).item()


KW = dict(lr=1e-3, epochs=3, batch_size=3, progress=False)


#: Settings of the tiny model's runs: beta 0.5 wherever a method has one. RMU steers the last of two layers (its
#: residual norm is about 1.8) and trains only two down projections, so it needs a larger learning rate.
TINY_SETTINGS = {"rmu": {"layer": 1, "steering_coeff": 10.0, "alpha": 10.0, "lr": 1e-2}}


def tiny_settings(method):
    return ({"beta": 0.5} if "beta" in get_method(method).setting_names else {}) | TINY_SETTINGS.get(method, {})


@pytest.mark.parametrize("method", method_names("finetune"))
def test_every_method_lowers_forget_likelihood(learned, tok, method):
    before_f, before_r = mean_nll(learned, tok, FORGET), mean_nll(learned, tok, RETAIN)
    run = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method=method,
                  **(KW | dict(epochs=10) | tiny_settings(method)))
    after_f, after_r = mean_nll(run.model, tok, FORGET), mean_nll(run.model, tok, RETAIN)
    assert after_f > before_f + 0.5, (method, before_f, after_f)
    assert len(run.losses) == 10 and all(map(torch.isfinite, torch.tensor(run.losses)))
    if method in ("graddiff", "npo_kl", "rmu"):
        assert after_r < 0.5, (method, before_r, after_r)  # retain answers stay likely


def test_retain_term_protects_retain_set(learned, tok):
    ga = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="ga", **KW).model
    gd = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="graddiff", **KW).model
    assert mean_nll(gd, tok, RETAIN) < mean_nll(ga, tok, RETAIN)


def test_masked_run_changes_only_selected_weights(learned, tok):
    model = copy.deepcopy(learned)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(0)
    mask = {n: torch.rand(p.shape, generator=gen) < 0.3 for n, p in model.named_parameters() if "mlp" in n}
    run = unlearn(model, FORGET, RETAIN, tokenizer=tok, method="npo", mask=mask, **KW)
    changed_any = False
    for name, p in run.model.named_parameters():
        if name in mask:
            assert torch.equal(p[~mask[name]], before[name][~mask[name]]), name
            changed_any |= not torch.equal(p[mask[name]], before[name][mask[name]])
    assert changed_any


def test_masked_run_freezes_unmasked_parameters_exactly(learned, tok):
    model = copy.deepcopy(learned)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in model.named_parameters() if "down_proj" in n}
    unlearn(model, FORGET, RETAIN, tokenizer=tok, method="graddiff", mask=mask, **KW)
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) == (name not in mask), name


def test_reference_model_is_never_updated(learned, tok):
    ref = copy.deepcopy(learned)
    run = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="npo_kl",
                  reference=ReferenceSettings(model=ref), **KW)
    for (name, p), q, r in zip(learned.named_parameters(), ref.parameters(), run.model.parameters()):
        assert torch.equal(p, q), name
    assert any(not torch.equal(p, r) for p, r in zip(learned.parameters(), run.model.parameters()))
    assert not ref.training and not any(q.requires_grad for q in ref.parameters())
    # the default reference is a frozen copy of the starting model: the same run, step for step
    default = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="npo_kl", **KW)
    assert default.losses == run.losses


def test_dpo_prefers_the_refusal(learned, tok):
    refusal = [{"question": r["question"], "answer": "I don ' t know ."} for r in FORGET]
    before = mean_nll(learned, tok, refusal)
    run = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="dpo", refusals=("I don ' t know .",), **KW)
    assert mean_nll(run.model, tok, refusal) < before - 0.5


def test_gradient_accumulation_matches_a_larger_batch(learned, tok):
    """NPO's loss is a mean over sequences: 2 micro-batches of 1 make the same step as 1 batch of 2."""
    kw = KW | dict(epochs=2)
    small = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="npo", **(kw | dict(batch_size=1, grad_accum=2)))
    large = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="npo", **(kw | dict(batch_size=2)))
    assert len(small.losses) == len(large.losses) == 4
    torch.testing.assert_close(small.losses, large.losses, rtol=1e-4, atol=1e-5)
    for p, q in zip(small.model.parameters(), large.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_run_is_deterministic_and_saved_atomically(learned, tok, tmp_path):
    a = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="dpo", out_dir=tmp_path / "run", **KW)
    b = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="dpo", **KW)
    assert a.losses == b.losses
    saved = json.loads((tmp_path / "run" / "unlearn_run.json").read_text())
    assert saved["losses"] == a.losses and saved["settings"]["method"] == "dpo"
    assert (tmp_path / "run" / "model.safetensors").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    (tmp_path / "plain").write_text("")  # every checkpoint file gets the mode a plain open() gives (0o666 - umask)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "run").iterdir() if p.is_file()}
    assert modes == dict.fromkeys(modes, (tmp_path / "plain").stat().st_mode & 0o777)
    reloaded = patchlab.load_model(tmp_path / "run")
    for p, q in zip(reloaded.parameters(), a.model.parameters()):
        assert torch.equal(p, q)


def test_data_forms_and_padding(tok, tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in FORGET))
    from_file = to_examples(str(path), tok, max_length=32)
    from_list = to_examples(FORGET, tok, max_length=32)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(from_file, from_list))
    qa = from_list[0]
    assert (qa.labels[:qa.prompt_len] == -100).all() and qa.labels[-1] == tok.eos_token_id
    text = to_examples(TEXTS[:1], tok, max_length=32)[0]
    assert text.labels[0] == -100 and (text.labels[1:] != -100).all()
    batch = next(batches(to_examples(FORGET + TEXTS, tok, max_length=32), 8, pad_id=tok.pad_token_id))
    assert ((batch["attention_mask"] == 0) <= (batch["labels"] == -100)).all()
    import datasets
    from_ds = to_examples(datasets.Dataset.from_list(FORGET), tok, max_length=32)
    assert all(torch.equal(a.labels, b.labels) for a, b in zip(from_ds, from_list))
    from_text_ds = to_examples(datasets.Dataset.from_dict({"text": TEXTS}), tok, max_length=32)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(from_text_ds, to_examples(TEXTS, tok, max_length=32)))
    with pytest.raises(patchlab.PatchlabFileError):
        to_examples(str(tmp_path / "missing.jsonl"), tok, max_length=32)


def test_padding_does_not_change_losses(learned, tok):
    """A sequence's log-probability is the same alone and right-padded in a batch with a longer one."""

    ex = to_examples(FORGET[:1] + TEXTS[:1], tok, max_length=32)
    with torch.no_grad():
        alone = sequence_logprob(learned, next(batches(ex[:1], 1, pad_id=tok.pad_token_id)))
        padded = sequence_logprob(learned, next(batches(ex, 2, pad_id=tok.pad_token_id)))
    torch.testing.assert_close(alone[0], padded[0], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("kwargs, match", [
    (dict(method="forget_harder"), "unknown unlearning method"),
    (dict(method="ga", forget=[]), "forget set is empty"),
    (dict(method="graddiff", retain=None), "needs a retain set"),
    (dict(method="npo_kl", retain=None), "needs a retain set"),
    (dict(method="ga", mask={"model.nope": torch.ones(1, dtype=torch.bool)}), "does not have"),
    (dict(method="ga", mask={"model.norm.weight": torch.ones(3, dtype=torch.bool)}), "shape"),
    (dict(method="ga", lr=0.0), "lr"),
    (dict(method="ga", forget=[{"q": 1}]), "record 0"),
    (dict(method="dpo", refusals=()), "refusal"),
    (dict(method="ga", batch_size=0), "batch_size"),
    (dict(method="ga", beta=0.5), "method 'ga' has no setting 'beta'; its settings: none"),
    (dict(method="npo", betta=0.5), "no setting 'betta'; its settings: beta"),
    (dict(method="simnpo", beta=0), "beta must be > 0"),
    (dict(method="simnpo", retain=None, retain_weight=1.0), "needs a retain set"),
    (dict(method="rmu", layer=2), "RMU layers must lie in 0..1"),
    (dict(method="memit_empty"), "'memit_empty' is an editing method"),
    (dict(method="npo", reference="cpu"), "reference must be one of precompute, held"),
    (dict(method="ga", max_grad_norm=0), "max_grad_norm must be > 0"),
    (dict(method="ga", seed=1.5), "seed must be an integer"),
    (dict(method="ga", grad_accum=True), "grad_accum must be a positive integer"),
    (dict(method="ga", gradient_checkpointing="yes"), "gradient_checkpointing must be True or False"),
    (dict(method="ga", template=None), "template must be a text"),
    (dict(method="ga", training={"lr": 1e-3}), "training must be a TrainingSettings, got dict"),
    (dict(method="ga", training=TrainingSettings(), epochs=0), "epochs must be a positive integer"),
    (dict(method="npo", lora={"rank": 4}), "unknown LoRA setting 'rank'; valid: r, alpha, target_modules, dropout"),
    (dict(method="npo", lora={"r": 0}), "LoRA r must be a positive integer"),
    (dict(method="npo", lora={"r": 4}, mask={"x": torch.ones(1, dtype=torch.bool)}), "either a weight mask or lora"),
    (dict(method="npo_kl", lora={"r": 4}, reference=ReferenceSettings(device="cpu")), "reference device does not apply"),
])
def test_bad_inputs(learned, tok, kwargs, match):
    args = dict(forget=FORGET, retain=RETAIN, tokenizer=tok, progress=False) | kwargs
    with pytest.raises(patchlab.PatchlabValueError, match=match):
        unlearn(copy.deepcopy(learned), **args)


def test_training_settings_and_flat_keywords_are_one_recipe(learned, tok):
    """``training=TrainingSettings(...)`` and the same fields as flat keywords train identically and record the same
    settings, in the order ``unlearn_run.json`` has always listed them; a flat keyword replaces that field."""
    recipe = TrainingSettings(lr=1e-3, epochs=2, batch_size=2, seed=3)
    grouped = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="graddiff", training=recipe,
                      progress=False)
    flat = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="graddiff", lr=1e-3, epochs=2,
                   batch_size=2, seed=3, progress=False)
    assert grouped.losses == flat.losses and grouped.settings == flat.settings
    assert list(flat.settings) == ["method", "lr", "epochs", "batch_size", "grad_accum", "retain_weight", "masked",
                                   "lora", "reference", "gradient_checkpointing", "max_grad_norm",
                                   "mask_after_clipping", "max_length", "template", "seed", "n_forget", "n_retain",
                                   "n_processes"]
    longer = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="graddiff", training=recipe,
                     epochs=3, progress=False)
    assert (longer.settings["epochs"], longer.settings["seed"]) == (3, 3)
    assert longer.losses[:len(flat.losses)] == flat.losses and len(longer.losses) == 3 * len(flat.losses) // 2


def test_cli_training_flags_are_the_training_settings():
    """analyses/unlearn.py has a flag per TrainingSettings field (the template has its own --template); given ones
    reach unlearn, unset ones leave the toy world's method settings or TrainingSettings' defaults in place."""
    from patchlab.toy.cache import toy_method_settings
    from patchlab.unlearning.settings import TRAINING_FIELDS

    cli = load_script("unlearn")
    args = cli.parse_args(["--method", "npo", "--lr", "3e-3", "--max-grad-norm", "0.5", "--mask-after-clipping",
                           "--seed", "2", "--reference", "held"])
    assert set(TRAINING_FIELDS) <= set(vars(args))
    kwargs = cli.unlearn_kwargs(args)
    assert {k: kwargs[k] for k in ("lr", "max_grad_norm", "mask_after_clipping", "seed")} == {
        "lr": 3e-3, "max_grad_norm": 0.5, "mask_after_clipping": True, "seed": 2}
    assert kwargs["epochs"] == toy_method_settings("npo")["epochs"] and "max_length" not in kwargs
    assert kwargs["reference"] == ReferenceSettings(mode="held")


def test_mask_file_roundtrip_and_cli(learned, tok, tmp_path, capsys):
    """analyses/unlearn.py: a masked NPO run from a checkpoint writes the unlearned checkpoint; bad input -> exit 2."""
    learned.save_pretrained(tmp_path / "vanilla")
    tok.save_pretrained(tmp_path / "vanilla")
    (tmp_path / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in FORGET))
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.5
            for n, p in learned.named_parameters() if "down_proj" in n}
    save_mask(mask, tmp_path / "mask.safetensors")
    assert all(torch.equal(mask[n], m) for n, m in load_mask(tmp_path / "mask.safetensors").items())

    cli = load_script("unlearn")
    code = cli.main(["--model", str(tmp_path / "vanilla"), "--forget", str(tmp_path / "forget.jsonl"), "--method",
                     "npo", "--lr", "1e-3", "--epochs", "2", "--batch-size", "3", "--mask",
                     str(tmp_path / "mask.safetensors"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 0, capsys.readouterr().err
    saved = json.loads((tmp_path / "out" / "unlearn_run.json").read_text())
    assert saved["settings"]["method"] == "npo" and saved["settings"]["masked"] and len(saved["losses"]) == 2
    out = dict(patchlab.load_model(tmp_path / "out").named_parameters())
    for name, p in learned.named_parameters():
        keep = ~mask[name] if name in mask else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(out[name][keep], p[keep]), name
    assert mean_nll(patchlab.load_model(tmp_path / "out"), tok, FORGET) > mean_nll(learned, tok, FORGET)

    code = cli.main(["--model", str(tmp_path / "vanilla"), "--forget", str(tmp_path / "nope.jsonl"), "--method",
                     "ga", "--out", str(tmp_path / "bad"), "--quiet"])
    assert code == 2 and "nope.jsonl" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_out_dir_that_is_a_file_is_rejected_before_training(learned, tok, tmp_path):
    (tmp_path / "taken").write_text("not a checkpoint")
    model = copy.deepcopy(learned)
    with pytest.raises(patchlab.PatchlabFileError, match="not a directory"):
        unlearn(model, FORGET, tokenizer=tok, method="ga", out_dir=tmp_path / "taken", progress=False)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), learned.parameters()))  # nothing trained
    assert (tmp_path / "taken").read_text() == "not a checkpoint"


def test_out_dir_with_foreign_files_is_refused_and_kept(learned, tok, tmp_path):
    """The data-loss bug: a directory holding a thesis and the run's own data was emptied, exit 0."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("\\section{years of work}")
    (out / "forget.jsonl").write_text("\n".join(json.dumps(r) for r in FORGET))
    model = copy.deepcopy(learned)
    with pytest.raises(patchlab.PatchlabFileError, match="did not write"):
        unlearn(model, out / "forget.jsonl", tokenizer=tok, method="ga", out_dir=out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["forget.jsonl", "thesis.tex"]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), learned.parameters()))  # nothing trained


# ----------------------------------------------------------------------------------------------- the registry


def forget_retain_batches(tok):
    fb = next(batches(to_examples(FORGET + TEXTS[:1], tok, max_length=32), 8, pad_id=tok.pad_token_id))
    rb = next(batches(to_examples(RETAIN, tok, max_length=32), 8, pad_id=tok.pad_token_id))
    assert (fb["attention_mask"] == 0).any()  # padding present: it must not count
    return fb, rb


def direct_target_logprobs(model, batch):
    """Per row, the log-probabilities of its target tokens, one position at a time."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    rows = []
    for i in range(len(batch["input_ids"])):
        rows.append(torch.stack([torch.log_softmax(logits[i, t], -1)[batch["labels"][i, t + 1]]
                                 for t in range(batch["labels"].shape[1] - 1) if batch["labels"][i, t + 1] != -100]))
    return rows


def test_simnpo_loss_is_the_formula(learned, tok):
    fb, rb = forget_retain_batches(tok)
    entry = get_method("simnpo")
    s = entry.make_settings({"beta": 2.0, "gamma": 0.3, "retain_weight": 0.7})
    with torch.no_grad():
        got = entry.loss(patchlab.unlearning.Step(model=learned, base=learned, forget=fb, retain=rb), s)
    nll_tok = torch.stack([-lp.mean() for lp in direct_target_logprobs(learned, fb)])
    retain = torch.cat(direct_target_logprobs(learned, rb))
    expected = -(2 / 2.0) * torch.log(torch.sigmoid(2.0 * (nll_tok - 0.3))).mean() + 0.7 * -retain.mean()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert entry.data_needs(s).retain and not entry.data_needs(entry.make_settings()).retain
    assert entry.data_needs(s).reference == "none"  # no reference model at all


def test_simnpo_runs_without_a_retain_set(learned, tok):
    run = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="simnpo", **(KW | dict(epochs=10)))
    assert run.settings["n_retain"] == 0 and mean_nll(run.model, tok, FORGET) > mean_nll(learned, tok, FORGET) + 0.5


def test_rmu_loss_is_the_formula(learned, tok):
    from patchlab.unlearning.methods import rmu

    fb, rb = forget_retain_batches(tok)
    frozen = copy.deepcopy(learned)
    with torch.no_grad():
        frozen.model.layers[0].mlp.down_proj.weight.mul_(0.5)  # so the retain term is not zero
    s = get_method("rmu").make_settings({"layer": 0, "steering_coeff": 5.0, "alpha": 3.0})
    control = rmu.setup(learned, s, seed=4)
    u = torch.rand(learned.config.hidden_size, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(control.vector, 5.0 * u / u.norm())
    step = patchlab.unlearning.Step(model=learned, base=learned, forget=fb, retain=rb, state=control,
                                    reference=patchlab.unlearning.Reference(frozen, out_device="cpu"))
    with torch.no_grad():
        got = rmu.loss(step, s)

    def mse(model, batch, target):  # hidden_states[1]: the output of decoder layer 0
        with torch.no_grad():
            h = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      output_hidden_states=True).hidden_states[1]
        keep = batch["attention_mask"].bool()
        target = target if target.dim() == 1 else target[keep]
        return ((h[keep] - target) ** 2).mean()

    with torch.no_grad():
        h_ref = frozen(input_ids=rb["input_ids"], attention_mask=rb["attention_mask"],
                       output_hidden_states=True).hidden_states[1]
    expected = mse(learned, fb, control.vector) + 3.0 * mse(learned, rb, h_ref)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_rmu_updates_only_its_layers_down_projections(learned, tok):
    run = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="rmu",
                  **(KW | TINY_SETTINGS["rmu"] | dict(update_layers=[1])))
    changed = [n for n, p in run.model.named_parameters() if not torch.equal(p, learned.get_parameter(n))]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]
    down = "model.layers.1.mlp.down_proj.weight"
    half = torch.zeros_like(learned.get_parameter(down), dtype=torch.bool)
    half[:, ::2] = True
    mask = {down: half, "model.layers.0.mlp.up_proj.weight": torch.ones_like(learned.model.layers[0].mlp.up_proj.weight,
                                                                             dtype=torch.bool)}
    masked = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method="rmu", mask=mask,
                     **(KW | TINY_SETTINGS["rmu"])).model
    assert torch.equal(masked.get_parameter(down)[~half], learned.get_parameter(down)[~half])
    assert not torch.equal(masked.get_parameter(down)[half], learned.get_parameter(down)[half])
    assert torch.equal(masked.model.layers[0].mlp.up_proj.weight, learned.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("method", ["npo", "dpo", "npo_kl"])
def test_precomputed_reference_gives_the_held_loss_curve(learned, tok, method, monkeypatch):
    from patchlab.unlearning import trainer

    kw = KW | dict(epochs=3, batch_size=2, refusals=("I don ' t know .",)) if method == "dpo" else \
        KW | dict(epochs=3, batch_size=2)
    held = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method=method, reference="held", **kw)
    kept = []
    monkeypatch.setattr(trainer, "Reference", lambda model, **k: kept.append(model) or Reference(model, **k))
    pre = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method=method, **kw)
    assert pre.settings["reference"] == "precompute"
    assert pre.losses == held.losses  # bit for bit: computed on the very batches training sees
    for p, q in zip(pre.model.parameters(), held.model.parameters()):
        assert torch.equal(p, q)
    # NPO and DPO keep no reference model; NPO+KL keeps one for the KL term on retain batches
    assert (kept[0] is None) == (method != "npo_kl")


def test_settings_are_documented_and_never_shadow_common_arguments():
    from patchlab.analysis.method_sweep import method_settings
    from patchlab.unlearning.methods import UNLEARNING_METHODS, field_docs
    from patchlab.unlearning.trainer import UNLEARN_ARGS

    for name, entry in UNLEARNING_METHODS.items():
        docs = field_docs(entry.settings)
        assert set(entry.setting_names) <= set(docs), (name, entry.setting_names, docs)
        assert all(docs.values()), name
        if entry.kind == "finetune":
            assert not set(entry.setting_names) & UNLEARN_ARGS, name
        assert len(entry.sweep) == 3, name
        for strength in entry.sweep:
            method_settings(name, strength)  # raises on a setting the method does not take


def test_a_registered_method_runs_through_unlearn(learned, tok, monkeypatch):
    from dataclasses import dataclass

    from patchlab.unlearning import methods

    @dataclass(frozen=True)
    class Settings:
        """Attributes:
            scale: multiplies the forget NLL (dimensionless)."""
        scale: float = 1.0

    entry = patchlab.unlearning.Method(name="scaled_ga", kind="finetune", settings=Settings, summary="-scale NLL(f)",
                                       loss=lambda step, s: -s.scale * step.nll(step.forget))
    registry = methods.UNLEARNING_METHODS
    monkeypatch.setattr(registry, "_entries", dict(registry.items()))  # undone after the test
    patchlab.unlearning.register_method(entry)
    assert "scaled_ga" in method_names("finetune")
    with pytest.raises(patchlab.PatchlabValueError, match="already registered"):
        patchlab.unlearning.register_method(dataclasses.replace(entry))
    run = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="scaled_ga", scale=2.0, **KW)
    ga = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="ga", **KW)
    torch.testing.assert_close(run.losses[0], 2 * ga.losses[0])
    with pytest.raises(patchlab.PatchlabValueError, match="its settings: scale"):
        unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="scaled_ga", beta=1.0, **KW)


@pytest.mark.parametrize("method", ["graddiff", "rmu"])
def test_gradient_checkpointing_keeps_the_loss_curve(learned, tok, method):
    kw = KW | tiny_settings(method)
    plain = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method=method, **kw)
    ckpt = unlearn(copy.deepcopy(learned), FORGET, RETAIN, tokenizer=tok, method=method, gradient_checkpointing=True,
                   **kw)
    torch.testing.assert_close(ckpt.losses, plain.losses, rtol=1e-5, atol=1e-6)
    assert not ckpt.model.is_activation_checkpointing  # switched off again after training
    for p, q in zip(ckpt.model.parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------- LoRA


def test_lora_trains_an_adapter_and_saves_it(learned, tok, tmp_path):
    import peft

    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    run = unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="npo", lora=lora,
                  out_dir=tmp_path / "adapter", **(KW | dict(epochs=10, lr=1e-2)))
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "unlearn_run.json", "tokenizer.json"} <= files
    assert "model.safetensors" not in files
    saved = json.loads((tmp_path / "adapter" / "unlearn_run.json").read_text())
    assert saved["settings"]["lora"] == {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "dropout": 0.0}
    merged = run.model.merge_and_unload()
    assert mean_nll(merged, tok, FORGET) > mean_nll(learned, tok, FORGET) + 0.5
    for name, p in learned.named_parameters():
        targeted = ".q_proj." in name or ".v_proj." in name
        assert torch.equal(merged.get_parameter(name), p) != targeted, name
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(learned), tmp_path / "adapter").merge_and_unload()
    for name, p in merged.named_parameters():
        torch.testing.assert_close(reloaded.get_parameter(name), p, rtol=0, atol=1e-7)


def test_lora_without_peft_names_the_extra(learned, tok, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "peft", None)
    with pytest.raises(patchlab.MissingDependencyError, match=r"patchlab\[peft\]"):
        unlearn(copy.deepcopy(learned), FORGET, tokenizer=tok, method="npo", lora={"r": 4}, progress=False)


# ----------------------------------------------------------------------------------------------- command line


def test_cli_flags_come_from_the_registry(capsys):
    cli = load_script("unlearn")
    args = cli.parse_args(["--model", "m", "--forget", "f.json", "--method", "rmu", "--steering-coeff", "5",
                           "--update-layers", "0", "1", "--lora-r", "4", "--lora-targets", "q_proj", "v_proj"])
    kwargs = cli.unlearn_kwargs(args)
    assert kwargs["steering_coeff"] == 5.0 and kwargs["update_layers"] == [0, 1]
    assert kwargs["lora"] == {"r": 4, "target_modules": ["q_proj", "v_proj"]} and "beta" not in kwargs
    assert cli.main(["--model", "m", "--forget", "f.json", "--method", "ga", "--beta", "0.5", "--quiet",
                     "--out", "/nonexistent/never-created"]) == 2
    assert "--beta is not a setting of method 'ga'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "inverse temperature" in help_text and "npo: 0.1" in help_text and "--kl-weight" in help_text


def test_cli_without_arguments_unlearns_the_toy_world(tmp_path, monkeypatch):
    from patchlab import toy

    monkeypatch.chdir(tmp_path)
    assert load_script("unlearn").main(["--quiet"]) == 0
    out = tmp_path / "results" / "unlearn" / "graddiff"
    saved = json.loads((out / "unlearn_run.json").read_text())
    settings = {k: saved["settings"][k] for k in ("method", "lr", "epochs", "batch_size", "retain_weight")}
    assert settings == {"method": "graddiff", **toy.METHOD_SETTINGS["graddiff"]}
    record = toy.world().record(toy.DEFAULT_CONCEPT)
    assert saved["settings"]["n_forget"] == len(record.forget_paragraphs) and saved["settings"]["n_retain"] > 0
    model, tok = patchlab.load_model(out), toy.vanilla()[1]
    assert toy.qa_accuracy(model, tok, record.qa) <= 0.2


def test_layer_output_and_reference_refuse_what_they_cannot_give(learned, tok):
    fb, _ = forget_retain_batches(tok)
    with torch.no_grad():
        h = patchlab.unlearning.layer_output(learned, learned, 1, fb)
        direct = learned(input_ids=fb["input_ids"], attention_mask=fb["attention_mask"], output_hidden_states=True)
    assert h.shape == (*fb["input_ids"].shape, learned.config.hidden_size)
    torch.testing.assert_close(learned.model.norm(h), direct.hidden_states[-1])  # the last layer, before the norm
    with pytest.raises(patchlab.PatchlabValueError, match=r"layer must lie in 0\.\.1, got 2"):
        patchlab.unlearning.layer_output(learned, learned, 2, fb)
    with pytest.raises(patchlab.PatchlabValueError, match="must declare Needs"):
        Reference(None, out_device="cpu").next_token_logprobs(fb)


def test_masking_after_clipping_changes_only_selected_weights_and_clipping_sees_every_gradient(learned, tok):
    """The WAGLE authors' order: clip the whole gradient, then mask. Without clipping it equals freezing; with
    clipping the step differs (the unselected gradients enter the norm) but unselected weights never move."""
    mask = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) < 0.5
            for n, p in learned.named_parameters() if "mlp" in n}
    kw = dict(tokenizer=tok, method="ga", lr=1e-3, epochs=2, batch_size=3, mask=mask, progress=False)
    frozen = unlearn(copy.deepcopy(learned), FORGET, **kw)
    after = unlearn(copy.deepcopy(learned), FORGET, mask_after_clipping=True, **kw)
    for p, q in zip(frozen.model.parameters(), after.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    clipped = unlearn(copy.deepcopy(learned), FORGET, mask_after_clipping=True, max_grad_norm=0.01, **kw)
    clipped_frozen = unlearn(copy.deepcopy(learned), FORGET, max_grad_norm=0.01, **kw)
    moved = dict(clipped.model.named_parameters())
    for name, p in learned.named_parameters():
        keep = ~mask[name] if name in mask else torch.ones_like(p, dtype=torch.bool)
        assert torch.equal(moved[name][keep], p[keep]), name
    assert any(not torch.allclose(a, b) for a, b in zip(clipped.model.parameters(), clipped_frozen.model.parameters()))
    assert clipped.settings["mask_after_clipping"] and clipped.settings["max_grad_norm"] == 0.01
