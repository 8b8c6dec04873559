"""Which transformer families zinit adapts, measured: ``python -m zinit.benchmarks.coverage`` (offline, CPU).

For every model type of the installed transformers that has a causal LM (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``), and
for the encoder and vision families listed in :data:`EXTRA`, build a tiny model from its config with random
weights, ``zinit.inject`` it, and check:

(a) zero-init invariance: the injected model's outputs equal the base model's (≤ 1e-6);
(b) the naive reference (``tests/reference.py``: the family's own attention for the tokens plus the prompt term in
    float64 with explicit loops) equals the injected model with open gates (≤ 1e-5);
(k) the prompt keys and values zinit projects equal the reference's (≤ 1e-5), and are not all ~0 (max |k| > 1e-3:
    a key path that gives zeros proves nothing). The reference's keys take one of two routes, named per row in
    ``key_path``: ``independent`` — the family's projections and norms written out (``reference.written_out_kv``:
    separate or fused projections, key/value norms, ``clip_qkv``, key multipliers, the layer's own rotary at
    position 0), never through the layer's forward; or ``capture: <why>`` — the layer's own forward at position 0
    through a recording attention function, where the key path has a part the reference cannot write out;
(c) causal LMs: cached greedy ``generate()`` gives, step by step, the logits of a full forward (≤ 1e-4);
(d) ``save_adapter`` → ``load_adapter`` into a fresh copy gives identical outputs.

A family zinit cannot adapt exactly is refused with a reason (:class:`zinit.hfauto.Unsupported`); a family whose
tiny config cannot be built here is "skipped" with the error. Tiny models are random; a parameter of an attention
module that its init leaves exactly 0 (a norm's offset weight, ZAYA's key scale) is drawn from U(0.5, 1.5), so every
path to the keys carries signal. Prints a table (family, backbone, result, key path, reason) and the counts, each
family once (the BERT-likes are checked as causal LMs and as encoders: a family passes when every row of it does);
``--json`` / ``--markdown`` write them. ``--only gpt2,qwen3`` runs a subset. Needs a repository checkout (the
reference lives in ``tests/``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

import zinit
from zinit.hfauto import Unsupported

#: Encoder and vision families checked besides every causal LM: (model type, kind).
EXTRA = (("bert", "encoder"), ("roberta", "encoder"), ("xlm-roberta", "encoder"), ("electra", "encoder"),
         ("camembert", "encoder"), ("distilbert", "encoder"), ("albert", "encoder"), ("mpnet", "encoder"),
         ("deberta-v2", "encoder"), ("modernbert", "encoder"), ("clip_text_model", "encoder"),
         ("clip_vision_model", "vision"), ("siglip_vision_model", "vision"), ("vit", "vision"), ("deit", "vision"),
         ("dinov2", "vision"), ("beit", "vision"))
SMALL = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
         "intermediate_size": 128, "head_dim": 16, "ffn_dim": 128, "d_model": 64, "encoder_layers": 2,
         "decoder_layers": 2, "encoder_attention_heads": 4, "decoder_attention_heads": 4, "encoder_ffn_dim": 128,
         "decoder_ffn_dim": 128, "image_size": 32, "patch_size": 8, "num_experts": 4, "num_local_experts": 4,
         "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "num_experts_per_tok": 2,
         "embedding_size": 64, "kv_lora_rank": 16, "q_lora_rank": 16, "qk_rope_head_dim": 16, "rotary_dim": 8,
         "qk_nope_head_dim": 16, "v_head_dim": 16, "max_position_embeddings": 128, "sliding_window": 16}


@dataclass
class Row:
    family: str
    kind: str
    result: str  #: "pass", "fail", "refused", "skipped"
    backbone: str = ""
    reason: str = ""
    checks: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    #: the reference's route to the prompt keys: "independent" (written out) or "capture: <why not independent>"
    key_path: str = ""


#: Limits of the checks (see the module docstring); ``prompt_key_size`` is a lower bound.
LIMITS = {"zero_init": 1e-6, "reference": 1e-5, "prompt_kv": 1e-5, "generate": 1e-4, "save_load": 0.0}
MIN_KEY = 1e-3


def _reference_module() -> Any:
    folder = Path(__file__).resolve().parent.parent / "tests"
    if not (folder / "reference.py").is_file():
        raise SystemExit("the coverage sweep needs a repository checkout: tests/reference.py holds the reference")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import reference

    return reference


def _shrink(config: Any, causal: bool = False, keep_depth: bool = False) -> None:
    for key, value in SMALL.items():
        if keep_depth and key in ("num_hidden_layers", "encoder_layers", "decoder_layers"):
            continue
        if hasattr(config, key) and getattr(config, key) is not None:
            with contextlib.suppress(Exception):
                setattr(config, key, value)
    if getattr(config, "kv_lora_rank", None) is not None:  # multi-head latent attention: as many KV heads as heads
        with contextlib.suppress(Exception):
            config.num_key_value_heads = config.num_attention_heads
    if causal and hasattr(config, "is_decoder"):  # an encoder family used as a causal LM (BERT-as-decoder)
        config.is_decoder = True
    types = getattr(config, "layer_types", None)
    if isinstance(types, list) and types and not keep_depth:  # one layer of each kind (a hybrid keeps attention)
        distinct = list(dict.fromkeys(types))
        with contextlib.suppress(Exception):
            config.num_hidden_layers = max(len(distinct), 2)
            config.layer_types = (distinct * 2)[:config.num_hidden_layers]


def build(family: str, kind: str, keep_depth: bool = False) -> nn.Module:
    """A tiny random-weight model of ``family`` (no download); ``keep_depth``: the config's own layer count (a
    hybrid family whose layer pattern needs it)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.for_model(family)
    _shrink(config, kind == "causal", keep_depth)
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            _shrink(sub, kind == "causal", keep_depth)
    torch.manual_seed(0)
    auto = AutoModelForCausalLM if kind == "causal" else AutoModel
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        model = auto.from_config(config)
    wake_zero_parameters(model)
    return model.float().eval()


def wake_zero_parameters(model: nn.Module) -> list[str]:
    """Draw from U(0.5, 1.5) every parameter of an attention module (a class named ``*Attention``) that is exactly 0
    everywhere and is not a bias: a norm weight stored as an offset (Gemma 3's ``k_norm``), ZAYA's per-head key
    scale (whose zeros make every key 0), attention sinks. A tiny random model then exercises its whole key path.
    Returns the names drawn; a fixed generator, so builds stay deterministic."""
    g = torch.Generator().manual_seed(3)
    woken = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not type(module).__name__.endswith("Attention"):
                continue
            for pname, p in module.named_parameters():
                full = f"{name}.{pname}" if name else pname
                if full in woken or not p.is_floating_point() or p.numel() == 0 or p.any() \
                        or "bias" in pname.split(".")[-1]:
                    continue
                p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float32).add_(0.5).to(p.dtype))
                woken.append(full)
    return woken


def _inputs(model: nn.Module, kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    if kind == "vision":
        config = model.config
        size = getattr(config, "image_size", 32)
        size = size if isinstance(size, int) else size[0]
        return {"pixel_values": torch.randn(2, getattr(config, "num_channels", 3), size, size, generator=g)}
    return {"input_ids": torch.randint(3, 60, (2, 8), generator=g), "attention_mask": torch.ones(2, 8, dtype=torch.long)}


def _out(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        out = model(**inputs)
    return (out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state).float()


def check(family: str, kind: str, L: int = 2, K: int = 4) -> Row:
    """Build, inject and check one family; never raises (the row says what happened)."""
    start = time.perf_counter()
    row = Row(family, kind, "fail")
    base = None
    for keep_depth in (False, True):
        try:
            base = build(family, kind, keep_depth)
            _out(base, _inputs(base, kind))
            break
        except Exception as exc:  # noqa: BLE001 - a config this sweep cannot build tiny is reported, not fatal
            base, error = None, f"tiny base model does not run: {type(exc).__name__}: {str(exc)[:160]}"
    if base is None:
        row.result, row.reason = "skipped", error
        return row
    try:
        _run_checks(base, kind, L, K, row)
    except Unsupported as exc:
        row.result, row.reason = "refused", str(exc)
    except Exception as exc:  # noqa: BLE001 - a failure is a result
        row.result, row.reason = "fail", f"{type(exc).__name__}: {str(exc)[:300]}"
    row.seconds = time.perf_counter() - start
    return row


def _run_checks(base: nn.Module, kind: str, L: int, K: int, row: Row) -> None:
    reference = _reference_module()
    inputs = _inputs(base, kind)
    expected = _out(base, inputs)
    pristine = copy.deepcopy(base)
    model = zinit.inject(base, layers=min(L, zinit.find_backbone(base).dims(base).num_layers), K=K)
    state = zinit.injection(model)
    row.backbone = state.backbone.name
    row.checks["zero_init"] = (_out(model, inputs) - expected).abs().max().item()

    g = torch.Generator().manual_seed(2)
    adapters = zinit.layer_adapters(model)
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.gate.copy_(torch.randn(adapter.gate.shape, generator=g))
    opened = _out(model, inputs)
    ref_model = copy.deepcopy(pristine)
    attns = [state.backbone.attention_modules(ref_model)[n] for n in adapters]
    routes = reference.install_reference(ref_model, attns, [a.prompt for a in adapters.values()],
                                         [a.gate for a in adapters.values()], state.gate_fn)
    row.key_path = next((r for r in routes if r != "independent"), "independent")
    row.checks["reference"] = (opened - _out(ref_model, inputs)).abs().max().item()
    row.checks["gates_open_effect"] = (opened - expected).abs().max().item()
    ours = state.backbone.attention_modules(model)
    with torch.no_grad():
        _key_checks(row, [(state.backbone.project(ours[n], a.prompt), attn._reference_kv)
                          for (n, a), attn in zip(adapters.items(), attns)])

    if kind == "causal":
        base_gap = _generate_gap(pristine, inputs)
        if base_gap <= 1e-4:
            row.checks["generate"] = _generate_gap(model, inputs)
        else:  # the base model's own cache does not reproduce its full forward: nothing to hold zinit to
            row.reason = f"generate check n/a: the base model's cached decoding differs from its forward by {base_gap:.0e}"

    with tempfile.TemporaryDirectory() as folder:
        zinit.save_adapter(model, folder)
        fresh = zinit.load_adapter(copy.deepcopy(pristine), folder)
        row.checks["save_load"] = (_out(fresh, inputs) - opened).abs().max().item()

    bad = _verdict(row)
    if row.checks["gates_open_effect"] == 0.0:
        bad.append("open gates change nothing (the prompt term never reached the output)")
    row.result = "fail" if bad else "pass"
    row.reason = "; ".join(bad + ([row.reason] if row.reason else []))


def _key_checks(row: Row, pairs: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]
                ) -> None:
    """``prompt_kv``: the largest gap between zinit's prompt keys/values and the reference's over the adapted
    layers; ``prompt_key_size``: the smallest of the layers' largest reference key (a key path giving ~0 proves
    nothing)."""
    gaps, sizes = [], []
    with torch.no_grad():
        for (key, value), (ref_key, ref_value) in pairs:
            key, value = key.detach().double().cpu(), value.detach().double().cpu()
            if key.shape != ref_key.shape or value.shape != ref_value.shape:
                raise AssertionError(f"prompt keys/values of shape {tuple(key.shape)}/{tuple(value.shape)}, the "
                                     f"reference's {tuple(ref_key.shape)}/{tuple(ref_value.shape)}")
            gaps.append(max((key - ref_key).abs().max().item(), (value - ref_value).abs().max().item()))
            sizes.append(ref_key.abs().max().item())
    row.checks["prompt_kv"] = max(gaps)
    row.checks["prompt_key_size"] = min(sizes)


def _verdict(row: Row) -> list[str]:
    """The failed checks of ``row``, each with its value and limit."""
    bad = [f"{k} {row.checks[k]:.1e} > {v:g}" for k, v in LIMITS.items() if k in row.checks and row.checks[k] > v]
    if "prompt_key_size" in row.checks and not row.checks["prompt_key_size"] > MIN_KEY:
        bad.append(f"prompt keys all ~0 (max |k| {row.checks['prompt_key_size']:.1e} ≤ {MIN_KEY:g}): the tiny "
                   "config does not exercise the key path")
    return bad


def _generate_gap(model: nn.Module, inputs: dict[str, torch.Tensor]) -> float:
    """Greedy cached ``generate()``: the largest gap between each step's logits and a full forward's."""
    prompt = inputs["input_ids"][:1, :6]
    with torch.no_grad():
        gen = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0)
        full = model(input_ids=gen.sequences[:, :-1]).logits.float()
    steps = torch.stack(gen.logits, dim=1).float()
    return (steps - full[:, prompt.shape[1] - 1:]).abs().max().item()


#: timm vision transformers: (row name, timm model name, extra create_model arguments).
TIMM = (("timm vit", "vit_tiny_patch16_224", {}),
        ("timm deit", "deit_tiny_patch16_224", {}),
        ("timm deit3 (layer scale)", "deit3_small_patch16_224", {}),
        ("timm dinov2 + registers", "vit_small_patch14_reg4_dinov2", {}),
        ("timm vit qk_norm", "vit_tiny_patch16_224", {"qk_norm": True}),
        ("timm vit gap (no class token)", "vit_base_patch16_gap_224", {}),
        ("timm siglip vit", "vit_base_patch16_siglip_224", {}),
        ("timm eva02", "eva02_tiny_patch14_224", {}),
        ("timm beit", "beit_base_patch16_224", {}),
        ("timm swin", "swin_tiny_patch4_window7_224", {}))


def build_timm(name: str, extra: dict[str, Any]) -> nn.Module:
    """A small random-weight timm model (2 blocks, width 64, 32×32 images where the family takes those sizes)."""
    import timm

    torch.manual_seed(0)
    small = {"depth": 2, "embed_dim": 64, "num_heads": 4, "img_size": 32, "patch_size": 8, "num_classes": 10}
    try:
        model = timm.create_model(name, pretrained=False, **small, **extra)
    except TypeError:  # a family with other size arguments (Swin): its own small default
        model = timm.create_model(name, pretrained=False, num_classes=10, **extra)
    return model.eval()


def check_timm(row_name: str, name: str, extra: dict[str, Any], L: int = 2, K: int = 4) -> Row:
    """zero-init, the reference (tests/reference.timm_attention_layer, layer by layer) and save/load for a timm
    model."""
    start = time.perf_counter()
    row = Row(row_name, "timm", "fail")
    try:
        base = build_timm(name, extra)
        size = base.default_cfg.get("input_size", (3, 224, 224))[-1] if not hasattr(base, "patch_embed") else \
            base.patch_embed.img_size[0]
        images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
        expected = _out_timm(base, images)
    except Exception as exc:  # noqa: BLE001
        row.result, row.reason = "skipped", f"small model does not run: {type(exc).__name__}: {str(exc)[:160]}"
        return row
    try:
        _timm_checks(base, images, expected, L, K, row)
    except (Unsupported, ValueError, TypeError) as exc:
        row.result, row.reason = "refused", str(exc).split("; registered backbones")[0]
    except Exception as exc:  # noqa: BLE001
        row.result, row.reason = "fail", f"{type(exc).__name__}: {str(exc)[:300]}"
    row.seconds = time.perf_counter() - start
    return row


def _out_timm(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(images).float()


def _timm_checks(base: nn.Module, images: torch.Tensor, expected: torch.Tensor, L: int, K: int, row: Row) -> None:
    reference = _reference_module()
    pristine = copy.deepcopy(base)
    model = zinit.inject(base, layers=min(L, zinit.find_backbone(base).dims(base).num_layers), K=K)
    state = zinit.injection(model)
    row.backbone = state.backbone.name
    row.checks["zero_init"] = (_out_timm(model, images) - expected).abs().max().item()
    adapters = zinit.layer_adapters(model)
    with torch.no_grad():
        g = torch.Generator().manual_seed(2)
        for adapter in adapters.values():
            adapter.gate.copy_(torch.randn(adapter.gate.shape, generator=g))
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    modules = state.backbone.attention_modules(model)
    hooks = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen.__setitem__(n, (a[0], out)))
             for n in adapters]
    try:
        opened = _out_timm(model, images)
    finally:
        for h in hooks:
            h.remove()
    row.checks["reference"] = max(
        (out.double() - reference.timm_attention_layer(modules[n], x, adapters[n].prompt, adapters[n].gate,
                                                       state.gate_fn)).abs().max().item()
        for n, (x, out) in seen.items())
    row.checks["gates_open_effect"] = (opened - expected).abs().max().item()
    row.key_path = "independent"  # timm_attention_layer writes the fused qkv split and k_norm out
    with torch.no_grad():
        _key_checks(row, [(state.backbone.project(modules[n], a.prompt),
                           reference.timm_prompt_kv(modules[n], a.prompt)) for n, a in adapters.items()])
    with tempfile.TemporaryDirectory() as folder:
        zinit.save_adapter(model, folder)
        fresh = zinit.load_adapter(copy.deepcopy(pristine), folder)
        row.checks["save_load"] = (_out_timm(fresh, images) - opened).abs().max().item()
    bad = _verdict(row)
    if row.checks["gates_open_effect"] == 0.0:
        bad.append("open gates change nothing")
    row.result, row.reason = ("fail" if bad else "pass"), "; ".join(bad)


def families() -> list[tuple[str, str]]:
    """Every causal-LM model type of the installed transformers, then :data:`EXTRA`."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [(t, "causal") for t in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)] + list(EXTRA)


#: A family with several rows (the BERT-likes as causal LMs and as encoders) takes the first of these its rows have.
_PRECEDENCE = ("fail", "refused", "skipped", "pass")


def by_family(rows: Sequence[Row]) -> dict[str, tuple[str, str]]:
    """Each family once: its result (the first of :data:`_PRECEDENCE` among its rows, so it passes only when every
    row does) and its key path ("independent" only when every passing row's is)."""
    out: dict[str, tuple[str, str]] = {}
    for family in dict.fromkeys(r.family for r in rows):
        mine = [r for r in rows if r.family == family]
        result = next(p for p in _PRECEDENCE if any(r.result == p for r in mine))
        paths = {r.key_path.split(":")[0] for r in mine if r.result == "pass"}
        out[family] = (result, "capture" if "capture" in paths else "independent" if paths else "")
    return out


def headline(rows: Sequence[Row]) -> str:
    """The counts, each family once, and the passing families' key routes."""
    families = by_family(rows)
    counts = {p: sum(result == p for result, _ in families.values()) for p in _PRECEDENCE}
    independent = sum(result == "pass" and path == "independent" for result, path in families.values())
    extra = len(rows) - len(families)
    return (f"{counts['pass']} pass, {counts['refused']} refused with a reason, {counts['fail']} fail, "
            f"{counts['skipped']} skipped (tiny config not buildable here), of {len(families)} families"
            + (f" ({len(rows)} rows: {extra} families are checked both as causal LMs and as encoders, and pass only "
               "if both rows do)" if extra else "")
            + f". Prompt keys checked against an independent (written-out) key path: {independent} of the "
              f"{counts['pass']} passing families; through the capture route: {counts['pass'] - independent}.")


def format_markdown(rows: Sequence[Row]) -> str:
    lines = [headline(rows), "",
             "| family | kind | result | backbone | key path | reason / worst check |", "|---|---|---|---|---|---|"]
    for r in rows:
        detail = r.reason or ", ".join(f"{k} {v:.0e}" for k, v in r.checks.items() if k != "gates_open_effect")
        lines.append(f"| {r.family} | {r.kind} | {r.result} | {r.backbone} | {r.key_path.replace('|', '/')} | "
                     f"{detail.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(prog="python -m zinit.benchmarks.coverage", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated model types, 'timm' for the timm rows (default: all)")
    p.add_argument("--json", default=None, help="write the rows here")
    p.add_argument("--markdown", default=None, help="write the table here")
    args = p.parse_args(argv)
    todo = families()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip() and t.strip() != "timm"
                  and not t.strip().startswith("timm ")]
        known = dict(todo)
        todo = [(t, known.get(t, "causal")) for t in wanted]
    torch.set_num_threads(1)
    from tqdm.auto import tqdm

    timm_rows = [t for t in TIMM if not args.only or t[0] in args.only.split(",") or "timm" in args.only.split(",")]
    rows = []
    for family, kind in tqdm(todo, desc="families", unit="family"):
        rows.append(check(family, kind))
        r = rows[-1]
        tqdm.write(f"{family:28s} {r.result:8s} {r.backbone:8s} {r.key_path.split(':')[0]:11s} {r.reason[:100]}")
    for row_name, name, extra in timm_rows:
        rows.append(check_timm(row_name, name, extra))
        r = rows[-1]
        tqdm.write(f"{row_name:28s} {r.result:8s} {r.backbone:8s} {r.key_path.split(':')[0]:11s} {r.reason[:100]}")
    table = format_markdown(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1) + "\n")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return rows


if __name__ == "__main__":
    main()
