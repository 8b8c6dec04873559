"""The ``zinit`` command.

``zinit demo`` shows the method end to end on a small random-weight LLaMA-shaped model: inject, check that the
zero-init model computes what the base model computes, train the adapter for a few steps on a toy sequence
(the gates open and the loss falls), save it and load it back into a fresh model. ``zinit backbones`` lists the
registered backbones. ``zinit train RECIPE`` trains an adapter with a recipe (see ``recipes/``: alpaca, scienceqa,
vtab, squad), ``zinit eval RECIPE`` scores one, ``zinit compare RECIPE`` runs other fine-tuning methods through the same recipe,
and ``zinit generate`` answers an instruction with a base model and an adapter.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Sequence


def _demo(args: argparse.Namespace) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import zinit

    torch.manual_seed(args.seed)
    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=6,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=256)
    base = LlamaForCausalLM(cfg).eval()
    data = torch.randint(0, cfg.vocab_size, (4, 48))
    with torch.no_grad():
        base_logits = base(input_ids=data).logits
    base_state = {k: v.clone() for k, v in base.state_dict().items()}

    model = zinit.inject(base, layers=args.layers, K=args.K)
    params = zinit.trainable_parameters(model)
    n_base = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in params)
    print(f"model: random LLaMA-shaped, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, {n_base:,} frozen parameters")
    print(f"inject(layers={args.layers}, K={args.K}): adapted layers {list(zinit.injection(model).layers)}, "
          f"{sum(p.numel() for p in params):,} trainable parameters")
    with torch.no_grad():
        diff = (model(input_ids=data).logits - base_logits).abs().max().item()
    print(f"zero-init: max |injected - base| logits = {diff:.1e}")

    model.train()
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95))
    for step in range(1, args.steps + 1):
        loss = model(input_ids=data, labels=data).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1 or step % max(1, args.steps // 5) == 0 or step == args.steps:
            gates = [a.gate_values().abs().mean().item() for a in zinit.layer_adapters(model).values()]
            print(f"step {step:3d}  loss {loss.item():.4f}  mean |tanh(gate)| per layer "
                  + " ".join(f"{g:.3f}" for g in gates))

    model.eval()
    with tempfile.TemporaryDirectory() as folder:
        zinit.save_adapter(model, folder)
        fresh = LlamaForCausalLM(cfg)
        fresh.load_state_dict(base_state)
        zinit.load_adapter(fresh.eval(), folder)
        with torch.no_grad():
            same = torch.equal(fresh(input_ids=data).logits, model(input_ids=data).logits)
    print(f"save_adapter -> load_adapter into a fresh model: outputs identical = {same}")
    return 0 if same and diff <= 1e-5 else 1


def _backbones(args: argparse.Namespace) -> int:
    import zinit

    for name in zinit.backbones():
        print(f"{name:10s} {zinit.get_backbone(name).description}")
    return 0


def _bench(argv: list[str]) -> int:
    from benchmarks import speed

    speed.main(argv)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zinit`` command."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # every option after `bench` belongs to the benchmark's own parser
        return _bench(argv[1:])
    if argv[:1] == ["compare"]:  # its own parser, which passes unknown options on to the recipe
        from recipes import compare

        return compare.main(argv[1:])
    parser = argparse.ArgumentParser(prog="zinit", description="Zero-init gated prompt attention adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="inject, check zero-init, train a few steps, save and reload (CPU, seconds)")
    demo.add_argument("--layers", type=int, default=4, help="adapt the top L layers (default 4 of 6)")
    demo.add_argument("--K", type=int, default=10, help="prompt length (default 10)")
    demo.add_argument("--steps", type=int, default=30, help="training steps (default 30)")
    demo.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate (default 1e-2)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=_demo)
    sub.add_parser("backbones", help="list the registered backbones").set_defaults(func=_backbones)

    from recipes import alpaca, scienceqa, squad, vtab

    train = sub.add_parser("train", help="train an adapter with a recipe").add_subparsers(dest="recipe", required=True)
    evaluate = sub.add_parser("eval", help="score a trained adapter with a recipe's metric").add_subparsers(
        dest="recipe", required=True)
    commands = [  # (subcommands, recipe name, module, what it does); each module has add_<verb>_args / run_<verb>
        (train, "train", "alpaca", alpaca, "Alpaca instruction tuning (default: embedded SmolLM2 + bundled set)"),
        (train, "train", "vtab", vtab, "VTAB-1k image classification on a timm ViT (grid on val, report on test)"),
        (train, "train", "scienceqa", scienceqa, "ScienceQA with image features (CLIP / timm ViT), paper's columns"),
        (train, "train", "squad", squad, "SQuAD v1.1 / v2.0 question answering on RoBERTa/BERT (official EM/F1)"),
        (evaluate, "eval", "scienceqa", scienceqa, "ScienceQA accuracy table of an adapter on one split"),
        (evaluate, "eval", "squad", squad, "official SQuAD EM/F1 of an adapter on a SQuAD file"),
    ]
    for group, verb, name, module, what in commands:
        p = group.add_parser(name, help=what)
        getattr(module, f"add_{verb}_args")(p)
        p.set_defaults(func=getattr(module, f"run_{verb}"))
    p = sub.add_parser("generate", help="answer an instruction with a base model and an adapter")
    alpaca.add_generate_args(p)
    p.set_defaults(func=alpaca.run_generate)
    p = sub.add_parser("compare", help="several fine-tuning methods through one recipe, one table "
                       "(zinit compare -h)", add_help=False)
    p.add_argument("compare_args", nargs=argparse.REMAINDER)
    p = sub.add_parser("bench", help="speed and memory vs peft and the floor (python -m benchmarks.speed -h)",
                       add_help=False)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
