"""Write a small demo set in the exact official SQuAD v1.1 and v2.0 JSON formats.

Real SQuAD cannot be fetched offline, so the demo is made here: short encyclopedia-style paragraphs about invented
people, towns and rivers (names drawn from syllables, so no pretrained model knows the answers), each with
questions whose answers are spans of the paragraph, and for v2.0 also unanswerable questions about facts the
paragraph does not state (``is_impossible: true``, no answers). ``answer_start`` is the character offset of the
answer, as in the official files. Train and dev use disjoint invented entities.

    python -m zinit.recipes.make_squad_demo out/squad-data      # train-v1.1.json dev-v1.1.json train-v2.0.json dev-v2.0.json
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from zinit.cliargs import positive_int
from zinit.files import atomic_write

SYLLABLES = ["ka", "lo", "mer", "tin", "sa", "vel", "dor", "ri", "an", "bel", "cor", "fen", "gal", "hu", "is", "jor",
             "lun", "mos", "nar", "ol", "pel", "quen", "ros", "tal", "ur", "ves", "wil", "yor", "zan", "bri"]
JOBS = ["painter", "engineer", "botanist", "composer", "cartographer", "physician", "poet", "astronomer", "architect"]
GOODS = ["wool", "copper", "salt", "timber", "glass", "silk", "grain", "olive oil", "paper"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]


def _name(rng: random.Random, used: set[str], parts: int = 2) -> str:
    while True:
        name = "".join(rng.choice(SYLLABLES) for _ in range(parts)).capitalize()
        if name not in used:
            used.add(name)
            return name


def _qa(qid: str, question: str, context: str, answer: str | None, version_2: bool) -> dict[str, Any]:
    qa: dict[str, Any] = {"id": qid, "question": question, "answers": []}
    if answer is not None:
        start = context.index(answer)
        qa["answers"] = [{"text": answer, "answer_start": start}]
    if version_2:
        qa["is_impossible"] = answer is None
    return qa


def make_paragraph(rng: random.Random, used: set[str], prefix: str, version_2: bool) -> dict[str, Any]:
    """One paragraph (a town, its river and a person born there) with its questions."""
    town, river, person = _name(rng, used, 3), _name(rng, used, 2), f"{_name(rng, used)} {_name(rng, used, 3)}"
    job, good = rng.choice(JOBS), rng.choice(GOODS)
    year, founded = rng.randint(1700, 1990), rng.randint(900, 1600)
    month, pop = rng.choice(MONTHS), rng.randint(2, 90) * 1000 + rng.randint(1, 9) * 100
    facts = [
        f"{town} is a town on the banks of the {river} River.",
        f"It was founded in {founded} and has about {pop:,} inhabitants.",
        f"For centuries the town traded in {good}, which was shipped down the {river}.",
        f"The {job} {person} was born in {town} in {month} {year}.",
        f"{person.split()[0]} later moved abroad but returned to {town} every summer.",
    ]
    rng.shuffle(facts[2:])
    context = " ".join(facts)
    questions = [
        (f"On which river does {town} lie?", f"{river} River"),
        (f"When was {town} founded?", str(founded)),
        (f"What did {town} trade in for centuries?", good),
        (f"Who was born in {town} in {year}?", person),
        (f"What was the profession of {person}?", job),
        (f"In which year was {person} born?", str(year)),
        (f"How many people live in {town}?", f"about {pop:,}"),
    ]
    if version_2:  # facts the paragraph does not state
        other = _name(rng, used, 3)
        questions += [(f"When did {person} die?", None), (f"Which river flows through {other}?", None),
                      (f"Who founded {town}?", None)]
    chosen = rng.sample(questions, k=min(len(questions), 6))
    return {"context": context,
            "qas": [_qa(f"{prefix}{i}", q, context, a, version_2) for i, (q, a) in enumerate(chosen)]}


def make(out: str | Path, train_paragraphs: int = 120, dev_paragraphs: int = 30, seed: int = 0) -> list[Path]:
    """Write ``train-v1.1.json``, ``dev-v1.1.json``, ``train-v2.0.json`` and ``dev-v2.0.json`` into ``out``."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for version in ("1.1", "2.0"):
        rng, used = random.Random(seed), set()
        for split, count in (("train", train_paragraphs), ("dev", dev_paragraphs)):
            paragraphs = [make_paragraph(rng, used, f"{split}{p:04d}q", version == "2.0") for p in range(count)]
            data = {"version": f"v{version}", "data": [{"title": f"Demo_{split}", "paragraphs": paragraphs}]}
            path = folder / f"{split}-v{version}.json"
            text = json.dumps(data, indent=1) + "\n"
            atomic_write(path, lambda tmp, text=text: Path(tmp).write_text(text))
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> None:
    """The command line: ``python -m zinit.recipes.make_squad_demo OUT [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the four JSON files into")
    parser.add_argument("--train-paragraphs", type=positive_int, default=120)
    parser.add_argument("--dev-paragraphs", type=positive_int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for path in make(args.out, args.train_paragraphs, args.dev_paragraphs, args.seed):
        print(path)


if __name__ == "__main__":
    main()
