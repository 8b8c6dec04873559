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


def _llama_folder_with_a_sentencepiece_tokenizer(folder, extra_sentences=(), vocab_size=64):
    """A LLaMA model folder as the LLaMA-1/2 conversions lay it out: config, weights, tokenizer.model (BPE
    sentencepiece, <unk>=0 <s>=1 </s>=2) and a tokenizer_config.json naming LlamaTokenizer; no tokenizer.json."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sentences = [" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 4 + list(extra_sentences)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences), model_writer=buffer, vocab_size=vocab_size,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   character_coverage=1.0, minloglevel=2)
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
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


def test_prompt_and_answer_are_tokenized_as_the_official_code_does(tmp_path):
    """The official alpaca_finetuning_v1 tokenizes ``prompt + output`` as one string (``tokenizer.encode(example, bos=True,
    eos=True)``) and masks the prompt's length: a SentencePiece model then trains on ``Response:fox`` with no
    word-start marker on the answer, the pieces that follow the prompt at generation time. The reference here is
    sentencepiece's own encoder on the joint string, not zinit's tokenizer call."""
    folder = tmp_path / "llama"
    template = [lm.format_prompt(" ".join(WORDS[i:i + 4])) + " ".join(WORDS[i + 4:i + 6]) for i in range(12)] * 4
    processor = _llama_folder_with_a_sentencepiece_tokenizer(folder, template, vocab_size=160)
    _, tokenizer = lm.load_model(str(folder), torch.device("cpu"))
    prompt, answer = lm.format_prompt("the lazy dog"), "fox jumps"
    pair = lm.tokenize_pair(prompt, answer, tokenizer, 512)
    n_prompt = len(tokenizer(prompt)["input_ids"])
    assert pair["input_ids"][:n_prompt] == tokenizer(prompt)["input_ids"]  # the prompt as generation sees it
    assert pair["labels"][:n_prompt] == [-100] * n_prompt and pair["labels"][n_prompt:] == pair["input_ids"][n_prompt:]
    # the answer: sentencepiece's pieces of the joint string after the prompt's (HF's converted tokenizer and raw
    # sentencepiece differ on the template's newlines, so the prompts are compared by their own encoders)
    joint, alone = processor.encode(prompt + answer), processor.encode(prompt)
    assert joint[:len(alone)] == alone
    official = joint[len(alone):] + [2]
    assert [processor.id_to_piece(i) for i in official[:2]] == ["fox", "▁jumps"]  # no word-start marker on 'fox'
    assert pair["input_ids"][n_prompt:] == official
    assert processor.encode(answer)[0] != official[0]  # the answer alone would start with '▁fox'


def test_a_token_merging_across_the_boundary_keeps_the_prompt_as_generation_sees_it():
    """A tokenizer that merges the prompt's last character with the answer's first (``:`` + ``:`` → ``::``): the prompt's
    ids stay those of the prompt alone (what generation is given), the answer is tokenized on its own."""

    class Merging:  # one id per character, except '::' (id 1); EOS = 0
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=True):
            ids, i = [], 0
            while i < len(text):
                if text.startswith("::", i):
                    ids.append(1)
                    i += 2
                else:
                    ids.append(ord(text[i]))
                    i += 1
            return {"input_ids": ids}

    pair = lm.tokenize_pair("Q:", ":A", Merging(), 16)
    assert pair["input_ids"] == [ord("Q"), ord(":"), ord(":"), ord("A"), 0]
    assert pair["labels"] == [-100, -100, ord(":"), ord("A"), 0]


LLAMA3_STYLE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                "{{ m['content'] }}<|eot_id|>{% endfor %}"
                "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


@pytest.mark.parametrize("template_end", ["<|eot_id|>", "</s>"])
def test_a_chat_example_has_one_bos_and_ends_the_turn_as_its_template_does(template_end):
    """In the ``"chat"`` format the prompt is the template's text (which writes its own BOS: the tokenizer adds no
    second one) and the answer ends as the template ends the assistant's turn: with an end-of-turn token that is
    not EOS (LLaMA-3's ``<|eot_id|>``) that token is the last target and no EOS follows; with EOS itself, EOS once.
    The training prompt is token for token what ``zinit generate`` and ``zinit serve`` send."""
    from tiny import char_tokenizer
    from zinit.recipes.instructions import tokenize

    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_STYLE.replace("<|eot_id|>", template_end)
    record = {"instruction": "Say yes.", "input": "now", "output": "yes"}
    item = tokenize([record], tokenizer, 512, "chat")[0]
    prompt = lm.format_prompt("Say yes.", "now", "chat", tokenizer)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    served = tokenizer.apply_chat_template([{"role": "user", "content": "Say yes.\n\nnow"}], add_generation_prompt=True,
                                           tokenize=True)
    served = list(served["input_ids"] if hasattr(served, "keys") else served)
    assert served == prompt_ids and prompt_ids.count(tokenizer.bos_token_id) == 1
    end = tokenizer.convert_tokens_to_ids(template_end)
    targets = [t for t in item["labels"] if t != -100]
    assert item["input_ids"] == prompt_ids + targets
    assert tokenizer.decode(targets[:-1]) == "yes" and targets[-1] == end
    assert targets.count(tokenizer.eos_token_id) == (1 if end == tokenizer.eos_token_id else 0)
