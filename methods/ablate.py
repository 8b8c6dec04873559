"""``zinit ablate RECIPE``: the paper's ablations through any recipe, one command, one report.

A grid over the gate variant (``zero``: zinit's zero-init gate; ``random``: the gate drawn from N(0, 1), the paper's
random-init ablation; ``none``: no gate, the prompt keys joined to the tokens' softmax), the number of adapted layers
L, the prompt length K and the epochs, each point trained over several seeds. Each run is
``zinit train RECIPE --method M --layers L --K K [--epochs E] --seed S --output OUT/runs/POINT [recipe options]`` in
its own process (:func:`zinit.methods.compare.run_method`), so everything a recipe does (its data, schedule, metric,
its choice of the best validation epoch) is what it always does.

The grid is one factor at a time by default (``--grid oat``): a base point, and each axis varied alone around it; the
base value of an axis is ``--base AXIS=VALUE``, else the recipe's default when it is among the axis's values, else
the axis's first value. ``--grid full`` runs every combination. A finished run is kept: re-running the command in the
same folder only runs what is missing (a failed run is retried).

Outputs in OUT: ``ablate.md`` (a table per axis: each metric's mean ± standard deviation over the seeds, the paper's
number beside it where the paper has one), ``ablate.json`` (every run, every point's aggregate), and the plots
``metric_vs_layers.png``, ``metric_vs_K.png``, ``metric_vs_epochs.png`` (the swept axes), ``loss_curves.png``
(training loss of each gate variant at the base point, seeds thin, their mean bold) and ``gate_opening.png`` (the
final mean |tanh(g)| of each adapted layer, per gated variant).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import itertools
import json
import os
import statistics
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import zinit
from zinit.cliargs import layer_count, positive_float, positive_int, prompt_length
from zinit.files import atomic_write, write_json

from . import compare as C

#: gate variant -> the method that trains it
GATES = {"zero": "zinit", "random": "zinit_random", "none": "zinit_nogate"}
#: the swept axes, in the order of a run's name and of the report
AXES = ("gate", "layers", "K", "epochs")
#: the recipe option each numeric axis sets
FLAG = {"layers": "--layers", "K": "--K", "epochs": "--epochs"}
#: The paper's ablations (LLaMA-7B, 32 layers, K=10, ScienceQA val accuracy %, with images; ICLR 2024 Tables 6-8),
#: shown beside the measured numbers of the recipe they were measured on.
PAPER: dict[str, dict[str, dict[Any, float]]] = {
    "scienceqa": {"gate": {"zero": 83.85, "random": 40.77}, "layers": {10: 55.95, 20: 73.36, 30: 83.85, 32: 81.03},
                  "epochs": {15: 82.08, 30: 83.85, 60: 83.94}},
}
ROW_NAME = "ablate_row.json"


@dataclass(frozen=True)
class Point:
    """One grid point: a gate variant and the values of the numeric axes (None: the recipe's default)."""

    gate: str
    layers: int | None
    K: int | None
    epochs: float | None

    def get(self, axis: str) -> Any:
        return getattr(self, axis)

    def name(self) -> str:
        """The run folder's name: ``zero-L30-K10`` (``-e3`` with an epochs axis)."""
        parts = [self.gate]
        for axis, tag in (("layers", "L"), ("K", "K"), ("epochs", "e")):
            if self.get(axis) is not None:
                parts.append(f"{tag}{self.get(axis):g}")
        return "-".join(parts)

    def args(self) -> list[str]:
        """The recipe options this point sets (the method and the numeric axes)."""
        out = ["--method", GATES[self.gate]]
        for axis, flag in FLAG.items():
            if self.get(axis) is not None:
                out += [flag, f"{self.get(axis):g}"]
        return out


def grid_points(values: dict[str, list[Any]], base: dict[str, Any], full: bool = False) -> list[Point]:
    """The points of the grid: ``values`` maps each axis to its values ([None] when it is not swept), ``base`` each
    axis to its base value. One factor at a time: the base point, then each axis's other values with the rest at base
    (in the order given, no point twice); ``full``: every combination.

    >>> pts = grid_points({"gate": ["zero", "random"], "layers": [5, 30], "K": [None], "epochs": [None]},
    ...                   {"gate": "zero", "layers": 30, "K": None, "epochs": None})
    >>> [p.name() for p in pts]
    ['zero-L30', 'random-L30', 'zero-L5']
    """
    if full:
        combos = itertools.product(*(values[a] for a in AXES))
        return [Point(*c) for c in combos]
    points = [Point(**base)]
    for axis in AXES:
        for v in values[axis]:
            p = Point(**{**base, axis: v})
            if p not in points:
                points.append(p)
    return points


# ---------------------------------------------------------------------------------------------------------------
# running


def _metrics_file(folder: Path) -> Path | None:
    direct = folder / "metrics.jsonl"
    if direct.is_file():
        return direct
    return next(iter(sorted(folder.rglob("metrics.jsonl"))), None)


def _curves(folder: Path) -> tuple[list[list[float]], dict[str, float]]:
    """A run's training loss ``[[step, loss], ...]`` and its last logged mean |gate| per adapted layer."""
    path = _metrics_file(folder)
    if path is None:
        return [], {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    loss = [[r["step"], r["loss"]] for r in records if "loss" in r]
    gated = [r["gates"] for r in records if r.get("gates")]
    return loss, (gated[-1] if gated else {})


def run_point(recipe: str, point: Point, seed: int, out: Path, recipe_args: Sequence[str], nproc: int = 1,
              threads: int | None = None) -> dict[str, Any]:
    """Train one grid point with one seed in ``OUT/runs/POINT-sS`` (or reuse a finished run of the same command);
    returns its row: the point, the seed, the compare row (metrics, sizes, wall) and the loss curve and gates."""
    row = finished(recipe, point, seed, out, recipe_args)
    if row["status"] == "ok":
        return row
    folder, args = _run_folder(point, seed, out), row["args"]
    check_folder(recipe, point, seed, out, recipe_args)
    env = None
    if threads is not None:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    row = C.run_method(recipe, GATES[point.gate], out, args, nproc, folder=folder, env=env)
    row.update(point={a: point.get(a) for a in AXES}, seed=seed, args=args, name=point.name())
    if row["status"] == "ok":
        row["loss_curve"], row["gates"] = _curves(folder)
    write_json(folder / ROW_NAME, row)
    return row


@functools.lru_cache(maxsize=None)
def seed_flag(recipe: str) -> str:
    """The option of ``zinit train RECIPE`` that sets the seed: ``--seed``, or ``--seeds`` (VTAB's list)."""
    parser = argparse.ArgumentParser()
    zinit.get_recipe(recipe).add_train_args(parser)
    for flag in ("--seed", "--seeds"):
        if flag in parser._option_string_actions:
            return flag
    raise ValueError(f"zinit train {recipe} has no --seed option, which zinit ablate sets for each run")


def _run_folder(point: Point, seed: int, out: Path) -> Path:
    return out / "runs" / f"{point.name()}-s{seed}"


def _run_args(recipe: str, point: Point, seed: int, recipe_args: Sequence[str]) -> list[str]:
    """The options of ``zinit train RECIPE`` for this point and seed."""
    return [*recipe_args, *point.args(), seed_flag(recipe), str(seed)]


def _saved_row(point: Point, seed: int, out: Path) -> dict[str, Any] | None:
    saved = _run_folder(point, seed, out) / ROW_NAME
    return json.loads(saved.read_text()) if saved.is_file() else None


_PARSE_LOCK = threading.Lock()


@functools.lru_cache(maxsize=256)
def _options(recipe: str, args: tuple[str, ...]) -> dict[str, Any] | None:
    try:  # under a lock: redirect_stderr swaps the process's sys.stderr, and --jobs parses in several threads
        with _PARSE_LOCK, contextlib.redirect_stderr(io.StringIO()):  # options this zinit no longer takes
            parsed = C.recipe_namespace(recipe, args)
    except SystemExit:
        return None
    return {k: v for k, v in vars(parsed).items() if k != "output"}


def same_options(recipe: str, a: Sequence[str], b: Sequence[str]) -> bool:
    """Whether two option lists of ``zinit train RECIPE`` mean the same run: compared as the recipe's parser reads
    them (defaults filled in), so order and ``--opt=value`` spellings do not matter; options the parser refuses
    match only themselves, token for token."""
    if list(a) == list(b):
        return True
    parsed_a, parsed_b = _options(recipe, tuple(a)), _options(recipe, tuple(b))
    return parsed_a is not None and parsed_a == parsed_b


def check_folder(recipe: str, point: Point, seed: int, out: Path, recipe_args: Sequence[str]) -> None:
    """Refuse to train this point and seed over a finished run made with other recipe options (a failed or
    unfinished one is retrained with the new options)."""
    row = _saved_row(point, seed, out)
    args = _run_args(recipe, point, seed, recipe_args)
    if row is not None and row.get("status") == "ok" and not same_options(recipe, row.get("args", []), args):
        raise ValueError(f"{_run_folder(point, seed, out)} holds a finished run of this point with other "
                         "recipe options; use another --output for the new options (or delete that folder to train "
                         "it again)")


def finished(recipe: str, point: Point, seed: int, out: Path, recipe_args: Sequence[str]) -> dict[str, Any]:
    """The saved row of a finished run of this point and seed (same options, however spelled), or a "missing" row
    (with the reason of a run that failed)."""
    args = _run_args(recipe, point, seed, recipe_args)
    row = _saved_row(point, seed, out)
    if row is not None and row.get("status") == "ok" and same_options(recipe, row.get("args", []), args):
        return row
    reason = "not run yet (or not finished)"
    if row is not None and row.get("status") not in (None, "ok"):
        why = (str(row.get("reason") or "").splitlines() or [""])[0]
        reason = f"{row['status']} earlier" + (f": {why}" if why else "")
    return {"status": "missing", "reason": reason, "point": {a: point.get(a) for a in AXES},
            "seed": seed, "args": args, "name": point.name()}


# ---------------------------------------------------------------------------------------------------------------
# the report


def aggregate(rows: Sequence[dict[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """One entry per grid point (in the order first met): each metric's mean, standard deviation (over seeds; 0 for
    one seed) and values, the seeds that finished and the ones that did not.

    >>> r = lambda s, v: {"name": "zero-L30", "point": {"gate": "zero"}, "seed": s, "status": "ok",
    ...                   "metrics": {"acc": v}, "trainable_parameters": 7}
    >>> a = aggregate([r(0, 50.0), r(1, 54.0)], ["acc"])[0]
    >>> a["acc"], a["seeds"]
    ({'mean': 52.0, 'std': 2.8284271247461903, 'values': [50.0, 54.0]}, [0, 1])
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(r["name"], []).append(r)
    out = []
    for name, runs in groups.items():
        ok = [r for r in runs if r["status"] == "ok"]
        entry: dict[str, Any] = {"name": name, "point": runs[0]["point"], "seeds": [r["seed"] for r in ok],
                                 "failed": [{"seed": r["seed"], "status": r["status"],
                                             "reason": r.get("reason", "").splitlines()[0] if r.get("reason") else ""}
                                            for r in runs if r["status"] != "ok"],
                                 "trainable_parameters": ok[0]["trainable_parameters"] if ok else None}
        for m in metrics:
            values = [r["metrics"][m] for r in ok if m in r["metrics"]]
            if values:
                entry[m] = {"mean": statistics.fmean(values),
                            "std": statistics.stdev(values) if len(values) > 1 else 0.0, "values": values}
        out.append(entry)
    return out


def _at_base(point: dict[str, Any], base: dict[str, Any], axis: str, keep: Sequence[str] = ()) -> bool:
    return all(point[a] == base[a] for a in AXES if a != axis and a not in keep)


def format_report(recipe: str, points: Sequence[dict[str, Any]], values: dict[str, list[Any]],
                  base: dict[str, Any], full: bool) -> str:
    """``ablate.md``: a table per swept axis (the other axes at their base values) and, for ``--grid full``, every
    point; each cell the mean ± std over seeds (n), the paper's number beside it where the paper has one."""
    spec = zinit.get_recipe(recipe)
    paper = PAPER.get(recipe, {})
    shown_base = ", ".join(f"{a}={base[a]:g}" if isinstance(base[a], (int, float)) else f"{a}={base[a]}"
                           for a in AXES if base[a] is not None)
    lines = [f"# zinit ablate {recipe}", "", f"Base point: {shown_base or 'the recipe defaults'}. "
             "Each cell: mean ± sample standard deviation over the seeds (n = seeds that finished; no spread "
             "for n = 1).", ""]

    def table(title: str, rows: Sequence[dict[str, Any]], axis: str | None) -> None:
        head = ["point", "trainable"] + list(spec.metrics)
        ref = paper.get(axis, {}) if axis else {}
        if ref:
            head.append(f"paper ({spec.headline}, LLaMA-7B)")
        lines.extend([f"## {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)])
        for p in rows:
            cells = [p["name"], f"{p['trainable_parameters']:,}" if p["trainable_parameters"] else "–"]
            for m in spec.metrics:
                s = p.get(m)
                n = len(s["values"]) if s else 0
                cells.append("–" if not s else f"{s['mean']:.2f} (n=1)" if n == 1
                             else f"{s['mean']:.2f} ± {s['std']:.2f} (n={n})")
            if ref:
                cells.append(f"{ref[p['point'][axis]]:.2f}" if p["point"][axis] in ref else "–")
            if p["failed"]:
                cells[0] += " (" + "; ".join(f"seed {f['seed']} {f['status']}" for f in p["failed"]) + ")"
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    for axis in AXES:
        if len(values[axis]) > 1:
            rows = [p for p in points if _at_base(p["point"], base, axis)]
            table(f"{axis}", sorted(rows, key=lambda p: values[axis].index(p["point"][axis])), axis)
    if full:
        table("every point", points, None)
    if paper:
        lines.append("The paper's numbers are LLaMA-7B (32 layers) on the real ScienceQA val split (Tables 6-8 of the "
                     "ICLR 2024 version); they are the shape to compare with, not the same experiment.")
    return "\n".join(lines) + "\n"


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_axis(recipe: str, points: Sequence[dict[str, Any]], axis: str, base: dict[str, Any], path: Path) -> Path:
    """The recipe's first two metrics against one numeric axis (the other axes at base; one line per gate variant
    where the grid has several there): each seed a dot, the mean a line with ± std bars."""
    plt = _plt()
    metrics = list(zinit.get_recipe(recipe).metrics)[:2]
    paper = PAPER.get(recipe, {}).get(axis, {})
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.2 * len(metrics), 3.8), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        for gate in GATES:
            pts = sorted((p for p in points if p["point"]["gate"] == gate and m in p
                          and _at_base(p["point"], base, axis, keep=("gate",))), key=lambda p: p["point"][axis])
            if not pts:
                continue
            xs = [p["point"][axis] for p in pts]
            line = ax.errorbar(xs, [p[m]["mean"] for p in pts], yerr=[p[m]["std"] for p in pts], marker="o",
                               capsize=3, label=f"gate {gate}")
            for p in pts:
                ax.scatter([p["point"][axis]] * len(p[m]["values"]), p[m]["values"], s=10, alpha=0.5,
                           color=line[0].get_color())
        if paper and m == metrics[0]:
            ax.plot(list(paper), list(paper.values()), "s--", color="grey", alpha=0.7, label="paper (LLaMA-7B)")
        ax.set_xlabel({"layers": "adapted layers L", "K": "prompt length K", "epochs": "epochs"}[axis])
        ax.set_ylabel(m)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"zinit ablate {recipe}: {m if len(metrics) == 1 else ', '.join(metrics)} vs {axis}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _smooth(ys: list[float]) -> list[float]:
    span = max(1, len(ys) // 20)
    return [statistics.fmean(ys[max(0, i - span + 1):i + 1]) for i in range(len(ys))]


def plot_loss_curves(rows: Sequence[dict[str, Any]], base: dict[str, Any], path: Path) -> Path | None:
    """Training loss of each gate variant at the base point (the gate axis free): each seed thin, the mean of the
    seeds bold (both smoothed by a trailing mean over ~5 % of the run)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    drawn, drawn_names = False, []
    for color, gate in zip(("tab:blue", "tab:red", "tab:green"), GATES):
        curves = [r["loss_curve"] for r in rows if r["status"] == "ok" and r.get("loss_curve")
                  and r["point"]["gate"] == gate and _at_base(r["point"], base, "gate")]
        if not curves:
            continue
        drawn = True
        drawn_names.append(f"{gate}-init" if gate != "none" else "no gate")
        for c in curves:
            ax.plot([s for s, _ in c], _smooth([v for _, v in c]), color=color, lw=0.7, alpha=0.4)
        n = min(len(c) for c in curves)
        mean = [statistics.fmean(c[i][1] for c in curves) for i in range(n)]
        ax.plot([s for s, _ in curves[0][:n]], _smooth(mean), color=color, lw=2,
                label=f"gate {gate} ({GATES[gate]}, {len(curves)} seed{'s' * (len(curves) > 1)})")
    title = "training loss by gate variant (" + " vs ".join(drawn_names) + ")"
    return _save(plt, fig, ax, drawn, path, "optimizer step", "training loss", title)


def _save(plt: Any, fig: Any, ax: Any, drawn: bool, path: Path, xlabel: str, ylabel: str, title: str
          ) -> Path | None:
    """Label, save and close a one-axis figure; None (and nothing written) when nothing was drawn on it."""
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_gate_opening(rows: Sequence[dict[str, Any]], base: dict[str, Any], path: Path) -> Path | None:
    """The final mean |tanh(g)| of each adapted layer at the base point, per gated variant (mean over seeds, ± std).
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for gate in ("zero", "random"):
        runs = [r["gates"] for r in rows if r["status"] == "ok" and r.get("gates") and r["point"]["gate"] == gate
                and _at_base(r["point"], base, "gate")]
        if not runs:
            continue
        drawn = True
        layers = sorted(runs[0], key=int)
        means = [statistics.fmean(g[n] for g in runs) for n in layers]
        stds = [statistics.stdev(g[n] for g in runs) if len(runs) > 1 else 0.0 for n in layers]
        ax.errorbar([int(n) for n in layers], means, yerr=stds, marker="o", ms=3, capsize=2,
                    label=f"gate {gate} ({len(runs)} seed{'s' * (len(runs) > 1)})")
    return _save(plt, fig, ax, drawn, path, "layer index", "mean |tanh(g)| over heads, end of training",
                 "how far each layer's gate opened")


# ---------------------------------------------------------------------------------------------------------------
# the command


def _checked_grid(recipe: str, recipe_args: Sequence[str], values: dict[str, list[Any]], seeds: Sequence[int],
                  base: dict[str, Any] | None) -> tuple[zinit.Recipe, dict[str, list[Any]], dict[str, Any]]:
    """The recipe, every axis's values and the base point, checked (metrics, gate names, base among values, seeds)."""
    spec = zinit.get_recipe(recipe)
    if not spec.metrics:
        raise ValueError(f"recipe {recipe!r} declares no metrics (zinit.Recipe.metrics): nothing to ablate")
    values = {a: list(values.get(a) or ([None] if a != "gate" else ["zero"])) for a in AXES}
    for g in values["gate"]:
        if g not in GATES:
            raise ValueError(f"gate variant {g!r}: choose from {', '.join(GATES)}")
    base = {**default_base(recipe, recipe_args, values), **(base or {})}
    for a in AXES:
        if base[a] not in values[a]:
            raise ValueError(f"the base {a}={base[a]} is not among the {a} values {values[a]}; add it or change --base")
    if not seeds:
        raise ValueError("no seeds: give --seeds, e.g. 0,1")
    return spec, values, base


def _run_all(recipe: str, out: Path, recipe_args: Sequence[str], runs: Sequence[tuple[Point, int]], jobs: int,
             nproc: int, threads: int | None, report_only: bool) -> list[dict[str, Any]]:
    """Every run's row, ``jobs`` at a time (or only read back with ``report_only``), each printed as it ends."""
    if not report_only:  # every folder checked before the first run starts, not when the grid reaches it
        for p, s in runs:
            check_folder(recipe, p, s, out, recipe_args)
    done, lock = 0, threading.Lock()

    def one(item: tuple[Point, int]) -> dict[str, Any]:
        nonlocal done
        p, s = item
        row = (finished(recipe, p, s, out, recipe_args) if report_only else
               run_point(recipe, p, s, out, recipe_args, nproc, threads))
        shown = json.dumps(row["metrics"]) if row["status"] == "ok" else f"{row['status']}: " + \
            row["reason"].splitlines()[0]
        with lock:
            done += 1
            wall = f" ({row['wall_s'] / 60:.1f} min)" if "wall_s" in row else ""
            print(f"[{done}/{len(runs)}] {p.name()} seed {s}: {shown}{wall}", flush=True)
        return row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(one, runs))


def _write_outputs(recipe: str, out: Path, recipe_args: Sequence[str], values: dict[str, list[Any]],
                   base: dict[str, Any], seeds: Sequence[int], full: bool, rows: list[dict[str, Any]],
                   metrics: Sequence[str]) -> dict[str, Any]:
    """Aggregate the rows, write ``ablate.json``, ``ablate.md`` and the plots, print the table; the report's data."""
    aggregated = aggregate(rows, metrics)
    report = format_report(recipe, aggregated, values, base, full)
    data = {"recipe": recipe, "recipe_args": list(recipe_args), "values": values, "base": base, "seeds": list(seeds),
            "grid": "full" if full else "oat", "points": aggregated, "runs": rows, "paper": PAPER.get(recipe, {}),
            "command": sys.argv}
    write_json(out / "ablate.json", data)
    atomic_write(out / "ablate.md", lambda tmp: Path(tmp).write_text(report))
    plots = [plot_axis(recipe, aggregated, a, base, out / f"metric_vs_{a}.png") for a in ("layers", "K", "epochs")
             if len(values[a]) > 1]
    plots += [p for p in (plot_loss_curves(rows, base, out / "loss_curves.png"),
                          plot_gate_opening(rows, base, out / "gate_opening.png")) if p is not None]
    print(report)
    print(f"table: {out / 'ablate.md'}   json: {out / 'ablate.json'}   plots: " + ", ".join(p.name for p in plots))
    return data


def ablate(recipe: str, out: str | Path, recipe_args: Sequence[str], values: dict[str, list[Any]],
           seeds: Sequence[int], base: dict[str, Any] | None = None, full: bool = False, jobs: int = 1,
           nproc: int = 1, report_only: bool = False) -> dict[str, Any]:
    """Run the grid and write ``ablate.md``, ``ablate.json`` and the plots into ``out``; returns the report's data.

    ``values``: axis -> its values (``gate``: names of :data:`GATES`; missing axes are not swept); ``base``: axis ->
    base value (default: :func:`default_base`); ``jobs``: runs at a time, the CPU threads shared among them. Runs go
    seed by seed (every point with the first seed, then the next). ``report_only``: run nothing, report the runs
    that finished (the others are "missing"), e.g. while the grid is still running or after it was cut short.
    """
    spec, values, base = _checked_grid(recipe, recipe_args, values, seeds, base)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    points = grid_points(values, base, full)
    runs = [(p, s) for s in seeds for p in points]  # seed by seed: a grid cut short has every point once first
    threads = max(1, (os.cpu_count() or 1) // (jobs * nproc)) if jobs > 1 else None  # per process
    print(f"zinit ablate {recipe}: {len(points)} points x {len(seeds)} seeds = {len(runs)} runs, "
          + ("reporting the finished ones" if report_only else f"{jobs} at a time") + f", in {out / 'runs'}",
          flush=True)
    rows = _run_all(recipe, out, recipe_args, runs, jobs, nproc, threads, report_only)
    return _write_outputs(recipe, out, recipe_args, values, base, seeds, full, rows, spec.metrics)


def default_base(recipe: str, recipe_args: Sequence[str], values: dict[str, list[Any]]) -> dict[str, Any]:
    """Each axis's base value: the recipe's default (with these options) when it is among the axis's values, else
    the axis's first value."""
    parsed = C.recipe_namespace(recipe, recipe_args)
    defaults = {"gate": "zero", "layers": getattr(parsed, "layers", None), "K": getattr(parsed, "K", None),
                "epochs": getattr(parsed, "epochs", None)}
    return {a: defaults[a] if defaults[a] in values[a] else values[a][0] for a in AXES}


def _list(kind: Any, flag: str) -> Any:
    def parse(text: str) -> list[Any]:
        parts = [t.strip() for t in text.split(",") if t.strip()]
        if not parts:
            raise argparse.ArgumentTypeError(f"{flag} is empty: give comma-separated values")
        try:
            out = [kind(t) for t in parts]
        except argparse.ArgumentTypeError as exc:
            raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None
        if len(set(out)) != len(out):
            raise argparse.ArgumentTypeError(f"{text!r} repeats a value")
        return out

    return parse


def _gate(text: str) -> str:
    if text not in GATES:
        raise argparse.ArgumentTypeError(f"gate variant {text!r}: choose from {', '.join(GATES)}")
    return text


def _seed(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seed {text!r} is not an int") from None


def _base(text: str) -> dict[str, Any]:
    kinds = {"gate": _gate, "layers": layer_count, "K": prompt_length, "epochs": positive_float}
    out = {}
    for part in (t.strip() for t in text.split(",") if t.strip()):
        axis, sep, value = part.partition("=")
        if not sep or axis not in kinds:
            raise argparse.ArgumentTypeError(f"--base {part!r}: write AXIS=VALUE with AXIS one of {', '.join(kinds)}")
        out[axis] = kinds[axis](value)
    return out


def main(argv: Sequence[str]) -> int:
    """``zinit ablate``: parse the grid, check the recipe's options, run every point and write the report."""
    parser = argparse.ArgumentParser(
        prog="zinit ablate", allow_abbrev=False, description="The paper's ablations (gate variant, layers L, prompt length K, epochs) "
        "through one recipe, over seeds: a table, JSON and plots. Options not listed here go to the recipe "
        "(zinit train RECIPE -h).")
    parser.add_argument("recipe", help=f"one of {', '.join(zinit.list_recipes())}")
    parser.add_argument("--output", required=True, help="folder for every run and the report (re-run to resume)")
    parser.add_argument("--gates", type=_list(_gate, "--gates"), default=["zero", "random"],
                        help="gate variants: zero (zinit), random (N(0,1) init), none (joint softmax) "
                             "(default zero,random)")
    parser.add_argument("--layers", type=_list(layer_count, "--layers"), default=None,
                        help="adapted-layer counts L, e.g. 5,10,20,30 (default: the recipe's)")
    parser.add_argument("--K", type=_list(prompt_length, "--K"), default=None,
                        help="prompt lengths, e.g. 5,10,20 (default: the recipe's)")
    parser.add_argument("--epochs", type=_list(positive_float, "--epochs"), default=None,
                        help="epoch counts, e.g. 1,3 (default: the recipe's)")
    parser.add_argument("--seeds", type=_list(_seed, "--seeds"), default=[0], help="seeds per point (default 0)")
    parser.add_argument("--grid", choices=("oat", "full"), default="oat",
                        help="oat: one factor at a time around the base point (default); full: every combination")
    parser.add_argument("--base", type=_base, default={},
                        help="the base point of --grid oat, e.g. gate=zero,layers=30,K=10 (default: the recipe's "
                             "defaults where they are in the grid, else each axis's first value)")
    parser.add_argument("--jobs", type=positive_int, default=1,
                        help="runs at a time, sharing the CPU threads (default 1)")
    parser.add_argument("--nproc", type=positive_int, default=1, help="processes per run (torchrun) (default 1)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report the runs that finished so far (the others are listed as missing)")
    args, recipe_args = parser.parse_known_args(argv)
    if args.recipe not in zinit.list_recipes():
        parser.error(f"recipe {args.recipe!r}: zinit ablate runs {', '.join(zinit.list_recipes())}")
    for flag in ("--method", "--seed"):
        if any(a == flag or a.startswith(flag + "=") for a in recipe_args):
            parser.error(f"{flag} is set by zinit ablate for each run (--gates, --seeds); drop it")
    try:
        seed = seed_flag(args.recipe)
    except ValueError as exc:
        parser.error(str(exc))
    values = {"gate": args.gates, "layers": args.layers, "K": args.K, "epochs": args.epochs}
    # the recipe's parser checks its options and that it takes every swept one, before any run starts
    probe = list(recipe_args)
    for axis, flag in FLAG.items():
        if values[axis]:
            probe += [flag, f"{values[axis][0]:g}"]
    C.check_recipe_args(args.recipe, [*probe, seed, "0"], args.output)
    try:
        ablate(args.recipe, args.output, recipe_args, values, args.seeds, args.base, args.grid == "full", args.jobs,
               args.nproc, args.report_only)
    except ValueError as exc:
        parser.error(str(exc))
    return 0
