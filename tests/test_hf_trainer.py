"""zinit under Hugging Face ``transformers.Trainer`` (zinit.integrations.trainer.ZinitTrainer), on a tiny random
LLaMA built from a config: Trainer's default optimizer (fused AdamW) trains the adapter and nothing else, every
evaluation runs the current adapter, each checkpoint-N/ is an adapter folder without the frozen base weights,
train(resume_from_checkpoint=True) ends exactly as an uninterrupted run, load_best_model_at_end loads the best
adapter, and 2 processes under torchrun or accelerate launch (gloo, CPU) train one adapter on both ranks."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, default_data_collator
from transformers.training_args import OptimizerNames

import zinit
from hf_trainer_script import build_model, dataset, training_args
from tiny import char_tokenizer, subprocess_env, tiny_llama
from zinit.integrations.trainer import ZinitTrainer, is_adapter_checkpoint

HERE = Path(__file__).resolve().parent
SCRIPT = str(HERE / "hf_trainer_script.py")
#: What Trainer writes for the base model (save_pretrained / a plain state dict): none may be in a checkpoint.
BASE_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json",
              "config.json", "generation_config.json")
TRAINER_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json", "training_args.bin"}


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory) -> set[str]:
    """What zinit.save_adapter writes into a folder (zinit.json, adapter.safetensors, and whatever else it adds)."""
    files = {p.name for p in zinit.save_adapter(build_model(), tmp_path_factory.mktemp("plain_save")).iterdir()}
    assert {"zinit.json", "adapter.safetensors"} <= files
    return files


def _adapter(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in zinit.adapter_state_dict(model).items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def _base_weight_files(folder: Path) -> list[str]:
    """Files in ``folder`` that hold (or describe) the base model's weights, as a plain Trainer writes them."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name in BASE_FILES or (p.name.startswith("model-") and p.suffix == ".safetensors"))


def _losses(trainer) -> list[float]:
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _batch(rows) -> dict[str, torch.Tensor]:
    return default_data_collator(rows)


def _loss_with(state: dict[str, torch.Tensor], rows) -> float:
    """The loss of a freshly built model carrying the adapter ``state`` (eval mode, no dropout)."""
    model = build_model().eval()
    zinit.load_adapter_state_dict(model, state)
    with torch.no_grad():
        return model(**_batch(rows)).loss.item()


class Record(TrainerCallback):
    """The adapter at every save and every evaluation (with the evaluation's loss), and an optional stop."""

    def __init__(self, stop_at: int | None = None):
        self.saved: dict[int, dict[str, torch.Tensor]] = {}
        self.evaluated: list[tuple[int, float, dict[str, torch.Tensor]]] = []
        self.stop_at = stop_at

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.stop_at:
            control.should_training_stop = True  # as a killed run: checkpoint-3 is the last thing on disk

    def on_save(self, args, state, control, model=None, **kwargs):
        self.saved[state.global_step] = _adapter(model)

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        self.evaluated.append((state.global_step, metrics["eval_loss"], _adapter(model)))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps (4 per epoch, so the run crosses an epoch) at Trainer's defaults but for sizes; attention dropout
    on, so a resumed run must restore the RNG; checkpoints at steps 3 and 6."""
    out = tmp_path_factory.mktemp("straight")
    model = build_model(attention_dropout=0.1)
    base = {k: v.clone() for k, v in model.state_dict().items() if "zinit" not in k}
    initial = _adapter(model)
    record = Record()
    trainer = ZinitTrainer(model=model, args=training_args(out, max_steps=6, save_steps=3),
                           train_dataset=dataset(), callbacks=[record])
    trainer.train()
    return dict(out=out, trainer=trainer, model=model, base=base, initial=initial, record=record)


def test_default_fused_adamw_trains_the_adapter_and_nothing_else(straight):
    trainer, model = straight["trainer"], straight["model"]
    assert trainer.args.optim == OptimizerNames.ADAMW_TORCH_FUSED  # Trainer's default (torch >= 2.8)
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["fused"] is True
    assert all(group["fused"] for group in optimizer.param_groups)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in zinit.trainable_parameters(model)}
    for name, value in model.state_dict().items():  # every base tensor bit for bit as before training
        if "zinit" not in name:
            assert torch.equal(value, straight["base"][name]), name
    final = _adapter(model)
    for key, value in final.items():
        if key.endswith(".gate"):
            assert straight["initial"][key].abs().max() == 0 and (value != 0).all(), key  # every head's gate moved
    rows = dataset()
    before, after = _loss_with(straight["initial"], rows), _loss_with(final, rows)
    assert after < before - 0.1, (before, after)


def test_gates_get_no_weight_decay_and_prompts_do(tmp_path):
    model = build_model()
    trainer = ZinitTrainer(model=model, args=training_args(tmp_path, weight_decay=0.1), train_dataset=dataset())
    groups = trainer.create_optimizer().param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 0.1 for p in g["params"]}
    adapters = zinit.layer_adapters(model).values()
    assert decayed == {id(a.prompt) for a in adapters}
    assert not decayed & {id(a.gate) for a in adapters}


def test_checkpoints_hold_the_adapter_and_trainer_state_but_not_the_base(straight, tmp_path, adapter_files):
    out, record, model = straight["out"], straight["record"], straight["model"]
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    base_bytes = sum(v.numel() * v.element_size() for v in straight["base"].values())
    for step in (3, 6):
        folder = out / f"checkpoint-{step}"
        names = {p.name for p in folder.iterdir()}
        assert names == adapter_files | TRAINER_FILES, names
        assert _base_weight_files(folder) == []
        assert sum(p.stat().st_size for p in folder.iterdir()) < base_bytes / 2  # optimizer.pt: adapter moments only
        saved = load_file(folder / "adapter.safetensors")
        assert _max_diff(saved, record.saved[step]) == 0  # the adapter of that very step
        assert is_adapter_checkpoint(folder)
    assert _max_diff(record.saved[3], record.saved[6]) > 1e-3  # two different adapters, not one written twice

    # checkpoint-6 into a fresh base model (not injected: load_adapter injects it) gives the trained model's logits
    ids = torch.randint(3, 96, (2, 10), generator=torch.Generator().manual_seed(1))
    fresh = zinit.load_adapter(tiny_llama(layers=3), out / "checkpoint-6").eval()
    with torch.no_grad():
        expected = model.eval()(ids).logits
        assert torch.equal(fresh(ids).logits, expected)
        assert not torch.allclose(tiny_llama(layers=3)(ids).logits, expected, atol=1e-3)  # the adapter matters

    # save_model (the final save) writes the same adapter folder, with the arguments as Trainer does
    straight["trainer"].save_model(str(tmp_path / "final"))
    assert {p.name for p in (tmp_path / "final").iterdir()} == adapter_files | {"training_args.bin"}
    assert _max_diff(load_file(tmp_path / "final" / "adapter.safetensors"), _adapter(model)) == 0


def test_save_model_writes_the_tokenizer_beside_the_adapter(tmp_path, adapter_files):
    trainer = ZinitTrainer(model=build_model(), args=training_args(tmp_path), processing_class=char_tokenizer())
    trainer.save_model(str(tmp_path / "final"))
    names = {p.name for p in (tmp_path / "final").iterdir()}
    assert adapter_files | {"tokenizer.json", "tokenizer_config.json", "training_args.bin"} <= names
    assert _base_weight_files(tmp_path / "final") == []


def test_resuming_from_a_checkpoint_of_another_adapter_names_the_field(straight, tmp_path):
    model = zinit.inject(tiny_llama(layers=3), layers=2, K=5)
    trainer = ZinitTrainer(model=model, args=training_args(tmp_path, max_steps=6), train_dataset=dataset())
    with pytest.raises(ValueError, match="mismatch on K: the adapter in .*checkpoint-3 has K=4"):
        trainer.train(resume_from_checkpoint=str(straight["out"] / "checkpoint-3"))


def test_a_plain_trainer_would_write_the_base_weights(tmp_path):
    """The control for the check above: a plain Trainer's save of the same model is caught by it."""
    Trainer(model=build_model(), args=training_args(tmp_path)).save_model(str(tmp_path / "plain"))
    assert "model.safetensors" in _base_weight_files(tmp_path / "plain")


def test_resume_from_checkpoint_ends_as_the_uninterrupted_run(straight, tmp_path):
    args = training_args(tmp_path, max_steps=6, save_steps=3)
    ZinitTrainer(model=build_model(attention_dropout=0.1), args=args, train_dataset=dataset(),
                 callbacks=[Record(stop_at=3)]).train()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3"]

    model = build_model(prompt_seed=7, attention_dropout=0.1)  # another prompt init: only the checkpoint can fix it
    assert _max_diff(_adapter(model), straight["record"].saved[3]) > 0.1
    resumed = ZinitTrainer(model=model, args=args, train_dataset=dataset())
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 6
    assert _max_diff(_adapter(model), _adapter(straight["model"])) <= 1e-6
    assert _losses(resumed) == pytest.approx(_losses(straight["trainer"]), abs=1e-6)  # steps 1-3 come from the state
    assert len(_losses(resumed)) == 6


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Evaluate and save every 2 steps; "best" is the *highest* eval loss, so the best checkpoint is not the last."""
    out = tmp_path_factory.mktemp("evaluated")
    record = Record()
    eval_rows = dataset(8, seed=11)
    args = training_args(out, max_steps=6, eval_strategy="steps", eval_steps=2, save_steps=2,
                         per_device_eval_batch_size=8, load_best_model_at_end=True,
                         metric_for_best_model="eval_loss", greater_is_better=True)
    model = build_model()
    trainer = ZinitTrainer(model=model, args=args, train_dataset=dataset(), eval_dataset=eval_rows,
                           callbacks=[record])
    trainer.train()
    return dict(trainer=trainer, model=model, record=record, rows=eval_rows)


def test_every_evaluation_runs_the_current_adapter(evaluated):
    """The eval loss Trainer reports equals a fresh model's loss with the adapter of that moment, and is far from
    what the adapter of the evaluation before would give (what a stale prompt would report)."""
    record, rows = evaluated["record"], evaluated["rows"]
    assert [step for step, _, _ in record.evaluated] == [2, 4, 6]
    previous = None
    for step, loss, state in record.evaluated:
        assert abs(_loss_with(state, rows) - loss) <= 1e-5, step
        if previous is not None:
            assert abs(_loss_with(previous, rows) - loss) > 1e-3, step
        previous = state


def test_load_best_model_at_end_loads_the_best_adapter(evaluated):
    trainer, record = evaluated["trainer"], evaluated["record"]
    best_step, _, best_state = max(record.evaluated, key=lambda r: r[1])
    assert best_step != 6  # else loading it could not be told from keeping the last adapter
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert _max_diff(_adapter(evaluated["model"]), best_state) == 0
    assert _max_diff(record.evaluated[-1][2], best_state) > 1e-3


def test_refuses_a_model_without_an_adapter(tmp_path):
    with pytest.raises(ValueError, match=r"zinit\.inject"):
        ZinitTrainer(model=tiny_llama(layers=3), args=training_args(tmp_path))


def test_the_trainer_internals_zinit_overrides_are_still_called():
    """ZinitTrainer overrides two private Trainer methods (no public hook exists); if a transformers release renames
    them or stops calling them, this names which (the tests above would also fail, less clearly)."""
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters) == ["self", "resume_from_checkpoint",
                                                                                   "model"]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]
    assert list(inspect.signature(Trainer.save_model).parameters) == ["self", "output_dir", "_internal_call"]
    source = inspect.getsource(Trainer)
    assert "self._load_from_checkpoint(resume_from_checkpoint)" in source
    assert "self._load_best_model()" in source
    assert "self.save_model(output_dir, _internal_call=True)" in inspect.getsource(Trainer._save_checkpoint)


LAUNCHERS = {  # --standalone / port 0: a free port, so concurrent test runs cannot collide
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                   "--num_machines", "1", "--main_process_port", "0", "--mixed_precision", "no",
                   "--dynamo_backend", "no"],
}


@pytest.mark.slow  # about 30 s: each of the two processes imports transformers' Trainer (~11 s on 2 cores)
@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_cpu_processes_with_gloo_train_one_adapter(launcher, tmp_path, adapter_files):
    """torchrun / accelerate launch, 2 processes, gloo on CPU: DDP trains one adapter (both ranks end equal though
    each saw other batches) and rank 0 writes adapter-only checkpoints with every rank's RNG state."""
    out = tmp_path / "out"
    env = subprocess_env()
    env["HF_HOME"] = str(tmp_path / "hf_home")  # no accelerate config file of the user's
    proc = subprocess.run([*LAUNCHERS[launcher], SCRIPT, str(out)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = [json.loads((out / f"result_rank{r}.json").read_text()) for r in (0, 1)]
    for result in ranks:
        assert result["world_size"] == 2 and result["parallel_mode"].endswith("DISTRIBUTED")
        assert result["backend"] == "gloo"
    assert ranks[0]["batches"] != ranks[1]["batches"]  # each rank its own data: only the all-reduce keeps them equal
    adapters = [{k: torch.tensor(v) for k, v in r["adapter"].items()} for r in ranks]
    assert _max_diff(adapters[0], adapters[1]) == 0
    assert all((v != 0).all() for k, v in adapters[0].items() if k.endswith(".gate"))  # it did train
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["checkpoint-2", "checkpoint-4"]
    folder = out / "checkpoint-4"
    names = {p.name for p in folder.iterdir()}
    assert names == adapter_files | (TRAINER_FILES - {"rng_state.pth"}) | {"rng_state_0.pth", "rng_state_1.pth"}
    assert _base_weight_files(folder) == []
    assert _max_diff(load_file(folder / "adapter.safetensors"), adapters[0]) == 0
