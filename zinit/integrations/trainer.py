"""zinit under Hugging Face ``transformers.Trainer``: checkpoints that hold the adapter, not the frozen base.

:class:`ZinitTrainer` is a ``Trainer`` that saves and loads a zinit-injected model's adapter where ``Trainer`` would
save and load the whole model. Everything else is ``Trainer``'s own: its default optimizer (fused AdamW), schedule,
evaluation, logging, callbacks, ``checkpoint-N`` folders, ``save_total_limit``, ``resume_from_checkpoint``,
``load_best_model_at_end``, DDP under ``torchrun`` / ``accelerate launch`` (gloo on CPU, nccl on GPU).

Each ``output_dir/checkpoint-N/`` is a zinit adapter folder (``zinit.json`` + ``adapter.safetensors``, exactly what
:func:`zinit.save_adapter` writes, so :func:`zinit.load_adapter` and ``zinit generate --adapter`` read it as it is)
beside ``Trainer``'s own files (``optimizer.pt``, ``scheduler.pt``, ``rng_state*.pth``, ``trainer_state.json``,
``training_args.bin``, and the tokenizer when one is given). No ``model.safetensors``: the frozen base is never
written. ``trainer.save_model(dir)`` writes the same adapter folder.

Which ``Trainer`` methods are overridden, and why (each is tested in ``tests/test_hf_trainer.py``, so a
transformers release that stops calling one of them fails a test rather than silently saving the whole model):

- ``save_model`` (public): every checkpoint (``_save_checkpoint``) and the final save go through it.
- ``_load_from_checkpoint`` (private, no public hook): ``train(resume_from_checkpoint=...)`` loads the model with it
  before the optimizer, scheduler and RNG states; it would refuse a folder without ``model.safetensors``.
- ``_load_best_model`` (private, no public hook): ``load_best_model_at_end`` loads the best checkpoint with it.
- ``get_decay_parameter_names`` (public): gates, scales and biases in any layout (and any 1-D parameter) get no
  weight decay, as in zinit's own trainer (:func:`zinit.train.schedule.decays`); prompts get ``args.weight_decay``
  (0 by default).

DeepSpeed and FSDP are refused (the adapter is a few MB and replicated; shard the frozen model with
``zinit train --fsdp`` instead). Named adapters (:func:`zinit.add_adapter`) are not handled here: inject one adapter
with :func:`zinit.inject`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from ..inject import injection, is_injected
from ..io import CONFIG_NAME, load_adapter, save_adapter
from ..train.schedule import decays

__all__ = ["ZinitTrainer", "is_adapter_checkpoint"]


def is_adapter_checkpoint(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` (a ``checkpoint-N`` folder, or any folder) holds a zinit adapter (``zinit.json``).

    >>> import tempfile
    >>> is_adapter_checkpoint(tempfile.mkdtemp())
    False
    """
    return (Path(folder) / CONFIG_NAME).is_file()


class ZinitTrainer(Trainer):
    """``transformers.Trainer`` for a model injected with :func:`zinit.inject`: checkpoints, ``save_model``,
    ``resume_from_checkpoint`` and ``load_best_model_at_end`` save and load only the adapter.

    Takes exactly ``Trainer``'s arguments. Only the adapter's parameters require grad after ``inject``, so the
    default optimizer (``args.optim``, fused AdamW) trains the prompts and gates and nothing else. Every evaluation
    runs the current adapter: zinit projects the prompt afresh on every forward.

    To combine with another ``Trainer`` subclass (trl's ``SFTTrainer``, your own), put this class first:
    ``class MyTrainer(ZinitTrainer, SFTTrainer): pass``.

    Raises:
        ValueError: the model is not injected with zinit, or DeepSpeed / FSDP is enabled.

    Example (a tiny random-weight model; ``checkpoint-2`` holds the adapter and Trainer's state, no base weights):
        >>> import os, tempfile, torch, zinit
        >>> from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments
        >>> from zinit.integrations.trainer import ZinitTrainer
        >>> cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                   num_attention_heads=4, num_key_value_heads=2)
        >>> model = zinit.inject(LlamaForCausalLM(cfg), layers=2, K=4)
        >>> data = [{"input_ids": torch.arange(8) + i, "labels": torch.arange(8) + i} for i in range(4)]
        >>> out = tempfile.mkdtemp()
        >>> args = TrainingArguments(out, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-2,
        ...                          use_cpu=True, disable_tqdm=True, logging_strategy="no", report_to="none")
        >>> _ = ZinitTrainer(model=model, args=args, train_dataset=data).train()  # doctest: +ELLIPSIS
        {'train_runtime': ...}
        >>> sorted(n for n in os.listdir(os.path.join(out, "checkpoint-2")) if n.endswith((".safetensors", ".json")))
        ['adapter.safetensors', 'trainer_state.json', 'zinit.json']
        >>> fresh = zinit.load_adapter(LlamaForCausalLM(cfg), os.path.join(out, "checkpoint-2"))
        >>> all(torch.equal(a, b) for a, b in zip(zinit.adapter_state_dict(fresh).values(),
        ...                                       zinit.adapter_state_dict(model).values()))
        True
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model is not None and not is_injected(self._unwrapped()):  # model_init's later models: checked on save
            raise ValueError(f"ZinitTrainer needs a model injected with zinit (zinit.inject(model, layers, K)); got "
                             f"a {type(self._unwrapped()).__name__} without an adapter: inject it first, or use "
                             "transformers.Trainer for a model without one")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("ZinitTrainer does not support DeepSpeed or FSDP: the adapter is a few MB and each "
                             "process holds a frozen replica of the model (DDP, as torchrun or accelerate launch "
                             "start it); to shard a large frozen model use zinit train --fsdp")

    def _unwrapped(self, model: nn.Module | None = None) -> nn.Module:
        """``model`` (default ``self.model``) without DDP / torch.compile wrappers: the module with the adapter."""
        return self.accelerator.unwrap_model(self.model if model is None else model, keep_torch_compile=False)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write the adapter to ``output_dir`` (default ``args.output_dir``) as :func:`zinit.save_adapter` does
        (``zinit.json`` + ``adapter.safetensors``), with the tokenizer / processor and ``training_args.bin`` as
        ``Trainer`` saves them; never the frozen base weights. Only the process that saves (``args.should_save``,
        rank 0 by default) writes; the adapter is the same on every rank. Pushes to the Hub as ``Trainer`` does
        when ``args.push_to_hub`` is set and the call is not internal."""
        if output_dir is None:
            output_dir = self.args.output_dir
        if self.args.should_save:
            model = self._unwrapped()
            injection(model)  # a clear error for a model without an adapter (e.g. from model_init)
            save_adapter(model, output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            elif getattr(self.data_collator, "tokenizer", None) is not None:
                self.data_collator.tokenizer.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    # Private Trainer method (transformers 5.x): train(resume_from_checkpoint=...) calls it to load the model's
    # weights from a checkpoint folder before the optimizer / scheduler / RNG states. No public hook exists.
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """Load the adapter of a ``checkpoint-N`` folder (strictly: it must fit the injected model); a folder of
        full weights (written by a plain ``Trainer``) is left to ``Trainer``."""
        if not is_adapter_checkpoint(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        load_adapter(self._unwrapped(model), resume_from_checkpoint)

    # Private Trainer method (transformers 5.x): called at the end of train() when load_best_model_at_end is set.
    def _load_best_model(self) -> None:
        """Load the adapter of ``state.best_model_checkpoint``."""
        if not is_adapter_checkpoint(self.state.best_model_checkpoint):
            return super()._load_best_model()
        load_adapter(self._unwrapped(), self.state.best_model_checkpoint)

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """``Trainer``'s choice (no decay on biases and norms) less what zinit's own trainer exempts
        (:func:`zinit.train.schedule.decays`: gates, scales and biases in any layout, every 1-D parameter), so zinit's
        gates get no weight decay and the prompts do, as in ``zinit train``."""
        exempt = {name for name, p in model.named_parameters() if not decays(name, p)}
        return [name for name in super().get_decay_parameter_names(model) if name not in exempt]
