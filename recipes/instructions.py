"""Instruction data in the Alpaca JSON format, shared by the Alpaca recipe and the benchmarks: reading and checking a
file, tokenizing its records in the Alpaca prompt, and the bundled instruction set of the embedded default run.

A file is a JSON list of ``{instruction, input, output}`` records (``input`` optional). The bundled set
(``recipes/data``, made by ``recipes/make_instructions.py``) has a training part and a held-out part.
:func:`resolve_data` also takes the published layouts (:mod:`zinit.recipes.published`): ``tatsu-lab/alpaca``'s
parquet, ``yahma/alpaca-cleaned``'s JSON, a local copy of either, or the Hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from zinit.files import atomic_write, read_json
from zinit.lm import adds_special_tokens, chat_answer, format_prompt, tokenize_pair

from . import published

DATA_DIR = Path(__file__).resolve().parent / "data"
EMBEDDED_TRAIN = DATA_DIR / "instructions_train.json"
EMBEDDED_HELDOUT = DATA_DIR / "instructions_heldout.json"
#: The seven task families of the bundled set, by their instruction (``make_instructions`` writes them).
FAMILIES = {
    "What is the capital of this country?": "capital",
    "Give the opposite of this word.": "opposite",
    "Which of the two numbers is larger?": "larger",
    "Write this number in words.": "number in words",
    "What is the first letter of this word?": "first letter",
    "Write this word in capital letters.": "capitals",
    "What is the next number in this sequence?": "next in sequence",
}


def family_of(record: dict[str, str]) -> str | None:
    """The task family of a record of the bundled set (:data:`FAMILIES`), None for any other instruction.

    >>> family_of({"instruction": "Write this word in capital letters.", "input": "meadow", "output": "MEADOW"})
    'capitals'
    """
    return FAMILIES.get(record.get("instruction", ""))
#: What ``--data`` of the Alpaca recipe takes, for error messages.
ACCEPTS = ("alpaca_data.json (a JSON list of {instruction, input, output}), a parquet or JSON Lines file with "
           "those columns, a folder as downloaded from the Hub (tatsu-lab/alpaca: data/train-*.parquet; "
           "yahma/alpaca-cleaned: alpaca_data_cleaned.json), or a Hub dataset id OWNER/NAME")
#: JSON files of a dataset repository that are metadata, not data.
METADATA_JSON = {"dataset_infos.json", "dataset_info.json", "state.json", "dataset_dict.json"}


def resolve_data(spec: str | Path) -> Path:
    """The Alpaca JSON file ``--data spec`` stands for (:mod:`zinit.recipes.published`):

    - a ``.json`` file (``alpaca_data.json``, yahma/alpaca-cleaned's ``alpaca_data_cleaned.json``: a JSON list of
      records): itself, unchanged;
    - a ``.parquet`` / ``.jsonl`` file with columns ``instruction``, ``output`` (and ``input``; other columns such
      as tatsu-lab/alpaca's ``text`` are dropped): converted once into an Alpaca JSON file in zinit's data cache;
    - a folder laid out as a Hub dataset repository: its ``train-*.parquet`` files (``data/`` in tatsu-lab/alpaca),
      else its one data file (``alpaca_data_cleaned.json`` in yahma/alpaca-cleaned), read as above;
    - a Hub dataset id ``OWNER/NAME[@REVISION]`` that is no local path: its data files, downloaded once into the
      Hugging Face cache, read as a folder (offline and not cached: an error naming the fix).

    Any other path is returned as it is (reading it then says it does not exist).

    >>> resolve_data(EMBEDDED_TRAIN) == EMBEDDED_TRAIN
    True
    """
    path = Path(spec)
    if path.is_file() and path.suffix == ".json":
        return path
    found = published.source_files(spec, ACCEPTS, _alpaca_files, needs_datasets=False)  # JSON needs none
    if found is None:
        return path
    root, files, label = found
    if len(files) == 1 and files[0].suffix == ".json":
        return files[0]  # yahma/alpaca-cleaned: the official format already
    target = published.cache_root() / "alpaca" / f"{label}-{published.source_key(files, root, 'alpaca')}.json"
    if target.is_file():
        return target
    records = [_record(row, i, files) for i, row in enumerate(
        published.read_rows(files, f"Alpaca data {spec}", ("instruction", "output")))]
    if not records:
        raise ValueError(f"--data {spec}: {[str(f) for f in files]} hold no rows")
    target.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(records)
    atomic_write(target, lambda tmp: Path(tmp).write_text(text))
    return target


def _alpaca_files(root: Path) -> list[Path]:
    """The data files of a folder in a Hub repository's layout: ``train-*.parquet`` (any folder below), else the one
    parquet / JSON / JSON Lines data file; several candidates and no train split are an error naming them."""
    train = published.data_files(root, "train")
    if train:
        return train
    candidates = [f for f in published.data_files(root, suffixes=tuple(published.BUILDERS))
                  if f.name not in METADATA_JSON]
    if len(candidates) == 1:
        return candidates
    if not candidates:
        raise FileNotFoundError(f"folder {root} holds no Alpaca data: expected {ACCEPTS}")
    names = ", ".join(str(f.relative_to(root)) for f in candidates)
    raise ValueError(f"folder {root} holds several data files ({names}) and no train-*.parquet: pass the one to "
                     "train on with --data FILE")


def _record(row: dict[str, Any], index: int, files: Sequence[Path]) -> dict[str, str]:
    """One Alpaca record of a published row: ``instruction``, ``input`` (null: empty), ``output``; other columns
    dropped. A non-string value is an error naming the row and the files."""
    record = {"instruction": row.get("instruction"), "input": row.get("input") or "", "output": row.get("output")}
    for key, value in record.items():
        if not isinstance(value, str):
            where = files[0] if len(files) == 1 else [str(f) for f in files]
            raise ValueError(f"{where}: row {index} has a {type(value).__name__} {key!r}, not a string: fix the "
                             "row or drop it")
    return record


def load_records(path: str | Path) -> list[dict[str, str]]:
    """Read and check an Alpaca JSON file; errors name the file and the record that is wrong.

    >>> len(load_records(EMBEDDED_TRAIN)) > 100
    True
    """
    path = Path(path)
    records = read_json(path, "Alpaca data file")
    if not isinstance(records, list) or not records:
        raise ValueError(f"{path} must hold a non-empty JSON list of {{instruction, input, output}} records")
    for i, r in enumerate(records):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: record {i} is a {type(r).__name__}, not an object")
        for key in ("instruction", "output"):
            if not isinstance(r.get(key), str):
                raise ValueError(f"{path}: record {i} has no string {key!r} (keys: {sorted(r)})")
        if not isinstance(r.get("input", ""), str):
            raise ValueError(f"{path}: record {i} has a non-string 'input'")
    return records


def prompt_of(record: dict[str, str], prompt_format: str = "alpaca", tokenizer: Any = None) -> str:
    """The prompt of one record in ``prompt_format`` (:func:`zinit.lm.format_prompt`: the Alpaca prompt, or one user
    turn of the tokenizer's chat template)."""
    return format_prompt(record["instruction"], record.get("input", ""), prompt_format, tokenizer)


def tokenize(records: Sequence[dict[str, str]], tokenizer: Any, max_seq_len: int,
             prompt_format: str = "alpaca") -> list[dict[str, list[int]]]:
    """:func:`zinit.lm.tokenize_pair` of each record's prompt (in ``prompt_format``) and output (in the ``"chat"``
    format the assistant's turn as the template ends it, :func:`zinit.lm.chat_answer`); records with no target token
    left are dropped."""
    special = adds_special_tokens(prompt_format)
    items = []
    for r in records:
        prompt = prompt_of(r, prompt_format, tokenizer)
        answer, ends_turn = ((r["output"], False) if prompt_format != "chat" else
                             chat_answer(tokenizer, r["instruction"], r.get("input", ""), r["output"], prompt))
        items.append(tokenize_pair(prompt, answer, tokenizer, max_seq_len, add_special_tokens=special,
                                   ends_turn=ends_turn))
    return [item for item in items if item is not None]
