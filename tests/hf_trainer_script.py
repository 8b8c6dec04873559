"""Train a tiny zinit LLaMA with ``ZinitTrainer``; run by tests/test_hf_trainer.py under torchrun (DDP, gloo, CPU).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/hf_trainer_script.py OUTPUT

Each rank writes ``OUTPUT/result_rank<R>.json``: the world size, the parallel mode, the input ids of every batch the
rank trained on, and its final adapter as lists (for exact comparison across processes). The builders below
(``build_model``, ``dataset``, ``training_args``) are shared with the tests, so both train the same thing.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))

import zinit  # noqa: E402
from tiny import tiny_llama  # noqa: E402

LENGTH = 12


def build_model(prompt_seed: int = 0, attention_dropout: float = 0.0):
    """The same random base every time (seed 0); the prompts' N(0, 1) init drawn from ``prompt_seed``."""
    model = tiny_llama(layers=3)
    model.config.attention_dropout = attention_dropout
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = attention_dropout
    torch.manual_seed(prompt_seed)
    return zinit.inject(model, layers=2, K=4)


def dataset(n: int = 16, seed: int = 5) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed sequences of LENGTH tokens (no padding), each its own target: memorisable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 96, (LENGTH,), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def training_args(output_dir, **overrides):
    """TrainingArguments at their defaults (optimizer included) but for a tiny CPU run's sizes."""
    from transformers import TrainingArguments

    kwargs = dict(output_dir=str(output_dir), use_cpu=True, report_to="none", disable_tqdm=True,
                  per_device_train_batch_size=4, learning_rate=0.3, logging_steps=1, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def main() -> None:
    from transformers import default_data_collator

    from zinit.integrations.trainer import ZinitTrainer

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    seen: list[list[list[int]]] = []

    def collate(rows):
        batch = default_data_collator(rows)
        seen.append(batch["input_ids"].tolist())
        return batch

    args = training_args(out, ddp_backend="gloo", per_device_train_batch_size=2, max_steps=4, save_steps=2)
    trainer = ZinitTrainer(model=build_model(), args=args, train_dataset=dataset(), data_collator=collate)
    trainer.train()
    rank = args.process_index
    state = {k: v.tolist() for k, v in zinit.adapter_state_dict(trainer.model).items()}
    result = {"world_size": args.world_size, "parallel_mode": str(args.parallel_mode),
              "backend": torch.distributed.get_backend() if torch.distributed.is_initialized() else None,
              "batches": seen, "adapter": state}
    (out / f"result_rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
