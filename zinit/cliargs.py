"""Checks for command-line values, shared by the ``zinit`` command and every recipe.

Each validator is an ``argparse`` ``type=``: a bad value stops the command before anything is loaded, with one line
that names the option, the rule and the value, e.g. ``zinit train vtab: error: argument --K: must be an int >= 1,
got 0``. Floats must be finite (``nan`` and ``inf`` are refused everywhere).

>>> import argparse
>>> p = argparse.ArgumentParser(prog="demo")
>>> _ = p.add_argument("--K", type=prompt_length, default=10)
>>> p.parse_args(["--K", "4"]).K
4
>>> prompt_length("0")
Traceback (most recent call last):
  ...
argparse.ArgumentTypeError: must be an int in 1..4096 (the prompt length per layer; the paper uses 10), got 0
"""

from __future__ import annotations

import argparse
import math
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Sequence

#: The longest prompt the commands accept: the paper uses 10, and K × hidden size × layers float32 values must fit.
MAX_K = 4096
#: Files one of which a local model folder needs for ``AutoTokenizer.from_pretrained``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


def _shown(text: str) -> str:
    return text if text.strip() else repr(text)


def int_at_least(minimum: int, note: str = "") -> Callable[[str], int]:
    """A validator for an int >= ``minimum``; ``note`` is appended to the message in parentheses."""
    extra = f" ({note})" if note else ""

    def check(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}{extra}, got {_shown(text)}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an int >= {minimum}{extra}, got {_shown(text)}")
        return value

    check.__name__ = f"int_at_least_{minimum}"
    return check


def int_between(minimum: int, maximum: int, note: str = "") -> Callable[[str], int]:
    """A validator for an int in ``minimum..maximum``; ``note`` is appended to the message in parentheses."""
    extra = f" ({note})" if note else ""

    def check(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            value = None
        if value is None or not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be an int in {minimum}..{maximum}{extra}, got {_shown(text)}")
        return value

    check.__name__ = f"int_between_{minimum}_{maximum}"
    return check


def _float(text: str, rule: str, ok: Callable[[float], bool]) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {_shown(text)}")
    return value


def option(flag: str, type_: Callable[[str], Any] | None, help_: str, **argparse_keywords: Any) -> dict[str, Any]:
    """The ``metadata`` of a dataclass field that is also a command-line option (litgpt's style: a setting declares
    its flag once, beside its default): the flag, its argparse ``type`` and ``help``, and any other argparse keyword
    (``default=`` when the command line's default differs from the field's). :func:`options_of` reads them back.

    >>> from dataclasses import dataclass, field
    >>> @dataclass
    ... class Settings:
    ...     epochs: float = field(default=5.0, metadata=option("--epochs", float, "epochs (default %(default)s)"))
    >>> options_of(Settings)
    {'epochs': ('--epochs', {'type': <class 'float'>, 'help': 'epochs (default %(default)s)', 'default': 5.0})}
    """
    keywords = {"type": type_, "help": help_, **argparse_keywords}
    return {"cli": (flag, {k: v for k, v in keywords.items() if v is not None or k == "default"})}


def options_of(cls: type) -> dict[str, tuple[str, dict[str, Any]]]:
    """``{field: (flag, argparse keywords)}`` of the fields of the dataclass ``cls`` declared with :func:`option`,
    each option's default the field's own unless the option names another."""
    out = {}
    for f in fields(cls):
        if "cli" in f.metadata:
            flag, keywords = f.metadata["cli"]
            out[f.name] = (flag, {**keywords, "default": keywords.get("default", f.default)})
    return out


def positive_int(text: str) -> int:
    """An int >= 1 (a count, a length, a batch size)."""
    return int_at_least(1)(text)


def positive_float(text: str) -> float:
    """A finite float > 0 (a learning rate, a number of epochs)."""
    return _float(text, "a number > 0", lambda v: v > 0)


def nonneg_float(text: str) -> float:
    """A finite float >= 0 (weight decay, warmup epochs, minutes)."""
    return _float(text, "a number >= 0", lambda v: v >= 0)


def finite_float(text: str) -> float:
    """Any finite float (a threshold)."""
    return _float(text, "a finite number", lambda v: True)


def unit_float(text: str) -> float:
    """A float in (0, 1] (top-p, a fraction)."""
    return _float(text, "a number in (0, 1]", lambda v: 0 < v <= 1)


#: ``--K``: the prompt length.
prompt_length = int_between(1, MAX_K, "the prompt length per layer; the paper uses 10")
#: ``--layers``: how many of the top layers to adapt (values above the model's depth mean all of them).
layer_count = int_at_least(1, "the number of top layers to adapt; more than the model has means all")


def float_list(text: str, flag: str, check: Callable[[float], bool] = math.isfinite, rule: str = "numbers"
               ) -> tuple[float, ...]:
    """Comma-separated numbers (``1e-3,1e-2``) for ``flag``; each must pass ``check`` (a ValueError names the bad
    value otherwise)."""
    values = []
    for part in (v.strip() for v in str(text).split(",")):
        if not part:
            continue
        try:
            value = float(part)
        except ValueError:
            raise ValueError(f"{flag} {text!r}: {part!r} is not a number; expected comma-separated {rule}, "
                             "e.g. 1e-3,1e-2") from None
        if not math.isfinite(value) or not check(value):
            raise ValueError(f"{flag} {text!r}: {part} is not allowed; expected comma-separated {rule}")
        values.append(value)
    if not values:
        raise ValueError(f"{flag} is empty: expected comma-separated {rule}, e.g. 1e-3,1e-2")
    return tuple(values)


def check_model_folder(name_or_path: str | None, tokenizer: bool = True) -> None:
    """Refuse, before any loading, a ``--model`` that is a local path which does not exist, is a file, or (with
    ``tokenizer``) is a model folder without tokenizer files. Hub ids (``owner/name``) and None pass unchecked.

    >>> check_model_folder(None)
    >>> check_model_folder("/nonexistent/model")
    Traceback (most recent call last):
      ...
    FileNotFoundError: --model /nonexistent/model: no such folder
    """
    if name_or_path is None:
        return
    path = Path(name_or_path).expanduser()
    local = path.exists() or name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.count("/") > 1
    if not local:
        return
    if not path.exists():
        raise FileNotFoundError(f"--model {name_or_path}: no such folder")
    if not path.is_dir():
        raise NotADirectoryError(f"--model {name_or_path} is a file: pass the model's folder (config.json, weights "
                                 "and tokenizer files)")
    if tokenizer and not any((path / name).is_file() for name in TOKENIZER_FILES) \
            and not any(path.glob("*.gguf")):
        raise FileNotFoundError(
            f"--model {name_or_path} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): save the base "
            "model's tokenizer into it (tokenizer.save_pretrained(folder)) or pass the original model folder")


def option_value(argv: Sequence[str], flag: str) -> str | None:
    """The value given to ``flag`` in a list of command-line words (``--flag V`` or ``--flag=V``; the last one
    wins, as argparse does), or None.

    >>> option_value(["--epochs", "3", "--data=a.json", "--epochs", "4"], "--epochs")
    '4'
    >>> option_value(["--data=a.json"], "--data"), option_value([], "--data")
    ('a.json', None)
    """
    found = None
    for i, word in enumerate(argv):
        if word == flag and i + 1 < len(argv):
            found = argv[i + 1]
        elif word.startswith(flag + "="):
            found = word.split("=", 1)[1]
    return found


def without_options(argv: Sequence[str], flags: Sequence[str]) -> list[str]:
    """``argv`` without the options ``flags`` and their values (``--flag V`` and ``--flag=V``).

    >>> without_options(["--data", "a", "--epochs", "3", "--eval-data=b"], ["--data", "--eval-data"])
    ['--epochs', '3']
    """
    out, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word in flags:
            skip = True
        elif not any(word.startswith(f + "=") for f in flags):
            out.append(word)
    return out
