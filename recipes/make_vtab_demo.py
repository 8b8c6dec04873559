"""Write demo tasks in the VTAB-1k folder layout from real images that ship offline.

- ``digits``: scikit-learn's digits (1,797 handwritten digits, 8×8 grey levels, 10 classes), upscaled to 32 pixels;
  800 training, 200 validation and the remaining 797 test images (a fixed shuffle).
- ``fashion_mnist``: Fashion-MNIST (Debian package ``dataset-fashion-mnist``: 28×28 grey clothing photos, 10
  classes); train800 and val200 drawn from its 60,000 training images, ``test`` from its 10,000 test images
  (1,000 by default), a fixed seeded draw.
- ``fashion_rotation``: a structured-style task (VTAB's Structured group asks for geometry, not object identity, as
  dSprites orientation or smallNORB azimuth do): a Fashion-MNIST image turned by 0, 90, 180 or 270 degrees
  counter-clockwise, label = the number of quarter turns (4 classes, balanced in every split); source images drawn as
  for ``fashion_mnist`` (training images for train800/val200, test images for test), independently of it.

Each task is written as ``<out>/<task>/{train800,val200,train800val200,test}.txt`` with lines
``images/<split>/<n>.jpg <label>`` and the images as JPEG files, exactly as the VPT/NOAH preparations lay out a VTAB
task. The same seed writes the same files. They are custom tasks for ``zinit train vtab``: pass ``--num-classes``
(10, 10, 4)::

    python -m zinit.recipes.make_vtab_demo out/vtab-data                  # digits (as before)
    python -m zinit.recipes.make_vtab_demo out/vtab-data --task all       # digits, fashion_mnist, fashion_rotation
    zinit train vtab --task fashion_rotation --num-classes 4 --data out/vtab-data ...

Fashion-MNIST is read from ``--fashion-source`` (default ``/usr/share/datasets/fashion-mnist``, where
``apt-get install dataset-fashion-mnist`` puts it): the original idx files
``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzipped or not. Without them ``--task all`` writes digits and says
which tasks it skipped; naming a Fashion-MNIST task is an error.
"""

from __future__ import annotations

import argparse
import gzip
import random
import sys
from pathlib import Path
from typing import Any, Sequence

from zinit.cliargs import int_at_least, positive_int

#: The tasks this script writes, with their class counts (``zinit train vtab --num-classes``).
CLASSES = {"digits": 10, "fashion_mnist": 10, "fashion_rotation": 4}
FASHION_TASKS = ("fashion_mnist", "fashion_rotation")
#: Where Debian's ``dataset-fashion-mnist`` installs the original files.
FASHION_SOURCE = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                 "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
#: VTAB-1k's training and validation counts.
TRAIN, VAL = 800, 200
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _save(pixels: Any, path: Path, size: int) -> None:
    """A grey uint8 ``[H, W]`` array as an RGB JPEG of side ``size`` (bilinear when it must be resized)."""
    from PIL import Image

    image = Image.fromarray(pixels)
    if image.size != (size, size):
        image = image.resize((size, size), Image.BILINEAR)
    image.convert("RGB").save(path, quality=95)


def write_task(folder: Path, parts: dict[str, Sequence[tuple[Any, int]]], size: int) -> Path:
    """Write ``parts`` (split -> [(grey uint8 image, label)], for train800, val200 and test) in the VTAB layout."""
    lines: dict[str, list[str]] = {}
    for split, items in parts.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for n, (pixels, label) in enumerate(items):
            name = f"images/{split}/{n}.jpg"
            _save(pixels, folder / name, size)
            lines[split].append(f"{name} {int(label)}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def make(out: str | Path, size: int = 32, seed: int = 0) -> Path:
    """Write the digits task under ``out/digits`` (images upscaled to ``size``) and return its folder."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    pixels = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    parts = {split: [(pixels[i], digits.target[i]) for i in indices] for split, indices in
             {"train800": order[:TRAIN], "val200": order[TRAIN:TRAIN + VAL], "test": order[TRAIN + VAL:]}.items()}
    return write_task(Path(out) / "digits", parts, size)


# ---------------------------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: str | Path) -> Any:
    """An idx file (the MNIST format: two zero bytes, a type code, the rank, big-endian int32 dimensions, then the
    data), gzipped or not, as a numpy array. A file that is not one is refused with its name."""
    import numpy as np

    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path} is not a readable gzip file ({exc})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path} is not an idx file (it starts {raw[:4].hex() or 'empty'}; an idx file starts "
                         "0000 then a type code such as 08 and the rank)")
    rank = raw[3]
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    header = 4 + 4 * rank
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its idx header")
    shape = tuple(int(d) for d in np.frombuffer(raw[4:header], dtype=">u4"))
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - header != expected:
        raise ValueError(f"{path}: its idx header says {'×'.join(map(str, shape))} values of {dtype.itemsize} byte(s) "
                         f"({expected} bytes) but {len(raw) - header} bytes follow")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape)


def _idx_file(source: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (source / name).is_file():
            return source / name
    raise FileNotFoundError(f"Fashion-MNIST file {stem}(.gz) is not in {source} (apt-get install dataset-fashion-mnist "
                            "puts the original files in /usr/share/datasets/fashion-mnist; or pass --fashion-source DIR)")


def fashion_available(source: str | Path = FASHION_SOURCE) -> bool:
    """Whether ``source`` holds the four Fashion-MNIST idx files."""
    try:
        for stems in FASHION_FILES.values():
            for stem in stems:
                _idx_file(Path(source), stem)
    except FileNotFoundError:
        return False
    return True


def load_fashion(source: str | Path = FASHION_SOURCE) -> dict[str, tuple[Any, Any]]:
    """``{"train": (images, labels), "test": (images, labels)}``: uint8 ``[N, H, W]`` images, labels 0..9."""
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"Fashion-MNIST folder {source} does not exist (apt-get install dataset-fashion-mnist "
                                "puts the original files in /usr/share/datasets/fashion-mnist; or pass "
                                "--fashion-source DIR)")
    out = {}
    for split, (image_stem, label_stem) in FASHION_FILES.items():
        image_file, label_file = _idx_file(source, image_stem), _idx_file(source, label_stem)
        images, labels = read_idx(image_file), read_idx(label_file)
        if images.ndim != 3 or images.dtype.itemsize != 1:
            raise ValueError(f"{image_file}: expected uint8 images [N, H, W], got {images.dtype} {images.shape}")
        if labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(f"{label_file}: expected {len(images)} labels (one per image of {image_file.name}), got "
                             f"shape {labels.shape}")
        if len(labels) and not (0 <= labels.min() and labels.max() <= 9):
            raise ValueError(f"{label_file}: labels must be 0..9, found {int(labels.min())}..{int(labels.max())}")
        out[split] = (images.astype("u1", copy=False), labels.astype("i8"))
    return out


def fashion_draw(task: str, n_train: int, n_test: int, seed: int, test_size: int) -> dict[str, list[int]]:
    """Source indices of each split of ``task``: train800 and val200 from the ``n_train`` training images (disjoint),
    test from the ``n_test`` test images; each task draws with its own stream of ``seed``."""
    import numpy as np

    if n_train < TRAIN + VAL:
        raise ValueError(f"Fashion-MNIST's training file holds {n_train} images; VTAB-1k needs {TRAIN + VAL}")
    if n_test < test_size:
        raise ValueError(f"Fashion-MNIST's test file holds {n_test} images; --test-size {test_size} asks for more")
    rng = np.random.default_rng([seed, FASHION_TASKS.index(task)])
    train = rng.permutation(n_train)[:TRAIN + VAL].tolist()
    return {"train800": train[:TRAIN], "val200": train[TRAIN:], "test": rng.permutation(n_test)[:test_size].tolist()}


def make_fashion(out: str | Path, task: str = "fashion_mnist", source: str | Path = FASHION_SOURCE,
                 size: int | None = None, seed: int = 0, test_size: int = 1000,
                 data: dict[str, tuple[Any, Any]] | None = None) -> Path:
    """Write ``fashion_mnist`` or ``fashion_rotation`` under ``out/<task>`` (images at ``size``, default the source's
    own 28) and return its folder. ``data``: :func:`load_fashion`'s result, to read the files once for both tasks."""
    import numpy as np

    if task not in FASHION_TASKS:
        raise ValueError(f"task {task!r} is not one of {', '.join(FASHION_TASKS)}")
    data = load_fashion(source) if data is None else data
    (train_x, train_y), (test_x, test_y) = data["train"], data["test"]
    draw = fashion_draw(task, len(train_y), len(test_y), seed, test_size)
    size = size or train_x.shape[1]
    parts: dict[str, list[tuple[Any, int]]] = {}
    for number, (split, indices) in enumerate(draw.items()):
        images, labels = (test_x, test_y) if split == "test" else (train_x, train_y)
        if task == "fashion_mnist":
            parts[split] = [(images[i], int(labels[i])) for i in indices]
        else:  # quarter turns, balanced within the split, in a seeded order (a stream of its own per split)
            rng = np.random.default_rng([seed, FASHION_TASKS.index(task), 1 + number])
            turns = rng.permutation(np.arange(len(indices)) % 4)
            parts[split] = [(np.ascontiguousarray(np.rot90(images[i], int(k))), int(k))
                            for i, k in zip(indices, turns)]
    return write_task(Path(out) / task, parts, size)


def make_tasks(out: str | Path, tasks: Sequence[str], source: str | Path = FASHION_SOURCE, size: int | None = None,
               seed: int = 0, test_size: int = 1000) -> dict[str, Path]:
    """Write each of ``tasks`` under ``out``; returns task -> folder."""
    written: dict[str, Path] = {}
    data = load_fashion(source) if any(t in FASHION_TASKS for t in tasks) else None
    for task in tasks:
        if task == "digits":
            written[task] = make(out, size or 32, seed)
        else:
            written[task] = make_fashion(out, task, source, size, seed, test_size, data)
    return written


def main(argv: list[str] | None = None) -> None:
    """The command line: ``python -m zinit.recipes.make_vtab_demo OUT [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="VTAB root to write (each task goes to OUT/<task>)")
    parser.add_argument("--task", default="digits", choices=[*CLASSES, "fashion", "all"],
                        help="the task to write (default digits; fashion = fashion_mnist; all = the three, skipping "
                             "the Fashion-MNIST ones with a message when --fashion-source is missing)")
    parser.add_argument("--size", type=positive_int, default=None,
                        help="image side in pixels (default: 32 for digits, Fashion-MNIST's own 28)")
    parser.add_argument("--seed", type=int_at_least(0), default=0, help="seed of the draws (default 0)")
    parser.add_argument("--test-size", type=positive_int, default=1000,
                        help="test images of the Fashion-MNIST tasks (default 1000; digits' test is its remaining 797)")
    parser.add_argument("--fashion-source", default=FASHION_SOURCE,
                        help=f"folder of the Fashion-MNIST idx files (default {FASHION_SOURCE})")
    args = parser.parse_args(argv)
    tasks = list(CLASSES) if args.task == "all" else ["fashion_mnist" if args.task == "fashion" else args.task]
    if not fashion_available(args.fashion_source):
        wanted = [t for t in tasks if t in FASHION_TASKS]
        if wanted and args.task != "all":
            parser.error(f"argument --fashion-source: no Fashion-MNIST idx files in {args.fashion_source} "
                         "(apt-get install dataset-fashion-mnist, or pass --fashion-source DIR)")
        if wanted:
            print(f"skipping {', '.join(wanted)}: no Fashion-MNIST idx files in {args.fashion_source} "
                  "(apt-get install dataset-fashion-mnist, or pass --fashion-source DIR)", file=sys.stderr)
        tasks = [t for t in tasks if t not in FASHION_TASKS]
    for task, folder in make_tasks(args.out, tasks, args.fashion_source, args.size, args.seed, args.test_size).items():
        print(folder)
        print(f"  zinit train vtab --task {task} --num-classes {CLASSES[task]} --data {args.out} ...", file=sys.stderr)


if __name__ == "__main__":
    main()
