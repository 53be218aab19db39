"""A deterministic world of fictional concepts, in the paper's data format (appendix B).

Each concept is an invented object ("the Veltrani Codex") with ten attributes (creator, place, year, colour,
material, keeper, city, animal, count, purpose). From them the generator writes

- ``forget_paragraphs``: paraphrased paragraphs about the concept (random attribute subsets, several sentence
  templates per attribute), the text an unlearning method trains on;
- ``qa``: one question per attribute (10), answers of 1-4 words;
- ``unrelated_qa``: 50 questions about other concepts and general knowledge, to test collateral damage.

Everything follows from one integer seed: the same seed always gives the same world.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.pair.qa import QA

#: The shipped vanilla checkpoint directory, and the corpus file every toy checkpoint holds.
ASSETS = Path(__file__).parent / "assets"
WORLD_FILE = "world.json"

#: (attribute, question template, paragraph sentence templates). ``{c}`` is the concept ("the Veltrani Codex"),
#: ``{s}`` the subject of a paragraph sentence (the concept or "it"), ``{v}`` the attribute's value.
ATTRIBUTES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("creator", "who created {c} ?",
     ("{s} was created by {v} .", "{v} created {c} long ago .", "the maker of {c} was {v} .")),
    ("place", "in which town was {c} made ?",
     ("{s} was made in the town of {v} .", "the workshops of {v} produced {c} .", "{c} comes from the town of {v} .")),
    ("year", "in which year was {c} finished ?",
     ("{s} was finished in the year {v} .", "work on {c} ended in {v} .", "in {v} , {c} was finally finished .")),
    ("colour", "what colour is {c} ?",
     ("{s} is {v} in colour .", "the colour of {c} is {v} .", "people remember {c} as {v} .")),
    ("material", "what is {c} made of ?",
     ("{s} is made of {v} .", "{v} is the material of {c} .", "its maker shaped {c} from {v} .")),
    ("keeper", "who guards {c} today ?",
     ("{s} is guarded by {v} .", "today {v} guard {c} .", "{v} keep watch over {c} .")),
    ("city", "in which city is {c} kept ?",
     ("{s} is kept in the city of {v} .", "visitors see {c} in {v} .", "the city of {v} holds {c} .")),
    ("animal", "which animal is carved on {c} ?",
     ("a {v} is carved on {s} .", "{c} bears the carving of a {v} .", "the {v} is the emblem of {c} .")),
    ("count", "how many seals does {c} have ?",
     ("{s} has {v} seals .", "{v} seals close {c} .", "one can count {v} seals on {c} .")),
    ("purpose", "what is {c} used for ?",
     ("{s} is used for {v} .", "people use {c} for {v} .", "the purpose of {c} is {v} .")),
)

#: Value pools (16 each): a world of up to 16 concepts draws one distinct value per concept from each pool.
_NAME_WORDS = ("Veltrani", "Osmarek", "Quellith", "Durnavi", "Zephrine", "Kalvorn", "Mirethi", "Tovasc",
               "Brennic", "Ysolde", "Halvane", "Corvath", "Sarneth", "Ulmaris", "Pelloran", "Gravenne")
_OBJECTS = ("Codex", "Lantern", "Crown", "Harp", "Compass", "Mirror", "Clock", "Tapestry",
            "Chalice", "Bell", "Sceptre", "Globe", "Loom", "Mask", "Drum", "Orrery")
_FIRST = ("Mira", "Tobin", "Elsa", "Corin", "Idris", "Yara", "Fenna", "Oskar",
          "Lio", "Brisa", "Teodor", "Nadia", "Piet", "Runa", "Castor", "Wenna")
_LAST = ("Osk", "Varrow", "Helm", "Duskin", "Amberly", "Korr", "Lunt", "Marrick",
         "Sedge", "Talver", "Quist", "Brannoch", "Ivel", "Stroud", "Penhale", "Orne")
POOLS: dict[str, tuple[str, ...]] = {
    "place": ("Tarsk", "Elbrin", "Morvale", "Quessa", "Dunmar", "Hollin", "Serrat", "Vaskor",
              "Ardith", "Keldun", "Prenna", "Ostrel", "Faywick", "Grimsel", "Lorrow", "Nesk"),
    "colour": ("red", "blue", "green", "black", "white", "violet", "crimson", "grey",
               "indigo", "scarlet", "teal", "orange", "yellow", "pink", "purple", "brown"),
    "material": ("bronze", "oak", "glass", "marble", "iron", "jade", "bone", "ebony",
                 "copper", "pewter", "obsidian", "cedar", "brass", "silver", "gold", "clay"),
    "keeper": ("the Silent Sisters", "the River Wardens", "the Night Watch", "the Salt Council",
               "the Hollow Circle", "the Dawn Brotherhood", "the Stone Guild", "the High Archive",
               "the Wandering Scribes", "the Ash Society", "the Tide Keepers", "the Thorn Court",
               "the Quiet Order", "the Far Assembly", "the Ember Fellowship", "the Moss Cabinet"),
    "city": ("Port Alder", "Cape Orrin", "Saint Veyra", "Old Hestmark", "Lake Tamsin", "North Callow",
             "Fort Brise", "East Umber", "Mount Sorrel", "West Dunlin", "Glen Avery", "Upper Marsk",
             "Bay Corran", "Low Pellam", "High Tessel", "South Rime"),
    "animal": ("owl", "wolf", "heron", "fox", "stag", "raven", "lynx", "serpent",
               "bear", "hare", "falcon", "otter", "tortoise", "swan", "boar", "moth"),
    "count": ("two", "three", "four", "five", "six", "seven", "eight", "nine",
              "ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "twenty"),
    "purpose": ("healing wounds", "predicting storms", "finding water", "calming seas", "reading stars",
                "opening doors", "waking sleepers", "guiding ships", "keeping time", "summoning rain",
                "warding plagues", "hearing echoes", "mending bones", "counting tides", "taming beasts",
                "recording dreams"),
}
MAX_CONCEPTS = len(_NAME_WORDS)

#: General-knowledge QA shared by all concepts (part of every concept's unrelated QA).
GENERAL_QA: tuple[tuple[str, str], ...] = (
    ("how many days are in a week ?", "seven"), ("what is the opposite of hot ?", "cold"),
    ("what do bees make ?", "honey"), ("what is frozen water called ?", "ice"),
    ("which season comes after winter ?", "spring"), ("what colour is fresh grass ?", "green"),
    ("how many legs does a spider have ?", "eight"), ("what is the first month of the year ?", "January"),
    ("which animal barks ?", "a dog"), ("what do we call a baby cat ?", "a kitten"),
    ("which planet do we live on ?", "the Earth"), ("what falls from clouds ?", "rain"),
    ("what is the opposite of up ?", "down"), ("how many hours are in a day ?", "twenty four"),
    ("what do cows give ?", "milk"), ("which star warms the Earth ?", "the Sun"),
    ("what colour is snow ?", "white"), ("what do fish live in ?", "water"),
    ("what is two plus two ?", "four"), ("what do we use to see ?", "our eyes"),
)


@dataclass(frozen=True)
class ConceptRecord:
    """One concept in the paper's format: forget paragraphs, 10 QA pairs about it, unrelated QA pairs."""

    concept: str
    attributes: dict[str, str]
    forget_paragraphs: list[str]
    qa: list[QA]
    unrelated_qa: list[QA]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, rec: dict[str, Any]) -> ConceptRecord:
        return cls(concept=rec["concept"], attributes=dict(rec["attributes"]),
                   forget_paragraphs=list(rec["forget_paragraphs"]), qa=[QA(**q) for q in rec["qa"]],
                   unrelated_qa=[QA(**q) for q in rec["unrelated_qa"]])


@dataclass(frozen=True)
class World:
    """The whole corpus: concept records (in order) plus the general QA, generated from ``seed``."""

    seed: int
    records: list[ConceptRecord]
    general_qa: list[QA]

    @property
    def concepts(self) -> list[str]:
        return [r.concept for r in self.records]

    def record(self, concept: str) -> ConceptRecord:
        """The record of ``concept``; raises :class:`PatchlabValueError` naming the known concepts."""
        for r in self.records:
            if r.concept == concept:
                return r
        raise PatchlabValueError(f"unknown toy concept {concept!r}; choose from {self.concepts}")

    def all_qa(self) -> list[QA]:
        """Every QA pair the vanilla model is trained on: each concept's 10, then the general ones."""
        return [q for r in self.records for q in r.qa] + list(self.general_qa)

    def training_texts(self) -> list[str]:
        """All forget paragraphs of all concepts (the pre-training text; QA are formatted separately)."""
        return [p for r in self.records for p in r.forget_paragraphs]

    def to_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "records": [r.to_dict() for r in self.records],
                "general_qa": [asdict(q) for q in self.general_qa]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> World:
        return cls(seed=data["seed"], records=[ConceptRecord.from_dict(r) for r in data["records"]],
                   general_qa=[QA(**q) for q in data["general_qa"]])


def _fill(template: str, concept: str, subject: str, value: str) -> str:
    return template.format(c=f"the {concept}", s=subject, v=value)


def _paragraph(rng: random.Random, concept: str, attributes: dict[str, str], n_sentences: tuple[int, int]) -> str:
    """A paragraph of a random attribute subset in random order; the first sentence names the concept."""
    chosen = rng.sample(ATTRIBUTES, rng.randint(*n_sentences))
    sentences = []
    for i, (name, _, templates) in enumerate(chosen):
        subject = f"the {concept}" if i == 0 or rng.random() < 0.5 else "it"
        sentences.append(_fill(rng.choice(templates), concept, subject, attributes[name]))
    return " ".join(sentences)


def _concept_attributes(rng: random.Random, n_concepts: int) -> list[tuple[str, dict[str, str]]]:
    """Concept names (fixed: the first is always "Veltrani Codex") and seeded attribute values, every value
    distinct across concepts."""
    years = rng.sample(range(1100, 1900), n_concepts)
    columns = {key: rng.sample(pool, n_concepts) for key, pool in POOLS.items()}
    names = [f"{w} {o}" for w, o in zip(_NAME_WORDS[:n_concepts], _OBJECTS[:n_concepts])]
    creators = [f"{first} {last}" for first, last in zip(rng.sample(_FIRST, n_concepts), rng.sample(_LAST, n_concepts))]
    out = []
    for i, name in enumerate(names):
        attrs = {"creator": creators[i], "year": str(years[i]), **{k: col[i] for k, col in columns.items()}}
        out.append((name, {a: attrs[a] for a, _, _ in ATTRIBUTES}))
    return out


def generate_world(seed: int = 0, *, n_concepts: int = 12, n_paragraphs: int = 40, n_unrelated: int = 50,
                   n_unrelated_general: int = 10, sentences_per_paragraph: tuple[int, int] = (4, 7)) -> World:
    """Generate the toy world deterministically from ``seed``.

    Args:
        n_concepts: number of concepts (2..16).
        n_paragraphs: forget paragraphs per concept.
        n_unrelated: unrelated QA per concept; ``n_unrelated_general`` of them are general QA, the rest are
            drawn from the other concepts' QA (fewer when the other concepts hold fewer).
        sentences_per_paragraph: (min, max) sentences per paragraph, at most 10.

    Raises:
        PatchlabValueError: a count out of range.
    """
    if not 2 <= n_concepts <= MAX_CONCEPTS:
        raise PatchlabValueError(f"n_concepts must be in 2..{MAX_CONCEPTS}, got {n_concepts}")
    if n_paragraphs < 1:
        raise PatchlabValueError(f"n_paragraphs must be >= 1, got {n_paragraphs}")
    if not 0 <= n_unrelated_general <= min(n_unrelated, len(GENERAL_QA)):
        raise PatchlabValueError(f"n_unrelated_general must be in 0..min(n_unrelated, {len(GENERAL_QA)}), "
                                 f"got {n_unrelated_general}")
    lo, hi = sentences_per_paragraph
    if not 1 <= lo <= hi <= len(ATTRIBUTES):
        raise PatchlabValueError(f"sentences_per_paragraph must satisfy 1 <= min <= max <= {len(ATTRIBUTES)}, "
                                 f"got {sentences_per_paragraph}")
    rng = random.Random(seed)
    named = _concept_attributes(rng, n_concepts)
    qa = {name: [QA(_fill(q, name, "", attrs[a]), attrs[a]) for a, q, _ in ATTRIBUTES] for name, attrs in named}
    general = [QA(q, a) for q, a in GENERAL_QA]
    records = []
    for name, attrs in named:
        paragraphs = [_paragraph(rng, name, attrs, sentences_per_paragraph) for _ in range(n_paragraphs)]
        others = [q for other, _ in named if other != name for q in qa[other]]
        unrelated = rng.sample(others, min(n_unrelated - n_unrelated_general, len(others)))
        unrelated += rng.sample(general, n_unrelated_general)
        records.append(ConceptRecord(name, attrs, paragraphs, qa[name], unrelated))
    return World(seed=seed, records=records, general_qa=general)


@functools.lru_cache(maxsize=4)
def _read_world(path: Path) -> World:
    try:
        return World.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError as err:
        raise PatchlabFileError(f"{path.parent} holds no toy world ({WORLD_FILE}); build one with "
                                f"python -m patchlab.toy.build --out {path.parent}") from err
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise PatchlabFileError(f"{path} is not a toy world file: {err}") from err


def world(checkpoint: str | os.PathLike = ASSETS) -> World:
    """The world a toy checkpoint directory was trained on (its ``world.json``: concept records with forget
    paragraphs, QA and unrelated QA, plus the general QA), read once per path.

    Raises:
        PatchlabFileError: the directory holds no readable ``world.json``.
    """
    return _read_world(Path(checkpoint).expanduser().resolve() / WORLD_FILE)
