"""Save and load adapters: ``adapter.safetensors`` (canonical keys) + ``zinit.json`` (what the adapter fits).

No pickle anywhere: weights are safetensors, the description is JSON. Files are written to a temporary name in the
target folder and renamed into place, so an interrupted save never leaves a half-written file under the real name;
they get the mode a plain ``open(path, "w")`` would give them (``0o666`` less the umask), never the temporary file's
``0o600``. An adapter's two files are written as a pair: both go to temporary files first, ``zinit.json`` records the
size and sha256 of the weights it describes, and the weights are renamed into place, then the description; an error
between the two renames puts the earlier weights back, and a crash there (power loss, SIGKILL) is detected by
:func:`load_adapter`, which then names the leftover files that restore either adapter.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError
from safetensors.torch import load as _load_safetensors, save_file
from torch import nn

from ._version import __version__
from .attention import GATE_FUNCTIONS
from .inject import adapter_state_dict, eject, inject, injection, is_injected, load_adapter_state_dict
from .prompts import GATE_KINDS
from .registry import get_backbone

WEIGHTS_NAME = "adapter.safetensors"
CONFIG_NAME = "zinit.json"
FORMAT_VERSION = 1
#: Model sizes an adapter must agree on, as (zinit.json key, Dims attribute).
_DIM_FIELDS = (
    ("hidden_size", "hidden_size"),
    ("num_heads", "num_heads"),
    ("num_kv_heads", "num_kv_heads"),
    ("head_dim", "head_dim"),
    ("num_layers", "num_layers"),
)
#: errno values that mean "the disk (or the user's quota) is full".
_DISK_FULL = frozenset({errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)})
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's file-creation mask (umask), read without changing it where the system allows.

    Linux reports it in ``/proc/self/status`` (``Umask:``). Elsewhere it is read by setting and at once restoring it
    (under a lock; in between it is ``0o077``, so a file another thread creates in that instant is only the more
    private).

    >>> 0 <= current_umask() <= 0o777
    True
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _UMASK_LOCK:
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: ``0o666`` less the umask (``0o644`` under ``022``)."""
    return 0o666 & ~current_umask()


def _disk_full(exc: OSError, what: str) -> OSError:
    return OSError(exc.errno, f"disk full (no space left on the device) while writing {what}; what was there before "
                              "is unchanged: free some space and write it again")


def _explained(exc: OSError, path: Path) -> OSError:
    """``exc`` as an error naming ``path``: a full disk says so; other errors keep their type."""
    if exc.errno in _DISK_FULL:
        return _disk_full(exc, str(path))
    if isinstance(exc, PermissionError):
        return PermissionError(exc.errno, f"cannot write {path}: permission denied on {path.parent}")
    return exc


def _discard(path: str | os.PathLike[str]) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable (best effort: not every system can open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _stage(path: Path, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` on a new temporary file beside ``path``, give it the default mode, fsync it and return its
    name (not yet renamed). Any failure removes the temporary file; a full disk raises an OSError saying so."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        new = _explained(exc, path)
        if new is exc:
            raise
        raise new from exc
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), default_file_mode())
            else:  # pragma: no cover - Windows
                os.chmod(tmp, default_file_mode())
            os.fsync(f.fileno())
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError):
            new = _explained(exc, path)
            if new is not exc:
                raise new from exc
        raise
    return tmp


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A crash or an exception inside ``write`` (Ctrl-C included) leaves any earlier file at ``path`` untouched and no
    temporary file behind. The new file gets the mode a plain ``open(path, "w")`` would give it (``0o666`` less the
    umask), whatever mode an earlier file had. A full disk raises an OSError (errno ``ENOSPC``) naming ``path``.
    """
    path = Path(path)
    tmp = _stage(path, write)
    try:
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    _fsync_dir(path.parent)


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON (with a final newline) through :func:`atomic_write`."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike[str], what: str, hint: str = "") -> Any:
    """Parse a JSON file; a missing, empty or malformed file raises an error naming ``what`` and the path.

    ``hint`` (e.g. "save the adapter again") is appended to the message of an empty or malformed file.
    """
    path = Path(path)
    if not path.is_file():
        if path.is_dir():
            raise IsADirectoryError(f"{what} {path} is a folder, not a file")
        raise FileNotFoundError(f"{what} {path} does not exist")
    tail = f"; {hint}" if hint else ""
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"{what} {path} is empty ({len(data)} bytes){tail}")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{what} {path} is not valid JSON (not UTF-8 text){tail}") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}{tail}") from None


def adapter_config(model: nn.Module) -> dict[str, Any]:
    """The ``zinit.json`` description of an injected model's adapter."""
    state = injection(model)
    config: dict[str, Any] = {"format": "zinit-adapter", "format_version": FORMAT_VERSION, "zinit_version": __version__}
    config["backbone"] = state.backbone.name
    config.update({key: getattr(state.dims, attr) for key, attr in _DIM_FIELDS})
    config.update(layers=list(state.layers), K=state.K, gate=state.gate, gate_fn=state.gate_fn,
                  train_modules=list(state.train_modules))
    if state.visual_dim is not None:
        config.update(visual_dim=state.visual_dim, visual_hidden=state.visual_hidden)
    return config


_AGAIN = "save the adapter again (zinit.save_adapter) or restore the folder from a copy"


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write an injected model's adapter to ``directory`` (created if needed) and return the folder.

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
    config = adapter_config(model)
    folder = Path(directory)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"save_adapter: {folder} is a file; pass a folder (it receives {WEIGHTS_NAME} and "
                                 f"{CONFIG_NAME})")
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    staged: list[str] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        weights_tmp = _stage(folder / WEIGHTS_NAME,
                             lambda tmp: save_file(tensors, tmp, metadata={"format": "zinit-adapter"}))
        staged.append(weights_tmp)
        digest, size = _digest(Path(weights_tmp).read_bytes())
        config.update(weights_bytes=size, weights_sha256=digest)
        text = json.dumps(config, indent=2) + "\n"
        staged.append(_stage(folder / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text)))
        _commit_pair(folder, *staged)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise OSError(exc.errno, f"disk full (no space left on the device) while saving the adapter to {folder}; "
                                     "the adapter there before, if any, is unchanged: free some space and save "
                                     "again") from exc
        raise
    finally:
        for tmp in staged:  # already renamed into place, unless something failed
            _discard(tmp)
    _fsync_dir(folder)
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
                _discard(backup)
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
                _discard(weights)
            raise
    finally:
        # the earlier weights go only once they are not needed: the pair is in, or nothing was replaced; if
        # putting them back failed, they stay under their .previous.tmp name, which load_adapter's error names
        if backup is not None and (committed or not replaced):
            _discard(backup)


def _field_error(path: Path, key: str, want: str, value: Any) -> ValueError:
    return ValueError(f"{path}: field {key!r} must be {want}, got {json.dumps(value)} ({type(value).__name__}); "
                      f"correct it or {_AGAIN}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(config: dict[str, Any], path: Path) -> None:
    """Types and ranges of every ``zinit.json`` field the loader uses; errors name the field, the value and the fix."""
    if not isinstance(config["backbone"], str):
        raise _field_error(path, "backbone", "a backbone name such as \"llama\"", config["backbone"])
    for key, _ in _DIM_FIELDS:
        if not _is_int(config[key]) or config[key] < 1:
            raise _field_error(path, key, "an int >= 1", config[key])
    layers, depth = config["layers"], config["num_layers"]
    if (not isinstance(layers, list) or not layers or not all(_is_int(n) and 0 <= n < depth for n in layers)
            or len(set(layers)) != len(layers)):
        raise _field_error(path, "layers", f"a non-empty list of distinct layer indices in 0..{depth - 1}", layers)
    if not _is_int(config["K"]) or config["K"] < 1:
        raise _field_error(path, "K", "an int >= 1 (the prompt length)", config["K"])
    if config["gate"] not in GATE_KINDS:
        raise _field_error(path, "gate", f"one of {list(GATE_KINDS)}", config["gate"])
    if config["gate_fn"] not in GATE_FUNCTIONS:
        raise _field_error(path, "gate_fn", f"one of {list(GATE_FUNCTIONS)}", config["gate_fn"])
    modules = config.get("train_modules", [])
    if not isinstance(modules, list) or not all(isinstance(m, str) for m in modules):
        raise _field_error(path, "train_modules", "a list of submodule names", modules)
    for key in ("visual_dim", "visual_hidden"):
        value = config.get(key)
        if value is not None and (not _is_int(value) or value < 1):
            raise _field_error(path, key, "an int >= 1 or null", value)
    if "weights_bytes" in config and (not _is_int(config["weights_bytes"]) or config["weights_bytes"] < 0):
        raise _field_error(path, "weights_bytes", "the size of adapter.safetensors in bytes", config["weights_bytes"])
    sha = config.get("weights_sha256")
    if sha is not None and not (isinstance(sha, str) and len(sha) == 64):
        raise _field_error(path, "weights_sha256", "the sha256 of adapter.safetensors (64 hex digits)", sha)


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
    if not isinstance(config, dict) or config.get("format") != "zinit-adapter":
        raise ValueError(f"{path} is not a zinit adapter description (no \"format\": \"zinit-adapter\")")
    version = config.get("format_version", 0)
    if not _is_int(version):
        raise _field_error(path, "format_version", f"an int (this zinit writes {FORMAT_VERSION})", version)
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {version}, newer than this zinit ({__version__}) reads "
            f"({FORMAT_VERSION}); upgrade zinit"
        )
    required = ["backbone", "layers", "K", "gate", "gate_fn"] + [key for key, _ in _DIM_FIELDS]
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}; {_AGAIN}")
    _check_config(config, path)
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
    config = read_adapter_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (the folder has {CONFIG_NAME} but no weights); {_AGAIN}")
    spec = get_backbone(config["backbone"])
    if not spec.matches(model):
        raise ValueError(
            f"the adapter in {directory} was saved for backbone {config['backbone']!r}, "
            f"which does not accept a {type(model).__qualname__}: load it into the model it was trained on"
        )
    dims = spec.dims(model)
    for key, attr in _DIM_FIELDS:
        if config[key] != getattr(dims, attr):
            raise ValueError(
                f"adapter/model mismatch on {key}: the adapter in {directory} has {key}={config[key]}, "
                f"the model has {key}={getattr(dims, attr)}; load it into the model it was trained on"
            )
    tensors = _read_weights(weights, config)
    injected_here = not is_injected(model)
    if injected_here:
        inject(model, config["layers"], config["K"], gate=config["gate"], gate_fn=config["gate_fn"], backbone=spec.name,
               train_modules=config.get("train_modules", []), visual_dim=config.get("visual_dim"),
               visual_hidden=config.get("visual_hidden") or 128)
    else:
        state = injection(model)
        have = {"layers": list(state.layers), "K": state.K, "gate": state.gate, "gate_fn": state.gate_fn,
                "train_modules": list(state.train_modules), "visual_dim": state.visual_dim,
                "visual_hidden": state.visual_hidden}
        for key, value in have.items():
            if config.get(key, [] if key == "train_modules" else None) != value:
                raise ValueError(
                    f"adapter/model mismatch on {key}: the adapter in {directory} has {key}={config.get(key)}, "
                    f"the model is injected with {key}={value}; eject it first or load into a fresh model"
                )
    try:
        try:
            load_adapter_state_dict(model, tensors)
        except KeyError as exc:
            message = exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc)
            raise KeyError(f"{weights}: {message}") from None
    except BaseException:
        if injected_here:
            eject(model)
        raise
    return model
