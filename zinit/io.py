"""Save and load adapters: ``adapter.safetensors`` (canonical keys) + ``zinit.json`` (what the adapter fits).

No pickle anywhere: weights are safetensors, the description is JSON. Files are written to a temporary name in the
target folder and renamed into place, so an interrupted save never leaves a half-written file under the real name.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ._version import __version__
from .inject import adapter_state_dict, eject, inject, injection, is_injected, load_adapter_state_dict
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


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, fsync it, then rename it onto ``path``.

    A crash or an exception inside ``write`` leaves any earlier file at ``path`` untouched.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON (with a final newline) through :func:`atomic_write`."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike[str], what: str) -> Any:
    """Parse a JSON file; a missing file or bad JSON raises an error naming ``what`` and the path."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} {path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{what} {path} is not valid JSON: {exc}") from None


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


def save_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> Path:
    """Write an injected model's adapter to ``directory`` (created if needed) and return the folder.

    Writes ``adapter.safetensors`` (keys ``layers.{n}.prompt`` / ``layers.{n}.gate``, float32, and
    ``modules.{name}.*`` for inject's ``train_modules``) and ``zinit.json`` (format version, backbone, hidden size,
    heads, KV heads, head size, layer count, adapted layers, K, gate, gate_fn, train_modules, visual_dim and
    visual_hidden when there is a visual projection (``visual_proj.*``), zinit version).

    >>> import tempfile, timm, zinit
    >>> vit = zinit.inject(timm.create_model("vit_tiny_patch16_224", pretrained=False), layers=2, K=4)
    >>> folder = zinit.save_adapter(vit, tempfile.mkdtemp())
    >>> sorted(p.name for p in folder.iterdir())
    ['adapter.safetensors', 'zinit.json']
    """
    config = adapter_config(model)
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter_state_dict(model).items()}
    atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "zinit-adapter"}))
    write_json(folder / CONFIG_NAME, config)
    return folder


def read_adapter_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``zinit.json`` in ``directory``; errors name the file and what is wrong with it."""
    path = Path(directory) / CONFIG_NAME
    config = read_json(path, f"adapter description ({CONFIG_NAME} beside {WEIGHTS_NAME})")
    if not isinstance(config, dict) or config.get("format") != "zinit-adapter":
        raise ValueError(f"{path} is not a zinit adapter description (no \"format\": \"zinit-adapter\")")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(
            f"{path} has format_version {config['format_version']}, newer than this zinit ({__version__}) reads "
            f"({FORMAT_VERSION}); upgrade zinit"
        )
    required = ["backbone", "layers", "K", "gate", "gate_fn"] + [key for key, _ in _DIM_FIELDS]
    missing = [key for key in required if key not in config]
    if missing:
        raise ValueError(f"{path} lacks the fields {missing}")
    return config


def load_adapter(model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Load an adapter saved by :func:`save_adapter` into ``model`` and return the model.

    A model that is not injected yet is injected as ``zinit.json`` says; an injected one must have the same layers,
    K, gate and gate_fn. A model whose sizes differ from the file's raises a ValueError naming the field and both
    values. If anything fails, a model this call injected is ejected again.

    >>> import tempfile, timm, torch, zinit
    >>> folder = zinit.save_adapter(zinit.inject(timm.create_model("vit_tiny_patch16_224"), 2, 4), tempfile.mkdtemp())
    >>> fresh = zinit.load_adapter(timm.create_model("vit_tiny_patch16_224"), folder)
    >>> zinit.injection(fresh).layers
    (10, 11)
    """
    config = read_adapter_config(directory)
    weights = Path(directory) / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} does not exist (the folder has {CONFIG_NAME} but no weights)")
    spec = get_backbone(config["backbone"])
    if not spec.matches(model):
        raise ValueError(
            f"the adapter in {directory} was saved for backbone {config['backbone']!r}, "
            f"which does not accept a {type(model).__qualname__}"
        )
    dims = spec.dims(model)
    for key, attr in _DIM_FIELDS:
        if config[key] != getattr(dims, attr):
            raise ValueError(
                f"adapter/model mismatch on {key}: the adapter in {directory} has {key}={config[key]}, "
                f"the model has {key}={getattr(dims, attr)}"
            )
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
            with safe_open(str(weights), framework="pt") as f:
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except SafetensorError as exc:
            raise ValueError(f"adapter weights {weights} cannot be read as safetensors: {exc}") from None
        load_adapter_state_dict(model, tensors)
    except BaseException:
        if injected_here:
            eject(model)
        raise
    return model
