"""Adapter files stay editable with standard tools, and a torn pair is still refused (issue 24, item 3).

``adapter.safetensors`` and ``zinit.json`` carry the same save id (``zinit.json``'s ``save_id`` field and the
safetensors metadata ``save_id``). A weights file rewritten with ``safetensors.torch.save_file`` (a model soup, a
dropped layer, a cast to bf16) loads when its tensors fit ``zinit.json``; two files of different saves (a save
interrupted between its two renames, or a file copied from another folder) are refused with a message that names
both ids and the fix. Folders written before save ids existed keep loading.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import zinit
from zinit.io import read_adapter
from tiny import edit_adapter_config, padded_batch, randomize_adapter, tiny_llama

WEIGHTS, CONFIG = "adapter.safetensors", "zinit.json"
TORN = r"adapter weights \S+adapter.safetensors and \S+zinit.json are from different saves"


def _saved(folder: Path, seed: int, **options) -> tuple[torch.nn.Module, Path]:
    """A tiny LLaMA (4 layers) injected on layers [2, 3], K=3, random prompts and gates (``seed``), saved."""
    model = zinit.inject(tiny_llama(), 2, K=3, **options)
    randomize_adapter(model, seed=seed)
    return model, zinit.save_adapter(model, folder)


def _logits(model: torch.nn.Module) -> torch.Tensor:
    ids, mask = padded_batch("right")
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def _metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in zinit.adapter_state_dict(model).items()}


def write_the_old_way(model: torch.nn.Module, folder: Path) -> Path:
    """An adapter folder exactly as zinit wrote it before save ids: weights with the metadata
    ``{"format": "zinit-adapter"}`` only, and a ``zinit.json`` recording the size and sha256 of those weights and no
    ``save_id``."""
    zinit.save_adapter(model, folder)
    tensors = load_file(str(folder / WEIGHTS))
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "zinit-adapter"})
    data = (folder / WEIGHTS).read_bytes()
    config = json.loads((folder / CONFIG).read_text())
    config.pop("save_id", None)
    config.update(weights_bytes=len(data), weights_sha256=hashlib.sha256(data).hexdigest())
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


# ---------------------------------------------------------------------------------------------------------------
# the save id


def test_both_files_of_a_save_carry_the_same_new_save_id(tmp_path):
    model, folder = _saved(tmp_path / "a", seed=1)
    first = json.loads((folder / CONFIG).read_text())["save_id"]
    assert re.fullmatch(r"[0-9a-f]{32}", first)
    assert _metadata(folder / WEIGHTS) == {"format": "zinit-adapter", "save_id": first}
    zinit.save_adapter(model, folder)  # the same adapter saved again is another save
    second = json.loads((folder / CONFIG).read_text())["save_id"]
    assert second != first and _metadata(folder / WEIGHTS)["save_id"] == second


# ---------------------------------------------------------------------------------------------------------------
# edits with safetensors load and compute the edit


@pytest.mark.parametrize("metadata", ["none", "copied"], ids=["save_file without metadata", "metadata copied"])
def test_an_averaged_adapter_loads_and_computes_the_average(tmp_path, metadata):
    """A model-soup script: the mean of two adapters, written over the first one's weights with save_file."""
    a, folder_a = _saved(tmp_path / "a", seed=1)
    b, folder_b = _saved(tmp_path / "b", seed=2)
    soup = tmp_path / "soup"
    shutil.copytree(folder_a, soup)
    first, second = load_file(str(folder_a / WEIGHTS)), load_file(str(folder_b / WEIGHTS))
    mean = {k: (first[k] + second[k]) / 2 for k in first}
    save_file(mean, str(soup / WEIGHTS), metadata=_metadata(folder_a / WEIGHTS) if metadata == "copied" else None)

    loaded = zinit.load_adapter(tiny_llama(), soup)
    state = zinit.adapter_state_dict(loaded)
    assert sorted(state) == sorted(mean) and all(torch.equal(state[k], mean[k]) for k in mean)
    assert torch.equal(state["layers.3.gate"], (first["layers.3.gate"] + second["layers.3.gate"]) / 2)
    expected = zinit.inject(tiny_llama(), 2, K=3)
    zinit.load_adapter_state_dict(expected, mean)
    out = _logits(loaded)
    assert torch.equal(out, _logits(expected))  # the model computes the average ...
    assert not torch.allclose(out, _logits(a), atol=1e-3) and not torch.allclose(out, _logits(b), atol=1e-3)
    named = zinit.add_adapter(tiny_llama(), "soup", soup)  # ... and add_adapter reads it the same way
    assert all(torch.equal(p, mean[k]) for k, p in zinit.bank.named_adapter_state_dict(named, "soup").items())


def test_a_weights_file_cast_to_bf16_loads_as_its_values(tmp_path):
    _, folder = _saved(tmp_path / "a", seed=1)
    small = {k: v.to(torch.bfloat16) for k, v in load_file(str(folder / WEIGHTS)).items()}
    save_file(small, str(folder / WEIGHTS))
    loaded = zinit.load_adapter(tiny_llama(), folder)
    for key, value in zinit.adapter_state_dict(loaded).items():
        assert value.dtype == torch.float32 and torch.equal(value, small[key].float()), key


def test_a_dropped_layer_is_refused_with_what_to_edit_and_each_fix_loads(tmp_path):
    """Deleting a layer's tensors alone is refused (zinit.json still lists the layer: loading the rest would be a
    partial load); following either fix in the message loads, and both compute the adapter without that layer."""
    _, folder = _saved(tmp_path / "a", seed=1)
    tensors = load_file(str(folder / WEIGHTS))
    save_file({k: v for k, v in tensors.items() if not k.startswith("layers.2.")}, str(folder / WEIGHTS))
    model = tiny_llama()
    with pytest.raises(KeyError, match=re.escape(
            f"{folder / WEIGHTS}: no tensors for layer 2 (missing keys ['layers.2.prompt', 'layers.2.gate']), "
            "which zinit.json beside it lists in 'layers': [2, 3]; to drop that layer's adapter, remove 2 from "
            "'layers' in zinit.json too; to switch it off and keep the file whole, keep its tensors and set its "
            "gate (layers.2.gate) to zeros")):
        zinit.load_adapter(model, folder)
    assert not zinit.is_injected(model)

    edited = tmp_path / "edited"  # fix 1: the description says the layer is gone too
    shutil.copytree(folder, edited)
    edit_adapter_config(edited, layers=[3])
    one_layer = zinit.load_adapter(tiny_llama(), edited)
    assert zinit.injection(one_layer).layers == (3,)
    gated_off = tmp_path / "gated_off"  # fix 2: the layer stays, its gate closed
    shutil.copytree(folder, gated_off)
    save_file({**tensors, "layers.2.gate": torch.zeros_like(tensors["layers.2.gate"])}, str(gated_off / WEIGHTS))
    closed = zinit.load_adapter(tiny_llama(), gated_off)
    assert torch.allclose(_logits(one_layer), _logits(closed), atol=1e-5)
    assert torch.equal(zinit.adapter_state_dict(one_layer)["layers.3.prompt"], tensors["layers.3.prompt"])


def test_two_dropped_layers_of_an_adapter_without_gates_are_named_together(tmp_path):
    model = zinit.inject(tiny_llama(), 3, K=3, gate="none")
    folder = zinit.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS))
    save_file({"layers.3.prompt": tensors["layers.3.prompt"]}, str(folder / WEIGHTS))
    with pytest.raises(KeyError, match=re.escape(
            "no tensors for layers 1, 2 (missing keys ['layers.1.prompt', 'layers.2.prompt']), which zinit.json "
            "beside it lists in 'layers': [1, 2, 3]; to drop those layers' adapters, remove 1, 2 from 'layers' in "
            "zinit.json too; to keep them, put their tensors back")):
        zinit.load_adapter(tiny_llama(), folder)


@pytest.mark.parametrize("change,error,pattern", [
    (lambda t: {**t, "layers.1.prompt": torch.zeros(3, 32), "layers.1.gate": torch.zeros(4)}, KeyError,
     r"adapter.safetensors does not fit zinit.json beside it: unexpected keys \['layers.1.gate', 'layers.1.prompt'\] "
     r"\(zinit.json lists layers \[2, 3\]: to add a layer's adapter, add its index to 'layers' there\)"),
    (lambda t: {k: v for k, v in t.items() if k != "layers.3.gate"}, KeyError,
     r"adapter.safetensors does not fit zinit.json beside it: missing keys \['layers.3.gate'\] \(zinit.json "
     r"describes layers \[2, 3\] with K=3, gate='head': keys layers.N.prompt \[3, 32\] and layers.N.gate \[4\]\)"),
    (lambda t: {**t, "lm_head.weight": torch.zeros(2, 2)}, KeyError,
     r"unexpected keys \['lm_head.weight'\] \(zinit.json has no train_modules"),
    (lambda t: {**t, "layers.3.prompt": torch.zeros(5, 32)}, ValueError,
     r"adapter.safetensors: tensor 'layers.3.prompt' has shape \[5, 32\]; zinit.json beside it \(K=3, "
     r"hidden_size=32\) says \[3, 32\]"),
    (lambda t: {**t, "layers.2.gate": torch.zeros(1)}, ValueError,
     r"tensor 'layers.2.gate' has shape \[1\]; zinit.json beside it \(gate='head', num_heads=4\) says \[4\]"),
], ids=["an extra layer", "a missing gate", "a key of no group", "a prompt of another K", "a gate of another kind"])
def test_an_edit_that_does_not_fit_zinit_json_names_the_key_and_what_zinit_json_says(tmp_path, change, error,
                                                                                     pattern):
    _, folder = _saved(tmp_path / "a", seed=1)
    save_file(change(load_file(str(folder / WEIGHTS))), str(folder / WEIGHTS))
    with pytest.raises(error, match=pattern):
        read_adapter(folder)  # checked without any model
    model = tiny_llama()
    with pytest.raises(error, match=pattern):
        zinit.load_adapter(model, folder)
    assert not zinit.is_injected(model)


def test_tensors_beside_the_layers_are_checked_by_the_fields_that_provide_them(tmp_path):
    """A visual projection and a task head (visual_dim, train_modules): an edit of their values loads; a group
    removed, or a key zinit.json provides no group for, is named with the field."""
    from tiny import tiny_vit

    model = zinit.inject(tiny_vit(), 2, K=3, train_modules=["head"], visual_dim=8)
    randomize_adapter(model, seed=1)
    folder = zinit.save_adapter(model, tmp_path / "a")
    tensors = load_file(str(folder / WEIGHTS))
    assert {k.split(".")[0] for k in tensors} == {"layers", "visual_proj", "modules"}
    halved = {k: v / 2 for k, v in tensors.items()}
    save_file(halved, str(folder / WEIGHTS))
    state = zinit.adapter_state_dict(zinit.load_adapter(tiny_vit(), folder))
    assert sorted(state) == sorted(halved) and all(torch.equal(state[k], halved[k]) for k in halved)

    save_file({k: v for k, v in tensors.items() if not k.startswith("visual_proj.")}, str(folder / WEIGHTS))
    with pytest.raises(KeyError, match=r"adapter.safetensors does not fit zinit.json beside it: no visual_proj.\* "
                                       r"tensors, which visual_dim=8 in zinit.json needs; make the two agree"):
        zinit.load_adapter(tiny_vit(), folder)
    save_file({**tensors, "modules.norm.weight": torch.ones(48)}, str(folder / WEIGHTS))
    with pytest.raises(KeyError, match=re.escape(
            "does not fit zinit.json beside it: unexpected keys ['modules.norm.weight'] (zinit.json describes "
            "layers.N.* and visual_proj.* (visual_dim=8), modules.head.* (train_modules entry 'head') only)")):
        zinit.load_adapter(tiny_vit(), folder)


# ---------------------------------------------------------------------------------------------------------------
# torn pairs are refused


def test_weights_of_another_save_are_refused_as_a_torn_pair_even_with_every_shape_equal(tmp_path):
    """zinit.json from save A, adapter.safetensors from save B of the same shapes, but another gate function: loading
    it would compute the wrong thing, silently."""
    _, folder_a = _saved(tmp_path / "a", seed=1)
    _, folder_b = _saved(tmp_path / "b", seed=2, gate_fn="identity")
    shutil.copyfile(folder_b / WEIGHTS, folder_a / WEIGHTS)
    id_a = json.loads((folder_a / CONFIG).read_text())["save_id"]
    id_b = _metadata(folder_b / WEIGHTS)["save_id"]
    model = tiny_llama()
    with pytest.raises(ValueError, match=TORN + re.escape(
            f" (adapter.safetensors has save_id {id_b}, zinit.json has save_id {id_a}): a save into {folder_a} was "
            "interrupted between its two renames, or one of the files was copied from another adapter folder; save "
            "the adapter again (zinit.save_adapter), or copy both files of one save into the folder; if you wrote "
            "adapter.safetensors yourself (averaging or editing adapters), write it without metadata "
            f"(safetensors.torch.save_file(tensors, path)) or with metadata={{'save_id': '{id_a}'}}")):
        zinit.load_adapter(model, folder_a)
    assert not zinit.is_injected(model)


def test_metadata_copied_from_the_other_parent_is_refused_and_the_message_says_which_id_to_write(tmp_path):
    _, folder_a = _saved(tmp_path / "a", seed=1)
    _, folder_b = _saved(tmp_path / "b", seed=2)
    first, second = load_file(str(folder_a / WEIGHTS)), load_file(str(folder_b / WEIGHTS))
    mean = {k: (first[k] + second[k]) / 2 for k in first}
    save_file(mean, str(folder_a / WEIGHTS), metadata=_metadata(folder_b / WEIGHTS))
    id_a = json.loads((folder_a / CONFIG).read_text())["save_id"]
    with pytest.raises(ValueError, match=TORN + r".*" + re.escape(f"metadata={{'save_id': '{id_a}'}}")):
        zinit.load_adapter(tiny_llama(), folder_a)
    save_file(mean, str(folder_a / WEIGHTS), metadata={"save_id": id_a})  # what the message says
    loaded = zinit.adapter_state_dict(zinit.load_adapter(tiny_llama(), folder_a))
    assert all(torch.equal(loaded[k], mean[k]) for k in mean)


def _crash_between_renames(monkeypatch, model, folder):
    """Save ``model`` into ``folder`` as if the process were killed between the weights rename and the description
    rename: no cleanup at all (the staged description and the earlier weights' backup stay on disk)."""
    import zinit.io as zio

    real = os.replace

    class Killed(BaseException):
        pass

    def replace(src, dst, *args, **kwargs):
        if str(dst).endswith(CONFIG) or ".previous.tmp" in str(src):
            raise Killed
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(zio.os, "replace", replace)
    monkeypatch.setattr(zio, "discard", lambda path: None)
    with pytest.raises(Killed):
        zinit.save_adapter(model, folder)
    monkeypatch.undo()


def test_a_crash_in_the_first_save_over_an_old_folder_is_detected_and_either_adapter_restores(tmp_path, monkeypatch):
    """A folder written before save ids, then a save of this zinit killed between its two renames: the new weights
    (with a save id) sit beside the old zinit.json (without one). Refused; the message names the leftover files,
    and renaming either gives back that adapter exactly."""
    old, new = zinit.inject(tiny_llama(), 2, K=3), zinit.inject(tiny_llama(), 2, K=3)
    randomize_adapter(old, seed=1)
    randomize_adapter(new, seed=2)
    folder = write_the_old_way(old, tmp_path / "a")
    _crash_between_renames(monkeypatch, new, folder)
    new_id = _metadata(folder / WEIGHTS)["save_id"]
    with pytest.raises(ValueError, match=TORN + re.escape(
            f" (adapter.safetensors has save_id {new_id}, zinit.json has none: it is from an earlier save)") +
            r": .*; (\.zinit\.json\.\S+\.tmp) describes these weights: rename it to zinit.json to use them; "
            r"(\.adapter\.safetensors\.\S+\.previous\.tmp) holds the weights zinit.json describes: rename it to "
            r"adapter.safetensors to restore the earlier adapter$") as caught:
        zinit.load_adapter(tiny_llama(), folder)
    description, weights = re.findall(r"(\.\S+\.tmp) ", str(caught.value))
    for model, (leftover, target) in ((old, (weights, WEIGHTS)), (new, (description, CONFIG))):
        copy = tmp_path / f"restored-{target}"
        shutil.copytree(folder, copy)
        (copy / leftover).rename(copy / target)
        loaded = zinit.adapter_state_dict(zinit.load_adapter(tiny_llama(), copy))
        assert all(torch.equal(loaded[k], v) for k, v in zinit.adapter_state_dict(model).items())


# ---------------------------------------------------------------------------------------------------------------
# folders written before save ids


def test_a_folder_written_before_save_ids_loads_and_its_edits_load(tmp_path):
    model = zinit.inject(tiny_llama(), 2, K=3)
    randomize_adapter(model, seed=1)
    folder = write_the_old_way(model, tmp_path / "old")
    assert "save_id" not in json.loads((folder / CONFIG).read_text())
    assert _metadata(folder / WEIGHTS) == {"format": "zinit-adapter"}
    loaded = zinit.load_adapter(tiny_llama(), folder)
    assert torch.equal(_logits(loaded), _logits(model))
    tensors = load_file(str(folder / WEIGHTS))
    halved = {k: v / 2 for k, v in tensors.items()}
    save_file(halved, str(folder / WEIGHTS))  # edited with safetensors: no zinit metadata
    state = zinit.adapter_state_dict(zinit.load_adapter(tiny_llama(), folder))
    assert all(torch.equal(state[k], halved[k]) for k in halved)


def test_a_folder_written_before_save_ids_still_refuses_the_weights_of_another_old_save(tmp_path):
    """Weights a zinit save wrote before save ids (its metadata, no id) that are not the file zinit.json records
    (sha256): two files of different saves, refused as before; the message says how to write an edit instead."""
    first, second = zinit.inject(tiny_llama(), 2, K=3), zinit.inject(tiny_llama(), 2, K=3)
    randomize_adapter(first, seed=1)
    randomize_adapter(second, seed=2)
    folder = write_the_old_way(first, tmp_path / "a")
    other = write_the_old_way(second, tmp_path / "b")
    shutil.copyfile(other / WEIGHTS, folder / WEIGHTS)
    with pytest.raises(ValueError, match=TORN + re.escape(
            " (adapter.safetensors carries the metadata of a zinit save made before save ids, but its sha256 differs "
            "from the one zinit.json records)") + r".*write it without metadata \(safetensors.torch.save_file\("
            r"tensors, path\)\)$"):
        zinit.load_adapter(tiny_llama(), folder)
