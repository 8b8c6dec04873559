"""Run by tests in a subprocess (alone or under torchrun): train a tiny LLaMA adapter on synthetic sequences.

    python tests/train_script.py OUTPUT [--kill-at STEP] [--grad-accum N] [--save-every N]
        [--pause-at STEP] [--pid-dir DIR] [--signal-at STEP --signal INT|TERM [--second-signal-in-save]]

Rank 0 prints ``RESULT <json>`` with the final adapter as lists (for exact comparison across processes). Hooks that
let a test control the timing, all deterministic (no sleeping in the hope that something has happened):

- ``--kill-at S``: SIGKILL itself from the callback of step S.
- ``--pause-at S``: rank 0 writes ``OUTPUT.paused`` from the callback of step S, then waits until ``OUTPUT.go``
  exists or a stop signal (SIGINT/SIGTERM) reached the trainer; the other ranks wait for it in the next collective.
- ``--pid-dir D``: each rank writes its pid to ``D/rank<RANK>.pid`` at start.
- ``--signal-at S --signal INT``: send that signal to itself from the callback of step S.
- ``--second-signal-in-save``: while writing the checkpoint of step ``--signal-at`` (the one the first signal asked
  for), write a partial file, print ``SECOND-SIGNAL-SENT`` and send SIGINT again.

A run stopped by a signal prints ``STOPPED rank=R step=S code=C`` on every rank, then exits with that code.
"""

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

import zinit  # noqa: E402
from tiny import tiny_llama  # noqa: E402
from zinit.train import Task, TrainConfig, TrainingInterrupted, causal_lm_loss, stop_requested, train  # noqa: E402
from zinit.train.data import pad_collate  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--grad-accum", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--pause-at", type=int, default=None)
    parser.add_argument("--pid-dir", default=None)
    parser.add_argument("--signal-at", type=int, default=None)
    parser.add_argument("--signal", choices=["INT", "TERM"], default="INT")
    parser.add_argument("--second-signal-in-save", action="store_true")
    args = parser.parse_args()

    rank = int(os.environ.get("RANK", "0"))
    if args.pid_dir:
        Path(args.pid_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.pid_dir) / f"rank{rank}.pid").write_text(str(os.getpid()))
    torch.set_num_threads(1)
    model = tiny_llama(layers=3)
    model.config.attention_dropout = 0.2  # exercises the RNG: a resumed run must draw the same dropout masks
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.2
    torch.manual_seed(0)
    zinit.inject(model, 2, K=4)
    g = torch.Generator().manual_seed(5)
    examples = []
    for i in range(40):
        n = 6 + (i * 7) % 9
        ids = torch.randint(3, 96, (n,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})

    def hooks(step, record):
        if args.kill_at is not None and step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        if args.signal_at is not None and step == args.signal_at:
            os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}"))
        if args.pause_at is not None and step == args.pause_at:
            go = Path(args.output + ".go")
            Path(args.output + ".paused").write_text(str(step))
            while not go.exists() and stop_requested() is None:
                time.sleep(0.02)

    if args.second_signal_in_save:
        real_save = torch.save

        def save_then_signal(obj, f, *a, **k):
            if isinstance(obj, dict) and obj.get("step") == args.signal_at:
                Path(f).write_bytes(b"half a checkpoint")
                print("SECOND-SIGNAL-SENT", file=sys.stderr, flush=True)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(30)  # never reached if the second signal ends the process at once
            return real_save(obj, f, *a, **k)

        torch.save = save_then_signal

    task = Task(examples=examples, lengths=[len(x["input_ids"]) for x in examples],
                collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss, fingerprint={"script": "train_script"})
    config = TrainConfig(output=args.output, epochs=2, batch_size=4, grad_accum=args.grad_accum, blr=2.0,
                         warmup_epochs=0.5, save_every=args.save_every, progress=False)
    try:
        result = train(model, task, config, callbacks=[hooks])
    except TrainingInterrupted as stop:
        print(f"STOPPED rank={rank} step={stop.step} code={stop.code}", flush=True)
        raise
    if rank == 0:  # one writer: two ranks' long lines would interleave on a shared stdout
        state = {k: v.tolist() for k, v in zinit.adapter_state_dict(model).items()}
        print("RESULT " + json.dumps({"steps": result.steps, "resumed_from": result.resumed_from, "adapter": state}))


if __name__ == "__main__":
    main()
