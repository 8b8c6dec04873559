"""Tiny random-weight models of every supported family, built from configs (no hub downloads), and inputs."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch

VOCAB = 96


def _unit_scale(model, seed: int):
    """Re-draw weights so activations are O(1) (library inits use std 0.02, which makes every output tiny and
    every absolute tolerance meaningless): linear weights N(0, 1/fan_in), biases N(0, 0.1²), embeddings N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * m.in_features ** -0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
            elif isinstance(m, torch.nn.Embedding):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
    return model.eval()


def tiny_llama(model_type: str = "llama", heads: int = 4, kv_heads: int = 2, layers: int = 4, hidden: int = 32,
               seed: int = 0, attn_implementation: str | None = None, base_only: bool = False):
    """A LLaMA / Mistral / Qwen2 causal LM (or base model) with random weights, in eval mode."""
    import transformers as tf

    cfg_cls, lm_cls, base_cls = {
        "llama": (tf.LlamaConfig, tf.LlamaForCausalLM, tf.LlamaModel),
        "mistral": (tf.MistralConfig, tf.MistralForCausalLM, tf.MistralModel),
        "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM, tf.Qwen2Model),
    }[model_type]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=128,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    if attn_implementation:
        cfg._attn_implementation = attn_implementation
    torch.manual_seed(seed)
    model = (base_cls if base_only else lm_cls)(cfg)
    return _unit_scale(model, seed)


def tiny_vit(seed: int = 0, depth: int = 4, distilled: bool = False, **kwargs):
    """A timm ViT (or distilled DeiT) on 32×32 images with random weights, in eval mode."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    cls = VisionTransformerDistilled if distilled else VisionTransformer
    args = dict(img_size=32, patch_size=8, embed_dim=48, depth=depth, num_heads=3, num_classes=10, qkv_bias=True)
    args.update(kwargs)
    return _unit_scale(cls(**args), seed)


def tiny_encoder(model_type: str = "roberta", head: str = "base", layers: int = 3, seed: int = 0):
    """A BERT or RoBERTa (base model, QA or sequence-classification head) with random weights, in eval mode."""
    import transformers as tf

    cfg_cls, prefix = {"roberta": (tf.RobertaConfig, "Roberta"), "bert": (tf.BertConfig, "Bert")}[model_type]
    cfg = cfg_cls(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    cls = getattr(tf, {"base": f"{prefix}Model", "qa": f"{prefix}ForQuestionAnswering",
                       "cls": f"{prefix}ForSequenceClassification"}[head])
    torch.manual_seed(seed)
    return _unit_scale(cls(cfg), seed)


def randomize_adapter(model, seed: int = 1, scale: float = 1.0) -> None:
    """Give every prompt and gate random non-zero values (gates too, so the prompt term is switched on; a
    ``gate="none"`` adapter has only its prompt)."""
    import zinit

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for adapter in zinit.layer_adapters(model).values():
            adapter.prompt.copy_(torch.randn(adapter.prompt.shape, generator=g))
            if adapter.gate is not None:
                adapter.gate.copy_(torch.randn(adapter.gate.shape, generator=g) * scale)


def clone(model):
    return copy.deepcopy(model)


def tokens(batch: int = 3, length: int = 9, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=g)


def padded_batch(side: str, seed: int = 0):
    """input_ids and attention_mask of 3 sequences of lengths 9, 6, 4, padded on ``side`` with id 0."""
    ids = tokens(3, 9, seed)
    mask = torch.ones_like(ids)
    for row, n in enumerate((9, 6, 4)):
        if side == "left":
            mask[row, : 9 - n] = 0
        else:
            mask[row, n:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def char_tokenizer():
    """A character-level fast tokenizer (printable ASCII + newline), built offline; ids 0-3 are special."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def save_tiny_causal_lm(folder, layers: int = 3, seed: int = 0, attention_dropout: float = 0.0, hidden: int = 32):
    """Save a tiny random LLaMA and its character tokenizer to ``folder`` (what ``--model PATH`` loads); ``hidden``
    the width (the MLP twice that)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      attention_dropout=attention_dropout)
    torch.manual_seed(seed)
    model = _unit_scale(LlamaForCausalLM(cfg), seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def alpaca_records(n=24):
    """A learnable Alpaca fixture: the answer is the input reversed, or a fixed word."""
    words = ["cat", "dog", "sun", "sky", "red", "map", "pen", "cup", "hat", "box", "owl", "ant"]
    out = []
    for i in range(n):
        w = words[i % len(words)]
        if i % 2:
            out.append({"instruction": "Reverse the word.", "input": w, "output": w[::-1]})
        else:
            out.append({"instruction": "Say yes.", "input": "", "output": "yes"})
    return out


def subprocess_env() -> dict[str, str]:
    """The environment for a test's child process (a script, torchrun): this checkout and tests/ importable, no
    hub access, one OpenMP thread per process (the machine has two cores)."""
    here = Path(__file__).resolve().parent
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(here.parent), str(here), env.get("PYTHONPATH", "")])
    env.setdefault("HF_HUB_OFFLINE", "1")
    env["OMP_NUM_THREADS"] = "1"
    return env


#: A value for :func:`edit_adapter_config` that deletes the key.
DELETE = object()


def edit_adapter_config(folder, **changes):
    """Rewrite ``folder/zinit.json`` with ``changes`` applied (a value of :data:`DELETE` removes the key), as a user
    or a broken tool might; returns ``folder``."""
    import json

    path = Path(folder) / "zinit.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is DELETE:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))
    return folder


def run_cli(args, capsys):
    """Run ``zinit ARGS`` in-process: (exit status, stdout, stderr)."""
    import pytest

    from zinit.cli import main

    capsys.readouterr()
    try:
        status = main([str(a) for a in args])
    except SystemExit as exc:
        status = exc.code
    except KeyboardInterrupt:  # pragma: no cover - would end the whole pytest session
        pytest.fail("KeyboardInterrupt escaped zinit.cli.main")
    out = capsys.readouterr()
    return status, out.out, out.err
