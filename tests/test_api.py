"""The public API's contract: argument checking, the registry, and extending it with a backbone of one's own."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import zinit
from tiny import tiny_encoder, tiny_llama, tiny_vit


def test_registered_backbones_and_detection():
    assert {"llama", "roberta", "vit"} <= set(zinit.list_backbones())
    assert zinit.find_backbone(tiny_llama("qwen2")).name == "llama"
    assert zinit.find_backbone(tiny_llama(base_only=True)).name == "llama"
    assert zinit.find_backbone(tiny_vit(distilled=True)).name == "vit"
    assert zinit.find_backbone(tiny_encoder("bert", "cls")).name == "roberta"


@pytest.mark.parametrize("layers,message", [
    (0, r"layers=0 is out of range: L \(the top L layers\) must be >= 1"),  # no model needed to say so
    (5, r"layers=5 is out of range"),
    ([], r"layers=\[\] is empty"),
    ([4], r"layer index 4 is out of range: this model has layers 0..3"),
    ([-1], r"layer index -1 is out of range"),
    ([1, 1], r"names a layer twice"),
])
def test_bad_layers(layers, message):
    model = tiny_llama(layers=4)
    with pytest.raises(ValueError, match=message):
        zinit.inject(model, layers, K=2)
    assert not zinit.is_injected(model)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen by the failed call


@pytest.mark.parametrize("kwargs,error,message", [
    (dict(K=0), ValueError, r"K=0 must be an int >= 1"),
    (dict(K=2.5), ValueError, r"K=2.5 must be an int"),
    (dict(K=True), ValueError, r"K=True must be an int"),
    (dict(K=2, gate="token"), ValueError, r"gate='token' must be one of \['head', 'layer', 'none'\]"),
    (dict(K=2, gate_fn="sigmoid"), ValueError, r"gate_fn='sigmoid' must be one of \['tanh', 'identity'\]"),
    (dict(K=2, backbone="gpt2"), ValueError, r"unknown backbone 'gpt2'; registered backbones: .*llama"),
    (dict(K=2, layers="top"), TypeError, r"layers='top': pass an int L"),
    (dict(K=2, layers=[1.0]), TypeError, r"layer index 1.0 is not an int"),
    (dict(K=2, layers=True), TypeError, r"layers=True"),
])
def test_bad_arguments(kwargs, error, message):
    kwargs = {"layers": 2, **kwargs}
    with pytest.raises(error, match=message):
        zinit.inject(tiny_llama(), **kwargs)


def test_unknown_model_lists_backbones_and_how_to_add_one():
    with pytest.raises(ValueError, match=r"no backbone for torch.nn.modules.linear.Linear.*llama.*register_backbone"):
        zinit.inject(nn.Linear(4, 4), 1, 1)


def test_double_inject_and_eject_of_plain_model():
    model = zinit.inject(tiny_vit(), 1, K=2)
    with pytest.raises(RuntimeError, match="already injected.*eject"):
        zinit.inject(model, 1, K=2)
    with pytest.raises(ValueError, match="no zinit adapter"):
        zinit.eject(tiny_vit())


def test_unsupported_vit_attention_is_refused_cleanly():
    from timm.layers import Attention

    class Custom(Attention):
        pass

    model = tiny_vit()
    model.blocks[3].attn.__class__ = Custom
    with pytest.raises(TypeError, match="adapts timm.layers.Attention.*Custom"):
        zinit.inject(model, 2, K=2)
    assert not zinit.is_injected(model) and all(p.requires_grad for p in model.parameters())
    assert not any("zinit_adapter" in name for name, _ in model.named_modules())


# ---------------------------------------------------------------- a user's own backbone, in one "file"


class ToyAttention(nn.Module):
    """A self-attention written by a user, with a hook point for zinit (``self.prompt_hook``)."""

    def __init__(self, dim=16, heads=2):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.prompt_hook = None

    def forward(self, x):
        B, T, C = x.shape
        split = lambda t: t.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        out = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim), -1) @ v
        if self.prompt_hook is not None:
            out = out + self.prompt_hook(q)
        return self.o(out.transpose(1, 2).reshape(B, T, C))


class ToyModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.attns = nn.ModuleList(ToyAttention() for _ in range(3))

    def forward(self, x):
        for a in self.attns:
            x = x + a(x)
        return x


def _toy_project(attn, prompt):
    split = lambda t: t.unflatten(-1, (attn.heads, attn.head_dim)).transpose(-2, -3)  # noqa: E731
    return split(attn.k(prompt)), split(attn.v(prompt))


def _toy_install(model, modules):
    for a in modules:
        a.prompt_hook = lambda q, a=a: zinit.prompt_term(a, q, a.head_dim ** -0.5)  # the public seam


def _toy_uninstall(model, modules):
    for a in modules:
        a.prompt_hook = None


def test_a_user_backbone_is_one_registration():
    spec = zinit.register_backbone(zinit.Backbone(
        name="toy",
        matches=lambda m: isinstance(m, ToyModel),
        attention_modules=lambda m: list(m.attns),
        dims=lambda m: zinit.Dims(hidden_size=16, num_heads=2, num_kv_heads=2, head_dim=8, num_layers=3),
        project=_toy_project,
        install=_toy_install,
        uninstall=_toy_uninstall,
    ))
    assert "toy" in zinit.list_backbones()
    with pytest.raises(ValueError, match="already registered"):
        zinit.register_backbone(zinit.Backbone(**{**spec.__dict__, "description": "another"}))
    x = torch.randn(2, 5, 16)
    base = ToyModel().eval()
    want = base(x)
    model = zinit.inject(base, 2, K=3)
    assert torch.equal(model(x), want)
    with torch.no_grad():
        for a in zinit.layer_adapters(model).values():
            a.gate.fill_(0.5)
    assert not torch.allclose(model(x), want)
    assert torch.equal(zinit.eject(model)(x), want)


def test_a_users_own_backbones_and_recipes_packages_change_nothing(tmp_path):
    """zinit's folders install as zinit.backbones / zinit.recipes / zinit.methods / zinit.benchmarks, so packages of the same generic
    names in the working directory (first on sys.path) are never picked up instead."""
    import subprocess
    import sys

    for name in ("backbones", "recipes", "methods", "benchmarks"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"raise ImportError('the user\\'s own {name} was imported')\n")
    script = (
        "import timm, zinit\n"
        "assert zinit.list_backbones() == ['hf', 'llama', 'roberta', 'vit'], zinit.list_backbones()\n"
        "vit = zinit.inject(timm.create_model('vit_tiny_patch16_224', pretrained=False), 2, K=4)\n"
        "from zinit.recipes import alpaca, scienceqa, squad, vtab\n"
        "from zinit.methods import ablate, compare\n"
        "from zinit.benchmarks import speed\n"
        "from zinit.cli import build_parser\n"
        "build_parser()\n"
        "print('ok', type(vit.blocks[-1].attn).__module__)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["ok", "zinit.backbones.vit"]
