"""zinit compare's baselines score as what they claim to be (issue 25): peft's prefix and prompt tuning generate with
their virtual tokens, and every method trains float32 master weights on a bf16 base (full fine-tuning and peft's
adaption prompt used to step the base's bf16 tensors, whose small updates round away)."""

from __future__ import annotations

import pytest
import torch

from zinit.methods import registry as M
from zinit.train import Task, TrainConfig, causal_lm_loss, train
from zinit.train.data import pad_collate
from tiny import tiny_llama, tokens

L, K = 2, 3


def _with_random_virtual_tokens(kind: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny LLaMA with peft ``kind`` tuning whose virtual tokens are large and random (so they change every
    output), and an untouched copy of the same base model."""
    model = M.prepare(kind, tiny_llama(), M.MethodContext("alpaca", L, K)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 3)
    return model, tiny_llama()


@pytest.mark.parametrize("kind", ["prefix", "prompt"])
def test_peft_prompt_learning_generates_with_its_virtual_tokens(kind):
    """Greedy ``generate`` gives, step by step, the logits of peft's own full forward (no cache) on the sequence so
    far, which differ from the base model's: the prefix / prompt is used at every step, once."""
    model, plain = _with_random_virtual_tokens(kind)
    ids, n = tokens(2, 7), 5
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, -1]
        assert (full - plain(input_ids=ids).logits[:, -1]).abs().max() > 1  # peft's forward uses the virtual tokens
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        seq = ids
        for step in range(n):  # the reference: greedy decoding by full forwards, without a cache
            logits = model(input_ids=seq, attention_mask=torch.ones_like(seq)).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=1e-4, rtol=1e-4, msg=f"step {step}")
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        assert torch.equal(out.sequences, seq)
        untuned = plain.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        assert not torch.equal(out.sequences, untuned)


def test_peft_prefix_generates_a_left_padded_batch_as_each_row_alone():
    """The recipes generate left-padded batches (Alpaca exact match, ScienceQA --mode generate): each row's greedy
    answer is the one it gets alone, with the prefix."""
    model, plain = _with_random_virtual_tokens("prefix")
    ids = tokens(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    with torch.no_grad():
        batch = model.generate(input_ids=ids.masked_fill(mask == 0, 0), attention_mask=mask, max_new_tokens=5,
                               do_sample=False, pad_token_id=0)[:, 7:]
        for row in range(2):
            alone = ids[row:row + 1, 7 - int(mask[row].sum()):]
            assert torch.equal(batch[row], model.generate(input_ids=alone, max_new_tokens=5, do_sample=False,
                                                          pad_token_id=0)[0, alone.shape[1]:])
            assert not torch.equal(batch[row], plain.generate(input_ids=alone, max_new_tokens=5, do_sample=False,
                                                              pad_token_id=0)[0, alone.shape[1]:])


def _changed_fraction(method: str, dtype: torch.dtype, blr: float, output) -> tuple[float, torch.nn.Module]:
    """Prepare ``method`` on a tiny LLaMA loaded in ``dtype``, train 4 steps with zinit's trainer on CPU (batch 2, so
    lr = blr/128), and return the fraction of trainable elements that changed, and the model."""
    model = M.prepare(method, tiny_llama().to(dtype), M.MethodContext("scienceqa", L, K))
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(8):
        ids = torch.randint(3, 96, (12,), generator=g).tolist()
        examples.append({"input_ids": ids, "labels": ids})
    task = Task(examples=examples, collate=lambda batch: pad_collate(batch, 0), loss=causal_lm_loss)
    train(model, task, TrainConfig(output=str(output), max_steps=4, epochs=1.0, warmup_epochs=0.0, batch_size=2,
                                   blr=blr, device="cpu", progress=False))
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in trainable.items())
    return changed / sum(p.numel() for p in trainable.values()), model


@pytest.mark.parametrize("method", ["full", "adaption_prompt"])
def test_a_bf16_base_trains_float32_master_weights(method, tmp_path):
    """At the method's default ScienceQA lr, 4 steps change (nearly) every trainable element on a bf16 base, as on a
    float32 one (a bf16 step rounded most of them away: 1 % and 35 % here before the policy); the trainable tensors
    are float32, the frozen base stays bf16, and the forward runs on CPU without the caller's autocast."""
    blr = M.recipe_blr("scienceqa", method)
    fp32, _ = _changed_fraction(method, torch.float32, blr, tmp_path / "fp32")
    bf16, model = _changed_fraction(method, torch.bfloat16, blr, tmp_path / "bf16")
    assert fp32 > 0.99 and bf16 >= 0.99 * fp32, (bf16, fp32)
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert frozen == ({torch.bfloat16} if method == "adaption_prompt" else set())
    with torch.no_grad():  # computes in the base's dtype, as the trainer's bf16 autocast has it on GPU
        assert model(input_ids=tokens(2, 5)).logits.dtype == torch.bfloat16


def test_a_float32_model_is_left_as_it_is():
    """The policy changes nothing where nothing trains below float32: no upcast, no hook (CPU runs unchanged)."""
    for method in ("full", "adaption_prompt", "lora"):
        model = M.prepare(method, tiny_llama(), M.MethodContext("alpaca", L, K))
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules()), method
    bf16 = M.prepare("lora", tiny_llama().to(torch.bfloat16), M.MethodContext("alpaca", L, K))
    assert all(not m._forward_pre_hooks for m in bf16.modules())  # peft keeps LoRA float32 itself
