"""Write a small demo set in the exact ScienceQA release format, with generated images.

Real ScienceQA cannot be fetched offline, so the demo is made here, with the three kinds of question whose columns
the paper reports: image questions that only the picture answers (the colour or the shape drawn in
``images/{split}/{pid}/image.png``), questions with a textual context (the hint holds the answer), and questions with
neither (common knowledge). Each question type keeps one option list in one order (so a 135M model learns the
letters in a few minutes). Subjects, grades, ``choices`` / ``answer`` (0-based), ``hint`` (empty when none),
``image`` (file name or null) and ``pid_splits.json`` follow the release.

    python -m zinit.recipes.make_scienceqa_demo out/scienceqa-data
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from zinit.cliargs import positive_int
from zinit.files import atomic_write

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
ANIMALS = [("cow", "mammal"), ("trout", "fish"), ("eagle", "bird"), ("horse", "mammal"), ("salmon", "fish"),
           ("owl", "bird"), ("goat", "mammal"), ("pike", "fish"), ("crow", "bird")]
CLASSES = ["mammal", "fish", "bird"]
RHYMES = [("cat", "hat"), ("dog", "log"), ("cake", "lake")]
COUNTS = ["2", "3", "4", "5"]
PLACES = ["Varnel", "Osric", "Tamsin", "Quillan", "Brevik", "Lorum", "Dace", "Ferrin"]


def _draw(colour: str, shape: str, size: int = 64):
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    box = (size * 0.18, size * 0.18, size * 0.82, size * 0.82)
    if shape == "circle":
        draw.ellipse(box, fill=COLOURS[colour])
    elif shape == "square":
        draw.rectangle(box, fill=COLOURS[colour])
    else:
        draw.polygon([(size / 2, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLOURS[colour])
    return image


def _choices(answer: str, pool: list[str]) -> tuple[list[str], int]:
    """Each question type keeps one option list in one order, so a small model can learn it in a few minutes."""
    return list(pool), list(pool).index(answer)


def make_problem(rng: random.Random, kind: int) -> tuple[dict[str, Any], Any]:
    """One problem (and its image or None): kind 0 image, 1 textual context, 2 neither."""
    grade = f"grade{rng.randint(1, 12)}"
    base = {"lecture": "", "solution": "", "task": "closed choice", "grade": grade}
    if kind == 0:
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        if rng.random() < 0.6:
            choices, answer = _choices(colour, list(COLOURS))
            question = "What colour is the shape in the picture?"
        else:
            choices, answer = _choices(shape, list(SHAPES))
            question = "Which shape is shown in the picture?"
        return {**base, "question": question, "choices": choices, "answer": answer, "hint": "",
                "image": "image.png", "subject": "natural science"}, _draw(colour, shape)
    if kind == 1:
        town, other = rng.sample(PLACES, 2)
        n = rng.randint(2, 5)
        choices, answer = _choices(str(n), COUNTS)
        hint = f"{town} has {n} bridges. {other} has {rng.randint(10, 20)} bridges."
        return {**base, "question": f"How many bridges does {town} have?", "choices": choices, "answer": answer,
                "hint": hint, "image": None, "subject": "social science"}, None
    if rng.random() < 0.5:
        animal, cls = rng.choice(ANIMALS)
        choices, answer = _choices(cls, CLASSES)
        return {**base, "question": f"What kind of animal is a {animal}?", "choices": choices, "answer": answer,
                "hint": "", "image": None, "subject": "natural science"}, None
    word, rhyme = rng.choice(RHYMES)
    choices, answer = _choices(rhyme, [r for _, r in RHYMES])
    return {**base, "question": f"Which word rhymes with {word}?", "choices": choices, "answer": answer, "hint": "",
            "image": None, "subject": "language science"}, None


def make(out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``problems.json``, ``pid_splits.json`` and the images into ``out``; half the questions have an image."""
    sizes = sizes or {"train": 400, "val": 100, "test": 200}
    root = Path(out)
    rng = random.Random(seed)
    problems, splits, pid = {}, {}, 1000
    for split, n in sizes.items():
        splits[split] = []
        for i in range(n):
            pid += 1
            kind = 0 if i % 2 == 0 else 1 + (i // 2) % 2
            problem, image = make_problem(rng, kind)
            problem["split"] = split
            problems[str(pid)] = problem
            splits[split].append(str(pid))
            if image is not None:
                folder = root / "images" / split / str(pid)
                folder.mkdir(parents=True, exist_ok=True)
                image.save(folder / "image.png")
    splits.update({f"mini{s}": pids[: len(pids) // 4] for s, pids in list(splits.items())})
    root.mkdir(parents=True, exist_ok=True)
    for file, data in (("problems.json", json.dumps(problems, indent=1)), ("pid_splits.json", json.dumps(splits))):
        atomic_write(root / file, lambda tmp, data=data: Path(tmp).write_text(data + "\n"))
    return root


def main(argv: list[str] | None = None) -> None:
    """The command line: ``python -m zinit.recipes.make_scienceqa_demo OUT [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder to write the release into")
    parser.add_argument("--train", type=positive_int, default=400)
    parser.add_argument("--val", type=positive_int, default=100)
    parser.add_argument("--test", type=positive_int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(make(args.out, {"train": args.train, "val": args.val, "test": args.test}, args.seed))


if __name__ == "__main__":
    main()
