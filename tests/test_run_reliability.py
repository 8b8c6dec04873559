"""Runs that cannot clash or be lost: one writer per output folder (a lock; orphaned torchrun workers exit when
their launcher dies), Ctrl-C / SIGTERM stop after the step with a checkpoint and exit 130 / 143, and checkpoints
also come on a wall-clock cadence.

Every timing is controlled: tests/train_script.py signals itself from a callback at a given step, or pauses at a
step until the test creates a file (or a stop signal arrives), so nothing sleeps in the hope that something happened.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zinit
from zinit.lm import load_model
from zinit.recipes import alpaca
from tiny import alpaca_records, subprocess_env, tiny_llama
from zinit.train import OutputInUse, Task, TrainConfig, causal_lm_loss, train
from zinit.train import loop
from zinit.train.checkpoint import load_checkpoint
from zinit.train.data import pad_collate
from zinit.train.lock import LOCK_NAME, OutputLock

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "train_script.py")


def _run(cmd, timeout=300):
    return subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def _script(out, *extra):
    return [sys.executable, SCRIPT, str(out), *extra]


def _torchrun(out, *extra):
    # --standalone: the rendezvous takes a free port, so concurrent test runs cannot collide
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", SCRIPT, str(out),
            "--grad-accum", "1", *extra]  # 40 examples / (4 × 2 ranks) = 5 steps per epoch, 10 steps


def _result(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def _assert_same_adapter(a, b):
    assert a["adapter"].keys() == b["adapter"].keys()
    for key, value in a["adapter"].items():
        diff = (torch.tensor(b["adapter"][key]) - torch.tensor(value)).abs().max().item()
        assert diff <= 1e-6, key


def _steps_logged(out):
    return [json.loads(line)["step"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def _wait_for(path, proc, timeout=180):
    """Wait until ``path`` exists; fail early (with the output) if ``proc`` ended first."""
    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {path} appeared:\n"
                                 + Path(proc.args_log).read_text()[-4000:])
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.05)


def _exited(pid):
    """True once ``pid`` has exited (gone, or a zombie its new parent has not reaped yet)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state in ("Z", "X")


def _kill_workers(pids, marker="train_script.py"):
    """SIGKILL the worker processes this test started that are still running (recognised by ``marker`` in their
    command line, so a reused pid is never hit)."""
    for pid in pids:
        try:
            running_script = not _exited(pid) and marker.encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            running_script = False
        if running_script:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _start(cmd, log):
    """Start ``cmd`` with stdout and stderr in the file ``log`` (no pipe to fill up while the test waits)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=open(log, "w"), stderr=subprocess.STDOUT)
    proc.args_log = str(log)
    return proc


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted single-process run of the script (10 steps)."""
    return _result(_run(_script(tmp_path_factory.mktemp("straight") / "out")))


@pytest.fixture(scope="module")
def torchrun_reference(tmp_path_factory):
    """An uninterrupted two-process run of the script (10 steps)."""
    return _result(_run(_torchrun(tmp_path_factory.mktemp("straight2") / "out")))


def _tiny_task(n=16):
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}] * n
    return Task(examples=examples, collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss, fingerprint={"data": "x"})


# ---------------------------------------------------------------- item 8: one writer per output folder


HOLDER = """
import sys
from zinit.train.lock import OutputLock
lock = OutputLock(sys.argv[1])
lock.acquire()
print("locked", flush=True)
sys.stdin.read()  # hold until the test closes stdin
lock.release()
"""


def test_a_second_run_into_a_locked_folder_is_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = out / ".checkpoint.pt.abc123.tmp"  # what a run killed while saving leaves behind
    stale.write_bytes(b"half")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=subprocess_env(), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        config = TrainConfig(output=str(out), max_steps=2, batch_size=4, progress=False)
        began = time.monotonic()
        with pytest.raises(OutputInUse) as refused:
            train(zinit.inject(tiny_llama(layers=2), 2, K=3), _tiny_task(), config)
        assert time.monotonic() - began < 5  # refused at once, not after waiting
        message = str(refused.value)
        assert f"pid {holder.pid}" in message and "Wait for it to finish or kill it" in message, message
        assert f"kill {holder.pid}" in message and "\n" not in message
        assert refused.value.holder["pid"] == holder.pid
        assert not (out / "checkpoint.pt").exists() and not (out / "metrics.jsonl").exists()
        assert stale.exists()  # nothing in the folder was touched
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert holder.returncode == 0

    result = train(zinit.inject(tiny_llama(layers=2), 2, K=3), _tiny_task(), config)  # free again: it runs
    assert result.steps == 2 and not stale.exists()  # and it cleared the killed run's temporary file
    lock = OutputLock(out)
    lock.acquire()  # train() released the lock when it returned
    lock.release()
    with pytest.raises(ValueError, match="fewer than one optimizer step"):
        train(zinit.inject(tiny_llama(layers=2), 2, K=3), _tiny_task(3), TrainConfig(output=str(out), progress=False))
    lock.acquire()  # ... and when it raised
    lock.release()


def test_killed_torchrun_launcher_leaves_no_writer_and_the_run_resumes_exactly(tmp_path, torchrun_reference):
    """SIGKILL the torchrun launcher: its workers (own session, so not killed with it) must exit by themselves;
    meanwhile a second launch into the folder is refused on every rank; the next launch resumes exactly."""
    out, pids = tmp_path / "run", tmp_path / "pids"
    first = _start(_torchrun(out, "--save-every", "3", "--pause-at", "4", "--pid-dir", str(pids)), tmp_path / "a.log")
    workers = []
    try:
        _wait_for(str(out) + ".paused", first)  # rank 0 waits in the callback of step 4; step 3's checkpoint exists
        workers = [int((pids / f"rank{r}.pid").read_text()) for r in (0, 1)]
        assert json.loads((out / LOCK_NAME).read_text())["pid"] == workers[0]

        second = _run(_torchrun(out), timeout=180)  # every rank must raise, none may hang in a barrier
        assert second.returncode != 0
        refusal = f"is in use by another training run: pid {workers[0]}"
        assert (second.stdout + second.stderr).count(refusal) >= 2, second.stderr[-4000:]  # rank 0 and rank 1

        first.send_signal(signal.SIGKILL)  # the launcher only
        first.wait(timeout=30)
        deadline = time.monotonic() + 30
        while not all(_exited(p) for p in workers):
            assert time.monotonic() < deadline, f"orphaned workers {workers} still running 30 s after the launcher died"
            time.sleep(0.05)
        assert "is gone; exiting" in (tmp_path / "a.log").read_text()
    finally:
        _stop(first)
        _kill_workers(workers)
    assert load_checkpoint(out)["step"] == 3  # nothing was written after the kill

    resumed = _result(_run(_torchrun(out, "--save-every", "3"), timeout=300))  # the same run, without the pause hook
    assert resumed["resumed_from"] == 3 and resumed["steps"] == 10
    _assert_same_adapter(torchrun_reference, resumed)
    assert _steps_logged(out) == list(range(1, 11))


LAUNCHER = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=open(sys.argv[3], "w"),
                         stderr=subprocess.STDOUT, start_new_session=True)  # as torchrun starts its workers
print(child.pid, flush=True)
child.wait()
"""
WORKER = """
import pathlib, sys, time
import zinit.train.dist as D
D._PR_SET_PDEATHSIG = 0  # an invalid prctl option: no parent-death signal, so the heartbeat alone must notice
assert D.watch_launcher(interval=0.1)
pathlib.Path(sys.argv[1]).write_text("watching")
time.sleep(600)  # a worker stuck in (or between) steps
"""


def test_the_heartbeat_ends_a_worker_whose_launcher_died(tmp_path):
    """With the parent-death signal switched off, the heartbeat thread alone must notice."""
    env = subprocess_env()
    env.update(WORLD_SIZE="2", RANK="1", LOCAL_RANK="1", TORCHELASTIC_RUN_ID="zinit-test")
    ready, log = tmp_path / "ready", tmp_path / "worker.log"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, WORKER, str(ready), str(log)], env=env,
                                stdout=subprocess.PIPE, text=True)
    worker = int(launcher.stdout.readline())
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while not _exited(worker):
            assert time.monotonic() < deadline, "the orphaned worker is still running 30 s after its launcher died"
            time.sleep(0.05)
    finally:
        _stop(launcher)
        _kill_workers([worker], "time.sleep(600)")
    assert "is gone; exiting so no orphan writes into the output folder" in log.read_text()


# ---------------------------------------------------------------- item 10: Ctrl-C must not lose the run


@pytest.mark.parametrize("name,code,resume", [("INT", 130, True), ("TERM", 143, False)])
def test_signal_stops_after_the_step_with_a_checkpoint_and_exit_code(tmp_path, reference, name, code, resume):
    out = tmp_path / "run"
    cmd = _script(out, "--save-every", "1000", "--signal-at", "5", "--signal", name)
    stopped = _run(cmd)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert f"STOPPED rank=0 step=5 code={code}" in stopped.stdout
    resume_line = (f"zinit: interrupted by SIG{name} at step 5/10; checkpoint saved in {out}; "
                   "run the same command again to resume")
    assert resume_line in stopped.stderr.splitlines(), stopped.stderr[-3000:]
    assert load_checkpoint(out)["step"] == 5  # save_every 1000: this checkpoint exists only because of the signal
    assert _steps_logged(out) == [1, 2, 3, 4, 5]
    if resume:
        resumed = _result(_run(cmd))  # literally the same command: the hook fires at step 5, which is done
        assert resumed["resumed_from"] == 5 and resumed["steps"] == 10
        _assert_same_adapter(reference, resumed)
        assert _steps_logged(out) == list(range(1, 11))


def test_second_sigint_while_saving_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _run(_script(out, "--save-every", "3", "--signal-at", "5", "--second-signal-in-save"))
    assert "SIGINT received: stopping after this step" in proc.stderr
    assert "SECOND-SIGNAL-SENT" in proc.stderr, proc.stderr[-3000:]  # the second signal came mid-write ...
    assert proc.returncode == -signal.SIGINT  # ... and ended the process then (not after the 30 s the hook waits)
    assert "checkpoint saved" not in proc.stderr
    saved = load_checkpoint(out)  # the last good checkpoint still loads
    assert saved["step"] == 3
    assert list(out.glob(".checkpoint.pt.*.tmp"))  # the half-written file never replaced it


def test_torchrun_sigint_stops_every_rank_at_the_same_step_and_resumes(tmp_path, torchrun_reference):
    """Ctrl-C reaches torchrun, which forwards SIGINT to each worker: all ranks stop after the same step."""
    out = tmp_path / "run"
    first = _start(_torchrun(out, "--save-every", "1000", "--pause-at", "5"), tmp_path / "a.log")
    try:
        _wait_for(str(out) + ".paused", first)  # rank 0 in the callback of step 5, rank 1 in the next collective
        first.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does (workers have their own session)
        first.wait(timeout=120)
    finally:
        _stop(first)
    log = (tmp_path / "a.log").read_text()
    assert first.returncode != 0
    assert "STOPPED rank=0 step=5 code=130" in log and "STOPPED rank=1 step=5 code=130" in log, log[-4000:]
    assert log.count("zinit: interrupted by SIGINT at step 5/10") == 1  # said once, by rank 0
    assert load_checkpoint(out)["step"] == 5

    resumed = _result(_run(_torchrun(out, "--save-every", "1000"), timeout=300))
    assert resumed["resumed_from"] == 5 and resumed["steps"] == 10
    _assert_same_adapter(torchrun_reference, resumed)


def test_cli_ctrl_c_exits_130_with_a_checkpoint_and_the_resume_line(tmp_path, tiny_model_dir):
    """``zinit train alpaca``: SIGINT mid-training (long before --save-every) exits 130 with a checkpoint."""
    data = tmp_path / "alpaca_data.json"
    data.write_text(json.dumps(alpaca_records(24) * 50))  # 1200 examples, 600 steps: far from done when signalled
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "zinit", "train", "alpaca", "--model", str(tiny_model_dir), "--data", str(data),
           "--output", str(out), "--layers", "2", "--K", "4", "--epochs", "1", "--batch-size", "2",
           "--save-every", "100000", "--no-progress", "--device", "cpu"]
    proc = _start(cmd, tmp_path / "cli.log")
    try:
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 180
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, (tmp_path / "cli.log").read_text()[-4000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=120)
    finally:
        _stop(proc)
    log = (tmp_path / "cli.log").read_text()
    assert proc.returncode == 130, log[-4000:]
    step = load_checkpoint(out)["step"]
    assert 2 <= step < 600 and _steps_logged(out)[-1] == step
    assert f"zinit: interrupted by SIGINT at step {step}/600; checkpoint saved in {out}; run the same command again " \
           "to resume" in log
    assert "Traceback" not in log and not (out / "adapter").exists()


def test_time_based_checkpoint_cadence_with_a_fake_clock(tmp_path, monkeypatch):
    """Checkpoints also come when ``save_every_minutes`` of wall time have passed (the clock is faked: each step
    takes four minutes)."""
    now = {"t": 1000.0}

    class Clock:
        perf_counter = staticmethod(time.perf_counter)

        @staticmethod
        def monotonic():
            return now["t"]

    monkeypatch.setattr(loop, "time", Clock)
    saves = []
    real_save = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda folder, state: (saves.append(state["step"]),
                                                                         real_save(folder, state))[1])

    def four_minute_step(model, batch):
        now["t"] += 240
        return causal_lm_loss(model, batch)

    task = _tiny_task()
    task.loss = four_minute_step
    config = TrainConfig(output=str(tmp_path / "a"), max_steps=7, batch_size=4, save_every=1000,
                         save_every_minutes=10, progress=False)
    train(zinit.inject(tiny_llama(layers=2), 2, K=3), task, config)
    assert saves == [3, 6, 7]  # 12 and 24 minutes in, then the end

    saves.clear()
    config = TrainConfig(output=str(tmp_path / "b"), max_steps=7, batch_size=4, save_every=2, save_every_minutes=10,
                         progress=False)
    train(zinit.inject(tiny_llama(layers=2), 2, K=3), task, config)
    assert saves == [2, 4, 6, 7]  # a step checkpoint restarts the clock: never more than 10 minutes apart here

    saves.clear()
    config = TrainConfig(output=str(tmp_path / "c"), max_steps=7, batch_size=4, save_every=1000,
                         save_every_minutes=0, progress=False)
    train(zinit.inject(tiny_llama(layers=2), 2, K=3), task, config)
    assert saves == [7]  # 0: by steps only
    assert "save_every_minutes" not in config.fingerprint()  # a resumed run may change it

    with pytest.raises(ValueError, match=r"save_every_minutes=-1 must be a number >= 0"):
        train(zinit.inject(tiny_llama(layers=2), 2, K=3), task,
              TrainConfig(output=str(tmp_path / "d"), save_every_minutes=-1, progress=False))


def test_heldout_evaluation_shows_a_progress_bar_unless_progress_is_off(tiny_model_dir, capsys):
    model, tokenizer = load_model(str(tiny_model_dir), torch.device("cpu"))
    records = alpaca_records(6)
    quiet = alpaca.evaluate(model, tokenizer, records, 512, batch_size=4, max_new_tokens=2)
    assert "held-out eval" not in capsys.readouterr().err
    shown = alpaca.evaluate(model, tokenizer, records, 512, batch_size=4, max_new_tokens=2, progress=True)
    err = capsys.readouterr().err
    assert "held-out eval (6 examples)" in err and "4/4" in err  # 2 loss batches + 2 generation batches
    assert shown == quiet


def test_only_torchrun_workers_are_watched(monkeypatch):
    """A process started by hand or by a scheduler (WORLD_SIZE and LOCAL_RANK set, no torchrun) may outlive its
    parent shell (nohup): the heartbeat must not kill it."""
    import zinit.train.dist as D

    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert not D.under_launcher()
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "x")
    assert D.under_launcher()
    monkeypatch.setenv("ZINIT_WATCH_LAUNCHER", "0")
    assert not D.under_launcher()


REPEATS = """
import os, signal
from zinit.train.stop import StopSignals

with StopSignals(announce=False) as signals:
    os.kill(os.getpid(), signal.SIGTERM)
    os.kill(os.getpid(), signal.SIGTERM)  # handled as a repeat: no exception, nothing changes
    assert signals.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == signals._handle
with StopSignals(announce=False) as signals:
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL  # a second Ctrl-C would end the process
assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored after the block
print("ok")
"""


def test_repeated_sigterms_are_one_stop_request_and_a_second_sigint_quits():
    """A scheduler's SIGTERM and torchrun's forwarded copy arrive together: one request, never a crash. A second
    Ctrl-C, by contrast, gets the default action (the process ends at once). In a child process: a regression
    would end the process that receives the signals."""
    done = _run([sys.executable, "-c", REPEATS], timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])


BACKGROUND = """
import os, signal
from zinit.train.stop import StopSignals

signal.signal(signal.SIGINT, signal.SIG_IGN)  # what a shell gives a background job (`cmd &`)
with StopSignals(announce=False) as signals:
    assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN  # left alone: Ctrl-C is not this job's
    assert signal.getsignal(signal.SIGTERM) == signals._handle
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.signum is None
print("ok")
"""


def test_a_background_jobs_ignored_sigint_is_left_alone():
    done = _run([sys.executable, "-c", BACKGROUND], timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-2000:])
