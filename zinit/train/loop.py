"""The one training loop every recipe uses.

A recipe hands :func:`train` a model (already injected) and a :class:`Task` (examples, how to batch them, how to
compute the loss); the loop does the rest the same way for every task: data-parallel processes under torchrun,
bf16 autocast on GPU, gradient accumulation, the official schedule and optimizer, atomic resumable checkpoints,
a progress bar, ``metrics.jsonl`` and the plots. One run at a time writes an output folder (an exclusive lock,
:mod:`zinit.train.lock`), and Ctrl-C or SIGTERM stops after the current step with a checkpoint
(:mod:`zinit.train.stop`). A step in which no trainable parameter received a gradient stops the run with
:class:`NoGradient` instead of updating nothing in silence.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .. import quant
from ..cliargs import nonneg_float, option, positive_float, positive_int
from ..errors import ZinitError, ZinitStateError
from ..inject import is_injected, layer_adapters
from ..files import atomic_write, write_json
from . import dist as D
from .checkpoint import CHECKPOINT_NAME, check_same_run, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import epoch_batches
from .lock import hold_output
from .plots import plot_run
from .schedule import lr_at, param_groups, scaled_lr
from .stop import StopSignals, TrainingInterrupted

METRICS_NAME = "metrics.jsonl"


@dataclass
class TrainConfig:
    """Trainer settings; the defaults are the official LLaMA-Adapter Alpaca recipe (docs/design.md §4).

    ``epochs`` and ``warmup_epochs`` may be fractional. With ``max_steps`` the run stops there and the schedule is
    compressed to fit (warmup is still ``warmup_epochs / epochs`` of the run). ``pad_to`` pads every batch to that
    length, as the official code does (512); the default pads each batch to its longest example. A checkpoint is
    written every ``save_every`` steps, and also after any step that ends ``save_every_minutes`` or more of wall time
    after the last one (0 or None: steps only), so a slow run never has more than that much work unsaved.
    """

    output: str
    epochs: float = field(default=5.0, metadata=option("--epochs", positive_float, "epochs (default %(default)s)"))
    max_steps: int | None = field(default=None, metadata=option(
        "--max-steps", positive_int, "stop after this many optimizer steps (the schedule is compressed to fit)"))
    batch_size: int = field(default=4, metadata=option(  # per process
        "--batch-size", positive_int, "examples per process per step (default %(default)s)"))
    grad_accum: int = field(default=1, metadata=option(
        "--grad-accum", positive_int, "micro-batches per optimizer step (default %(default)s)"))
    #: lr = blr · global batch / 256; on the command line None means the method's default for the recipe
    blr: float = field(default=9e-3, metadata=option(
        "--blr", positive_float, "base lr; lr = blr·global_batch/256 (default: the method's default for this recipe, "
        "see zinit compare)", default=None))
    weight_decay: float = field(default=0.02, metadata=option(
        "--weight-decay", nonneg_float, "on prompts, not on gates (default %(default)s)"))
    warmup_epochs: float = field(default=2.0, metadata=option(
        "--warmup-epochs", nonneg_float, "linear warmup, in epochs (default %(default)s)"))
    min_lr: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    #: optimizer steps between checkpoints (and one at the end)
    save_every: int = field(default=100, metadata=option(
        "--save-every", positive_int, "checkpoint every N optimizer steps (default %(default)s)"))
    #: also checkpoint once this much wall time has passed since the last
    save_every_minutes: float | None = field(default=10.0, metadata=option(
        "--save-every-minutes", nonneg_float, "also checkpoint when this many minutes have passed since the last one "
        "(default %(default)s; 0: off)"))
    log_every: int = 1
    seed: int = field(default=0, metadata=option("--seed", int, "random seed (default %(default)s)"))
    group_by_length: bool = True
    pad_to: int | None = None
    fsdp: bool = False  #: shard the frozen model with FSDP2 (fully_shard) instead of replicating it
    #: "cpu", "cuda" or None (CUDA when available)
    device: str | None = field(default=None, metadata=option(
        "--device", None, "cpu or cuda (default: cuda when available)"))
    progress: bool = True

    # settings that do not change the result, so a resumed run may change them
    _RESUMABLE = ("output", "save_every", "save_every_minutes", "log_every", "progress", "device")

    def fingerprint(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self._RESUMABLE}


@dataclass
class Task:
    """What the trainer needs from a recipe.

    Attributes:
        examples: the training examples (any objects ``collate`` understands).
        collate: ``list of examples -> dict of tensors`` (a batch).
        loss: ``(model, batch) -> (mean loss, count)``; ``count`` is what tokens/s counts (tokens, or images).
        lengths: per-example lengths for length-grouped batching, or None.
        fingerprint: what identifies the data/model side of the run (model path, data file, K, L, ...): a
            checkpoint of a run with another fingerprint is refused.
    """

    examples: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Tensor]]
    loss: Callable[[nn.Module, dict[str, Tensor]], tuple[Tensor, int | Tensor]]
    lengths: Sequence[int] | None = None
    fingerprint: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    """What :func:`train` did. ``final_loss`` is the last optimizer step's loss, also when that step ran in an earlier
    process (it is stored in the checkpoint); ``finished_earlier``: the checkpoint was already at the last step, so
    this call trained nothing (a re-run of a finished run)."""

    output: Path
    steps: int
    final_loss: float
    resumed_from: int | None
    metrics_path: Path
    plots: list[Path]
    finished_earlier: bool = False


class TrainingDiverged(ZinitError, FloatingPointError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class NoGradient(ZinitStateError):
    """After an optimizer step's backward passes, no trainable parameter had a gradient (every ``.grad`` None, on
    at least one process; every process raises it), or a loss did not require grad at all (raised at once, by the
    process that computed it): the step would change nothing. Raised before the update; the last checkpoint is
    kept. The message names the likely causes."""


def _no_gradient_message(model: nn.Module, what: str) -> str:
    """``what`` went wrong, and the likely causes, the layers at fault first when they can be named."""
    packed = quant.packed_for_cpu(model)
    kernel = (f"{len(packed)} bitsandbytes 4-bit layer(s) of this model (e.g. {packed[0]}) are in bitsandbytes' CPU "
              "inference layout, read by gemv_4bit, which has no autograd" if packed else
              "a kernel without autograd, such as a quantized weight repacked for inference (bitsandbytes 4-bit on a "
              "CPU with AVX512-BF16, after an eval-mode forward without grad)")
    return (f"{what}, so the optimizer step would change nothing. Likely causes: (1) {kernel}: call "
            "zinit.quant.keep_autograd(model) before training (zinit's trainer does at its start; a model changed "
            "after that needs it again); (2) a frozen path: the loss computed under torch.no_grad() or "
            "torch.inference_mode(), or from .detach()ed outputs; (3) a detached prompt: prompt keys/values computed "
            "once without grad (or .detach()ed) and reused. Fix: task.loss(model, batch) must return a loss computed "
            "with grad enabled whose graph reaches the trainable parameters.")


def _reduce_gradients(model: nn.Module, params: list[nn.Parameter], stats: Tensor, step: int, env: D.Dist) -> None:
    """Check that some trainable parameter received a gradient (raise :class:`NoGradient` otherwise), then, with
    several processes, average ``stats`` and the gradients across them in place.

    With N > 1 every process raises together (a lone raise would leave the others waiting in a collective), and a
    parameter that has a gradient on some processes only gets zeros for it on the others (as DDP does for unused
    parameters) so that every process reduces the same tensors; one with no gradient anywhere keeps ``None`` (the
    optimizer skips it, as with one process). One small collective more than the gradients' own.
    """
    world, present = env.world_size, [p.grad is not None for p in params]
    missing = [env.rank] if not any(present) else []
    if world > 1:
        flags = torch.zeros(world + len(params), device=env.device)
        flags[env.rank] = float(not any(present))
        flags[world:] = torch.tensor(present, dtype=flags.dtype, device=env.device)
        D.all_reduce_mean_([flags])
        missing = [r for r in range(world) if flags[r] > 0]
        present = [bool(v > 0) for v in flags[world:].tolist()]
    if missing:
        where = f" on rank(s) {', '.join(map(str, missing))} of {world}" if world > 1 else ""
        raise NoGradient(_no_gradient_message(
            model, f"step {step}: none of the {len(params)} trainable parameters received a gradient{where}"))
    if world > 1:
        for p, anywhere in zip(params, present):
            if anywhere and p.grad is None:
                p.grad = torch.zeros_like(p)
        D.all_reduce_mean_([stats] + [p.grad for p in params if p.grad is not None])


def causal_lm_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """Mean cross-entropy over the target tokens (labels != -100), and the number of tokens processed."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return out.loss, batch["attention_mask"].sum()


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters: call zinit.inject(model, layers, K) first")
    return named


def _apply_fsdp(model: nn.Module, trainable: list[nn.Parameter]) -> None:
    """Shard the frozen model with FSDP2, one unit per transformer block; the adapter stays replicated."""
    from torch.distributed.fsdp import fully_shard

    ignored = set(trainable)
    blocks = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    for block in (blocks[0] if blocks else []):
        fully_shard(block, ignored_params=ignored)
    fully_shard(model, ignored_params=ignored)


def _gate_summary(model: nn.Module) -> dict[str, float]:
    if not is_injected(model):
        return {}
    with torch.no_grad():
        return {str(n): a.gate_values().abs().mean().item() for n, a in layer_adapters(model).items()
                if a.gate is not None}  # gate="none" has no gate


def _step_seed(seed: int, rank: int, step: int) -> int:
    return (seed * 1_000_003 + rank * 10_007 + step) % (2**63)


def _check_settings(config: TrainConfig) -> None:
    for name in ("batch_size", "grad_accum"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if not (isinstance(config.epochs, (int, float)) and math.isfinite(config.epochs) and config.epochs > 0):
        raise ValueError(f"epochs={config.epochs!r} must be a finite number > 0")
    if not (isinstance(config.warmup_epochs, (int, float)) and math.isfinite(config.warmup_epochs)
            and config.warmup_epochs >= 0):
        raise ValueError(f"warmup_epochs={config.warmup_epochs!r} must be a finite number >= 0")
    if not isinstance(config.save_every, int) or config.save_every < 1:
        raise ValueError(f"save_every={config.save_every!r} must be a whole number of steps >= 1")
    minutes = config.save_every_minutes
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes >= 0):
        raise ValueError(f"save_every_minutes={minutes!r} must be a number >= 0 (0 or None: save by steps only)")


def _clean_stale_temporaries(out: Path) -> None:
    """Delete the temporary files of atomic writes that a killed run left behind (safe: this run holds the folder's
    lock, so no other run is writing them)."""
    for name in (CHECKPOINT_NAME, METRICS_NAME, "train_config.json"):
        for tmp in out.glob(f".{name}.*.tmp"):
            try:
                tmp.unlink()
            except OSError:
                pass


def _read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics file; a torn last line (a run killed mid-write) is dropped."""
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except ValueError:
            continue
    return records


def train(model: nn.Module, task: Task, config: TrainConfig,
          callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = ()) -> TrainResult:
    """Train ``model``'s trainable parameters on ``task``; resume from ``config.output`` if it holds a checkpoint.

    Every optimizer step reseeds the RNG from ``(seed, rank, step)`` and reads a batch that is a function of
    ``(seed, epoch, position)``, so a run killed at any point and started again with the same command ends with the
    same parameters as an uninterrupted one. ``callbacks`` are called on the main process after every step (and after
    that step's checkpoint, if any) as ``callback(step, record)``.

    The output folder is locked for the whole call: a second run into it raises
    :class:`~zinit.train.lock.OutputInUse` at once, naming the holder's pid. SIGINT (Ctrl-C) or SIGTERM stops the
    run after the current step: a checkpoint is written, one line on stderr says how to resume, and
    :class:`~zinit.train.stop.TrainingInterrupted` (a SystemExit with code 130 or 143) is raised; a second signal
    ends the process at once, keeping the last checkpoint.

    Returns a :class:`TrainResult`; the output folder holds ``checkpoint.pt``, ``metrics.jsonl`` and the plots
    (the recipe saves the adapter).
    """
    _check_settings(config)
    env = D.setup(config.device)
    out = Path(config.output)
    with hold_output(out, env):
        return _train_locked(model, task, config, callbacks, env, out)


def _prepare_model(model: nn.Module, config: TrainConfig, env: D.Dist) -> list[tuple[str, nn.Parameter]]:
    """Put ``model`` on the device ready to train (autograd kept, sharded with ``--fsdp``); its trainable parameters."""
    named = _trainable(model)
    params = [p for _, p in named]
    model.to(env.device)
    quant.keep_autograd(model)  # a 4-bit base that an evaluation packed for inference would give no gradients
    if config.fsdp:
        if env.world_size == 1:
            raise ValueError("--fsdp shards the model across processes: launch with torchrun --nproc_per_node N>1")
        _apply_fsdp(model, params)
    D.broadcast_([p.data for p in params])  # identical replicas, whatever each process drew at inject
    return named


@dataclass
class _Plan:
    """The run's length and learning-rate schedule."""

    steps_per_epoch: int
    total: int
    warmup: float
    global_batch: int
    peak: float


def _plan(task: Task, config: TrainConfig, world: int) -> _Plan:
    """How many steps the run has and its schedule; a ValueError when the data or ``max_steps`` allow no step."""
    per_step = config.batch_size * world
    micro_per_epoch = len(task.examples) // per_step
    steps_per_epoch = micro_per_epoch // config.grad_accum
    if steps_per_epoch < 1:
        raise ValueError(
            f"{len(task.examples)} training examples are fewer than one optimizer step needs "
            f"(batch {config.batch_size} × {world} processes × accumulation {config.grad_accum}); "
            "lower --batch-size or add data"
        )
    if config.max_steps is not None and config.max_steps < 1:
        raise ValueError(f"max_steps={config.max_steps} must be >= 1")
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    warmup = total * config.warmup_epochs / config.epochs if config.epochs > 0 else 0.0
    global_batch = per_step * config.grad_accum
    peak = scaled_lr(config.blr, global_batch)
    return _Plan(steps_per_epoch, total, warmup, global_batch, peak)


def _resume(out: Path, named: list[tuple[str, nn.Parameter]], optimizer: torch.optim.Optimizer,
            fingerprint: dict[str, Any]) -> tuple[int, int | None, Any]:
    """Load ``out``'s checkpoint, if any, into the parameters, the optimizer and the RNG: (first step, the step
    resumed from or None, that step's stored loss or None)."""
    start, resumed_from, saved_loss = 0, None, None
    saved = load_checkpoint(out)
    if saved is not None:
        check_same_run(json.loads(saved["fingerprint"]), fingerprint, out)
        by_name = dict(named)
        with torch.no_grad():
            for name, value in saved["trainable"].items():
                by_name[name].copy_(value)
        optimizer.load_state_dict(saved["optimizer"])
        set_rng_state(saved["rng"])
        start = resumed_from = int(saved["step"])
        saved_loss = saved.get("loss")  # checkpoints written before the loss was stored have none
    return start, resumed_from, saved_loss


def _start_files(out: Path, env: D.Dist, resumed_from: int | None, fingerprint: dict[str, Any], plan: _Plan) -> Path:
    """On the main process, clear stale temporaries, cut the metrics back to the resumed step and write
    ``train_config.json``; the metrics file's path."""
    metrics_path = out / METRICS_NAME
    if env.is_main:
        _clean_stale_temporaries(out)
        kept = []
        if resumed_from is not None and metrics_path.exists():
            kept = [r for r in _read_records(metrics_path) if r.get("step", 0) <= resumed_from]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(metrics_path, lambda tmp: Path(tmp).write_text(text))
        write_json(out / "train_config.json",
                   {**fingerprint, "steps_per_epoch": plan.steps_per_epoch, "total_steps": plan.total,
                    "peak_lr": plan.peak, "global_batch": plan.global_batch, "warmup_steps": plan.warmup})
    return metrics_path


@dataclass
class _Run:
    """One training run in progress: what its steps, logs and checkpoints share."""

    model: nn.Module
    task: Task
    config: TrainConfig
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]]
    env: D.Dist
    out: Path
    named: list[tuple[str, nn.Parameter]]
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    plan: _Plan
    fingerprint: dict[str, Any]
    metrics_path: Path
    autocast: Any
    progress: Any
    resumed_from: int | None
    loss_value: float = float("nan")
    window_start: float = 0.0
    window_tokens: float = 0.0
    last_save: dict[str, Any] = field(default_factory=dict)

    def close_progress(self) -> None:
        """Close the progress bar, if there is one."""
        if self.progress is not None:
            self.progress.close()

    def checkpoint(self, step: int) -> None:
        """Save a checkpoint after ``step`` (main process), wait for every process, and restart the save clock."""
        if self.env.is_main:
            plan = self.plan
            save_checkpoint(self.out, {
                "step": step, "epoch": step // plan.steps_per_epoch, "position": step % plan.steps_per_epoch,
                "trainable": {n: p.detach().cpu().clone() for n, p in self.named},
                "optimizer": self.optimizer.state_dict(), "rng": rng_state(),
                "loss": self.loss_value,  # the step's loss: a re-run of a finished run reports it
                "schedule": {"total_steps": plan.total, "warmup_steps": plan.warmup,
                             "peak_lr": plan.peak},  # lr = lr_at(step, ...)
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True),
            })
        D.barrier()
        self.last_save.update(step=step, time=time.monotonic())

    def interrupted(self, signum: int, step: int) -> TrainingInterrupted:
        """The exception that stops the run after a signal at ``step`` (its message printed by the main process)."""
        self.close_progress()
        stop = TrainingInterrupted(signum, step, self.plan.total, self.out)
        if self.env.is_main:
            print(stop.message, file=sys.stderr, flush=True)
        return stop

    def accumulate(self, step: int, batches: list, position: int) -> Tensor:
        """Run the forward and backward passes of step ``step + 1``'s micro-batches; its ``[mean loss, count]``."""
        config, env, task = self.config, self.env, self.task
        seed = _step_seed(config.seed, env.rank, step)
        torch.manual_seed(seed)
        random.seed(seed)
        total_loss = torch.zeros((), device=env.device)
        tokens = torch.zeros((), device=env.device)
        for micro in range(config.grad_accum):
            indices = batches[position * config.grad_accum + micro][env.rank]
            batch = {k: v.to(env.device) for k, v in task.collate([task.examples[i] for i in indices]).items()}
            with self.autocast:
                loss, count = task.loss(self.model, batch)
            if not loss.requires_grad:  # torch's own error ("element 0 of tensors does not require grad") says less
                self.close_progress()
                raise NoGradient(_no_gradient_message(
                    self.model, f"step {step + 1}: the loss does not require grad (it has no grad_fn)"))
            (loss / config.grad_accum).backward()
            total_loss += loss.detach().float() / config.grad_accum
            tokens += count
        return torch.stack([total_loss, tokens.float()])

    def update(self, step: int, stats: Tensor) -> float:
        """Reduce the gradients and ``stats`` across processes, check the loss and take the optimizer step; its lr."""
        try:
            _reduce_gradients(self.model, self.params, stats, step + 1, self.env)
        except NoGradient:
            self.close_progress()
            raise
        self.loss_value = stats[0].item()
        if not math.isfinite(self.loss_value):
            self.close_progress()
            raise TrainingDiverged(
                f"loss is {self.loss_value} at step {step + 1}; stopped without updating. The last good checkpoint "
                f"(if any) is kept in {self.out}. Lower --blr or check the data."
            )
        lr = lr_at(step, self.plan.total, self.plan.warmup, self.plan.peak, self.config.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return lr

    def log(self, step: int, lr: float) -> dict[str, Any]:
        """The record of ``step``; on logging steps with its speed and gates, appended to the metrics file."""
        record = {"step": step, "epoch": round(step / self.plan.steps_per_epoch, 4), "loss": self.loss_value, "lr": lr}
        if step % self.config.log_every == 0 or step == self.plan.total:
            elapsed = time.perf_counter() - self.window_start
            record.update(tokens_per_s=self.window_tokens / max(elapsed, 1e-9), gates=_gate_summary(self.model))
            self.window_start, self.window_tokens = time.perf_counter(), 0.0
            if self.env.is_main:
                with open(self.metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if self.progress is not None:
                    self.progress.set_postfix(loss=f"{self.loss_value:.4f}", lr=f"{lr:.2e}",
                                              tok_s=f"{record['tokens_per_s']:.0f}")
        return record

    def after_step(self, step: int, record: dict[str, Any], signals: StopSignals, interval: float) -> None:
        """Advance the bar, checkpoint when due (by steps or by time), call the callbacks, stop on a signal."""
        if self.progress is not None:
            self.progress.update(1)
        if step % self.config.save_every == 0 or step == self.plan.total:
            self.checkpoint(step)
        if self.env.is_main:
            for callback in self.callbacks:
                callback(step, record)
        # every process stops (and saves on time) at the same step: one tiny collective, only with N > 1
        due = interval > 0 and time.monotonic() - self.last_save["time"] >= interval
        signum, due = D.all_reduce_max([signals.signum or 0, int(due)], self.env.device)
        if (signum or due) and self.last_save["step"] != step:
            self.checkpoint(step)
        if signum:
            raise self.interrupted(signum, step)

    def fit(self, start: int, saved_loss: Any, lengths: Sequence[int]) -> int:
        """Train from step ``start`` (whose stored loss is ``saved_loss``, or None) to the last one, or until a
        signal; the step reached."""
        config, world = self.config, self.env.world_size
        interval = 60.0 * (config.save_every_minutes or 0.0)
        self.last_save.update(step=self.resumed_from, time=time.monotonic())
        self.model.train()
        epoch_cache: dict[int, list] = {}
        self.loss_value = float("nan") if saved_loss is None else float(saved_loss)
        step = start
        self.window_start, self.window_tokens = time.perf_counter(), 0.0
        with StopSignals(announce=self.env.is_main) as signals:
            while step < self.plan.total:
                epoch, position = divmod(step, self.plan.steps_per_epoch)
                if epoch not in epoch_cache:
                    epoch_cache.clear()
                    epoch_cache[epoch] = epoch_batches(lengths, config.batch_size, world, epoch, config.seed,
                                                       config.group_by_length)
                stats = self.accumulate(step, epoch_cache[epoch], position)
                lr = self.update(step, stats)
                step += 1
                self.window_tokens += stats[1].item() * world
                self.after_step(step, self.log(step, lr), signals, interval)
        # a signal after the last step's check is ignored: the run is complete and its final checkpoint is on disk
        return step


def _train_locked(model: nn.Module, task: Task, config: TrainConfig,
                  callbacks: Sequence[Callable[[int, dict[str, Any]], None]], env: D.Dist, out: Path) -> TrainResult:
    """:func:`train` once the output folder is locked: prepare, resume, fit, then plot."""
    named = _prepare_model(model, config, env)
    world = env.world_size
    lengths = task.lengths if task.lengths is not None else [1] * len(task.examples)
    plan = _plan(task, config, world)
    optimizer = torch.optim.AdamW(param_groups(named, config.weight_decay), lr=0.0, betas=config.betas)

    fingerprint = {**task.fingerprint, **config.fingerprint(), "world_size": world}
    fingerprint = json.loads(json.dumps(fingerprint))  # the form it takes once stored
    start, resumed_from, saved_loss = _resume(out, named, optimizer, fingerprint)
    metrics_path = _start_files(out, env, resumed_from, fingerprint, plan)

    autocast = D.autocast(env.device)
    progress = None
    if env.is_main and config.progress:
        from tqdm.auto import tqdm

        progress = tqdm(total=plan.total, initial=start, desc="zinit train", unit="step", dynamic_ncols=True)

    run = _Run(model, task, config, callbacks, env, out, named, [p for _, p in named], optimizer, plan, fingerprint,
               metrics_path, autocast, progress, resumed_from)
    step = run.fit(start, saved_loss, lengths)
    run.close_progress()
    model.eval()
    plots = plot_run(metrics_path, out) if env.is_main else []
    D.barrier()
    return TrainResult(out, step, run.loss_value, resumed_from, metrics_path, plots,
                       finished_earlier=resumed_from is not None and resumed_from >= plan.total)
