"""F1 per method with the seed spread, from docs/real_weights/squad/summary.json (the README's SQuAD table).

    python docs/real_weights/squad/plot.py docs/real_weights/squad/summary.json docs/real_weights/squad/f1_by_method.png
"""

from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(source: str, dest: str) -> None:
    summary = json.loads(open(source).read())
    rows = summary["rows"]
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for i, (method, row) in enumerate(rows.items()):
        ax.bar(i, row["f1_mean"], yerr=row["f1_std"], color=f"C{i}", alpha=0.6, capsize=4)
        ax.scatter([i] * len(row["f1"]), row["f1"], color="k", s=12, zorder=3)
        ax.text(i, 3, f"blr {row['blr_chosen']:g}\n{row['trainable_parameters']:,}", ha="center", fontsize=7)
    ax.axhline(summary["no_answer_baseline"]["f1"], color="grey", ls="--", lw=1)
    ax.text(len(rows) - 0.5, summary["no_answer_baseline"]["f1"] + 1.5, '"no answer" to every question',
            ha="right", fontsize=8, color="grey")
    ax.set_xticks(range(len(rows)), list(rows))
    ax.set_ylabel("dev F1 (mean ± std, seeds as dots)")
    ax.set_ylim(0, 105)
    ax.set_title("SQuAD 2.0 demo on all-MiniLM-L6-v2: each method at its lr (searched ×1, 10, 30)", fontsize=9)
    fig.tight_layout()
    fig.savefig(dest, dpi=120)


if __name__ == "__main__":
    main(*sys.argv[1:3])
