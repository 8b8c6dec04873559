"""Pretrained timm vision transformers as the recipes load them (VTAB's backbone, ScienceQA's timm image encoder):
by name with random weights, or with the weights of a local file, never downloading anything.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from zinit.convert import load_state_file
from zinit.weights import read_metadata

#: The VTAB-1k backbone of the paper (ViT-B/16 pretrained on ImageNet-21k).
DEFAULT_VIT = "vit_base_patch16_224.orig_in21k"


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load ViT weights from a local safetensors file or a timm/PyTorch checkpoint (``weights_only=True``, no code
    is unpickled); the classifier head is left to the task. Any other missing or unexpected key is an error."""
    from timm.models.vision_transformer import checkpoint_filter_fn

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained-file {path} does not exist")
    state = load_state_file(path)
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    # a DINOv2 file from zinit.weights: resize its position table as DINOv2 itself does (bicubic, no antialiasing;
    # timm's default antialiases, which moves the 224-pixel features away from the model's own)
    dinov2 = "dinov2" in read_metadata(path).get("timm_model", "")
    state = checkpoint_filter_fn(state, model, antialias=not dinov2)
    head = {k for k in model.state_dict() if k.startswith("head.")}
    state = {k: v for k, v in state.items() if k not in head}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{path} does not fit {type(model).__name__}: shapes differ, e.g. {wrong[:3]} "
                         "(is it the checkpoint of --model?)")
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing[:8]}, unexpected "
                         f"{list(unexpected)[:8]} (is it the checkpoint of --model?)")


def build_vit(name: str, pretrained_file: str | None, img_size: int | None) -> nn.Module:
    """A timm ViT with random weights, or the weights of ``pretrained_file`` (no download ever happens)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"--model {name!r} is not a timm model name (e.g. {DEFAULT_VIT}, vit_small_patch16_224)")
    kwargs = {"img_size": img_size} if img_size else {}
    model = timm.create_model(name, pretrained=False, **kwargs)
    if pretrained_file:
        load_pretrained(model, pretrained_file)
    return model.eval()
