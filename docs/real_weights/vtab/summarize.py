"""One table and one plot from the ``zinit compare vtab`` runs of docs/real_weights/vtab/README.md.

``zinit compare`` tabulates one run (one task, one --num-classes) and shows each method's mean over seeds; this
reads the ``compare.json`` of every run given and each method's ``<task>/result.json`` (per-seed test top-1, the lr
the grid chose) and writes ``summary.md`` / ``summary.json`` / ``summary.png`` into DEST: mean ± std over seeds, train
images/s and wall per row, and the paper's ordering (zinit ≥ VPT-deep, zinit ≥ linear probe + 2 points) checked per
task. Each run's task is read from its compare.json; several runs of one task add up (rows in the order given, a
method's later row replacing an earlier one), so methods run later (``--methods full``) join the task's table.

    python docs/real_weights/vtab/summarize.py docs/real_weights/vtab out/vtab-dinov2/digits out/vtab-dinov2/full-digits ...
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

TASKS = ("digits", "fashion_mnist", "fashion_rotation")


def _tasks(run: Path, report: dict) -> list[str]:
    """The tasks of one run: the ``--task`` it was given (``--task X`` or ``--task=X``, a comma list), or, for
    ``all``, the task folders its methods wrote."""
    from zinit.cliargs import option_value

    named = option_value(report["recipe_args"], "--task") or "all"
    if named != "all":
        return named.split(",")
    return sorted({p.parent.name for p in run.glob("*/*/result.json")}, key=lambda t: (t not in TASKS, t))


def collect(runs: list[Path]) -> dict:
    """``{task: {method: row}}`` from the compare.json of each run folder, tasks in :data:`TASKS` order."""
    tasks: dict[str, dict] = {}
    for run in runs:
        report = json.loads((run / "compare.json").read_text())
        for task in _tasks(run, report):
            rows = tasks.setdefault(task, {})
            for row in report["rows"]:
                result_file = run / row["method"] / task / "result.json"
                if row["status"] != "ok" or not result_file.is_file():
                    status = row["status"] if row["status"] != "ok" else f"no {result_file}"
                    if rows.get(row["method"], {}).get("status") != "ok":  # a failed row never hides a finished one
                        rows[row["method"]] = {"status": status, "reason": row.get("reason", "")}
                    continue
                result = json.loads(result_file.read_text())
                rows[row["method"]] = {
                    "status": "ok", "test_top1": result["test_top1"], "mean": result["mean"], "std": result["std"],
                    "best_blr": result["best"]["blr"], "best_val_top1": result["best"]["val_top1"],
                    "search": {f"{s['blr']:g}": s["val_top1"] for s in result["search"]},
                    "trainable_parameters": row["trainable_parameters"], "images_per_s": row["throughput"],
                    "wall_min": row["wall_s"] / 60}
    return {t: tasks[t] for t in sorted(tasks, key=lambda t: TASKS.index(t) if t in TASKS else len(TASKS))}


def ordering(rows: dict) -> dict:
    z, v, lin = (rows.get(m, {}).get("mean") for m in ("zinit", "vpt", "linear"))
    return {"zinit>=vpt": None if z is None or v is None else z >= v,
            "zinit>=linear+2": None if z is None or lin is None else z >= lin + 2}


def table(tasks: dict) -> str:
    lines = []
    for task, rows in tasks.items():
        lines += [f"### {task}", "", "| method | test top-1 % (mean ± std over seeds) | per seed | lr chosen (blr; val200 %) "
                  "| trainable | train images/s | wall |", "|---|---|---|---|---|---|---|"]
        for method, r in rows.items():
            if r["status"] != "ok":
                lines.append(f"| {method} | {r['status']}: {r['reason'].splitlines()[0] if r['reason'] else ''} "
                             "| | | | | |")
                continue
            seeds = " / ".join(f"{a:.1f}" for a in r["test_top1"])
            speed = "–" if r["images_per_s"] is None else f"{r['images_per_s']:.0f}"
            lines.append(f"| {method} | {r['mean']:.2f} ± {r['std']:.2f} | {seeds} | {r['best_blr']:g} "
                         f"({r['best_val_top1']:.1f}) | {r['trainable_parameters']:,} | {speed} | "
                         f"{r['wall_min']:.1f} min |")
        check = ordering(rows)
        lines += ["", "paper's ordering: " + ", ".join(f"{k} {'yes' if ok else 'NO' if ok is False else 'n/a'}"
                                                       for k, ok in check.items()), ""]
    return "\n".join(lines)


def plot(tasks: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(dict.fromkeys(m for rows in tasks.values() for m, r in rows.items() if r["status"] == "ok"))
    lowest = min(r["mean"] - r["std"] for rows in tasks.values() for r in rows.values() if r["status"] == "ok")
    fig, ax = plt.subplots(figsize=(1.6 + 2.4 * len(tasks), 4))
    w = 0.8 / max(len(methods), 1)
    for j, method in enumerate(methods):
        xs, means, stds = [], [], []
        for i, rows in enumerate(tasks.values()):
            r = rows.get(method)
            if r and r["status"] == "ok":
                xs.append(i + (j - (len(methods) - 1) / 2) * w)
                means.append(r["mean"])
                stds.append(r["std"])
        ax.bar(xs, means, w, yerr=stds, label=method, capsize=2)
    ax.set_xticks(range(len(tasks)), list(tasks))
    ax.set_ylim(max(0.0, lowest - 5), 100)  # the differences are a few points: do not start the axis at 0
    ax.set_ylabel("test top-1 % (mean ± std over seeds)")
    ax.set_title("DINOv2 ViT-S/14, VTAB-1k layout, each method's lr chosen on train800 → val200", fontsize=9)
    ax.legend(fontsize=7, ncol=3)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str]) -> None:
    if len(argv) < 2:
        sys.exit("usage: summarize.py DEST RUN [RUN ...]  (RUN: a `zinit compare vtab` output folder)")
    out, runs = Path(argv[0]), [Path(a) for a in argv[1:]]
    missing = [str(r) for r in runs if not (r / "compare.json").is_file()]
    if missing:
        sys.exit(f"no compare.json in {', '.join(missing)}: give the --output folders of `zinit compare vtab`")
    tasks = collect(runs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(
        {"tasks": tasks, "ordering": {t: ordering(rows) for t, rows in tasks.items()}}, indent=1) + "\n")
    (out / "summary.md").write_text(table(tasks) + "\n")
    plot(tasks, out / "summary.png")
    print(table(tasks))


if __name__ == "__main__":
    main(sys.argv[1:])
