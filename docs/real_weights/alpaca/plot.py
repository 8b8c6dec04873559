"""The Alpaca half of "Does it work on real weights?": held-out exact match of the zero- and random-init gate on the
real SmolLM2-135M-Instruct, one dot per seed, from a ``zinit ablate alpaca --gates zero,random`` run.

    python docs/real_weights/alpaca/plot.py out/abl-gate3/ablate.json docs/real_weights/alpaca

Writes ``gate_3seeds.png`` and ``gate_3seeds.json`` (per seed: exact match, held-out loss, wall) into the folder.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def collect(ablate_json: Path) -> dict[str, list[dict]]:
    runs = json.loads(ablate_json.read_text())["runs"]
    out: dict[str, list[dict]] = {}
    for r in runs:
        if r["status"] == "ok":
            out.setdefault(r["point"]["gate"], []).append(
                {"seed": r["seed"], "exact_match": r["metrics"]["exact_match"], "eval_loss": r["metrics"]["eval_loss"],
                 "wall_s": round(r["wall_s"], 1)})
    return out


def plot(points: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    for i, (gate, runs) in enumerate(points.items()):
        values = [r["exact_match"] for r in runs]
        mean = statistics.mean(values)
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        ax.bar(i, mean, 0.6, yerr=std, capsize=4, color="tab:blue" if gate == "zero" else "tab:gray", alpha=0.7)
        ax.plot([i] * len(values), values, "o", color="black", ms=4)
    ax.set_xticks(range(len(points)), [f"{g}-init gate" for g in points])
    ax.set_ylabel("held-out exact match % (greedy)")
    ax.set_title("SmolLM2-135M-Instruct, 126 steps, 3 seeds", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    points = collect(Path(argv[0]))
    out = Path(argv[1])
    out.mkdir(parents=True, exist_ok=True)
    (out / "gate_3seeds.json").write_text(json.dumps(points, indent=1) + "\n")
    plot(points, out / "gate_3seeds.png")
    print(json.dumps(points))


if __name__ == "__main__":
    main(sys.argv[1:])
