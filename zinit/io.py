"""Save and load adapters: ``adapter.safetensors`` (canonical keys) + ``zinit.json`` (what the adapter fits).

No pickle anywhere: weights are safetensors, the description is JSON (an :class:`~zinit.AdapterConfig`). Files
are written through :mod:`zinit.files`: to a temporary name in the target folder, then renamed into place, so an
interrupted save never leaves a half-written file under the real name, and with the umask's mode. An adapter's two
files are written as a pair: both go to temporary files first, ``zinit.json`` records the size and sha256 of the
weights it describes, and the weights are renamed into place, then the description; an error between the two renames
puts the earlier weights back, and a crash there (power loss, SIGKILL) is detected by
:func:`load_adapter`, which then names the leftover files that restore either adapter.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.torch import load as _load_safetensors, save_file
from torch import nn

from ._version import __version__
from .config import _AGAIN, DIM_FIELDS, FORMAT_VERSION, AdapterConfig  # noqa: F401 - FORMAT_VERSION re-exported
from .files import DISK_FULL, discard, fsync_dir, read_json, stage
from .inject import adapter_state_dict, eject, inject, injection, is_injected, load_adapter_state_dict
from .registry import Backbone, get_backbone

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "zinit.json"


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The ``zinit.json`` description of an injected model's adapter: its :class:`~zinit.AdapterConfig` as JSON,
    and the zinit version that wrote it."""
    return {**injection(model).config.to_json(), "zinit_version": __version__}


def save_adapter(model: nn.Module, directory: str | os.PathLike[str], *, name: str | None = None) -> Path:
    """Write an injected model's adapter (or, with ``name``, the named adapter of :func:`zinit.add_adapter`) to
    ``directory`` (created if needed) and return the folder. Either way the folder is the same kind: any of them
    loads with :func:`load_adapter` or :func:`zinit.add_adapter`.

    Writes ``adapter.safetensors`` (keys ``layers.{n}.prompt`` / ``layers.{n}.gate``, float32, and
    ``modules.{name}.*`` for inject's ``train_modules``) and ``zinit.json`` (format version, backbone, hidden size,
    heads, KV heads, head size, layer count, adapted layers, K, gate, gate_fn, train_modules, visual_dim and
    visual_hidden when there is a visual projection (``visual_proj.*``), zinit version, and the size and sha256 of
    the weights file it describes).

    The pair is replaced together: if anything fails (a full disk, Ctrl-C, any error) the adapter that was in the
    folder before is left as it was, and no temporary file stays behind. A full disk raises an OSError (errno
    ``ENOSPC``) that says so and names the folder. Files get the umask's mode (``0o644`` under umask ``022``).

    >>> import tempfile, timm, zinit
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False), layers=2, K=4)
    >>> folder = zinit.save_adapter(vit, tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter.safetensors', 'zinit.json']
    """
    if name is None:
        config = adapter_config(model)
        state = adapter_state_dict(model)
    else:
        from .bank import named_adapter_config, named_adapter_state_dict

        config = {**named_adapter_config(model, name).to_json(), "zinit_version": __version__}
        state = named_adapter_state_dict(model, name)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_adapter: {folder} is a file; pass a folder (it receives {WEIGHTS_NAME} and "
                                 f"{CONFIG_NAME})")
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    staged: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        weights_tmp = stage(folder / WEIGHTS_NAME,
                             lambda tmp: save_file(tensors, tmp, metadata={"format": "zinit-adapter"}))
        staged.append(weights_tmp)
        digest, size = _digest(Path(weights_tmp).read_bytes())
        config.update(weights_bytes=size, weights_sha256=digest)
        text = json.dumps(config, indent=2) + "\n"
        staged.append(stage(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text)))
        _commit_pair(folder, *staged)
    except OSError as exc:
        if exc.errno in DISK_FULL:
            raise OSError(exc.errno, f"disk full (no space left on the device) while saving the adapter to {folder}; "
                                     "the adapter there before, if any, is unchanged: free some space and save "
                                     "again") from exc
        raise
    finally:
        for tmp in staged:  # already renamed into place, unless something failed
            discard(tmp)
    fsync_dir(folder)
    return folder


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


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``zinit.json`` in ``directory``; errors name the file and what is wrong with it.

    Every field the loader uses is checked for its type and range (``"K": "10"`` or ``"layers": "all"`` is an error
    naming the field and the value), as is the folder itself (missing, a file, or another method's weights).

    >>> import tempfile, timm, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> zinit.read_adapter_config(folder)["K"]
    4
    """
    folder = Path(directory)
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


def _mismatch(weights: Path, config: dict[str, Any], data: bytes, reason: str) -> ValueError:
    """The error for weights that are not the ones ``zinit.json`` describes, naming leftover files of an interrupted
    save that restore a consistent adapter."""
    folder = weights.parent
    digest, _ = _digest(data)
    hints = []
    for tmp in _leftovers(folder, CONFIG_NAME):  # the description of these weights, staged but not renamed
        try:
            if json.loads(tmp.read_text()).get("weights_sha256") == digest:
                hints.append(f"{tmp.name} describes these weights: rename it to {CONFIG_NAME} to use them")
        except (OSError, ValueError, AttributeError):
            continue
    for tmp in _leftovers(folder, WEIGHTS_NAME):  # the weights zinit.json describes, kept while the pair was replaced
        try:
            if _digest(tmp.read_bytes())[0] == config.get("weights_sha256"):
                hints.append(f"{tmp.name} holds the weights {CONFIG_NAME} describes: rename it to {WEIGHTS_NAME} to "
                             "restore the earlier adapter")
        except OSError:
            continue
    fix = "; ".join(hints) if hints else _AGAIN
    return ValueError(f"adapter weights {weights} do not match {CONFIG_NAME} beside them ({reason}): the file was "
                      f"truncated or replaced, or a save into {folder} was interrupted; {fix}")


def _read_weights(weights: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The tensors of ``adapter.safetensors``, checked against the size and sha256 ``zinit.json`` records and for a
    floating-point dtype; errors name the file and the fix."""
    data = weights.read_bytes()
    recorded = config.get("weights_bytes")
    size_note = ""
    if recorded not in (None, len(data)):
        size_note = f"; it is {len(data)} bytes, {CONFIG_NAME} records {recorded}"
    try:
        if not data:
            raise SafetensorError("the file is empty (0 bytes)")
        tensors = _load_safetensors(data)
    except SafetensorError as exc:
        raise ValueError(f"adapter weights {weights} cannot be read as safetensors: {exc}{size_note}; "
                         f"{_AGAIN}") from None
    if size_note:
        raise _mismatch(weights, config, data, size_note[2:])
    if "weights_sha256" in config and _digest(data)[0] != config["weights_sha256"]:
        raise _mismatch(weights, config, data, "its sha256 differs from the one recorded")
    for key, value in tensors.items():
        if not value.is_floating_point():
            dtype = str(value.dtype).replace("torch.", "")
            raise ValueError(f"adapter weights {weights}: tensor {key!r} has dtype {dtype}; adapter tensors are "
                             f"floating point (zinit writes float32); {_AGAIN}")
    return tensors


def read_adapter(directory: str | os.PathLike[str]) -> tuple[AdapterConfig, dict[str, Any]]:
    """The :class:`~zinit.AdapterConfig` and the tensors of an adapter folder, both checked (the description's
    fields, the weights' size, sha256 and dtypes); errors name the file and the fix. Nothing is loaded anywhere.

    >>> import tempfile, timm, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> config, tensors = read_adapter(folder)
    >>> config.K, sorted(tensors)[:2]
    (4, ['layers.10.gate', 'layers.10.prompt'])
    """
    config = read_adapter_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (the folder has {CONFIG_NAME} but no weights); {_AGAIN}")
    return AdapterConfig.from_json(config, str(Path(directory) / CONFIG_NAME)), _read_weights(weights, config)


def check_fits(config: AdapterConfig, model: nn.Module, source: str | os.PathLike[str],
               fix: str = "load it into the model it was trained on") -> Backbone:
    """The backbone of the adapter ``config`` (read from ``source``), after checking that it accepts ``model`` and
    that the model's sizes are the adapter's; each error names the field, both values and ``fix``. Shared by
    :func:`load_adapter` and :func:`zinit.add_adapter`."""
    spec = get_backbone(config.backbone)
    if not spec.matches(model):
        raise ValueError(f"the adapter in {source} was saved for backbone {config.backbone!r}, "
                         f"which does not accept a {type(model).__qualname__}: {fix}")
    dims = spec.dims(model)
    for key in DIM_FIELDS:
        if getattr(config, key) != getattr(dims, key):
            raise ValueError(f"adapter/model mismatch on {key}: the adapter in {source} has {key}="
                             f"{getattr(config, key)}, the model has {key}={getattr(dims, key)}; {fix}")
    return spec


def _shown(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return the model.

    A model that is not injected yet is injected as ``zinit.json`` says; an injected one must have the same layers,
    K, gate and gate_fn. A model whose sizes differ from the file's raises a ValueError naming the field and both
    values. The weights must be the file ``zinit.json`` describes (its size and sha256 are recorded there) and hold
    floating-point tensors with exactly the expected keys (a KeyError names the missing and unexpected ones). If
    anything fails, a model this call injected is ejected again and the model's adapter is unchanged.

    >>> import tempfile, timm, torch, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> fresh = zinit.load_adapter(timm.create_model("vit_tiny_patch16_224"), folder)
    >>> zinit.injection(fresh).layers
    (10, 11)
    """
    wanted, tensors = read_adapter(directory)
    check_fits(wanted, model, directory)
    injected_here = not is_injected(model)
    if injected_here:
        inject(model, list(wanted.layers), wanted.K, **wanted.inject_options())
    else:
        differ = injection(model).config.differences(wanted)
        if differ:
            key, (have, want) = next(iter(differ.items()))
            others = f" (also {', '.join(list(differ)[1:])})" if len(differ) > 1 else ""
            raise ValueError(
                f"adapter/model mismatch on {key}: the adapter in {directory} has {key}={_shown(want)}, "
                f"the model is injected with {key}={_shown(have)}{others}; eject it first or load into a fresh model"
            )
    try:
        try:
            load_adapter_state_dict(model, tensors)
        except KeyError as exc:
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            raise KeyError(f"{Path(directory) / WEIGHTS_NAME}: {message}") from None
    except BaseException:
        if injected_here:
            eject(model)
        raise
    return model
