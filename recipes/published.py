"""Datasets as published on the Hugging Face Hub: read from the Hub where a network exists, from local files in the
same layouts offline, and converted once into each recipe's official format (which the recipes read unchanged).

A recipe's ``--data`` takes, in this order:

(a) a local file or folder in the recipe's own official format: unchanged (``alpaca_data.json``, the SQuAD JSON
    files, a ScienceQA release folder with ``problems.json``);
(b) a local file or folder in the layout of the Hub repository (a ``.parquet`` / ``.json`` / ``.jsonl`` file, or a
    folder as ``hf download OWNER/NAME --repo-type dataset --local-dir DIR`` leaves it): read with
    ``datasets.load_dataset("parquet" | "json", data_files=...)``;
(c) a Hub dataset id ``OWNER/NAME`` (or ``OWNER/NAME@REVISION``) that is not a local path: its data files are
    downloaded once into the Hugging Face cache (:func:`huggingface_hub.snapshot_download`, so ``HF_HUB_OFFLINE``,
    ``HF_HUB_CACHE`` and ``HF_TOKEN`` work as everywhere) and read as in (b). Offline and not cached: an error
    naming the fix (run once with network access, or download elsewhere and pass the folder).

(b) and (c) are converted once into the official format under zinit's data cache (``$ZINIT_CACHE/data``, else
``$XDG_CACHE_HOME/zinit/data``, else ``~/.cache/zinit/data``), keyed by the source files' names, sizes and
modification times: a changed source is converted again, an unchanged one is not.

Reading (b) and (c) needs Hugging Face ``datasets`` (and ``pyarrow``): ``pip install 'zinit[data]'``; (a) needs
neither.

Layouts assumed (the repositories' files and columns, as published in 2023-2025):

- ``tatsu-lab/alpaca``: ``data/train-00000-of-00001-a09b74b3ef9c3b56.parquet``, columns ``instruction, input,
  output, text`` (``text`` is the formatted prompt and is dropped). 52,002 rows.
- ``yahma/alpaca-cleaned``: ``alpaca_data_cleaned.json``, a JSON list of ``{instruction, input, output}``: the
  format of ``alpaca_data.json``, read as it is.
- ``rajpurkar/squad``: ``plain_text/{train,validation}-00000-of-00001.parquet`` (config ``plain_text``);
  ``rajpurkar/squad_v2``: ``squad_v2/{train,validation}-00000-of-00001.parquet`` (config ``squad_v2``). Columns
  ``id, title, context, question, answers``, ``answers`` a struct of two lists ``{text: [str], answer_start:
  [int32]}``; SQuAD 2.0's unanswerable questions have empty lists (its ``plausible_answers`` are not published).
  The folder a file sits in is not relied on: any ``train-*.parquet`` / ``validation-*.parquet`` below the folder.
- ``derek-thomas/ScienceQA``: ``data/{train,validation,test}-00000-of-00001-<hash>.parquet`` (12,726 / 4,241 /
  4,241 rows), columns ``image`` (the ``datasets`` Image feature, stored as a struct ``{bytes, path}`` with the PNG
  embedded, or null for a question without a picture), ``question, choices`` (list of str), ``answer`` (int8,
  0-based), ``hint, task, grade, subject, topic, category, skill, lecture, solution``. The release's ``pid``,
  ``caption`` and the mini splits are not published; ``validation`` is the release's ``val``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Iterator, Sequence

from zinit.errors import ZinitImportError
from zinit.hub import split_repo_id

#: Environment variable naming zinit's cache folder (converted data go to ``$ZINIT_CACHE/data``).
CACHE_ENV = "ZINIT_CACHE"
#: The install that reads published layouts.
EXTRA = "pip install 'zinit[data]'"
#: Data files a Hub dataset repository's snapshot is limited to.
DATA_PATTERNS = ("*.parquet", "*.json", "*.jsonl")
#: Suffixes read through ``datasets``, by builder.
BUILDERS = {".parquet": "parquet", ".json": "json", ".jsonl": "json"}
#: Bumped when a conversion's output changes, so earlier caches are not reused.
FORMAT_VERSION = "1"


class MissingDataExtra(ZinitImportError, RuntimeError):
    """``datasets`` / ``pyarrow`` are not installed (also a RuntimeError, as the earlier parquet reader raised)."""


def require_datasets(what: str) -> ModuleType:
    """The ``datasets`` module, or an error naming ``what`` needed it and the install that brings it."""
    try:
        import datasets
        import pyarrow  # noqa: F401
    except ImportError as exc:
        raise MissingDataExtra(f"reading {what} needs Hugging Face datasets and pyarrow ({exc.name} is missing): "
                               f"{EXTRA} (or: pip install pyarrow datasets); or pass the data in the recipe's "
                               "official format") from None
    return datasets


def hub_id(spec: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``spec`` names a Hub dataset (a string ``OWNER/NAME`` or ``OWNER/NAME@REVISION``
    that is not an existing local path), else None (a :class:`~pathlib.Path` is always local).

    >>> hub_id("tatsu-lab/alpaca"), hub_id("rajpurkar/squad_v2@main"), hub_id("./data/x"), hub_id(Path("a/b"))
    (('tatsu-lab/alpaca', None), ('rajpurkar/squad_v2', 'main'), None, None)
    """
    return split_repo_id(spec) if isinstance(spec, str) else None


def cache_root() -> Path:
    """The folder converted data are cached in: ``$ZINIT_CACHE/data``, else ``$XDG_CACHE_HOME/zinit/data``, else
    ``~/.cache/zinit/data`` (not created here)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "data"
    root = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return root / "zinit" / "data"


def download(repo: str, revision: str | None, what: str) -> Path:
    """The local snapshot of a Hub dataset repository's data files (``*.parquet``, ``*.json``, ``*.jsonl``),
    downloaded first if needed; offline and not cached, a FileNotFoundError naming the fixes."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    label = repo + (f"@{revision}" if revision else "")
    local = f"hf download {repo} --repo-type dataset --local-dir DIR"
    try:
        return Path(snapshot_download(repo, repo_type="dataset", revision=revision,
                                      allow_patterns=list(DATA_PATTERNS)))
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub dataset {repo} has no revision {revision!r}: pass an existing branch, tag or "
                                f"commit ({repo}@REVISION), or drop @{revision}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"--data {label}: there is no local path {label} and no Hub dataset {repo} (or it "
                                "is private or gated and this token cannot read it): check the name, log in (hf auth "
                                f"login), or pass a local file or folder with {what}") from None
    except LocalEntryNotFoundError as exc:
        from huggingface_hub import constants

        why = ("downloads are off (HF_HUB_OFFLINE=1)" if constants.is_offline_mode() else
               f"the Hub cannot be reached ({' '.join(str(exc).split())})")
        raise FileNotFoundError(
            f"--data {label}: there is no local path {label}, and Hub dataset {repo} is not in the Hugging Face cache "
            f"and {why}. Fix: run once with network access (HF_HUB_OFFLINE unset) to download it, or download it "
            f"where a network exists (`{local}`), copy DIR here and pass --data DIR (a folder in the published "
            f"layout, or {what})") from None


def data_files(folder: Path, stem: str | None = None, suffixes: Sequence[str] = (".parquet",)) -> list[Path]:
    """Files below ``folder`` with one of ``suffixes``, sorted by their path in the folder; with ``stem``, only those
    named ``{stem}.{ext}`` or ``{stem}-*.{ext}`` (the Hub's ``train-00000-of-00001-<hash>.parquet``). Hidden folders
    (``.cache`` of ``hf download --local-dir``) are skipped."""
    found = []
    for path in folder.rglob("*"):
        rel = path.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or path.suffix not in suffixes or not path.is_file():
            continue
        name = path.name[:-len(path.suffix)]
        if stem is None or name == stem or name.startswith(stem + "-"):
            found.append(path)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def read_rows(files: Sequence[Path], what: str, columns: Sequence[str], raw_images: Sequence[str] = ()
              ) -> Iterator[dict[str, Any]]:
    """The rows of ``files`` (all parquet, or all JSON / JSON Lines), in file order, through
    ``datasets.load_dataset(builder, data_files=..., streaming=True)`` (no copy of the data is made). Checks that
    ``columns`` are there (the error names the file, the missing and the present columns). ``raw_images``: Image
    columns to yield undecoded, as ``{bytes, path}`` (or None)."""
    if not files:
        raise ValueError(f"{what}: no data files to read")
    builders = {BUILDERS.get(f.suffix) for f in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{what}: cannot read {[str(f) for f in files]} together: expected .parquet files, or "
                         ".json / .jsonl files")
    datasets = require_datasets(what)
    cache = cache_root() / "hf-datasets"  # streaming: only lock files go there
    cache.mkdir(parents=True, exist_ok=True)
    for file in files:  # one at a time, so an error names its file
        ds = datasets.load_dataset(BUILDERS[file.suffix], data_files={"train": [str(file)]}, split="train",
                                   streaming=True, cache_dir=str(cache))
        present = list(ds.column_names) if ds.column_names is not None else None  # None: JSON, known per row
        if present is not None:
            missing = [c for c in columns if c not in present]
            if missing:
                raise ValueError(f"{file} has no column(s) {missing} (it has {present}): {what} needs {list(columns)}")
        for name in raw_images:
            if present is not None and name in present:
                ds = ds.cast_column(name, datasets.Image(decode=False))
        for i, row in enumerate(ds):
            missing = [c for c in columns if c not in row]
            if missing:
                raise ValueError(f"{file}: row {i} has no {missing} (it has {sorted(row)}): {what} needs "
                                 f"{list(columns)}")
            yield row


def source_key(files: Sequence[Path], root: Path, kind: str) -> str:
    """A short hash of what a conversion depends on: ``kind``, :data:`FORMAT_VERSION`, the folder (for a Hub
    snapshot it names the commit) and each source file's path below it, size and modification time."""
    parts: list[Any] = [kind, FORMAT_VERSION, str(root.resolve())]
    for f in files:
        st = f.stat()
        parts.append([f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f), st.st_size,
                      st.st_mtime_ns])
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]


def slug(text: str) -> str:
    """A file-name-safe label (for cache entries).

    >>> slug("derek-thomas/ScienceQA@v1")
    'derek-thomas--ScienceQA-v1'
    """
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text.replace("/", "--")).strip("-") or "data"


def build_once(target: Path, build: Callable[[Path], None], note: str | None = None) -> Path:
    """``target`` (a folder), built by ``build(tmp)`` in a temporary sibling and renamed into place, unless it exists
    already. A crash leaves no half-built ``target``; when two processes build at once, the first rename wins and
    the other's copy is discarded. ``note``: what is converted, said on stderr when the build starts."""
    if target.is_dir():
        return target
    if note:
        print(f"zinit: converting {note} into {target} (once: later runs reuse it)", file=sys.stderr)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def source_files(spec: str | os.PathLike[str], what: str, wanted: Callable[[Path], list[Path]],
                 needs_datasets: bool = True) -> tuple[Path, list[Path], str] | None:
    """Where ``--data spec`` is a published layout: ``(root, files, label)``, the data files ``wanted(root)``
    picks from a local folder, or from the snapshot of the Hub dataset ``spec`` names; a single local data file is
    its own list. None when ``spec`` is neither a folder, a data file nor a Hub id (the recipe's own error follows).
    ``needs_datasets``: a Hub dataset is downloaded only where ``datasets`` can read it (else the error naming the
    extra comes first); False where the repository may hold the recipe's official format (read without it).
    """
    found = hub_id(spec)
    if found is not None:
        if needs_datasets:
            require_datasets(f"Hub dataset {spec}")  # before downloading what could not be read
        root = download(*found, what)
        label = slug(str(spec))
    else:
        path = Path(spec)
        if path.is_file() and path.suffix in BUILDERS:
            return path.parent, [path], slug(path.stem)
        if not path.is_dir():
            return None
        root, label = path, slug(path.resolve().name)
    return root, wanted(root), label
