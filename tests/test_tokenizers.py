"""LLaMA-1/2 checkpoints ship a sentencepiece ``tokenizer.model`` and no ``tokenizer.json``: transformers converts it
at load time with sentencepiece and protobuf (both dependencies of zinit). A tiny sentencepiece model trained here
stands in for the real one, in the real folder layout."""

from __future__ import annotations

import io
import json

import pytest
import torch

import zinit
from zinit import lm

spm = pytest.importorskip("sentencepiece")

WORDS = "the quick brown fox jumps over a lazy dog while zero init gates open prompts layer by layer".split()


def _llama_folder_with_a_sentencepiece_tokenizer(folder):
    """A LLaMA model folder as the LLaMA-1/2 conversions lay it out: config, weights, tokenizer.model (BPE
    sentencepiece, <unk>=0 <s>=1 </s>=2) and a tokenizer_config.json naming LlamaTokenizer; no tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=64,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return spm.SentencePieceProcessor(model_proto=buffer.getvalue())


def test_a_sentencepiece_llama_tokenizer_loads_and_tokenizes_as_sentencepiece_does(tmp_path):
    folder = tmp_path / "llama"
    processor = _llama_folder_with_a_sentencepiece_tokenizer(folder)
    assert not (folder / "tokenizer.json").exists()
    model, tokenizer = lm.load_model(str(folder), torch.device("cpu"))
    text = "the lazy fox opens zero init gates"
    assert tokenizer(text)["input_ids"] == [1] + processor.encode(text)  # <s> then sentencepiece's own pieces
    assert tokenizer.decode(tokenizer(text)["input_ids"], skip_special_tokens=True) == text
    assert tokenizer.pad_token == "</s>"  # no pad token of its own: pads with EOS
    pair = lm.tokenize_pair(lm.format_prompt("Say the word."), "fox", tokenizer, 512)
    assert pair["input_ids"][-1] == 2 and pair["labels"][-1] == 2 and pair["labels"][0] == -100
    zinit.inject(model, layers=2, K=4)
    reply = lm.answer(model, tokenizer, "Say the word.", greedy=True, max_new_tokens=3)
    assert isinstance(reply, str)
