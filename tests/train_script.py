"""Run by tests in a subprocess: train a tiny LLaMA adapter on synthetic sequences, optionally SIGKILLing itself.

    python tests/train_script.py OUTPUT [--kill-at STEP]

Prints ``RESULT <json>`` with the final adapter as lists (for exact comparison across processes).
"""

import argparse
import json
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

import zinit  # noqa: E402
from tiny import tiny_llama  # noqa: E402
from zinit.train import Task, TrainConfig, causal_lm_loss, train  # noqa: E402
from zinit.train.data import pad_collate  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("output")
    parser.add_argument("--kill-at", type=int, default=None)
    args = parser.parse_args()

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

    def killer(step, record):
        if args.kill_at is not None and step == args.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    task = Task(examples=examples, lengths=[len(x["input_ids"]) for x in examples],
                collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss, fingerprint={"script": "train_script"})
    config = TrainConfig(output=args.output, epochs=2, batch_size=4, grad_accum=2, blr=2.0, warmup_epochs=0.5,
                         save_every=3, progress=False)
    result = train(model, task, config, callbacks=[killer])
    state = {k: v.tolist() for k, v in zinit.adapter_state_dict(model).items()}
    print("RESULT " + json.dumps({"steps": result.steps, "resumed_from": result.resumed_from, "adapter": state}))


if __name__ == "__main__":
    main()
