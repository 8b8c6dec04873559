"""SQuAD recipe: the official metrics, windows mapped back to characters, a full tiny run, and bad input."""

from __future__ import annotations

import json
import re

import pytest
import torch

import zinit
from zinit.recipes import make_squad_demo, squad
from zinit.cli import main as cli


# ---------------------------------------------------------------- metrics (official evaluate-v1.1 / v2.0 rules)

@pytest.mark.parametrize("text, normal", [
    ("The Cat", "cat"),                        # case, article
    ("a  cat,\tan apple; the end.", "cat apple end"),  # punctuation, articles, whitespace
    ("Theatre", "theatre"),                     # 'the' only as a word
    ("  (U.S.A.)  ", "usa"),
    ("an", ""),
])
def test_normalisation(text, normal):
    assert squad.normalize_answer(text) == normal


def test_em_f1_max_over_gold_answers():
    ex = {"id": "q", "answers": [{"text": "Denver Broncos", "answer_start": 0}, {"text": "the Broncos",
                                                                                  "answer_start": 0}],
          "is_impossible": False}
    assert squad.score([ex], {"q": "broncos"}) == {"exact": 100.0, "f1": 100.0, "total": 1}
    result = squad.score([ex], {"q": "Denver"})
    assert result["exact"] == 0.0 and result["f1"] == pytest.approx(100 * 2 / 3)  # vs "Denver Broncos": p=1, r=1/2
    assert squad.score([ex], {})["f1"] == 0.0  # a missing prediction scores 0
    assert squad.f1_score("x y", "z") == 0.0


def test_each_version_is_scored_by_its_own_official_rules(tmp_path, monkeypatch):
    """evaluate-v1.1.py keeps every gold text (one that normalises to empty included) and has no empty-vs-empty rule
    (F1 0: no common token); evaluate-v2.0.py drops such golds and scores empty vs empty as F1 1. Hand-computed:
    gold "The" / "Paris", prediction "a" (normalises to empty): v1.1 EM 1 (matches "The"), F1 0; v2.0 EM 0, F1 0."""
    ex = {"id": "q", "answers": [{"text": "The", "answer_start": 0}, {"text": "Paris", "answer_start": 4}],
          "is_impossible": False}
    assert squad.score([ex], {"q": "a"}, version="1.1") == {"exact": 100.0, "f1": 0.0, "total": 1}
    assert squad.score([ex], {"q": "a"}, version="2.0") == {"exact": 0.0, "f1": 0.0, "total": 1}
    with pytest.raises(ValueError, match="SQuAD version '3'"):
        squad.score([ex], {"q": "a"}, version="3")
    # a v1.1 file is evaluated with the v1.1 rules end to end
    data = squad.SquadData(tmp_path / "dev-v1.1.json", [ex], version_2=False)
    monkeypatch.setattr(squad, "prepare_features", lambda *a, **k: [])
    monkeypatch.setattr(squad, "predict_logits", lambda *a, **k: ([], []))
    monkeypatch.setattr(squad, "postprocess", lambda *a, **k: ({"q": "a"}, {"q": 0.0}))
    result = squad.evaluate(None, type("Tokenizer", (), {"pad_token_id": 0})(), data, squad.EvalSettings())
    assert (result["version"], result["exact"], result["f1"]) == ("1.1", 100.0, 0.0)


def test_v2_unanswerable_questions_and_threshold():
    examples = [
        {"id": "a", "answers": [{"text": "Paris", "answer_start": 0}], "is_impossible": False},
        {"id": "n", "answers": [], "is_impossible": True},
        {"id": "m", "answers": [], "is_impossible": True},
    ]
    result = squad.score(examples, {"a": "Paris", "n": "", "m": "London"})
    assert result["exact"] == pytest.approx(200 / 3) and result["f1"] == pytest.approx(200 / 3)
    assert (result["HasAns_exact"], result["NoAns_exact"], result["NoAns_f1"]) == (100.0, 50.0, 50.0)
    assert (result["HasAns_total"], result["NoAns_total"]) == (1, 2)

    spans = {"a": "Paris", "n": "Lyon", "m": "London"}
    diffs = {"a": -2.0, "n": 1.0, "m": -0.5}  # null score minus span score
    assert squad.apply_threshold(spans, diffs, 0.0) == {"a": "Paris", "n": "", "m": "London"}
    assert squad.apply_threshold(spans, diffs, -1.0) == {"a": "Paris", "n": "", "m": ""}
    best = squad.best_threshold(examples, spans, diffs)
    assert best["best_exact"] == 100.0 and best["best_exact_thresh"] == -2.0  # answer only "a"
    assert best["best_f1"] == 100.0


# ---------------------------------------------------------------- a tiny word-level tokenizer and model

def word_tokenizer(texts):
    """A fast word-level tokenizer over ``texts`` with RoBERTa's pair template ``<s> Q </s></s> C </s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(specials + words)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B:1 </s>:1", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", cls_token="<s>", sep_token="</s>")


def tiny_qa_model(vocab_size, seed=0):
    from transformers import RobertaConfig, RobertaForQuestionAnswering

    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=140, pad_token_id=1)
    return RobertaForQuestionAnswering(cfg).eval()


LONG = {"id": "long", "question": "Who found the key ?", "is_impossible": False,
        "context": " ".join(f"word{i}" for i in range(60)) + " The key was found by Ada Lovelace today . "
                   + " ".join(f"tail{i}" for i in range(40))}
LONG["answers"] = [{"text": "Ada Lovelace", "answer_start": LONG["context"].index("Ada Lovelace")}]


def test_long_contexts_split_into_windows_and_answers_map_back_to_characters():
    tok = word_tokenizer([LONG["question"], LONG["context"]])
    features = squad.prepare_features([LONG], tok, max_length=32, stride=8, train=True)
    assert len(features) > 3
    labelled = [f for f in features if f["start"] > 0]
    assert labelled, "some window must hold the answer"
    for f in labelled:
        s, e = f["offsets"][f["start"]][0], f["offsets"][f["end"]][1]
        assert LONG["context"][s:e] == "Ada Lovelace"
    for f in features:  # windows without the whole answer point at CLS; offsets only on context tokens
        ids = tok.convert_ids_to_tokens(f["input_ids"])
        assert ids[0] == "<s>" and f["offsets"][0] is None
        if f["start"] == 0:
            assert f["end"] == 0
    # oracle logits on the last labelled window: post-processing recovers the exact characters
    width = max(len(f["input_ids"]) for f in features)
    starts, ends = torch.zeros(len(features), width), torch.zeros(len(features), width)
    k = features.index(labelled[-1])
    starts[k, labelled[-1]["start"]] = ends[k, labelled[-1]["end"]] = 10.0
    spans, diffs = squad.postprocess([LONG], features, starts, ends)
    assert spans == {"long": "Ada Lovelace"} and diffs["long"] < 0
    too_short = squad.postprocess([LONG], features, starts, ends, max_answer_length=1)[0]
    assert too_short["long"] != "Ada Lovelace"


def test_answer_start_mismatch_is_reported(tmp_path, capsys):
    make_squad_demo.make(tmp_path, train_paragraphs=3, dev_paragraphs=1)
    path = tmp_path / "train-v1.1.json"
    raw = json.loads(path.read_text())
    qa = raw["data"][0]["paragraphs"][0]["qas"][0]
    qa["answers"][0]["answer_start"] += 3
    path.write_text(json.dumps(raw))
    data = squad.load_squad(path)
    assert len(data.mismatched) == 1 and data.mismatched[0].startswith(qa["id"] + ": answer")
    assert "it occurs at" in data.mismatched[0]
    assert cli(["train", "squad", "--train-file", str(path), "--dev-file", str(tmp_path / "dev-v1.1.json"),
                "--output", str(tmp_path / "out"), "--model", "unused", "--device", "cpu"]) == 2  # zinit: error: ...
    assert re.search(r"(?s)zinit: error: .*1 answers do not match.*" + re.escape(qa["id"]) + r".*--skip-mismatched",
                     capsys.readouterr().err)


def test_bad_files_are_refused_with_their_name(tmp_path):
    with pytest.raises(FileNotFoundError, match="SQuAD file .*missing.json does not exist"):
        squad.load_squad(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"data": [{"paragraphs": [{"context": "x", "qas": [{"id": "q1", "question": "?",
                                                                                    "answers": []}]}]}]}))
    with pytest.raises(ValueError, match="question q1 has no answers and is not marked is_impossible"):
        squad.load_squad(bad)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        squad.find_files(tmp_path / "nope", "1.1")


# ---------------------------------------------------------------- a full tiny run through the CLI

@pytest.fixture
def tiny_squad(tmp_path):
    make_squad_demo.make(tmp_path / "data", train_paragraphs=8, dev_paragraphs=3)
    texts = []
    for name in ("train-v2.0.json", "dev-v2.0.json"):
        for ex in squad.load_squad(tmp_path / "data" / name).examples:
            texts += [ex["question"], ex["context"]]
    tok = word_tokenizer(texts)
    model = tiny_qa_model(len(tok))
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    path = tmp_path / "data" / "train-v2.0.json"  # one wrong answer_start: dropped with --skip-mismatched, and named
    raw = json.loads(path.read_text())
    raw["data"][0]["paragraphs"][0]["qas"][0]["answers"] = [{"text": "banks", "answer_start": 0}]
    raw["data"][0]["paragraphs"][0]["qas"][0]["is_impossible"] = False
    path.write_text(json.dumps(raw))
    return tmp_path, folder


def test_full_tiny_run_produces_em_f1_and_eval_reads_the_adapter(tiny_squad, capsys):
    root, model = tiny_squad
    out = root / "out"
    args = ["--data", str(root / "data"), "--version", "2.0", "--model", str(model), "--max-length", "64",
            "--doc-stride", "16", "--no-progress", "--device", "cpu"]
    assert cli(["train", "squad", *args, "--output", str(out), "--layers", "2", "--K", "4", "--epochs", "2",
                "--batch-size", "8", "--blr", "0.5", "--tune-threshold", "--skip-mismatched"]) == 0
    assert "skipping 1 training questions whose answer_start does not match:\n  train0000q0: answer 'banks'" in \
        capsys.readouterr().out
    result = json.loads((out / "eval.json").read_text())
    assert result["version"] == "2.0" and result["questions"] == 18
    for key in ("exact", "f1", "HasAns_exact", "NoAns_exact", "threshold", "tuned_on_this_set"):
        assert key in result
    predictions = json.loads((out / "predictions.json").read_text())
    assert len(predictions) == 18
    assert squad.score(squad.load_squad(root / "data" / "dev-v2.0.json").examples, predictions)["f1"] == \
        pytest.approx(result["f1"])
    config = zinit.read_adapter_config(out / "adapter")
    assert config["train_modules"] == ["qa_outputs"] and config["layers"] == [0, 1]
    capsys.readouterr()
    eval_out = root / "eval"
    assert cli(["eval", "squad", "--adapter", str(out / "adapter"), *args, "--output", str(eval_out)]) == 0
    again = json.loads((eval_out / "eval.json").read_text())
    assert (again["exact"], again["f1"]) == (result["exact"], result["f1"])  # the adapter and head came back
    assert "zinit (measured)" in capsys.readouterr().out


def test_hub_rows_convert_to_the_official_layout(tmp_path, monkeypatch):
    rows = [{"id": "a", "title": "T1", "context": "Ada wrote notes.", "question": "Who wrote?",
             "answers": {"text": ["Ada"], "answer_start": [0]}},
            {"id": "b", "title": "T1", "context": "Ada wrote notes.", "question": "When?",
             "answers": {"text": [], "answer_start": []}},
            {"id": "c", "title": "T2", "context": "Bo ran.", "question": "Who ran?",
             "answers": {"text": ["Bo", "Bo"], "answer_start": [0, 0]}}]
    path = tmp_path / "dev-v2.0.json"
    path.write_text(json.dumps(squad.rows_to_squad(rows, "2.0")))
    data = squad.load_squad(path)
    assert [e["id"] for e in data.examples] == ["a", "b", "c"] and data.version_2 and not data.mismatched
    assert [e["is_impossible"] for e in data.examples] == [False, True, False]
    assert len(json.loads(path.read_text())["data"][0]["paragraphs"]) == 1  # a and b share their paragraph

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: str(tmp_path / "snapshot"))
    monkeypatch.setattr(squad.Path, "home", classmethod(lambda cls: tmp_path / "home"))
    (tmp_path / "snapshot").mkdir()
    try:
        import pyarrow  # noqa: F401
        expected = (FileNotFoundError, "has no train-\\*/validation-\\* parquet files")
    except ImportError:
        expected = (RuntimeError, "pip install pyarrow")
    with pytest.raises(expected[0], match=expected[1]):
        squad.find_files("rajpurkar/squad_v2", "2.0")


def test_the_span_head_is_drawn_from_the_seed(tmp_path, monkeypatch):
    """A checkpoint without a span head (a base model, as roberta-large on the hub): the head the run draws depends on
    --seed and on nothing else, whatever the process drew before, so every method of a compare starts from the same
    head. Each run stops where the method would be applied (recording the head), before any training."""
    from transformers import RobertaConfig, RobertaModel

    from zinit.methods import registry as methods

    make_squad_demo.make(tmp_path / "data", train_paragraphs=2, dev_paragraphs=1)
    texts = [t for name in ("train-v1.1.json", "dev-v1.1.json")
             for ex in squad.load_squad(tmp_path / "data" / name).examples for t in (ex["question"], ex["context"])]
    tok = word_tokenizer(texts)
    torch.manual_seed(0)
    RobertaModel(RobertaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=140, pad_token_id=1)
                 ).save_pretrained(tmp_path / "model")
    tok.save_pretrained(tmp_path / "model")
    heads = []

    def record(name, model, ctx):
        heads.append((name, model.qa_outputs.weight.detach().clone(), model.qa_outputs.bias.detach().clone()))
        raise methods.NotApplicable("recorded the initial span head")

    monkeypatch.setattr(methods, "prepare", record)
    for i, (method, seed, drawn_before) in enumerate([("zinit", 0, 1), ("lora", 0, 2), ("full", 0, 3),
                                                      ("zinit", 5, 1)]):
        torch.manual_seed(drawn_before)  # what earlier work in the process left the generator at
        assert cli(["train", "squad", "--data", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
                    "--output", str(tmp_path / f"out{i}"), "--method", method, "--seed", str(seed),
                    "--max-length", "64", "--doc-stride", "16", "--no-progress", "--device", "cpu"]) == 3
    assert [name for name, _, _ in heads] == ["zinit", "lora", "full", "zinit"]
    first = heads[0]
    for _, weight, bias in heads[1:3]:
        assert torch.equal(weight, first[1]) and torch.equal(bias, first[2])
    assert not torch.equal(heads[3][1], first[1])  # another --seed, another head
