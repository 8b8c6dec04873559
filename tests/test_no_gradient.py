"""The trainer's guard (issue 24): an optimizer step in which no trainable parameter received a gradient is an error
(:class:`zinit.train.NoGradient`) naming the likely causes, never a silent step that changes nothing. Checked over
the gradients accumulated for the whole step, on every process together under torchrun, and only when none at all
arrived (a parameter that legitimately gets no gradient in a step is fine)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import zinit
from tiny import subprocess_env, tiny_llama
from zinit.train import NoGradient, Task, TrainConfig, causal_lm_loss, train
from zinit.train.data import pad_collate

CAUSES = r"Likely causes: \(1\) a kernel without autograd.*\(2\) a frozen path.*\(3\) a detached prompt"


def _task(loss=causal_lm_loss, n: int = 16) -> Task:
    examples = [{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, 8, 9]}] * n
    return Task(examples=examples, collate=lambda b: pad_collate(b, 0), loss=loss)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in zinit.adapter_state_dict(model).items()}


def test_a_step_in_which_no_trainable_parameter_got_a_gradient_is_an_error(tmp_path):
    """The loss requires grad but its graph misses the adapter (here: rebuilt from a detached value, as a kernel
    without autograd leaves it): before the guard every step ran, AdamW skipped every parameter, and the run
    "finished" having trained nothing."""

    def detached(model, batch):
        value, count = causal_lm_loss(model, batch)
        return value.detach().requires_grad_(), count

    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    before = _snapshot(model)
    with pytest.raises(NoGradient, match=r"step 1: none of the 4 trainable parameters received a gradient, so the "
                                         r"optimizer step would change nothing\. " + CAUSES):
        train(model, _task(detached), TrainConfig(output=str(tmp_path), max_steps=3, batch_size=4, progress=False))
    assert all(torch.equal(v, before[k]) for k, v in zinit.adapter_state_dict(model).items())
    assert not (tmp_path / "checkpoint.pt").exists()  # stopped before any update or checkpoint


def test_a_loss_computed_without_grad_is_the_same_error(tmp_path):
    """torch's own error for it ("element 0 of tensors does not require grad") names no cause."""

    def frozen(model, batch):
        with torch.no_grad():
            return causal_lm_loss(model, batch)

    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    with pytest.raises(NoGradient, match=r"step 1: the loss does not require grad .*" + CAUSES):
        train(model, _task(frozen), TrainConfig(output=str(tmp_path), max_steps=2, batch_size=4, progress=False))


def test_gradients_are_checked_over_the_whole_accumulated_step(tmp_path):
    """With accumulation, a micro-batch that contributes no gradient is fine when another one of the step does; a
    trainable parameter that gets no gradient at all (unused here) is fine as long as some parameter gets one."""
    calls = {"n": 0}

    def every_other_detached(model, batch):
        calls["n"] += 1
        value, count = causal_lm_loss(model, batch)
        return (value.detach().requires_grad_() if calls["n"] % 2 else value), count

    model = zinit.inject(tiny_llama(layers=2), 2, K=3)
    model.unused = torch.nn.Parameter(torch.ones(3))  # trainable, never in the graph
    before = _snapshot(model)
    result = train(model, _task(every_other_detached), TrainConfig(output=str(tmp_path), max_steps=3, batch_size=4,
                                                                   grad_accum=2, blr=50.0, progress=False))
    assert result.steps == 3 and calls["n"] == 6
    assert all(not torch.equal(v, before[k]) for k, v in zinit.adapter_state_dict(model).items() if "gate" in k)
    assert model.unused.grad is None and torch.equal(model.unused.detach(), torch.ones(3))


WORKER = textwrap.dedent("""
    import json, os, sys
    import torch
    from torch import nn
    from zinit.train import NoGradient, Task, TrainConfig, train

    rank, out = int(os.environ["RANK"]), sys.argv[1]

    class Toy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Parameter(torch.ones(3))
            self.b = nn.Parameter(torch.ones(3))

    def run(scenario):
        def loss(model, batch):
            x = batch["x"].float()
            if scenario == "rank1_detached":  # rank 1's loss misses the parameters; rank 0's is fine
                value = (model.a * x).sum()
                return (value.detach().requires_grad_() if rank == 1 else value), x.shape[0]
            # "b_on_rank0_only": b gets a gradient on rank 0 only (a parameter some processes do not use)
            return (model.a * x).sum() + ((model.b * x).sum() if rank == 0 else 0.0), x.shape[0]

        task = Task(examples=list(range(8)), collate=lambda b: {"x": torch.tensor(b)[:, None].expand(-1, 3)},
                    loss=loss)
        model = Toy()
        try:
            train(model, task, TrainConfig(output=f"{out}/{scenario}", max_steps=2, batch_size=2, blr=25.6,
                                           warmup_epochs=0, progress=False, device="cpu"))
        except NoGradient as e:
            return {"error": str(e)}
        return {n: p.tolist() for n, p in model.named_parameters()}

    # both scenarios in one process group (one launch): the first must leave every process in step
    print("RESULT", json.dumps({s: run(s) for s in ("rank1_detached", "b_on_rank0_only")}), flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(tmp_path: Path) -> list[dict]:
    """Run the worker as ranks 0 and 1 of a gloo process group (what torchrun sets up); their RESULT records."""
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port, procs = _free_port(), []
    for rank in range(2):
        env = {**subprocess_env(), "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(script), str(tmp_path)], env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0 and "RESULT " in out, out + err[-3000:]
            results.append(json.loads(out.split("RESULT ", 1)[1].splitlines()[0]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return results


def test_under_torchrun_every_process_raises_together_naming_the_rank_without_gradients(tmp_path):
    """One process without gradients: all of them stop (none is left waiting in a collective) and the message
    names it; a parameter that has a gradient on some processes only is averaged with zeros from the others (as
    DDP does), so every process reduces the same tensors and ends with the same parameters."""
    results = _two_processes(tmp_path)
    for r in results:
        assert "step 1: none of the 2 trainable parameters received a gradient on rank(s) 1 of 2" in \
            r["rank1_detached"]["error"]
    final = [r["b_on_rank0_only"] for r in results]
    assert final[0] == final[1]  # the same parameters on both processes
    assert final[0]["a"] != [1.0] * 3 and final[0]["b"] != [1.0] * 3  # both trained, b from rank 0's gradient
