"""Instruction data in the Alpaca JSON format, shared by the Alpaca recipe and the benchmarks: reading and checking a
file, tokenizing its records in the Alpaca prompt, and the bundled instruction set of the embedded default run.

A file is a JSON list of ``{instruction, input, output}`` records (``input`` optional). The bundled set
(``recipes/data``, made by ``recipes/make_instructions.py``) has a training part and a held-out part.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from zinit.files import read_json
from zinit.lm import format_prompt, tokenize_pair

DATA_DIR = Path(__file__).resolve().parent / "data"
EMBEDDED_TRAIN = DATA_DIR / "instructions_train.json"
EMBEDDED_HELDOUT = DATA_DIR / "instructions_heldout.json"


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


def prompt_of(record: dict[str, str]) -> str:
    """The Alpaca prompt of one record (:func:`zinit.lm.format_prompt`)."""
    return format_prompt(record["instruction"], record.get("input", ""))


def tokenize(records: Sequence[dict[str, str]], tokenizer: Any, max_seq_len: int) -> list[dict[str, list[int]]]:
    """:func:`zinit.lm.tokenize_pair` of each record's Alpaca prompt and output; records with no target token left
    are dropped."""
    items = [tokenize_pair(prompt_of(r), r["output"], tokenizer, max_seq_len) for r in records]
    return [item for item in items if item is not None]
