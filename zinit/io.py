"""Save and load adapters: ``adapter.safetensors`` (canonical keys) + ``zinit.json`` (what the adapter fits), with
an adapter card ``README.md`` beside them; a Hub repo id (``"org/name"``, ``"org/name@revision"``) works wherever a
folder does, and ``save_adapter(..., push_to_hub=...)`` uploads the folder (:mod:`zinit.hub`).

No pickle anywhere: weights are safetensors, the description is JSON (an :class:`~zinit.AdapterConfig` and the
model's sizes, :meth:`~zinit.AdapterConfig.to_json`). Files are written through :mod:`zinit.files`: to a temporary
name in the target folder, then renamed into place, so an interrupted save never leaves a half-written file under
the real name, and with the umask's mode. An adapter's two files are written as a pair: both go to temporary files
first, both carry the same new save id (``zinit.json``'s ``save_id`` field, the safetensors metadata ``save_id``),
and the weights are renamed into place, then the description; an error between the two renames puts the earlier
weights back, and a crash there (power loss, SIGKILL) leaves two files of different saves, which
:func:`load_adapter` refuses ("from different saves"), naming the leftover files that restore either adapter. The
card is staged with the pair and renamed into place after it; it describes the adapter and is never read back by a
load.

The weights stay editable with standard tools: a file rewritten with ``safetensors.torch.save_file`` (a model soup,
a cast to bf16) carries no save id, or the one it was copied with, and loads when its tensor names, shapes and
dtypes fit ``zinit.json`` (:func:`check_weights`). Only a file that says it belongs to another save is refused: a
different save id, or, for a folder written before save ids existed, zinit's metadata without an id on a file whose
sha256 is not the one ``zinit.json`` records.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any, Mapping, Sequence

from safetensors import SafetensorError
from safetensors.torch import load as _load_safetensors, save_file
from torch import Tensor, nn

from ._version import __version__
from .config import (_AGAIN, CARD_NAME, CONFIG_NAME, FORMAT, WEIGHTS_NAME, AdapterConfig, FittedConfig,
                     changed_options, check_fits, check_prompt_format, layer_shapes)
from .registry import Dims
from .files import DISK_FULL, discard, fsync_dir, read_json, stage
from . import hub
from .bank import (PreparedAdapter, build_adapter, install_adapter, named_adapter_config, named_adapter_state_dict,
                   named_state, new_adapter_config, single_only)
from .errors import ZinitKeyError, ZinitValueError
from .inject import adapter_state_dict, eject, inject, injection, is_injected, load_adapter_state_dict

#: The key of the save id, in ``zinit.json`` and in the safetensors metadata of ``adapter.safetensors`` alike.
SAVE_ID = "save_id"


def new_save_id() -> str:
    """A fresh save id: 32 random hex digits, written into both files of one save."""
    return secrets.token_hex(16)


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The ``zinit.json`` description of an injected model's adapter: its :class:`~zinit.AdapterConfig` and the
    model's sizes as JSON, and the zinit version that wrote it."""
    state = injection(model)
    return {**state.config.to_json(state.dims), "zinit_version": __version__}


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], *, name: str | None = None,
                 base_model: str | None = None, command: str | Sequence[str] | None = None,
                 prompt_format: str | None = None, push_to_hub: bool | str = False, revision: str | None = None,
                 private: bool | None = None, token: str | bool | None = None,
                 commit_message: str | None = None) -> Path:
    """Write an injected model's adapter (or, with ``name``, the named adapter of :func:`zinit.add_adapter`) to
    ``directory`` (created if needed) and return the folder. Either way the folder is the same kind: any of them
    loads with :func:`load_adapter` or :func:`zinit.add_adapter`.

    Writes ``adapter.safetensors`` (keys ``layers.{n}.prompt`` / ``layers.{n}.gate``, float32, no gate keys for
    ``gate="none"``, and ``modules.{name}.*`` for inject's ``train_modules``), ``zinit.json`` (format version: the
    lowest the adapter needs, 2 for ``gate="none"`` and 1 otherwise, so older zinit reads what it can compute;
    backbone, hidden size, heads, KV heads, head size, layer count, adapted layers, K, gate, gate_fn, gate_init when
    it is not ``"zero"``, train_modules, visual_dim and
    visual_hidden when there is a visual projection (``visual_proj.*``), zinit version, the base model and the
    training command when known, the save id, and the size and sha256 of the weights file as saved) and
    ``README.md``, the adapter card (:func:`zinit.hub.adapter_card`: Hub metadata, what the adapter is, how to load
    it). The weights' safetensors metadata is ``{"format": "zinit-adapter", "save_id": <the same id>}``: a new
    random id every save, which is how :func:`load_adapter` tells the two files of one save from a torn pair while
    letting the weights be edited (older zinit versions compare the recorded size and sha256 instead).

    ``base_model``: the Hub id of the model it was trained on (default: the model's own ``name_or_path`` when that
    is a repo id, :func:`zinit.hub.base_model_of`). ``command``: the training command (``sys.argv`` or a string),
    shown in the card. ``prompt_format``: how the adapter was trained to be prompted
    (:data:`zinit.config.PROMPT_FORMATS`: ``"alpaca"`` or ``"chat"``), recorded so that ``zinit generate`` and
    ``zinit serve`` prompt it the same way.

    ``push_to_hub``: a repo id (``"org/name"``), or True for one named after the folder (see
    :func:`zinit.hub.push_target`); after the folder is saved it is uploaded with :func:`zinit.push_adapter`
    (``revision`` = the branch to push to, created if needed; ``private``, ``token``, ``commit_message`` as in
    ``huggingface_hub``). If the upload fails, the folder stays saved and the error says how to push it again.

    The files are replaced together: if anything fails (a full disk, Ctrl-C, any error) the adapter that was in the
    folder before is left as it was, and no temporary file stays behind. A full disk raises an OSError (errno
    ``ENOSPC``) that says so and names the folder. Files get the umask's mode (``0o644`` under umask ``022``).

    >>> import tempfile, timm, zinit
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False), layers=2, K=4)
    >>> folder = zinit.save_adapter(vit, tempfile.mkdtemp(), command="zinit train vtab --task svhn")
    >>> sorted(p.name for p in folder.iterdir())
    ['README.md', 'adapter.safetensors', 'zinit.json']
    """
    folder = Path(directory)
    push_id = hub.push_target(folder, push_to_hub) if push_to_hub else None  # a bad repo id fails before writing
    if prompt_format is not None:
        check_prompt_format(prompt_format)
    config, tensors = _to_save(model, name, base_model, command)
    if prompt_format is not None:
        config["prompt_format"] = prompt_format
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_adapter: {folder} is a file; pass a folder (it receives {WEIGHTS_NAME} and "
                                 f"{CONFIG_NAME})")
    _write_folder(folder, config, tensors, push_id)
    if push_id is not None:
        try:
            push_adapter(folder, push_id, revision=revision, private=private, token=token,
                         commit_message=commit_message)
        except Exception as exc:
            reason = " ".join(str(exc).split()) or type(exc).__name__
            if "push_adapter(" not in reason:
                reason += f"; push it again with zinit.push_adapter({str(folder)!r}, {push_id!r})"
            raise OSError(f"the adapter is saved in {folder}, but pushing it to {push_id} failed: {reason}") from exc
    return folder


def _to_save(model: nn.Module, name: str | None, base_model: str | None, command: str | Sequence[str] | None
             ) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``zinit.json``'s content (without the weights' fields) and the tensors (on the CPU) of the injected adapter, or
    of the named adapter ``name``."""
    if name is None:
        config = adapter_config(model)
        state = adapter_state_dict(model)
    else:
        config = {**named_adapter_config(model, name).to_json(named_state(model).dims), "zinit_version": __version__}
        state = named_adapter_state_dict(model, name)
    base = base_model if base_model is not None else hub.base_model_of(model)
    if base:
        config["base_model"] = base
    if command is not None:
        config["command"] = hub.command_text(command)
    return config, {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _write_folder(folder: Path, config: dict[str, Any], tensors: dict[str, Tensor], push_id: str | None) -> None:
    """Write the weights, ``zinit.json`` (with the save id, size and digest) and the card into ``folder``: staged,
    then the pair replaced together and the card after it; nothing changes in the folder if anything fails."""
    staged: list[str] = []
    card_tmp: str | None = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        save_id = new_save_id()
        weights_tmp = stage(folder / WEIGHTS_NAME,
                            lambda tmp: save_file(tensors, tmp, metadata={"format": FORMAT, SAVE_ID: save_id}))
        staged.append(weights_tmp)
        digest, size = _digest(Path(weights_tmp).read_bytes())
        config.update({SAVE_ID: save_id, "weights_bytes": size, "weights_sha256": digest})
        text = json.dumps(config, indent=2) + "\n"
        staged.append(stage(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text)))
        card = hub.adapter_card(config, sum(t.numel() for t in tensors.values()), push_id)
        card_tmp = stage(folder / CARD_NAME, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
        _commit_pair(folder, *staged)
        os.replace(card_tmp, folder / CARD_NAME)  # after the pair: a card never describes weights not in place
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise OSError(exc.errno, f"disk full (no space left on the device) while saving the adapter to {folder}; "
                                     "the adapter there before, if any, is unchanged: free some space and save "
                                     "again") from exc
        raise
    finally:
        for tmp in [*staged, *([card_tmp] if card_tmp else [])]:  # already renamed into place, unless something failed
            discard(tmp)
    fsync_dir(folder)


def _digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def _commit_pair(folder: Path, weights_tmp: str, config_tmp: str) -> None:
    """Rename the staged weights, then the staged description, into place; if the second rename fails, put the
    earlier weights back (they are kept under a second name, a hard link or else a copy, until the pair is in)."""
    weights, config = folder / WEIGHTS_NAME, folder / CONFIG_NAME
    backup: Path | None = None
    if weights.exists():
        backup = folder / f".{WEIGHTS_NAME}.{secrets.token_hex(4)}.previous.tmp"
        try:
            os.link(weights, backup)
        except OSError:  # a file system without hard links: copy (which may itself find the disk full: then
            try:         # nothing has been replaced yet)
                shutil.copyfile(weights, backup)
            except BaseException:
                discard(backup)
                raise
    replaced = committed = False
    try:
        os.replace(weights_tmp, weights)
        replaced = True
        try:
            os.replace(config_tmp, config)
            committed = True
        except BaseException:
            if backup is not None:
                os.replace(backup, weights)  # if this fails too, the backup stays on disk (see below)
                backup = None
            else:
                discard(weights)
            raise
    finally:
        # the earlier weights go only once they are not needed: the pair is in, or nothing was replaced; if
        # putting them back failed, they stay under their .previous.tmp name, which load_adapter's error names
        if backup is not None and (committed or not replaced):
            discard(backup)


def _local(directory: str | os.PathLike[str], revision: str | None, cache_dir: str | os.PathLike[str] | None,
           token: str | bool | None, local_files_only: bool) -> Path:
    """The local folder of ``directory``: itself, or for a Hub repo id its snapshot in the Hugging Face cache."""
    return hub.resolve_adapter(directory, revision=revision, cache_dir=cache_dir, token=token,
                           local_files_only=local_files_only)


def read_adapter_config(directory: str | os.PathLike[str], *, revision: str | None = None,
                        cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                        local_files_only: bool = False) -> dict[str, Any]:
    """Read and check ``zinit.json`` in ``directory``; errors name the file and what is wrong with it.

    Every field the loader uses is checked for its type and range (``"K": "10"`` or ``"layers": "all"`` is an error
    naming the field and the value), as is the folder itself (missing, a file, or another method's weights).

    ``directory`` may be a Hub repo id (``"org/name"``, ``"org/name@revision"``; an existing local path always
    wins): the adapter's files are fetched into the Hugging Face cache first (:func:`zinit.hub.resolve_adapter`;
    ``revision``, ``cache_dir``, ``token``, ``local_files_only`` and ``HF_HUB_OFFLINE`` as in ``huggingface_hub``).

    >>> import tempfile, timm, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> zinit.read_adapter_config(folder)["K"]
    4
    """
    folder = _local(directory, revision, cache_dir, token, local_files_only)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        if folder.is_file():
            raise NotADirectoryError(f"adapter folder {folder} is a file: pass the folder that holds {CONFIG_NAME} and "
                                     f"{WEIGHTS_NAME} ({folder.parent})")
        raise FileNotFoundError(f"adapter folder {folder} does not exist")
    if not path.exists():
        if (folder / "trainable.safetensors").is_file():
            raise FileNotFoundError(f"{folder} holds trainable.safetensors (the weights of another fine-tuning method, "
                                    "written by zinit train --method M), not a zinit adapter: it has no " + CONFIG_NAME)
        raise FileNotFoundError(f"adapter description {path} does not exist (a zinit adapter folder holds "
                                f"{CONFIG_NAME} and {WEIGHTS_NAME}, as zinit.save_adapter writes them)")
    config = read_json(path, f"adapter description ({CONFIG_NAME} beside {WEIGHTS_NAME})", _AGAIN)
    AdapterConfig.from_json(config, str(path))  # checks every field the loader uses
    return config


def _leftovers(folder: Path, name: str) -> list[Path]:
    return sorted(folder.glob(f".{name}.*.tmp"))


def _metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file's bytes (empty when it has none or its header cannot be read)."""
    try:
        size = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + size].decode("utf-8"))
    except ValueError:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        return {}
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return {k: v for k, v in meta.items() if isinstance(v, str)} if isinstance(meta, dict) else {}


def _written_together(config: Mapping[str, Any], data: bytes) -> bool:
    """Whether the description ``config`` was written by the save that wrote the weights ``data``: the same save
    id, or the very bytes it records (its sha256)."""
    theirs = _metadata(data).get(SAVE_ID)
    if theirs is not None and theirs == config.get(SAVE_ID):
        return True
    return config.get("weights_sha256") == _digest(data)[0]


def _different_saves(config: Mapping[str, Any], data: bytes) -> str | None:
    """Why the weights ``data`` and the description ``config`` are from different saves, or None when nothing says
    so (an edited file without zinit's metadata says nothing: its tensors are checked instead).

    The weights name their save in their safetensors metadata; a file written by a zinit from before save ids has
    only ``{"format": "zinit-adapter"}``, and then the sha256 its ``zinit.json`` recorded is the test.
    """
    if config.get("weights_sha256") == _digest(data)[0]:
        return None  # the very file the description was written with
    meta = _metadata(data)
    theirs, ours = meta.get(SAVE_ID), config.get(SAVE_ID)
    if theirs is not None:
        if theirs == ours:
            return None
        if ours is None:
            return f"{WEIGHTS_NAME} has save_id {theirs}, {CONFIG_NAME} has none: it is from an earlier save"
        return f"{WEIGHTS_NAME} has save_id {theirs}, {CONFIG_NAME} has save_id {ours}"
    if meta.get("format") == FORMAT and "weights_sha256" in config:
        return (f"{WEIGHTS_NAME} carries the metadata of a zinit save made before save ids, but its sha256 differs "
                f"from the one {CONFIG_NAME} records")
    return None


def _torn(weights: Path, config: Mapping[str, Any], data: bytes, reason: str) -> ValueError:
    """The error for weights and a description of different saves, naming leftover files of an interrupted save
    that restore a consistent adapter, or else the ways to make the pair whole."""
    folder = weights.parent
    hints = []
    for tmp in _leftovers(folder, CONFIG_NAME):  # the description of these weights, staged but not renamed
        try:
            staged = json.loads(tmp.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(staged, dict) and _written_together(staged, data):
            hints.append(f"{tmp.name} describes these weights: rename it to {CONFIG_NAME} to use them")
    for tmp in _leftovers(folder, WEIGHTS_NAME):  # the weights zinit.json describes, kept while the pair was replaced
        try:
            if _written_together(config, tmp.read_bytes()):
                hints.append(f"{tmp.name} holds the weights {CONFIG_NAME} describes: rename it to {WEIGHTS_NAME} to "
                             "restore the earlier adapter")
        except OSError:
            continue
    if hints:
        fix = "; ".join(hints)
    else:
        ours = config.get(SAVE_ID)
        fix = (f"save the adapter again (zinit.save_adapter), or copy both files of one save into the folder; if you "
               f"wrote {WEIGHTS_NAME} yourself (averaging or editing adapters), write it without metadata "
               "(safetensors.torch.save_file(tensors, path))" +
               (f" or with metadata={{'{SAVE_ID}': '{ours}'}}" if isinstance(ours, str) else ""))
    return ValueError(f"adapter weights {weights} and {folder / CONFIG_NAME} are from different saves ({reason}): a "
                      f"save into {folder} was interrupted between its two renames, or one of the files was copied "
                      f"from another adapter folder; {fix}")


def _extra_groups(config: AdapterConfig) -> dict[str, str]:
    """``{key prefix: the zinit.json field that puts tensors under it}`` for the tensors beside the layers' (their
    exact names and shapes are the model's, checked when they are loaded into it)."""
    groups = {}
    if config.visual_dim is not None:
        groups["visual_proj."] = f"visual_dim={config.visual_dim}"
    for name in config.train_modules:
        groups[f"modules.{name}."] = f"train_modules entry {name!r}"
    if config.bias_scale is not None:
        groups["linears."] = f"bias_scale={config.bias_scale!r}"
    if config.train_norms:
        groups["norms."] = "train_norms=true"
    return groups


def _layout(config: AdapterConfig, dims: Dims) -> str:
    """What ``zinit.json`` says the layers' tensors are, for an error message."""
    gates = {"head": f" and layers.N.gate {[dims.num_heads]}", "layer": " and layers.N.gate [1]"}
    return (f"{CONFIG_NAME} describes layers {list(config.layers)} with K={config.K}, gate={config.gate!r}: keys "
            f"layers.N.prompt {[config.K, dims.hidden_size]}{gates.get(config.gate, ' and no gates')}")


def check_weights(tensors: Mapping[str, Tensor], config: AdapterConfig, dims: Dims,
                  source: str | os.PathLike[str]) -> None:
    """Check that the tensors of an adapter file (``source``, named in the errors) fit its description ``config`` on
    a model of sizes ``dims``:
    floating-point tensors (any float dtype: a load converts them to the adapter's), exactly the layers' keys
    ``config`` implies with the shapes it implies (:func:`layer_shapes`), and the other tensors only under the
    prefixes its fields provide (``visual_proj.*``, ``modules.NAME.*``, ``linears.*``, ``norms.*``).

    Raises:
        ValueError: a tensor that is not floating point, or a layer tensor of another shape (naming the key, its
            shape, and the shape and fields of ``zinit.json``).
        KeyError: missing or unexpected keys, each named with what ``zinit.json`` says; a layer whose tensors are all
            gone gets its own message (what to edit to drop it, or how to switch it off instead).
    """
    for key, value in tensors.items():
        if not value.is_floating_point():
            dtype = str(value.dtype).replace("torch.", "")
            raise ZinitValueError(f"adapter weights {source}: tensor {key!r} has dtype {dtype}; adapter tensors are "
                             f"floating point (zinit writes float32); {_AGAIN}")
    expected = layer_shapes(config, dims)
    groups = _extra_groups(config)
    missing = [k for k in expected if k not in tensors]
    listed = {f"layers.{n}." for n in config.layers}
    unlisted = sorted(k for k in tensors if k.startswith("layers.") and k not in expected
                      and not any(k.startswith(p) for p in listed))
    misnamed = sorted(k for k in tensors if k.startswith("layers.") and k not in expected and k not in unlisted)
    other = sorted(k for k in tensors if not k.startswith("layers.") and not any(k.startswith(p) for p in groups))
    # a visual projection, a task head (inject refuses one without parameters) and trained norms always have
    # tensors; bias/scale ones may in principle be none, and the model's own check names any that are missing
    empty = [p for p in groups if p != "linears." and not any(k.startswith(p) for k in tensors)]
    dropped = [n for n in config.layers if all(k not in tensors for k in expected if k.startswith(f"layers.{n}."))]
    if dropped and len(dropped) < len(config.layers) and not (unlisted or misnamed or other or empty) and all(
            any(k.startswith(f"layers.{n}.") for n in dropped) for k in missing):
        raise ZinitKeyError(_dropped_message(source, config, dropped, missing))
    if missing or unlisted or misnamed or other or empty:
        parts = []
        if missing:
            parts.append(f"missing keys {missing} ({_layout(config, dims)})")
        if unlisted:
            parts.append(f"unexpected keys {unlisted} ({CONFIG_NAME} lists layers {list(config.layers)}: to add a "
                         "layer's adapter, add its index to 'layers' there)")
        if misnamed:
            parts.append(f"unexpected keys {misnamed} ({_layout(config, dims)})")
        if other:
            where = (f"describes layers.N.* and {', '.join(f'{p}* ({why})' for p, why in groups.items())} only"
                     if groups else "has no train_modules, visual_dim, bias_scale or train_norms: its keys are "
                                    "layers.N.* only")
            parts.append(f"unexpected keys {other} ({CONFIG_NAME} {where})")
        for prefix in empty:
            parts.append(f"no {prefix}* tensors, which {groups[prefix]} in {CONFIG_NAME} needs")
        raise ZinitKeyError(f"{source} does not fit {CONFIG_NAME} beside it: {'; '.join(parts)}; make the two agree: add "
                       f"or remove those tensors, or correct {CONFIG_NAME}")
    for key, shape in expected.items():
        got = tuple(tensors[key].shape)
        if got != shape:
            if key.endswith(".prompt"):
                why, fields_ = f"K={config.K}, hidden_size={dims.hidden_size}", "K"
            else:
                why = f"gate={config.gate!r}" + (f", num_heads={dims.num_heads}" if config.gate == "head" else "")
                fields_ = "gate"
            raise ZinitValueError(f"{source}: tensor {key!r} has shape {list(got)}; {CONFIG_NAME} beside it ({why}) says "
                             f"{list(shape)}; write the tensor in that shape, or correct {fields_} in {CONFIG_NAME}")


def _dropped_message(source: str | os.PathLike[str], config: AdapterConfig, dropped: list[int],
                     missing: list[str]) -> str:
    """The error for layers whose tensors are all gone while ``zinit.json`` still lists them: what to edit to drop
    them, or how to switch them off instead (a gate of zeros adds nothing, whatever the gate function)."""
    which = ", ".join(map(str, dropped))
    gates = ", ".join(f"layers.{n}.gate" for n in dropped)
    if len(dropped) == 1:
        head = f"layer {which}"
        drop, keep = "that layer's adapter", "to keep it, put its tensors back"
        switch = f"to switch it off and keep the file whole, keep its tensors and set its gate ({gates}) to zeros"
    else:
        head = f"layers {which}"
        drop, keep = "those layers' adapters", "to keep them, put their tensors back"
        switch = (f"to switch them off and keep the file whole, keep their tensors and set their gates ({gates}) to "
                  "zeros")
    return (f"{source}: no tensors for {head} (missing keys {missing}), which {CONFIG_NAME} beside it lists in "
            f"'layers': {list(config.layers)}; to drop {drop}, remove {which} from 'layers' in {CONFIG_NAME} too; "
            f"{keep if config.gate == 'none' else switch}")


def _read_weights(weights: Path, config: Mapping[str, Any], adapter: FittedConfig) -> dict[str, Tensor]:
    """The tensors of ``adapter.safetensors``, checked: a readable safetensors file, of the same save as
    ``zinit.json`` (:func:`_different_saves`), whose tensors fit ``adapter`` (:func:`check_weights`); errors name
    the file and the fix."""
    data = weights.read_bytes()
    try:
        if not data:
            raise SafetensorError("the file is empty (0 bytes)")
        tensors = _load_safetensors(data)
    except SafetensorError as exc:
        recorded = config.get("weights_bytes")
        size_note = f"; it is {len(data)} bytes, {CONFIG_NAME} records {recorded}" if recorded not in (
            None, len(data)) else ""
        raise ZinitValueError(f"adapter weights {weights} cannot be read as safetensors: {exc}{size_note}; "
                         f"{_AGAIN}") from None
    reason = _different_saves(config, data)
    if reason is not None:
        raise _torn(weights, config, data, reason)
    check_weights(tensors, adapter.config, adapter.dims, weights)
    return tensors


def read_adapter(directory: str | os.PathLike[str], *, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                 local_files_only: bool = False) -> tuple[FittedConfig, dict[str, Any]]:
    """The :class:`~zinit.config.FittedConfig` (the resolved :class:`~zinit.AdapterConfig` and the sizes of the model
    it fits) and the tensors of an adapter folder (or Hub repo id, as for
    :func:`read_adapter_config`), both checked: the description's fields, the two files being of one save, and the
    tensors' names, shapes and dtypes against the description (:func:`check_weights`); errors name the file and the
    fix. Nothing is loaded anywhere. Other files in the folder (the ``README.md`` card) are not read.

    Tensors come as stored (an edited file may hold bf16 or float16: loading converts them).

    >>> import tempfile, timm, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> (config, dims), tensors = read_adapter(folder)
    >>> config.K, dims.hidden_size, sorted(tensors)[:2]
    (4, 192, ['layers.10.gate', 'layers.10.prompt'])
    """
    folder = _local(directory, revision, cache_dir, token, local_files_only)
    config = read_adapter_config(folder)
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (the folder has {CONFIG_NAME} but no weights); {_AGAIN}")
    adapter = AdapterConfig.from_json(config, str(folder / CONFIG_NAME))
    return adapter, _read_weights(weights, config, adapter)


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_adapter(model: nn.Module, directory: str | os.PathLike[str], *, revision: str | None = None,
                 cache_dir: str | os.PathLike[str] | None = None, token: str | bool | None = None,
                 local_files_only: bool = False) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return the model.

    ``directory`` is the adapter folder, or a Hub repo id: ``"org/name"`` or ``"org/name@revision"`` (an existing
    local path always wins), fetched into the Hugging Face cache by :func:`zinit.hub.resolve_adapter` (only the
    adapter's files; ``revision``, ``cache_dir``, ``token``, ``local_files_only`` and ``HF_HUB_OFFLINE=1`` as in
    ``huggingface_hub``), then checked exactly as a local folder is.

    A model that is not injected yet is injected as ``zinit.json`` says; an injected one must have the same layers,
    K, gate, gate_fn and gate_init (every :class:`~zinit.AdapterConfig` field). A model whose sizes differ from the
    file's raises a ValueError naming the field and both values. The weights must be of the same save as
    ``zinit.json`` (both carry its save id; a pair of two saves, from an interrupted save or a copied file, is
    refused naming both ids and the fix) and hold floating-point tensors with exactly the keys and shapes
    ``zinit.json`` implies (:func:`check_weights`: a KeyError names the missing and unexpected keys, a ValueError a
    wrong shape and the one expected). A weights file edited with safetensors (an average of adapters, values
    changed, a cast to bf16) loads as long as it fits, converted to the adapter's dtype. If anything fails, a model
    this call injected is ejected again and the model's adapter is unchanged.

    >>> import tempfile, timm, torch, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> fresh = zinit.load_adapter(timm.create_model("vit_tiny_patch16_224"), folder)
    >>> zinit.injection(fresh).layers
    (10, 11)
    """
    folder = _local(directory, revision, cache_dir, token, local_files_only)
    (wanted, dims), tensors = read_adapter(folder)
    check_fits(wanted, dims, model, directory)
    injected_here = not is_injected(model)
    if injected_here:
        inject(model, wanted)
    else:
        differ = injection(model).config.differences(wanted)
        if differ:
            key, (have, want) = next(iter(differ.items()))
            others = f" (also {', '.join(list(differ)[1:])})" if len(differ) > 1 else ""
            raise ZinitValueError(
                f"adapter/model mismatch on {key}: the adapter in {directory} has {key}={_shown(want)}, "
                f"the model is injected with {key}={_shown(have)}{others}; eject it first or load into a fresh model"
            )
    try:
        try:
            load_adapter_state_dict(model, tensors)
        except KeyError as exc:
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            raise ZinitKeyError(f"{folder / WEIGHTS_NAME}: {message}") from None
    except BaseException:
        if injected_here:
            eject(model)
        raise
    return model


def prepare_adapter(model: nn.Module, name: str, source: str | os.PathLike[str] | AdapterConfig | None = None, *,
                    layers: int | Sequence[int] | None = None, K: int | None = None, gate: str = "head",
                    gate_fn: str = "tanh", backbone: str | None = None,
                    gate_init: str = "zero") -> PreparedAdapter:
    """Read, check and build the named adapter :func:`add_adapter` would add (same arguments), without touching
    ``model``: the files are read and every untrusted field of ``zinit.json`` is checked against the model and
    against the weights' shapes before any tensor of those sizes is allocated. Safe to call from another thread
    while the model runs forwards; :func:`zinit.bank.install_adapter` attaches the result.

    >>> import timm, zinit
    >>> from zinit.bank import install_adapter
    >>> vit = timm.create_model("vit_tiny_patch16_224")
    >>> prepared = prepare_adapter(vit, "a", layers=2, K=4)
    >>> zinit.adapter_names(vit), zinit.adapter_names(install_adapter(vit, prepared))
    ([], ['a'])
    """
    if source is None:
        if layers is None or K is None:
            raise ZinitValueError("add_adapter needs an adapter folder, or layers= and K= for a new zero-init adapter")
        config = new_adapter_config(model, layers, K, gate=gate, gate_fn=gate_fn, backbone=backbone,
                                    gate_init=gate_init)
        return build_adapter(model, name, config)
    if layers is not None or K is not None:
        raise ZinitValueError("add_adapter takes either an adapter folder or layers= and K= for a new adapter, not both")
    changed = changed_options(prepare_adapter, {"gate": gate, "gate_fn": gate_fn, "backbone": backbone,
                                                "gate_init": gate_init})
    if changed:
        raise ZinitValueError(f"add_adapter(model, name, source) takes every option from the source; drop {changed} "
                              "(or change them in an AdapterConfig with config.replace(...))")
    if isinstance(source, AdapterConfig):  # a new zero-init adapter of that configuration, of the model's sizes
        return build_adapter(model, name, source)
    (config, dims), tensors = read_adapter(source)  # check_weights: the tensors fit zinit.json before anything is built
    why = single_only(config)
    if why is not None:
        raise ZinitValueError(f"the adapter in {source} has {why}: load it alone with zinit.load_adapter")
    check_fits(config, dims, model, source, "add it to the model it was trained on")
    return build_adapter(model, name, config, tensors, source)


def add_adapter(model: nn.Module, name: str, source: str | os.PathLike[str] | AdapterConfig | None = None, *,
                layers: int | Sequence[int] | None = None, K: int | None = None, gate: str = "head",
                gate_fn: str = "tanh", backbone: str | None = None, gate_init: str = "zero") -> nn.Module:
    """Add a named adapter to ``model`` (frozen on the first one) and return the model.

    ``source`` is an adapter folder written by :func:`zinit.save_adapter` or a Hub repo id (its ``zinit.json`` says
    the layers, K and gate; the model's sizes must match), or an :class:`~zinit.AdapterConfig` for a new zero-init
    adapter of that configuration. Without a source, a new zero-init adapter is made from ``layers`` and ``K`` (and
    the gate options), for training several adapters on one model (multi-task batches).

    Adapters of different K, layers and gate options mix freely (``gate_init="random"`` too: a new adapter's gate
    then starts drawn from N(0, 1), as :func:`zinit.inject` draws it). Adapters with image features, a trained task
    head, no gate or LLaMA-Adapter V2's additions (``visual_dim``, ``train_modules``, ``gate="none"``, whose prompt
    keys join the tokens' softmax and so cannot be mixed per row, ``bias_scale``/``train_norms``, which change shared
    layers) are single-adapter only (:func:`zinit.bank.single_only`): load those with :func:`zinit.load_adapter`.

    The same as :func:`zinit.bank.install_adapter` of :func:`prepare_adapter`: a server reads and builds an adapter
    off its decoding thread with the first and attaches it between forwards with the second.

    >>> import torch, timm, zinit
    >>> vit = timm.create_model("vit_tiny_patch16_224")
    >>> _ = zinit.add_adapter(vit, "birds", layers=2, K=4)
    >>> _ = zinit.add_adapter(vit, "cars", layers=[5, 11], K=8, gate="layer")
    >>> with torch.no_grad(), zinit.use_adapters(vit, ["birds", "cars", None]):
    ...     out = vit(torch.randn(3, 3, 224, 224))
    >>> zinit.adapter_names(vit), tuple(out.shape)
    (['birds', 'cars'], (3, 1000))
    """
    prepared = prepare_adapter(model, name, source, layers=layers, K=K, gate=gate, gate_fn=gate_fn,
                               backbone=backbone, gate_init=gate_init)
    return install_adapter(model, prepared)


def _described(folder: Path) -> tuple[dict[str, Any], int]:
    """``zinit.json``'s content and the adapter's parameter count, after every check a load makes."""
    _, tensors = read_adapter(folder)
    return read_json(folder / CONFIG_NAME, "adapter description"), sum(t.numel() for t in tensors.values())


def write_card(folder: str | os.PathLike[str], repo_id: str | None = None) -> Path:
    """(Re)write the ``README.md`` card of an adapter folder from its ``zinit.json`` and weights (both checked
    first, as a load checks them; :func:`zinit.hub.adapter_card` renders it), atomically; returns its path.

    >>> import tempfile, timm, zinit
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224", depth=2), 2, 4)
    >>> folder = zinit.save_adapter(vit, tempfile.mkdtemp())
    >>> "| prompt length K | 4 |" in write_card(folder, "me/vit-adapter").read_text()
    True
    """
    config, parameters = _described(Path(folder))
    return hub.write_card_text(Path(folder), hub.adapter_card(config, parameters, repo_id))


def push_adapter(folder: str | os.PathLike[str], repo_id: str, *, revision: str | None = None,
                 private: bool | None = None, token: str | bool | None = None, commit_message: str | None = None,
                 extra_files: Sequence[str] = ()) -> "hub.CommitInfo":
    """Upload an adapter folder (``zinit.json``, ``adapter.safetensors``, ``README.md``, and ``extra_files``) to
    the Hub repo ``repo_id`` and return the commit (:class:`huggingface_hub.CommitInfo`).

    The folder is checked first as a load checks it (a broken adapter is never uploaded), then uploaded by
    :func:`zinit.hub.upload_adapter`: ``create_repo`` (``exist_ok=True``; ``private`` applies to a new repo), a branch
    when ``revision`` names one, ``upload_folder``. A folder without a card gets one; a card zinit wrote and nobody
    edited is rewritten to name ``repo_id``; an edited card is uploaded as it is. ``token``: as everywhere in
    ``huggingface_hub`` (default: the login of ``hf auth login`` or ``HF_TOKEN``).

    >>> import tempfile
    >>> push_adapter(tempfile.mkdtemp(), "my-org/nothing")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    FileNotFoundError: adapter description ... does not exist ...
    """
    config, parameters = _described(Path(folder))  # the folder is checked before anything is sent
    return hub.upload_adapter(folder, repo_id, config, parameters, revision=revision, private=private, token=token,
                              commit_message=commit_message, extra_files=extra_files)
