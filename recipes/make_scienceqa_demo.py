"""Write a small demo set in the exact ScienceQA release format, with generated images.

Real ScienceQA cannot be fetched offline, so the demo is made here, with the three kinds of question whose columns
the paper reports: image questions that only the picture answers (the colour or the shape drawn in
``images/{split}/{pid}/image.png``), questions with a textual context (the hint holds the answer), and questions with
neither (common knowledge). Each question type keeps one option list in one order (so a 135M model learns the
letters in a few minutes). Subjects, grades, ``choices`` / ``answer`` (0-based), ``hint`` (empty when none),
``image`` (file name or null) and ``pid_splits.json`` follow the release.

``--images drawn`` (default) draws the pictures: a coloured circle, square or triangle, which any encoder, even one
with random weights, tells apart. ``--images fashion-mnist`` asks instead which garment a real photo shows (a
Fashion-MNIST image: T-shirt, pullover, sneaker or ankle boot, two pairs of look-alikes), so the answer needs the
features of a pretrained encoder; training and validation photos come from Fashion-MNIST's training images, test
photos from its test images, each used once.

    python -m zinit.recipes.make_scienceqa_demo out/scienceqa-data
    python -m zinit.recipes.make_scienceqa_demo out/sqa-photos --images fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from zinit.cliargs import positive_int
from zinit.files import atomic_write

from .make_vtab_demo import FASHION_SOURCE, load_fashion

COLOURS = {"red": (215, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210), "yellow": (235, 205, 40)}
SHAPES = ("circle", "square", "triangle")
ANIMALS = [("cow", "mammal"), ("trout", "fish"), ("eagle", "bird"), ("horse", "mammal"), ("salmon", "fish"),
           ("owl", "bird"), ("goat", "mammal"), ("pike", "fish"), ("crow", "bird")]
CLASSES = ["mammal", "fish", "bird"]
RHYMES = [("cat", "hat"), ("dog", "log"), ("cake", "lake")]
COUNTS = ["2", "3", "4", "5"]
PLACES = ["Varnel", "Osric", "Tamsin", "Quillan", "Brevik", "Lorum", "Dace", "Ferrin"]
#: The garments of ``--images fashion-mnist``: Fashion-MNIST label -> option text (two tops, two shoes).
GARMENTS = {0: "T-shirt", 2: "pullover", 7: "sneaker", 9: "ankle boot"}
IMAGE_SOURCES = ("drawn", "fashion-mnist")


class Photos:
    """Real Fashion-MNIST photos of :data:`GARMENTS` for the image questions, each drawn once, per split: ``train``
    and ``val`` from the training images, ``test`` from the test images (so no test photo was ever trained on)."""

    def __init__(self, source: str | Path, seed: int) -> None:
        import numpy as np

        data = load_fashion(source)
        rng = np.random.default_rng(seed)
        self._pools = {}
        for part, (images, labels) in data.items():
            keep = np.flatnonzero(np.isin(labels, list(GARMENTS)))
            rng.shuffle(keep)
            self._pools[part] = [(images[i], int(labels[i])) for i in keep]

    def take(self, split: str) -> tuple[Any, str]:
        """A photo (RGB PIL image, 28×28) and its garment's name, never handed out before."""
        from PIL import Image

        pool = self._pools["test" if split == "test" else "train"]
        if not pool:
            raise ValueError(f"Fashion-MNIST has no photo left for split {split!r}: ask for fewer questions")
        pixels, label = pool.pop()
        return Image.fromarray(pixels, mode="L").convert("RGB"), GARMENTS[label]


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


def make_problem(rng: random.Random, kind: int, photo: tuple[Any, str] | None = None) -> tuple[dict[str, Any], Any]:
    """One problem (and its image or None): kind 0 image (drawn, or ``photo``: an image and its garment), 1 textual
    context, 2 neither."""
    grade = f"grade{rng.randint(1, 12)}"
    base = {"lecture": "", "solution": "", "task": "closed choice", "grade": grade}
    if kind == 0 and photo is not None:
        image, garment = photo
        choices, answer = _choices(garment, list(GARMENTS.values()))
        return {**base, "question": "Which piece of clothing is shown in the photo?", "choices": choices,
                "answer": answer, "hint": "", "image": "image.png", "subject": "natural science"}, image
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


def make(out: str | Path, sizes: dict[str, int] | None = None, seed: int = 0, images: str = "drawn",
         fashion_source: str | Path | None = None) -> Path:
    """Write ``problems.json``, ``pid_splits.json`` and the images into ``out``; half the questions have an image,
    drawn or (``images="fashion-mnist"``) a real photo read from ``fashion_source`` (default where Debian's
    ``dataset-fashion-mnist`` puts it).

    >>> import tempfile, json
    >>> root = make(tempfile.mkdtemp(), {"train": 4, "val": 2, "test": 2})
    >>> sorted(json.loads((root / "pid_splits.json").read_text()))
    ['minitest', 'minitrain', 'minival', 'test', 'train', 'val']
    """
    if images not in IMAGE_SOURCES:
        raise ValueError(f"images={images!r}: choose one of {', '.join(IMAGE_SOURCES)}")
    sizes = sizes or {"train": 400, "val": 100, "test": 200}
    root = Path(out)
    rng = random.Random(seed)
    photos = None
    if images == "fashion-mnist":
        photos = Photos(fashion_source or FASHION_SOURCE, seed)
    problems, splits, pid = {}, {}, 1000
    for split, n in sizes.items():
        splits[split] = []
        for i in range(n):
            pid += 1
            kind = 0 if i % 2 == 0 else 1 + (i // 2) % 2
            problem, image = make_problem(rng, kind, photos.take(split) if photos and kind == 0 else None)
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
    parser.add_argument("--images", choices=IMAGE_SOURCES, default="drawn",
                        help="drawn shapes (default), or real Fashion-MNIST photos whose garment is asked")
    parser.add_argument("--fashion-source", default=None,
                        help="folder of the Fashion-MNIST idx files (default /usr/share/datasets/fashion-mnist)")
    args = parser.parse_args(argv)
    try:
        root = make(args.out, {"train": args.train, "val": args.val, "test": args.test}, args.seed, args.images,
                    args.fashion_source)
    except (FileNotFoundError, ValueError) as exc:
        parser.error(str(exc))
    print(root)


if __name__ == "__main__":
    main()
