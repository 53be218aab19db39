"""A zoo: a set of checkpoints with roles towards one target (a concept and its questions), for meta-evaluating the
audit's probes (:func:`patchlab.meta_evaluation.meta_eval`).

Roles (:data:`ROLES`):

* ``full``: the model that learned the target (exactly one); every other member is audited against it, as the
  unlearned side of a (full, member) pair. It also counts as a positive;
* ``positive``: models that still know the target (e.g. copies fine-tuned further on unrelated data);
* ``negative``: models that never saw the target (retain models of other seeds or schedules);
* ``retain``: at most one model that never saw the target, given to the probes that need one (UDS, the relearning
  control) and used as the reference of the relearning robustness R; it is not scored as a negative, since the probes
  compare the audited model with it;
* ``unlearned``: models unlearned on the target (for the robustness R and Q).

A zoo is read from a small JSON or YAML file (:func:`load_zoo`)::

    {"target": "Veltrani Codex",
     "questions": "questions.jsonl",            # or an inline list of {"question", "answer"} records / strings
     "unrelated": "unrelated.jsonl",            # optional
     "members": [{"name": "vanilla", "role": "full", "source": "checkpoints/full"},
                 {"name": "retain-s1", "role": "negative", "source": "org/retain-seed1"},
                 {"name": "npo", "role": "unlearned", "source": "checkpoints/full",
                  "weights": "cache/npo.safetensors"}]}

``source`` is a local checkpoint directory (relative to the file) or a hub id; ``weights`` optionally names a
safetensors state dict loaded over it (how cached toy members are stored). The toy world's zoo is built offline by
:func:`patchlab.toy.zoo.toy`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from transformers import PreTrainedModel

from patchlab.errors import PatchlabFileError, PatchlabValueError
from patchlab.io import atomic_write_json, read_records
from patchlab.pair.qa import QA
from patchlab.probes.base import as_questions

ROLES = ("full", "positive", "negative", "retain", "unlearned")
#: The roles whose models know the target (the P pool of faithfulness) and those that never saw it (N).
POSITIVE_ROLES = ("full", "positive")
NEGATIVE_ROLES = ("negative",)


@dataclass(frozen=True)
class Member:
    """One checkpoint of a zoo.

    Attributes:
        name: its label (distinct in the zoo; used for its result file).
        role: one of :data:`ROLES`.
        source: a local checkpoint directory or a hub id.
        weights: optional safetensors state dict loaded over ``source``'s model (same architecture).
        note: how it was made (free text, shown in the report).
    """

    name: str
    role: str
    source: str
    weights: str | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise PatchlabValueError(f"a zoo member needs a non-empty name, got {self.name!r}")
        if self.role not in ROLES:
            raise PatchlabValueError(f"zoo member {self.name!r} has role {self.role!r}; choose from {ROLES}")
        if not isinstance(self.source, str) or not self.source.strip():
            raise PatchlabValueError(f"zoo member {self.name!r} needs a source (a checkpoint directory or hub id)")
        if self.weights is not None and not Path(self.weights).is_file():
            raise PatchlabFileError(f"zoo member {self.name!r}: no weights file {self.weights}")

    def digest(self) -> str:
        """xxh3-128 of the role and the checkpoint: the bytes of every weight file of a local ``source`` directory
        (``*.safetensors``, ``*.bin``) and of ``weights``, else the hub id. A meta-evaluation reuses a member's stored
        record only under the same digest."""
        h = xxhash.xxh3_128()
        h.update(self.role.encode())
        source = Path(self.source)
        files = sorted(f for pattern in ("*.safetensors", "*.bin") for f in source.glob(pattern)) \
            if source.is_dir() else []
        h.update(self.source.encode() if not files else b"")
        for f in files + ([Path(self.weights)] if self.weights else []):
            h.update(f.read_bytes())
        return h.hexdigest()

    def load(self) -> PreTrainedModel:
        """The member's model (eval mode, CPU, float32 unless the checkpoint says otherwise)."""
        from safetensors.torch import load_file

        from patchlab.pair import load_model

        model = load_model(self.source)
        if self.weights is not None:
            model.load_state_dict(load_file(self.weights))
        return model.eval()


@dataclass(frozen=True)
class Zoo:
    """Checkpoints with roles towards one target.

    Attributes:
        target: the target's name (e.g. a concept). questions: the target questions (answers known or not).
        unrelated: unrelated questions (the behaviour probe, the benign relearning attack), or ``None``.
        members: the checkpoints; exactly one ``full``, at most one ``retain``, distinct names.
    """

    target: str
    questions: list[QA]
    members: list[Member]
    unrelated: list[QA] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", as_questions(self.questions, "target"))
        if self.unrelated is not None:
            object.__setattr__(self, "unrelated", as_questions(self.unrelated, "unrelated"))
        if not isinstance(self.members, Sequence) or not all(isinstance(m, Member) for m in self.members):
            raise PatchlabValueError("a zoo's members must be a list of patchlab.zoo.Member")
        names = [m.name for m in self.members]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise PatchlabValueError(f"zoo member names must be distinct; repeated: {repeated}")
        for role, allowed in (("full", (1, 1)), ("retain", (0, 1))):
            n = len(self.by_role(role))
            if not allowed[0] <= n <= allowed[1]:
                raise PatchlabValueError(f"a zoo needs {'exactly one' if allowed[0] else 'at most one'} {role!r} "
                                         f"member, got {n}")

    def by_role(self, *roles: str) -> list[Member]:
        """The members with any of ``roles``, in zoo order."""
        return [m for m in self.members if m.role in roles]

    @property
    def full(self) -> Member:
        return self.by_role("full")[0]

    @property
    def retain(self) -> Member | None:
        found = self.by_role("retain")
        return found[0] if found else None

    def member(self, name: str) -> Member:
        for m in self.members:
            if m.name == name:
                return m
        raise PatchlabValueError(f"no zoo member named {name!r}; members: {[m.name for m in self.members]}")

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "questions": [asdict(q) for q in self.questions],
                "unrelated": [asdict(q) for q in self.unrelated] if self.unrelated is not None else None,
                "members": [asdict(m) for m in self.members], "meta": self.meta}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], base: Path | None = None) -> Zoo:
        """The zoo ``data`` describes (:func:`load_zoo`'s format); relative paths are taken from ``base``."""
        if not isinstance(data, Mapping):
            raise PatchlabValueError(f"a zoo file holds a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - {"target", "questions", "unrelated", "members", "meta"})
        if unknown:
            raise PatchlabValueError(f"unknown zoo field(s) {unknown}; expected target, questions, unrelated, "
                                     "members, meta")
        for key in ("target", "questions", "members"):
            if key not in data:
                raise PatchlabValueError(f"a zoo needs {key!r}")
        if not isinstance(data["members"], list) or not data["members"]:
            raise PatchlabValueError("a zoo's members must be a non-empty list")
        members = []
        for i, item in enumerate(data["members"]):
            if not isinstance(item, Mapping):
                raise PatchlabValueError(f"zoo member {i} must be a mapping, got {item!r}")
            extra = sorted(set(item) - {"name", "role", "source", "weights", "note"})
            if extra or "source" not in item or "role" not in item:
                raise PatchlabValueError(f"zoo member {i} needs name, role and source (optional weights, note); got "
                                         f"{sorted(item)}")
            members.append(Member(name=str(item.get("name", f"member-{i}")), role=item["role"],
                                  source=_resolve(item["source"], base, must_exist=False),
                                  weights=_resolve(item["weights"], base) if item.get("weights") else None,
                                  note=str(item.get("note", ""))))
        return cls(target=str(data["target"]), questions=_questions(data["questions"], base),
                   unrelated=_questions(data["unrelated"], base) if data.get("unrelated") is not None else None,
                   members=members, meta=dict(data.get("meta") or {}))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the zoo as JSON (absolute paths), atomically."""
        return atomic_write_json(path, self.to_dict())


def _resolve(value: Any, base: Path | None, must_exist: bool = True) -> str:
    """A path relative to ``base`` made absolute when it exists there; else ``value`` as is (a hub id)."""
    if not isinstance(value, str) or not value.strip():
        raise PatchlabValueError(f"expected a path or hub id, got {value!r}")
    candidate = Path(value).expanduser()
    if not candidate.is_absolute() and base is not None:
        candidate = base / candidate
    if candidate.exists():
        return str(candidate.resolve())
    if must_exist:
        raise PatchlabFileError(f"no such file: {candidate}")
    return value


def _questions(value: Any, base: Path | None) -> list[Any]:
    """Inline question records, or the records of a JSON / JSONL / CSV file (relative to ``base``)."""
    if isinstance(value, str):
        return read_records(_resolve(value, base))
    return value


def load_zoo(path: str | os.PathLike) -> Zoo:
    """The zoo described by a JSON or YAML file (``.yaml`` / ``.yml``; module docstring for the format).

    Raises:
        PatchlabFileError: no such file, or a question or weights file it names is missing.
        PatchlabValueError: not valid JSON / YAML, an unknown field or role, no ``full`` member, repeated names.
    """
    path = Path(path)
    if not path.is_file():
        raise PatchlabFileError(f"no zoo file {path}")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise PatchlabValueError(f"{path} is not valid YAML: {err}") from err
    else:
        from patchlab.io import read_json

        data = read_json(path, what="zoo file")
    return Zoo.from_dict(data, base=path.parent.resolve())
