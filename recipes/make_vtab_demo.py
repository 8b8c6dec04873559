"""Write a demo task in the VTAB-1k folder layout from real images that ship offline: scikit-learn's digits
(1,797 handwritten digits, 8×8 grey levels, 10 classes).

``<out>/digits/{train800,val200,train800val200,test}.txt`` with lines ``images/<split>/<n>.jpg <label>`` and the
images as JPEG files, exactly as the VPT/NOAH preparations lay out a VTAB task: 800 training, 200 validation and the
remaining 797 test images (a fixed shuffle). Train on it with ``zinit train vtab --task digits --num-classes 10``.

    python -m zinit.recipes.make_vtab_demo out/vtab-data
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

from zinit.cliargs import positive_int


def make(out: str | Path, size: int = 32, seed: int = 0) -> Path:
    """Write the demo task under ``out/digits`` (images upscaled to ``size``) and return its folder."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = list(range(len(digits.target)))
    random.Random(seed).shuffle(order)
    parts = {"train800": order[:800], "val200": order[800:1000], "test": order[1000:]}
    folder = Path(out) / "digits"
    lines: dict[str, list[str]] = {}
    for split, indices in parts.items():
        (folder / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for n, i in enumerate(indices):
            pixels = (digits.images[i] * (255.0 / 16.0)).astype(np.uint8)
            image = Image.fromarray(pixels, mode="L").resize((size, size), Image.BILINEAR).convert("RGB")
            name = f"images/{split}/{n}.jpg"
            image.save(folder / name, quality=95)
            lines[split].append(f"{name} {int(digits.target[i])}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (folder / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return folder


def main(argv: list[str] | None = None) -> None:
    """The command line: ``python -m zinit.recipes.make_vtab_demo OUT [options]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="VTAB root to write (the task goes to OUT/digits)")
    parser.add_argument("--size", type=positive_int, default=32, help="image side in pixels (default 32)")
    args = parser.parse_args(argv)
    print(make(args.out, args.size))


if __name__ == "__main__":
    main()
