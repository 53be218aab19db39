"""The toy world's QA in TOFU's format (Maini et al., 2024), as open-unlearning reads it: a fixture for TOFU-format
readers and metrics, since TOFU itself cannot be downloaded offline.

Each record is one QA pair of a concept, with the fields of TOFU's ``*_perturbed`` splits::

    {"question": "who created the Veltrani Codex ?", "answer": "Mira Osk",
     "paraphrased_answer": "Mira Osk created the Veltrani Codex long ago .",
     "perturbed_answer": ["Tobin Varrow created the Veltrani Codex long ago .", ...]}

The paraphrase restates the fact with a sentence template of the corpus the toy model was trained on; the
perturbed answers are the same sentence with the attribute's value of other concepts (wrong, equally fluent).
The *forget* split is one concept's QA, the *retain* split the QA of the next concepts.

``python -m patchlab.toy.tofu --out DIR`` writes both splits as JSON, JSONL and ``datasets`` directories.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from patchlab.errors import PatchlabValueError
from patchlab.io import OutputDir, atomic_write_json, output_dir
from patchlab.toy.corpus import ASSETS, ATTRIBUTES, World, world

#: TOFU ships five perturbed answers per question.
N_PERTURBED = 5
#: File formats :func:`write_fixture` writes each split in: ``{split}.json``, ``{split}.jsonl``, ``{split}_dataset/``.
FORMATS = ("json", "jsonl", "dataset")


def _sentence(attribute_index: int, concept: str, value: str) -> str:
    """The fact ``concept``'s attribute = ``value`` as the corpus's second sentence template for that attribute."""
    template = ATTRIBUTES[attribute_index][2][1]
    return template.format(c=f"the {concept}", s=f"the {concept}", v=value)


def tofu_records(toy_world: World, concept: str, *, n_perturbed: int = N_PERTURBED) -> list[dict]:
    """``concept``'s QA pairs as TOFU records (``question``, ``answer``, ``paraphrased_answer``,
    ``perturbed_answer``: ``n_perturbed`` sentences with the values of the next concepts, in world order).

    Raises:
        PatchlabValueError: unknown concept, ``n_perturbed`` outside ``1..(number of concepts - 1)``.
    """
    record = toy_world.record(concept)
    others = [r for r in toy_world.records if r.concept != concept]
    if not 1 <= n_perturbed <= len(others):
        raise PatchlabValueError(f"n_perturbed must be in 1..{len(others)}, got {n_perturbed}")
    start = toy_world.concepts.index(concept)
    ring = (others[start:] + others[:start])[:n_perturbed]
    out = []
    for i, ((attribute, _, _), qa) in enumerate(zip(ATTRIBUTES, record.qa)):
        out.append({"question": qa.question, "answer": qa.answer,
                    "paraphrased_answer": _sentence(i, concept, record.attributes[attribute]),
                    "perturbed_answer": [_sentence(i, concept, r.attributes[attribute]) for r in ring]})
    return out


def tofu_splits(toy_world: World, concept: str, *, n_retain_concepts: int = 2,
                n_perturbed: int = N_PERTURBED) -> dict[str, list[dict]]:
    """``{"forget": concept's records, "retain": the records of the next n_retain_concepts concepts}``.

    Raises:
        PatchlabValueError: unknown concept, ``n_retain_concepts`` outside ``1..(number of concepts - 1)``.
    """
    names = toy_world.concepts
    if concept not in names:
        toy_world.record(concept)  # raises naming the known concepts
    if not 1 <= n_retain_concepts < len(names):
        raise PatchlabValueError(f"n_retain_concepts must be in 1..{len(names) - 1}, got {n_retain_concepts}")
    start = names.index(concept)
    retain = [names[(start + k) % len(names)] for k in range(1, n_retain_concepts + 1)]
    return {"forget": tofu_records(toy_world, concept, n_perturbed=n_perturbed),
            "retain": [r for name in retain for r in tofu_records(toy_world, name, n_perturbed=n_perturbed)]}


def _write(records: list[dict], path: Path, fmt: str) -> None:
    if fmt == "json":
        atomic_write_json(path, records)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    else:
        import datasets
        datasets.Dataset.from_list(records).save_to_disk(str(path))


def fixture_name(split: str, fmt: str) -> str:
    """The file (or directory) name of ``split`` in format ``fmt``: ``forget.json``, ``retain_dataset``..."""
    return f"{split}_dataset" if fmt == "dataset" else f"{split}.{fmt}"


def write_fixture(out_dir: str | os.PathLike | OutputDir, *, checkpoint: str | os.PathLike = ASSETS,
                  concept: str | None = None, n_retain_concepts: int = 2, overwrite: bool = False
                  ) -> dict[tuple[str, str], Path]:
    """Write the forget and retain splits of ``concept`` (default: the world's first) in every format of
    :data:`FORMATS` into ``out_dir`` (claimed as a ``"tofu_fixture"`` output, :class:`patchlab.io.OutputDir`;
    written as one tree, so nothing is half-written); returns ``{(split, format): path}``."""
    out = output_dir(out_dir, "tofu_fixture", overwrite=overwrite)
    toy_world = world(checkpoint)
    splits = tofu_splits(toy_world, concept or toy_world.concepts[0], n_retain_concepts=n_retain_concepts)

    def write(tmp: Path) -> None:
        for split, records in splits.items():
            for fmt in FORMATS:
                _write(records, tmp / fixture_name(split, fmt), fmt)

    out.write_tree(write)
    return {(split, fmt): out.path / fixture_name(split, fmt) for split in splits for fmt in FORMATS}


def main(argv: list[str] | None = None) -> int:
    from patchlab.cli import add_output_args, run

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default=str(ASSETS), help="toy-world checkpoint directory")
    parser.add_argument("--concept", help="the concept of the forget split (default: the world's first)")
    parser.add_argument("--retain-concepts", type=int, default=2, help="concepts in the retain split")
    add_output_args(parser, "results/tofu_fixture")
    args = parser.parse_args(argv)

    def job() -> None:
        paths = write_fixture(args.out, checkpoint=args.checkpoint, concept=args.concept,
                              n_retain_concepts=args.retain_concepts, overwrite=args.overwrite)
        for path in paths.values():
            print(path)

    return run(job)


if __name__ == "__main__":
    sys.exit(main())
