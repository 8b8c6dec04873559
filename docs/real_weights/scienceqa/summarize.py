"""One table and one plot from the ScienceQA runs of docs/real_weights/scienceqa/README.md.

Reads ``<root>/<variant>-s<seed>/report.json`` (the test table of the adapter of the best val epoch) and the wall time
``zinit train`` logged (``<root>/log/<variant>-s<seed>.log``, from ``/usr/bin/time -v``, when present), and writes
``summary.md``, ``summary.json`` and ``summary.png``: every column's mean ± sample std over the seeds per variant, and
the IMG / Avg columns with each seed's point.

    python docs/real_weights/scienceqa/summarize.py out/sqa-real docs/real_weights/scienceqa
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path

VARIANTS = {"dino": "DINOv2 ViT-S/14 features (pretrained)", "random": "the same ViT-S/14, random weights",
            "noimg": "no image (--no-image)"}
COLUMNS = ("NAT", "SOC", "LAN", "TXT", "IMG", "NO", "G1-6", "G7-12", "Avg")


def _wall_min(log: Path) -> float | None:
    if not log.is_file():
        return None
    m = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", log.read_text())
    if not m:
        return None
    h, mnt, sec = int(m.group(1) or 0), int(m.group(2)), float(m.group(3))
    return h * 60 + mnt + sec / 60


def collect(root: Path) -> dict:
    out = {}
    for variant in VARIANTS:
        runs = sorted(root.glob(f"{variant}-s*/report.json"))
        if not runs:
            continue
        tables = [json.loads(r.read_text()) for r in runs]
        seeds = [int(r.parent.name.rsplit("-s", 1)[1]) for r in runs]
        walls = [_wall_min(root / "log" / f"{r.parent.name}.log") for r in runs]
        out[variant] = {
            "seeds": seeds,
            "per_seed": {c: [t["table"][c] for t in tables] for c in COLUMNS},
            "mean": {c: statistics.fmean(t["table"][c] for t in tables) for c in COLUMNS},
            "std": {c: statistics.stdev([t["table"][c] for t in tables]) if len(tables) > 1 else 0.0
                    for c in COLUMNS},
            "no_valid_letter": [t["table"]["no_valid_letter"] for t in tables],
            "trainable_parameters": tables[0]["trainable_parameters"],
            "best_val_epoch": [t["best_val"]["epoch"] for t in tables],
            "wall_min": [w for w in walls if w is not None],
        }
    return out


def table(summary: dict) -> str:
    lines = ["| test (200 questions) | " + " | ".join(COLUMNS) + " | trainable | wall per run |",
             "|---" * (len(COLUMNS) + 3) + "|"]
    for variant, s in summary.items():
        cells = [f"{s['mean'][c]:.1f} ± {s['std'][c]:.1f}" for c in COLUMNS]
        cells[COLUMNS.index("IMG")] = f"**{cells[COLUMNS.index('IMG')]}**"
        wall = f"{statistics.fmean(s['wall_min']):.0f} min" if s["wall_min"] else "-"
        lines.append(f"| {VARIANTS[variant]} | " + " | ".join(cells) + f" | {s['trainable_parameters']:,} | {wall} |")
    return "\n".join(lines)


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, column in zip(axes, ("IMG", "Avg")):
        for i, (variant, s) in enumerate(summary.items()):
            ax.bar(i, s["mean"][column], yerr=s["std"][column], color=f"C{i}", alpha=0.6, capsize=4)
            ax.scatter([i] * len(s["per_seed"][column]), s["per_seed"][column], color="k", s=12, zorder=3)
        ax.set_xticks(range(len(summary)), [v for v in summary], rotation=0)
        ax.set_title(f"{column} (test, mean ± std, seeds as dots)")
        if column == "IMG":
            ax.axhline(25, color="grey", ls="--", lw=1)
            ax.text(len(summary) - 0.5, 26, "chance (4 options)", ha="right", fontsize=8, color="grey")
    axes[0].set_ylabel("accuracy %")
    fig.suptitle("ScienceQA demo, real photos: SmolLM2-135M + zinit (L=30, K=10), 3 seeds", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> None:
    root, dest = Path(argv[0]), Path(argv[1])
    summary = collect(root)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (dest / "summary.md").write_text(table(summary) + "\n")
    plot(summary, dest / "summary.png")
    print(table(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
