"""transformers' own adapter methods on zinit adapters (issue 24, item 2): ``PreTrainedModel.load_adapter``,
``add_adapter``, ``set_adapter``, ``enable_adapters`` / ``disable_adapters``, ``active_adapters``,
``get_adapter_state_dict``, ``delete_adapter``, ``save_pretrained`` and ``AutoModelForCausalLM.from_pretrained`` of an
adapter folder, on a model loaded the way users hold one (``from_pretrained`` of a saved base); and a process that
never imported zinit.

transformers 5.x gates every one of these methods but ``load_adapter`` on peft >= 0.22 (``check_peft_version``). On
peft 0.22 (the pinned release) the check runs as users get it; on peft 0.21 the ``mixin`` fixture lifts that check
alone, so the methods' own code still runs against zinit's layers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import zinit
from tiny import randomize_adapter, subprocess_env, tiny_llama, tokens

peft = pytest.importorskip("peft")
zp = pytest.importorskip("zinit.integrations.peft")

from huggingface_hub import ModelCard  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

K = 3
IDS = tokens(2, 9)
ADAPTED = (2, 3)  # the top 2 of 4 layers


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


#: Logits equal to float32 rounding. Tensors loaded from a file can be views of its buffer at another alignment than
#: tensors built in memory, and the CPU's vector kernels can round differently at another alignment (seen: 1.2e-6 on
#: an AMD EPYC, 0 after cloning the loaded prompts; 0 on a Sapphire Rapids). A wrong or missing layer moves them by
#: more than 1e-3 (each test checks that its adapter does).
SAME = 1e-5


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def _keys(layers=ADAPTED, prefix="model.") -> set[str]:
    return {f"{prefix}layers.{n}.self_attn.zinit_adapter.{w}" for n in layers for w in ("prompt", "gate")}


def _trainable(model) -> set[str]:
    return {n for n, p in model.named_parameters() if p.requires_grad}


def _first_line(folder) -> str:
    """The first line of the body (after the YAML metadata) of the folder's README.md card."""
    return ModelCard.load(folder / "README.md").text.strip().splitlines()[0]


IMPORT = "`import zinit.integrations.peft`"


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny LLaMA saved with save_pretrained: every model below is AutoModelForCausalLM.from_pretrained of it."""
    folder = tmp_path_factory.mktemp("base")
    tiny_llama("llama", 4, 2, layers=4).save_pretrained(folder)
    return folder


def _load(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def base_logits(base_dir):
    return _logits(_load(base_dir))


@pytest.fixture(scope="module")
def adapter(base_dir, base_logits, tmp_path_factory):
    """A zinit adapter with random non-zero prompts and gates, saved by PeftModel.save_pretrained; its logits."""
    model = get_peft_model(_load(base_dir), zp.ZinitConfig(layers=2, K=K, task_type="CAUSAL_LM"))
    randomize_adapter(model.get_base_model())
    want = _logits(model)
    assert _max_diff(want, base_logits) > 1e-3  # what SAME tells apart from the base model
    folder = tmp_path_factory.mktemp("adapter")
    model.save_pretrained(folder)
    return folder, want


@pytest.fixture
def mixin(monkeypatch):
    """transformers' PeftAdapterMixin methods, with its peft >= 0.22 version check lifted on an older peft only (see the
    module docstring)."""
    import transformers.integrations.peft as integration
    from packaging.version import Version

    if Version(peft.__version__) >= Version("0.22"):
        return
    monkeypatch.setattr(integration, "check_peft_version", lambda min_version: None)


# ---------------------------------------------------------------- load_adapter


@pytest.mark.parametrize("options", [
    dict(layers=2),
    dict(layers=[0, 2], gate="layer", gate_fn="identity"),
    dict(layers=2, gate_init="random"),
    dict(layers=2, gate="none"),
], ids=["top2-head-tanh", "list-layer-identity", "random-gate-init", "no-gate"])
def test_load_adapter_computes_what_peft_and_zinit_compute(base_dir, base_logits, tmp_path, options):
    trained = get_peft_model(_load(base_dir), zp.ZinitConfig(K=K, task_type="CAUSAL_LM", **options))
    randomize_adapter(trained.get_base_model())
    want = _logits(trained)
    assert _max_diff(want, base_logits) > 1e-3
    trained.save_pretrained(tmp_path / "peft")
    zinit.save_adapter(trained.get_base_model(), tmp_path / "zinit")

    torch.manual_seed(123)  # a fresh random gate (gate_init="random") would differ from the saved one
    model = _load(base_dir)
    info = model.load_adapter(str(tmp_path / "peft"))
    assert (info.unexpected_keys, info.missing_keys, info.mismatched_keys) == (set(), set(), set())
    got = _logits(model)
    assert _max_diff(got, want) <= SAME
    assert _max_diff(got, _logits(PeftModel.from_pretrained(_load(base_dir), tmp_path / "peft"))) <= SAME
    assert _max_diff(got, _logits(zinit.load_adapter(_load(base_dir), tmp_path / "zinit"))) <= SAME
    assert _trainable(model) == set()  # is_trainable=False, transformers' default: frozen


def test_load_adapter_is_trainable_trains_prompts_and_gates_only(base_dir, adapter):
    folder, want = adapter
    model = _load(base_dir)
    model.load_adapter(str(folder), is_trainable=True)
    assert _trainable(model) == _keys()
    assert _max_diff(_logits(model), want) <= SAME
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if p.requires_grad)


def test_auto_model_from_pretrained_of_an_adapter_folder(base_dir, adapter):
    """transformers reads base_model_name_or_path from adapter_config.json, loads the base, then load_adapter."""
    folder, want = adapter
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert _max_diff(_logits(model), want) <= SAME


def test_other_methods_load_through_transformers_as_before(base_dir, base_logits, tmp_path):
    """zinit's change to peft's key renaming touches zinit's adapters only: a LoRA adapter loads as always."""
    lora = get_peft_model(_load(base_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False, task_type="CAUSAL_LM"))
    want = _logits(lora)
    assert _max_diff(want, base_logits) > 1e-3
    lora.save_pretrained(tmp_path)
    model = _load(base_dir)
    info = model.load_adapter(str(tmp_path))
    assert (info.unexpected_keys, info.missing_keys) == (set(), set())
    assert _max_diff(_logits(model), want) <= SAME


def test_load_adapter_into_a_model_it_does_not_fit_refuses_the_first_forward(adapter, tmp_path):
    folder, _ = adapter
    deeper = tiny_llama("llama", 4, 2, layers=5)  # its top 2 layers are 3 and 4; the checkpoint holds 2 and 3
    info = deeper.load_adapter(str(folder))
    assert info.unexpected_keys == {k for k in _keys() if ".layers.2." in k}
    with pytest.raises(ValueError, match=r"no value for \['model\.layers\.4\.self_attn\.zinit_adapter\.prompt', "
                                         r"'model\.layers\.4\.self_attn\.zinit_adapter\.gate'\].*trained on another "
                                         r"model: this one gets layers \[3, 4\] with K=3"):
        deeper(input_ids=IDS)

    wider = tiny_llama("llama", 4, 2, layers=4, hidden=48)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):  # transformers' own refusal
        wider.load_adapter(str(folder))
    with pytest.raises(ValueError, match=r"no value for .*hidden size 48"):  # and the model it leaves computes none
        wider(input_ids=IDS)
    wider = tiny_llama("llama", 4, 2, layers=4, hidden=48)
    info = wider.load_adapter(str(folder), ignore_mismatched_sizes=True)
    assert {k for k, _, _ in info.mismatched_keys} == {k for k in _keys() if k.endswith("prompt")}  # gates fit
    with pytest.raises(ValueError, match=r"no value for \['model\.layers\.2\.self_attn\.zinit_adapter\.prompt', "
                                         r"'model\.layers\.3\.self_attn\.zinit_adapter\.prompt'\].*hidden size 48"):
        wider(input_ids=IDS)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")  # peft's, before zinit's
def test_a_second_adapter_is_refused_and_the_first_stays(base_dir, adapter, mixin):
    folder, want = adapter
    model = _load(base_dir)
    model.load_adapter(str(folder))
    with pytest.raises(ValueError, match="one adapter per model.*zinit.add_adapter"):
        model.load_adapter(str(folder), adapter_name="other")
    with pytest.raises(ValueError, match="one adapter per model"):
        model.add_adapter(zp.ZinitConfig(layers=1, K=2), adapter_name="other")
    assert list(model.peft_config) == ["default"]
    assert _max_diff(_logits(model), want) <= SAME
    assert model.active_adapters() == ["default"]


# ---------------------------------------------------------------- the other PeftAdapterMixin methods


def test_disable_enable_set_active_state_dict_and_delete(base_dir, base_logits, adapter, mixin):
    folder, want = adapter
    model = _load(base_dir)
    model.load_adapter(str(folder))
    assert model.active_adapters() == ["default"]
    assert _max_diff(_logits(model), want) <= SAME

    model.disable_adapters()
    assert torch.equal(_logits(model), base_logits)
    with pytest.raises(ValueError, match="saving inside disable_adapter\\(\\) / disable_adapters\\(\\)"):
        model.get_adapter_state_dict()
    with pytest.raises(ValueError, match="zinit adapters of this model are disabled"):
        zinit.trainable_parameters(model)  # zinit's own API says so too, instead of an AttributeError on None
    model.enable_adapters()
    assert _max_diff(_logits(model), want) <= SAME

    model.set_adapter("default")  # peft's rule: the adapter set active is trainable
    assert _trainable(model) == _keys()
    with pytest.raises(ValueError, match="not found"):
        model.set_adapter("other")
    saved = load_file(folder / "adapter_model.safetensors")
    state = model.get_adapter_state_dict()
    assert set(state) == _keys()
    assert all(torch.equal(state[k], saved[f"base_model.model.{k}"]) for k in state)

    model.delete_adapter("default")
    assert torch.equal(_logits(model), base_logits)
    assert not zinit.is_injected(model) and not hasattr(model, "peft_config")
    assert list(model.state_dict()) == list(_load(base_dir).state_dict())
    model.load_adapter(str(folder))  # and a deleted adapter loads again
    assert _max_diff(_logits(model), want) <= SAME


def test_add_adapter_trains_and_save_pretrained_round_trips(base_dir, base_logits, mixin, tmp_path):
    model = _load(base_dir)
    model.add_adapter(zp.ZinitConfig(layers=2, K=K, task_type="CAUSAL_LM"))
    assert model.active_adapters() == ["default"]
    assert _trainable(model) == _keys()
    assert torch.equal(_logits(model), base_logits)  # gates start at 0
    randomize_adapter(model)  # zinit's own functions work on it: a stand-in for training
    want = _logits(model)
    assert _max_diff(want, base_logits) > 1e-3

    model.save_pretrained(tmp_path)
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == _keys(prefix="base_model.model.model.")
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "ZINIT"
    assert IMPORT in _first_line(tmp_path)
    assert _max_diff(_logits(PeftModel.from_pretrained(_load(base_dir), tmp_path)), want) <= SAME
    fresh = _load(base_dir)
    fresh.load_adapter(str(tmp_path))
    assert _max_diff(_logits(fresh), want) <= SAME


def test_peft_model_layers_are_in_the_model_where_transformers_finds_them(base_dir, adapter):
    """The same ZinitLayerStatus layers serve PeftModel: get_layer_status names each adapted layer."""
    folder, _ = adapter
    loaded = PeftModel.from_pretrained(_load(base_dir), folder)
    status = loaded.get_layer_status()
    assert [s.name for s in status] == [f"model.peft_zinit.{n}" for n in ADAPTED]
    assert {(s.enabled, tuple(s.active_adapters), tuple(s.available_adapters)) for s in status} == {
        (True, ("default",), ("default",))}
    model = loaded.unload()
    assert not hasattr(model, "peft_zinit") and not zinit.is_injected(model)


# ---------------------------------------------------------------- the saved card and a new process


def test_save_pretrained_card_says_to_import_zinit_first(adapter, tmp_path):
    folder, _ = adapter
    assert IMPORT in _first_line(folder) and "KeyError: 'ZINIT'" in _first_line(folder)
    assert _first_line(folder) == zp.CARD_LINE
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and "zinit" in card.data.tags
    assert "## Model Details" in card.text  # peft's own card is kept below the line
    zp.write_card_line(folder)  # saving again into the folder keeps one line, first
    again = ModelCard.load(folder / "README.md")
    assert again.text.count(zp.CARD_LINE) == 1 and again.text.strip().splitlines()[0] == zp.CARD_LINE


NEW_PROCESS = r"""
import json, sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

base, folder, ids = sys.argv[1], sys.argv[2], torch.tensor(json.loads(sys.argv[3]))
out = {"zinit_imported_before": sorted(m for m in sys.modules if m.split(".")[0] == "zinit")}
for door, load in (("peft", lambda m: PeftModel.from_pretrained(m, folder)),
                   ("transformers", lambda m: m.load_adapter(folder))):
    try:
        load(AutoModelForCausalLM.from_pretrained(base))
        out[door] = "loaded"
    except Exception as exc:
        out[door] = f"{type(exc).__name__}: {exc}"
import zinit.integrations.peft
model = AutoModelForCausalLM.from_pretrained(base)
model.load_adapter(folder)
with torch.no_grad():
    out["logits"] = model(input_ids=ids).logits.tolist()
print(json.dumps(out))
"""


def test_a_new_process_needs_the_import_and_the_card_says_so(base_dir, adapter):
    """peft has no hook to find zinit's config class without the import (see write_card_line): the error is peft's
    KeyError, and the card's first line names the fix; with the import, transformers' load_adapter works."""
    folder, want = adapter
    run = subprocess.run([sys.executable, "-c", NEW_PROCESS, str(base_dir), str(folder), json.dumps(IDS.tolist())],
                         capture_output=True, text=True, env=subprocess_env(), timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["zinit_imported_before"] == []
    assert out["peft"] == out["transformers"] == "KeyError: 'ZINIT'"
    assert _max_diff(torch.tensor(out["logits"]), want) <= SAME
    assert IMPORT in _first_line(folder)


def test_the_key_renaming_wrapper_is_installed_once():
    """register() (on import, again after a reload) wraps peft's build_peft_weight_mapping once, around the original."""
    from peft.utils import transformers_weight_conversion as conversion

    zp.register()
    zp.register()
    wrapper = conversion.build_peft_weight_mapping
    assert getattr(wrapper, "_zinit", False) and not getattr(wrapper.__wrapped__, "_zinit", False)
    from transformers.core_model_loading import WeightRenaming

    config = zp.ZinitConfig(layers=2, K=K)
    mapping = wrapper([WeightRenaming("a", "b")], "default", peft_config=config)
    assert [t.target_patterns for t in mapping] == [["model."], [""], ["b"]]  # peft's two prefix strips, the model's
    assert config.__dict__.pop("_zinit_from_checkpoint") is True
    lora = wrapper([WeightRenaming("a", "b")], "default", peft_config=LoraConfig())
    assert [t.target_patterns for t in lora] == [["model."], [""], [r"\1.default"], ["b"]]  # untouched
