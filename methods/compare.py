"""``zinit compare RECIPE --methods zinit,lora,...``: every method through the same recipe, data, seed, step budget
and evaluation, one after another, each in its own process (or torchrun job), then one table.

Each method runs as ``zinit train RECIPE --method M --output OUT/M [recipe options]``, with the method's own default
base learning rate for the recipe (:meth:`zinit.Recipe.base_lr`) unless the options set one. ``--lr-grid 0.3,1,3``
first runs each method at those multiples of its default on the recipe's validation split
(:attr:`zinit.Recipe.validation_args`: carved from the training data for alpaca and squad, the release's val split
for scienceqa) or passes the grid to a recipe that selects the lr itself (:attr:`zinit.Recipe.lr_grid_flag`: vtab's
train800→val200 grid), keeps the best, and only then trains on the full training data and scores the evaluation
set: the test/eval data never selects anything. Every recipe in the registry (:func:`zinit.list_recipes`) can be
compared; this module knows none of them by name.

Outputs in OUT: ``compare.md`` (the table), ``compare.json`` and ``compare.png`` (the recipe's metric against
trainable parameters, log scale). Columns: trainable parameters, adapter file size, peak GPU memory (CUDA
``max_memory_allocated`` of the training process; – on CPU) and peak host memory (its RSS), each labelled, training
throughput (tokens/s or images/s, median over logged steps), wall time, the recipe's metrics. A method the model cannot take is a row "n/a" with the reason.
Below the measured rows, the paper's published numbers for the recipe (:attr:`zinit.Recipe.paper`: VTAB's group
means of zero-init, VPT-deep and full fine-tuning; SQuAD's EM/F1 of zero-init, full fine-tuning and P-tuning v2 for
the ``--version`` run; ScienceQA's LLaMA-Adapter accuracy), in italics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

import zinit
from zinit.cli import build_parser
from zinit.cliargs import float_list, option_value, positive_int
from zinit.files import atomic_write, write_json

from . import registry as M


def run_method(recipe: str, method: str, out: Path, recipe_args: Sequence[str], nproc: int = 1,
               blr: float | None = None, folder: Path | None = None,
               env: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one method in its own process, in ``folder`` (default ``out/method``) with the environment ``env``
    (default this one's); returns its row (metrics, sizes, peak memory, throughput, wall)."""
    spec = zinit.get_recipe(recipe)
    folder = out / method if folder is None else folder
    cmd = [sys.executable, "-m", "zinit", "train", recipe, "--method", method, "--output", str(folder), *recipe_args]
    cmd += [a for a in spec.compare_args if a not in recipe_args]
    if blr is not None:
        cmd += [spec.lr_flag, f"{blr:g}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), *cmd[1:]]
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(folder / "compare.log", "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    row: dict[str, Any] = {"method": method, "command": " ".join(cmd[1:]), "wall_s": wall}
    na = folder / M.NOT_APPLICABLE_NAME
    if proc.returncode == M.NOT_APPLICABLE_EXIT and na.is_file():
        return {**row, "status": "n/a", "reason": json.loads(na.read_text())["reason"]}
    if proc.returncode != 0:
        tail = (folder / "compare.log").read_text()[-1500:]
        return {**row, "status": "failed", "reason": f"exit {proc.returncode}; end of {folder / 'compare.log'}:\n{tail}"}
    summary, problem = _read_summary(folder / M.SUMMARY_NAME)
    if problem is not None:
        return {**row, "status": "failed", "reason": problem}
    throughput = []
    for metrics_file in folder.rglob("metrics.jsonl"):
        throughput += [r["tokens_per_s"] for r in map(json.loads, metrics_file.read_text().splitlines())
                       if "tokens_per_s" in r][1:]  # the first logged step includes warm-up
    return {**row, "status": "ok", "metrics": summary["metrics"], "trainable_parameters":
            summary["trainable_parameters"], "adapter_bytes": summary["adapter_bytes"],
            "peak_memory_mb": peak_memory(summary["peak_memory_mb"], usage.ru_maxrss / 1024),
            "throughput": statistics.median(throughput) if throughput else None, "blr": blr}


#: What a recipe's run_train writes into ``summary.json`` for zinit compare (``zinit.recipes.common.TrainingRun``).
SUMMARY_KEYS = ("metrics", "trainable_parameters", "adapter_bytes", "peak_memory_mb")


def _read_summary(path: Path) -> tuple[dict[str, Any], str | None]:
    """``summary.json`` of a finished run, or the reason it cannot be tabulated (a recipe that wrote none, or one
    without :data:`SUMMARY_KEYS`): that method's row fails, the others go on."""
    fix = "a recipe's run_train writes it with zinit.recipes.common.TrainingRun (README, 'Adding a recipe')"
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return {}, f"the run exited 0 but {path} cannot be read ({exc}); {fix}"
    missing = [key for key in SUMMARY_KEYS if not isinstance(summary, dict) or key not in summary]
    if missing or not isinstance(summary.get("metrics"), dict):
        return {}, f"{path} lacks {missing or ['metrics as an object']}; {fix}"
    return summary, None


def peak_memory(summary: float | Mapping[str, float | None], child_rss_mb: float) -> dict[str, float | None]:
    """A run's peak memory, labelled: ``gpu`` (the training process's CUDA peak, None on CPU) and ``host`` (the
    larger of the process's own peak RSS and the one the OS reports for the child, which includes its whole life).
    ``summary``: the ``peak_memory_mb`` of a summary.json (a ``{gpu, host}`` dict; an older file's single number was
    the CUDA peak on GPU and RSS on CPU, so it is taken as neither and only the child's RSS is reported).

    >>> peak_memory({"gpu": None, "host": 900.0}, 950.0)
    {'gpu': None, 'host': 950.0}
    >>> peak_memory({"gpu": 2048.0, "host": 3000.0}, 2900.0)
    {'gpu': 2048.0, 'host': 3000.0}
    """
    if not isinstance(summary, Mapping):
        return {"gpu": None, "host": child_rss_mb}
    host = max(summary.get("host") or 0.0, child_rss_mb)
    return {"gpu": summary.get("gpu"), "host": host}


def _memory_cells(peak: float | Mapping[str, float | None]) -> list[str]:
    if not isinstance(peak, Mapping):  # a compare.json written before GPU and host memory were told apart
        return ["–", f"{peak:.0f} MB"]
    gpu = peak.get("gpu")
    return ["–" if gpu is None else f"{gpu:.0f} MB", f"{peak['host']:.0f} MB"]


# ---------------------------------------------------------------------------------------------------------------
# --lr-grid


def recipe_namespace(recipe: str, recipe_args: Sequence[str], output: str = "-") -> argparse.Namespace:
    """``recipe_args`` parsed by ``zinit train RECIPE``'s own parser (its defaults filled in); a bad option stops
    with the recipe's own error (exit 2)."""
    return build_parser().parse_args(["train", recipe, *recipe_args, "--output", str(output)])


def default_blr(recipe: str, method: str, recipe_args: Sequence[str]) -> float | None:
    """The base lr ``zinit train RECIPE --method METHOD [recipe_args]`` uses when none is given."""
    return M.recipe_blr(recipe, method, recipe_namespace(recipe, [*recipe_args, "--method", method]))


def select_lr(recipe: str, method: str, out: Path, recipe_args: list[str], grid: Sequence[float],
              nproc: int) -> tuple[float | None, list[dict[str, Any]]]:
    """Run ``method`` at each multiple of its default base lr on the recipe's validation split; the best by the
    recipe's headline metric (ties: the smaller lr). Returns (best blr or None if n/a, the grid's rows)."""
    spec = zinit.get_recipe(recipe)
    if spec.validation_args is None:
        raise ValueError(f"recipe {recipe!r} has no validation split for --lr-grid (zinit.Recipe.validation_args)")
    default = default_blr(recipe, method, recipe_args)
    if default is None:
        return None, []
    val_args = spec.validation_args(list(recipe_args), out / "_validation_split")
    rows = []
    for g in grid:
        blr = default * g
        row = run_method(recipe, method, out / "_lr_grid" / f"x{g:g}", val_args, nproc, blr)
        row["blr"] = blr
        rows.append(row)
        if row["status"] == "n/a":
            return None, rows
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None, rows
    best = max(ok, key=lambda r: (r["metrics"].get(spec.headline, float("-inf")), -r["blr"]))
    return best["blr"], rows


# ---------------------------------------------------------------------------------------------------------------
# the report


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def format_table(recipe: str, rows: Sequence[dict[str, Any]], paper: Mapping[str, Mapping[str, float]] | None = None
                 ) -> str:
    """The comparison as a Markdown table (one row per method, n/a rows with their reason), then a row per published
    result of ``paper`` (:attr:`zinit.Recipe.paper`), its metrics only."""
    spec = zinit.get_recipe(recipe)
    unit, metric_names = spec.throughput_unit, spec.metrics
    head = (["method", "trainable params", "adapter file", "peak GPU memory", "peak host memory (RSS)", f"train {unit}",
             "wall"] + list(metric_names))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['status']}: {r['reason'].splitlines()[0]} |" + " |" * (len(head) - 2))
            continue
        cells = [r["method"], f"{r['trainable_parameters']:,}", _size(r["adapter_bytes"]),
                 *_memory_cells(r["peak_memory_mb"]), "–" if r["throughput"] is None else f"{r['throughput']:.0f}",
                 f"{r['wall_s'] / 60:.1f} min"]
        cells += [f"{r['metrics'][m]:.2f}" if m in r["metrics"] else "–" for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    for label, values in (paper or {}).items():
        cells = [f"*paper: {label}*"] + ["–"] * 6 + [f"{values[m]:.2f}" if m in values else "–" for m in metric_names]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paper_rows(recipe: str, recipe_args: Sequence[str]) -> dict[str, dict[str, float]]:
    """The published numbers (:attr:`zinit.Recipe.paper`) for a run of ``recipe`` with these options; {} if none."""
    spec = zinit.get_recipe(recipe)
    if spec.paper is None:
        return {}
    args = recipe_namespace(recipe, recipe_args)
    return {label: dict(values) for label, values in spec.paper(args).items()}


def plot(recipe: str, rows: Sequence[dict[str, Any]], path: Path) -> Path:
    """Scatter of the headline metric against trainable parameters (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    headline = zinit.get_recipe(recipe).headline
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, r in enumerate(r for r in rows if r["status"] == "ok" and headline in r["metrics"]):
        ax.scatter(r["trainable_parameters"], r["metrics"][headline], s=40)
        ax.annotate(r["method"], (r["trainable_parameters"], r["metrics"][headline]), textcoords="offset points",
                    xytext=(6, 4 - 11 * (i % 3)), fontsize=8)  # staggered: methods can land on one point
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel(headline)
    ax.set_title(f"zinit compare {recipe}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def compare(recipe: str, method_names: Sequence[str], out: str | Path, recipe_args: Sequence[str],
            lr_grid: Sequence[float] | None = None, nproc: int = 1) -> list[dict[str, Any]]:
    """Run the comparison and write ``compare.md``, ``compare.json`` and ``compare.png``; returns the rows."""
    spec = zinit.get_recipe(recipe)
    for name in method_names:
        M.get_method(name)
    if not spec.metrics:
        raise ValueError(f"recipe {recipe!r} declares no metrics (zinit.Recipe.metrics): nothing to compare")
    if lr_grid and spec.validation_args is None and spec.lr_grid_flag is None:
        raise ValueError(f"recipe {recipe!r} cannot select a learning rate (it has no validation split: "
                         "zinit.Recipe.validation_args); drop --lr-grid")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    user_lr = option_value(recipe_args, spec.lr_flag) is not None
    rows = []
    for name in method_names:
        blr, grid_rows = (None, [])
        if lr_grid and not user_lr:
            if spec.lr_grid_flag is not None:  # the recipe selects among the grid on its own validation split
                default = default_blr(recipe, name, recipe_args)
                grid_args = [spec.lr_grid_flag, ",".join(f"{default * g:g}" for g in lr_grid)] if default else []
                row = run_method(recipe, name, out, [*recipe_args, *grid_args], nproc)
            else:
                blr, grid_rows = select_lr(recipe, name, out / name, list(recipe_args), lr_grid, nproc)
                row = run_method(recipe, name, out, recipe_args, nproc, blr)
        else:
            row = run_method(recipe, name, out, recipe_args, nproc)
        if grid_rows:
            row["lr_grid"] = [{k: r.get(k) for k in ("blr", "status", "metrics")} for r in grid_rows]
        rows.append(row)
        status = row["status"] if row["status"] != "ok" else json.dumps(row["metrics"])
        print(f"{name}: {status}" + (f" ({row['reason'].splitlines()[0]})" if row["status"] != "ok" else ""),
              flush=True)
    paper = paper_rows(recipe, recipe_args)
    table = format_table(recipe, rows, paper)
    write_json(out / "compare.json", {"recipe": recipe, "recipe_args": list(recipe_args), "lr_grid": lr_grid,
                                      "rows": rows, "paper": paper})
    atomic_write(out / "compare.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    plot(recipe, rows, out / "compare.png")
    print(table)
    print(f"table: {out / 'compare.md'}   json: {out / 'compare.json'}   plot: {out / 'compare.png'}")
    return rows


def check_recipe_args(recipe: str, recipe_args: Sequence[str], output: str) -> None:
    """Parse the options meant for the recipe with the recipe's own parser before any run starts: a typo or a bad
    value stops ``zinit compare`` at once (``zinit train RECIPE: error: ...``, exit 2) instead of failing every
    method's run in turn."""
    recipe_namespace(recipe, [*recipe_args, "--method", "zinit"], output)


def main(argv: Sequence[str]) -> int:
    """``zinit compare``: parse the options, check the recipe's, run every method and write the report."""
    parser = argparse.ArgumentParser(
        prog="zinit compare", description="Run several fine-tuning methods through one recipe and tabulate them. "
        "Options not listed here go to the recipe (zinit train RECIPE -h).")
    parser.add_argument("recipe", help=f"one of {', '.join(zinit.list_recipes())}")
    parser.add_argument("--methods", default="zinit,lora",
                        help=f"comma-separated, from: {', '.join(M.list_methods())} (default zinit,lora)")
    parser.add_argument("--output", required=True, help="folder for every run and the report")
    parser.add_argument("--lr-grid", default=None,
                        help="multiples of each method's default base lr to try on a validation split, e.g. 0.3,1,3")
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes per run (torchrun) (default 1)")
    args, recipe_args = parser.parse_known_args(argv)
    if args.recipe not in zinit.list_recipes():
        parser.error(f"recipe {args.recipe!r}: zinit compare runs {', '.join(zinit.list_recipes())}")
    try:
        grid = list(float_list(args.lr_grid, "--lr-grid", lambda v: v > 0, "multiples > 0")) if args.lr_grid else None
    except ValueError as exc:
        parser.error(str(exc))
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not names:
        parser.error(f"--methods {args.methods!r} names no method; choose from {', '.join(M.list_methods())}")
    for name in names:
        if name not in M.list_methods():
            parser.error(f"--methods: unknown method {name!r}; choose from {', '.join(M.list_methods())}")
    check_recipe_args(args.recipe, recipe_args, args.output)
    compare(args.recipe, names, args.output, recipe_args, grid, args.nproc)
    return 0
