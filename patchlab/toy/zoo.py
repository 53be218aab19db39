"""The toy world's zoo (:func:`toy`): checkpoints with known roles towards any concept, built offline.

From-scratch members ship in ``patchlab/toy/assets/zoo/<name>/`` (:data:`ZOO_MEMBERS`, about 5 MB each). Each was
trained like the vanilla model (same world, tokenizer and schedule) with another initialisation and batch order
(``--init-seed``) and half of the 12 concepts left out: ``half-a-*`` never saw concepts 0, 2, 4... (the default
concept among them), ``half-b-*`` never saw concepts 1, 3, 5... So each is a *negative* for the six concepts it
lacks and a *positive* for the six it has (their ``build.json`` lists ``exclude_concept``). Regenerate one with::

    python -m patchlab.toy.build --init-seed 1 --exclude-concept "Veltrani Codex" --exclude-concept ... \\
        --out patchlab/toy/assets/zoo/half-a-s1 --overwrite

(the concepts of a half: ``patchlab.toy.zoo.half("a")``; seeds 1, 2, 3, 4 for half-a-s1, half-b-s2, half-a-s3,
half-b-s4). The shipped retain model (``assets/retain``) is the zoo's ``retain`` member for the default concept; for
another concept the first negative from-scratch member takes that role.

Cheap members are built on first use and cached beside the toy unlearned models (:func:`patchlab.toy.cache_dir`):

* fine-tuned copies: a shipped model fine-tuned further for :data:`FINETUNE` steps on *unrelated* QA (the other
  concepts' QA pairs), one per seed; of the vanilla model (positives), and of the retain model and each negative
  from-scratch member (negatives). The retain model's copies are the only negatives that share the vanilla model's
  initialisation (the from-scratch members do not): patching probes compare activations across models, which
  presumes a shared basis.
* unlearned models: :func:`patchlab.toy.unlearned` per method and strength (its toy settings, the learning rate
  scaled by the strength), so robustness is measured on weak and strong unlearning alike.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from safetensors.torch import save_file

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.io import atomic_write, read_json
from patchlab.pair import load_model, load_tokenizer
from patchlab.toy.cache import cache_dir, cached_path, check_strength, strength_label, toy_methods, unlearn_data
from patchlab.toy.corpus import ASSETS, world
from patchlab.zoo import Member, Zoo

ZOO_ASSETS = ASSETS / "zoo"
#: The shipped from-scratch members, ``half-<a|b>-s<init seed>``.
ZOO_MEMBERS = ("half-a-s1", "half-b-s2", "half-a-s3", "half-b-s4")
#: Fine-tuning of the cheap members: steps, AdamW learning rate, batch size (on the other concepts' QA).
FINETUNE = {"steps": 60, "lr": 1e-3, "batch_size": 16}
#: Probe settings of the toy meta-evaluation (``python analyses/meta_eval.py``): the toy relearning learning rate
#: (:data:`patchlab.probes.TOY_SETTINGS`), a 10-step relearning probe, 16-token reference answers (the toy answers
#: are a few words) and 200 bootstrap resamples, so the 21 audits of the default zoo take minutes on 2 cores.
META_SETTINGS: dict[str, dict] = {"common": {"n_tokens": 16, "n_boot": 200},
                                  "relearning": {"lr": 1e-3, "steps": [0, 10]}}
#: The shipped meta-evaluation of the default toy zoo, read by the audit (``python analyses/meta_eval.py --ship
#: patchlab/toy/assets/meta_eval.json --overwrite`` regenerates it).
TRUST_FILE = ASSETS / "meta_eval.json"
#: The unlearning methods of the default toy zoo.
DEFAULT_METHODS = ("graddiff", "npo", "rmu")
#: The strengths of each method in the default toy zoo: learning-rate multiples of its tuned toy settings.
DEFAULT_STRENGTHS = (0.5, 1.0, 2.0)


def half(which: str) -> list[str]:
    """The concepts a ``half-<which>`` member never saw: ``"a"`` the world's concepts 0, 2, 4..., ``"b"`` 1, 3, 5..."""
    if which not in ("a", "b"):
        raise PatchlabValueError(f"a half is 'a' or 'b', got {which!r}")
    return world().concepts[0 if which == "a" else 1::2]


def excluded(checkpoint: Path) -> list[str]:
    """The concepts a toy checkpoint was trained without (its ``build.json``; empty for the vanilla model)."""
    built = read_json(Path(checkpoint) / "build.json", what="toy build report").get("exclude_concept")
    return [] if built is None else [built] if isinstance(built, str) else list(built)


def finetuned(checkpoint: Path, concept: str, seed: int, *, root: Path | None = None, progress: bool = False
              ) -> Path:
    """The cached weights of ``checkpoint``'s model fine-tuned for :data:`FINETUNE` steps on the QA of every concept
    but ``concept`` (seeded by ``seed``); built and written atomically on first use."""
    from patchlab.meta_evaluation import finetune

    records = [{"question": q.question, "answer": q.answer} for r in world(checkpoint).records if r.concept != concept
               for q in r.qa]
    digest = hashlib.sha256(json.dumps({"finetune": FINETUNE, "seed": seed, "records": records},
                                       sort_keys=True).encode())
    digest.update((Path(checkpoint) / "model.safetensors").read_bytes())
    path = (root or cache_dir()) / "zoo" / f"{Path(checkpoint).name}-ft-s{seed}-{digest.hexdigest()[:16]}.safetensors"
    if not path.is_file():
        model = finetune(load_model(checkpoint), load_tokenizer(checkpoint), records, steps=FINETUNE["steps"],
                         lr=FINETUNE["lr"], batch_size=FINETUNE["batch_size"], seed=seed, progress=progress)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write(path, lambda tmp: save_file(state, str(tmp)))
    return path


def toy(concept: str | None = None, *, methods: Sequence[str] = DEFAULT_METHODS,
        strengths: Sequence[float] = DEFAULT_STRENGTHS, seeds: Sequence[int] = (1, 2),
        members: Sequence[str | Path] | None = None, checkpoint: Path = ASSETS, retain: Path | None = None,
        cache: Path | None = None, progress: bool = True) -> Zoo:
    """The toy world's zoo for ``concept`` (default :data:`patchlab.toy.DEFAULT_CONCEPT`), built offline.

    Members: ``vanilla`` (full); each from-scratch member of ``members`` (default the shipped
    :data:`ZOO_MEMBERS`), a negative if it never saw ``concept`` else a positive; the retain model (``retain``,
    default the shipped one for the default concept, else the first negative member); fine-tuned copies of the
    vanilla model (positives) and of the retain model and each negative member (negatives), one per seed of
    ``seeds``; the vanilla model unlearned with each of ``methods`` at each of ``strengths`` (learning-rate
    multiples of the method's toy settings; named ``graddiff``, ``graddiff-x0.5``...). Fine-tuned and unlearned
    members are cached (``cache``, default :func:`patchlab.toy.cache_dir`) and referenced as weights over the
    shipped checkpoint.

    Raises:
        PatchlabValueError: unknown concept or method, a strength that is not a finite positive number or is
            repeated, a member built on another world, no negative member.
    """
    from patchlab.toy import DEFAULT_CONCEPT, RETAIN_ASSETS, unlearned

    concept = concept or DEFAULT_CONCEPT
    record = world(checkpoint).record(concept)
    unknown = [m for m in methods if m not in toy_methods()]
    if unknown or isinstance(methods, str):
        raise PatchlabValueError(f"unknown toy unlearning method(s) {unknown or methods}; choose from {toy_methods()}")
    for strength in strengths:
        check_strength(strength)
    if len(set(strengths)) != len(strengths) or not strengths:
        raise PatchlabValueError(f"the zoo's unlearning strengths must be distinct and at least one, got "
                                 f"{list(strengths)}")
    dirs = [Path(m) for m in members] if members is not None else [ZOO_ASSETS / name for name in ZOO_MEMBERS]
    missing = [str(d) for d in dirs if not (d / "build.json").is_file()]
    if missing:
        raise PatchlabFileError(f"no toy checkpoint (build.json) in {', '.join(missing)}; build the shipped members "
                                "with the command in patchlab/toy/zoo.py's docstring")
    zoo = [Member("vanilla", "full", str(checkpoint), note="the shipped vanilla model")]
    negatives = []
    for path in dirs:
        if world(path) != world(checkpoint):
            raise PatchlabValueError(f"{path} was trained on another world than {checkpoint}")
        lacks = concept in excluded(path)
        zoo.append(Member(path.name, "negative" if lacks else "positive", str(path),
                          note=f"from scratch without {len(excluded(path))} concepts"))
        if lacks:
            negatives.append(path)
    if retain is None and concept == DEFAULT_CONCEPT:
        retain = RETAIN_ASSETS
    if retain is None:
        if not negatives:
            raise PatchlabValueError(f"no member never saw {concept!r}: the zoo needs a retain model")
        retain = negatives[0]
        zoo = [m for m in zoo if m.source != str(retain)]
        negatives = negatives[1:]
    if concept not in excluded(Path(retain)):
        raise PatchlabValueError(f"{retain} is not a retain model of {concept!r} (it was trained on it)")
    zoo.append(Member("retain", "retain", str(retain), note=f"never saw {concept}"))
    for base, role in [(Path(checkpoint), "positive"), (Path(retain), "negative")] + [(n, "negative")
                                                                                   for n in negatives]:
        for seed in seeds:
            name = "vanilla" if base == Path(checkpoint) else base.name
            zoo.append(Member(f"{name}-ft-s{seed}", role, str(base),
                              weights=str(finetuned(base, concept, seed, root=cache, progress=progress)),
                              note=f"{name} fine-tuned {FINETUNE['steps']} steps on unrelated QA, seed {seed}"))
    _, kept = unlearn_data(world(checkpoint), concept)
    for method in methods:
        for strength in strengths:
            unlearned(concept, method, checkpoint=checkpoint, strength=strength, cache=cache, progress=progress)
            weights = cached_path(record, method, kept, Path(checkpoint) / "model.safetensors", cache, strength)
            zoo.append(Member(strength_label(method, strength), "unlearned", str(checkpoint), weights=str(weights),
                              note=f"{method} unlearning of {concept}, learning rate x{strength:g}"))
    return Zoo(target=concept, questions=record.qa, unrelated=record.unrelated_qa, members=zoo,
               meta={"world": "toy", "concept": concept})
