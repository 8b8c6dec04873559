"""zinit ablate: the grid it runs (one factor at a time or full), each run's command and trainable count, the
report's aggregates over seeds, the plots, resuming without re-running finished points (and re-running failed
ones), the paper's column, and bad grids refused before anything runs."""

from __future__ import annotations

import json
import subprocess

import pytest

from tiny import run_cli
from zinit.methods import ablate as A

H, C = 4, 32  # save_tiny_causal_lm: 3 layers, hidden 32, 4 heads


def _values(**kw):
    return {"gate": kw.get("gate", ["zero"]), "layers": kw.get("layers", [None]), "K": kw.get("K", [None]),
            "epochs": kw.get("epochs", [None])}


def test_one_factor_at_a_time_and_full_grids():
    values = _values(gate=["zero", "random", "none"], layers=[5, 10, 30], K=[5, 10])
    base = {"gate": "zero", "layers": 30, "K": 10, "epochs": None}
    oat = [p.name() for p in A.grid_points(values, base)]
    assert oat == ["zero-L30-K10", "random-L30-K10", "none-L30-K10", "zero-L5-K10", "zero-L10-K10", "zero-L30-K5"]
    full = A.grid_points(values, base, full=True)
    assert len(full) == 3 * 3 * 2 and len(set(full)) == len(full)
    assert A.Point("random", 5, 10, 2.0).args() == ["--method", "zinit_random", "--layers", "5", "--K", "10",
                                                     "--epochs", "2"]


def test_aggregate_means_and_spreads_over_seeds_and_keeps_failures():
    def row(seed, status="ok", acc=None):
        r = {"name": "zero-L2", "point": {"gate": "zero", "layers": 2, "K": None, "epochs": None}, "seed": seed,
             "status": status, "trainable_parameters": 10}
        return {**r, "metrics": {"acc": acc, "loss": 1.0}} if status == "ok" else {**r, "reason": "exit 1\nmore"}

    (agg,) = A.aggregate([row(0, acc=60.0), row(1, acc=70.0), row(2, acc=80.0), row(3, "failed")], ["acc", "loss"])
    assert agg["acc"]["mean"] == 70.0 and agg["acc"]["std"] == 10.0 and agg["acc"]["values"] == [60.0, 70.0, 80.0]
    assert agg["seeds"] == [0, 1, 2] and agg["failed"] == [{"seed": 3, "status": "failed", "reason": "exit 1"}]
    assert agg["loss"]["std"] == 0.0


def test_scienceqa_report_shows_the_papers_numbers_beside_the_measured_ones():
    def point(gate, layers, avg):
        return {"name": f"{gate}-L{layers}", "point": {"gate": gate, "layers": layers, "K": None, "epochs": None},
                "trainable_parameters": 5, "failed": [], "Avg": {"mean": avg, "std": 1.0, "values": [avg - 1, avg + 1]}}

    single = {**point("zero", 10, 50.0), "Avg": {"mean": 50.0, "std": 0.0, "values": [50.0]}}  # one seed finished
    points = [point("zero", 30, 70.0), point("random", 30, 30.0), single]
    values = _values(gate=["zero", "random"], layers=[10, 30])
    text = A.format_report("scienceqa", points, values, {"gate": "zero", "layers": 30, "K": None, "epochs": None},
                           False)
    gate_table = text.split("## gate")[1].split("## layers")[0]
    assert "| zero-L30 | 5 | 70.00 ± 1.00 (n=2) |" in gate_table and gate_table.rstrip().endswith("| 40.77 |")
    layer_rows = text.split("## layers")[1].splitlines()
    assert layer_rows[4].startswith("| zero-L10 |") and layer_rows[4].endswith("| 55.95 |")  # sorted by L
    assert "| 50.00 (n=1) |" in layer_rows[4]  # one seed: no spread shown
    assert "| zero-L30 |" in layer_rows[5] and layer_rows[5].endswith("| 83.85 |")
    assert "random" not in text.split("## layers")[1]  # the layer table holds the other axes at base


def test_ablate_alpaca_end_to_end_then_resume(tmp_path, tiny_model_dir, alpaca_file, capsys, monkeypatch):
    out = tmp_path / "abl"
    args = ["ablate", "alpaca", "--output", out, "--gates", "zero,random", "--layers", "1,2", "--base", "layers=2",
            "--seeds", "0", "--jobs", "3", "--model", tiny_model_dir, "--data", alpaca_file, "--eval-data",
            alpaca_file, "--K", "4", "--epochs", "1", "--batch-size", "4", "--no-progress", "--device", "cpu"]
    status, stdout, _ = run_cli(args, capsys)
    assert status == 0, stdout
    data = json.loads((out / "ablate.json").read_text())
    runs = {r["name"]: r for r in data["runs"]}
    assert set(runs) == {"zero-L2-K4-e1", "random-L2-K4-e1", "zero-L1-K4-e1"}
    assert all(r["status"] == "ok" for r in runs.values()), [r.get("reason") for r in runs.values()]
    assert runs["random-L2-K4-e1"]["args"][-6:] == ["--K", "4", "--epochs", "1", "--seed", "0"]
    assert "--method zinit_random" in runs["random-L2-K4-e1"]["command"]
    assert runs["zero-L2-K4-e1"]["trainable_parameters"] == 2 * (4 * C + H)
    assert runs["zero-L1-K4-e1"]["trainable_parameters"] == 4 * C + H
    # the top L layers' gates, and what each variant starts from: zero-init computes the base model at step 0
    assert set(runs["zero-L2-K4-e1"]["gates"]) == {"1", "2"} and set(runs["zero-L1-K4-e1"]["gates"]) == {"2"}
    first = {n: runs[n]["loss_curve"][0][1] for n in ("zero-L2-K4-e1", "zero-L1-K4-e1", "random-L2-K4-e1")}
    assert first["zero-L2-K4-e1"] == pytest.approx(first["zero-L1-K4-e1"], abs=1e-6)
    assert first["random-L2-K4-e1"] != pytest.approx(first["zero-L2-K4-e1"], abs=1e-3)
    for name in ("metric_vs_layers.png", "loss_curves.png", "gate_opening.png"):
        assert (out / name).stat().st_size > 1000
    assert not (out / "metric_vs_K.png").exists()  # K is not swept
    table = (out / "ablate.md").read_text()
    assert "## gate" in table and "## layers" in table and "## K" not in table
    assert "| zero-L1-K4-e1 | 132 |" in table

    # re-running the command runs nothing that finished; a failed run (here: marked failed) runs again
    row_file = out / "runs" / "zero-L1-K4-e1-s0" / A.ROW_NAME
    row_file.write_text(json.dumps({**json.loads(row_file.read_text()), "status": "failed", "reason": "x"}))
    started = []
    real = subprocess.Popen
    monkeypatch.setattr(subprocess, "Popen", lambda cmd, **kw: started.append(cmd) or real(cmd, **kw))
    status, stdout, _ = run_cli(args, capsys)
    assert status == 0 and len(started) == 1 and "--layers" in started[0]
    assert started[0][started[0].index("--layers") + 1] == "1"
    assert json.loads(row_file.read_text())["status"] == "ok"

    # --report-only runs nothing and lists what has not run (a new point, L=3)
    wider = [a if a != "1,2" else "1,2,3" for a in args]
    status, stdout, _ = run_cli([*wider, "--report-only"], capsys)
    assert status == 0 and len(started) == 1
    assert "zero-L3-K4-e1 seed 0: missing" in stdout and "| zero-L3-K4-e1 (seed 0 missing) | – |" in stdout
    runs = {r["name"]: r for r in json.loads((out / "ablate.json").read_text())["runs"]}
    assert runs["zero-L3-K4-e1"]["status"] == "missing" and runs["zero-L1-K4-e1"]["status"] == "ok"


def test_finished_runs_are_matched_by_meaning_and_only_a_finished_one_blocks_other_options(tmp_path, monkeypatch):
    point, args = A.Point("zero", 2, 4, 1.0), ["--data", "d.json", "--max-seq-len", "50"]
    folder = tmp_path / "runs" / f"{point.name()}-s0"
    folder.mkdir(parents=True)

    def save(status, **extra):
        row = {"status": status, "args": [*args, *point.args(), "--seed", "0"], "name": point.name(), **extra}
        (folder / A.ROW_NAME).write_text(json.dumps(row))

    save("ok", metrics={"exact_match": 1.0})
    respelled = ["--max-seq-len=50", "--data", "d.json"]  # the same run, other order and spelling
    assert A.finished("alpaca", point, 0, tmp_path, respelled)["status"] == "ok"
    A.check_folder("alpaca", point, 0, tmp_path, respelled)
    other = ["--data", "d.json", "--max-seq-len", "60"]
    assert A.finished("alpaca", point, 0, tmp_path, other)["status"] == "missing"
    with pytest.raises(ValueError, match="holds a finished run of this point with other recipe options"):
        A.check_folder("alpaca", point, 0, tmp_path, other)

    row = json.loads((folder / A.ROW_NAME).read_text())
    (folder / A.ROW_NAME).write_text(json.dumps({**row, "args": [*row["args"], "--retired-option", "1"]}))
    assert A.finished("alpaca", point, 0, tmp_path, args)["status"] == "missing"  # an option zinit no longer takes
    with pytest.raises(ValueError, match="other recipe options"):
        A.check_folder("alpaca", point, 0, tmp_path, args)

    save("failed", reason="exit 1\nTraceback ...")
    A.check_folder("alpaca", point, 0, tmp_path, other)  # a failed run is retrained, with the new options
    assert A.finished("alpaca", point, 0, tmp_path, args)["reason"] == "failed earlier: exit 1"

    # the whole grid is checked before its first run: a conflict at the last point starts nothing
    save("ok", metrics={"exact_match": 1.0})
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a run started"))
    with pytest.raises(ValueError, match="holds a finished run"):
        A.ablate("alpaca", tmp_path, other, {"layers": [1, 2], "K": [4], "epochs": [1.0]}, [0],
                 {"layers": 1})


def test_option_parsing_in_several_threads_gives_sys_stderr_back(monkeypatch):
    """``--jobs`` threads parse saved runs' options with stderr silenced; the second thread's parse is forced to
    start while the first is inside its own (events, not luck), and the process's stderr must come back."""
    import sys
    import threading

    real_stderr, entered, go = sys.stderr, [], threading.Event()
    first_inside = threading.Event()

    def parse(recipe, args, output="-"):
        entered.append(args)
        if len(entered) == 1:
            first_inside.set()
            assert go.wait(30)
        raise SystemExit(2)  # a retired option, as argparse ends it

    monkeypatch.setattr(A.C, "recipe_namespace", parse)
    A._options.cache_clear()
    one = threading.Thread(target=A._options, args=("alpaca", ("--a",)))
    two = threading.Thread(target=A._options, args=("alpaca", ("--b",)))
    one.start()
    assert first_inside.wait(30)
    two.start()
    two.join(0.5)
    assert len(entered) == 1  # the second parse waits for the first
    go.set()
    one.join(30)
    two.join(30)
    A._options.cache_clear()
    assert len(entered) == 2 and sys.stderr is real_stderr


@pytest.mark.parametrize("extra, message", [
    (["--gates", "zero,half"], "gate variant 'half'"),
    (["--layers", "2,0"], "--layers"),
    (["--layers", "2,2"], "repeats a value"),
    (["--base", "layers=7", "--layers", "1,2"], "the base layers=7 is not among the layers values [1, 2]"),
    (["--base", "depth=3"], "AXIS=VALUE"),
    (["--method", "lora"], "--method is set by zinit ablate"),
    (["--seed", "3"], "--seed is set by zinit ablate"),
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
])
def test_bad_grids_are_refused_before_any_run(tmp_path, capsys, monkeypatch, extra, message):
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("a run started"))
    status, _, err = run_cli(["ablate", "alpaca", "--output", tmp_path / "o", *extra], capsys)
    assert status == 2 and message in err, err
    assert not (tmp_path / "o" / "runs").exists()
