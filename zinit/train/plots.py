"""PNG plots of a run from its ``metrics.jsonl``: loss and learning rate, and the gates opening layer by layer."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (one JSON object per line)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_run(metrics_path: str | Path, folder: str | Path) -> list[Path]:
    """Write ``loss_lr.png`` and (when gates were logged) ``gates.png`` into ``folder``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in read_metrics(metrics_path) if "loss" in r]
    if not records:
        return []
    folder = Path(folder)
    steps = [r["step"] for r in records]
    written = []

    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 5.5), sharex=True)
    losses = [r["loss"] for r in records]
    ax_loss.plot(steps, losses, lw=0.8, color="tab:blue", alpha=0.45, label="training loss")
    span = max(1, len(losses) // 20)  # trailing mean over ~5% of the run, to see the trend through the noise
    smooth = [sum(losses[max(0, i - span + 1):i + 1]) / len(losses[max(0, i - span + 1):i + 1])
              for i in range(len(losses))]
    ax_loss.plot(steps, smooth, lw=1.6, color="tab:blue", label=f"mean of last {span}")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    evals = [r for r in read_metrics(metrics_path) if "eval_loss" in r]
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=6, lw=1.4,
                     color="tab:orange", label="held-out loss")
    ax_loss.legend()
    ax_lr.plot(steps, [r["lr"] for r in records], lw=1, color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle("zinit training")
    fig.tight_layout()
    written.append(folder / "loss_lr.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    gated = [r for r in records if r.get("gates")]
    if gated:
        layers = sorted(gated[0]["gates"], key=int)
        grid = [[r["gates"][n] for r in gated] for n in layers]
        fig, ax = plt.subplots(figsize=(7, 0.18 * len(layers) + 2.2))
        image = ax.imshow(grid, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                          extent=(gated[0]["step"] - 0.5, gated[-1]["step"] + 0.5, -0.5, len(layers) - 0.5))
        ticks = list(range(0, len(layers), max(1, len(layers) // 10)))
        ax.set_yticks(ticks, [layers[i] for i in ticks])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("adapted layer")
        ax.set_title("mean |gate| per layer (|tanh(g)|): the prompts switching on")
        fig.colorbar(image, ax=ax, label="mean |gate|")
        fig.tight_layout()
        written.append(folder / "gates.png")
        fig.savefig(written[-1], dpi=110)
        plt.close(fig)
    return written
