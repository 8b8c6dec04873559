"""ScienceQA recipe: the release format, the paper's accuracy columns, the feature cache, training (also under
torchrun) and evaluation of the saved adapter, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import zinit
from zinit.recipes import scienceqa as sqa
from tiny import save_tiny_causal_lm
from zinit.cli import main as cli

COLOURS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}


def write_release(root, n_train=12, n_val=6, n_test=6):
    """A ScienceQA folder in the release format: image questions (the colour of the picture), hint-only text
    questions and questions with neither, three subjects, grades 1-12."""
    problems, splits = {}, {}
    subjects = list(sqa.SUBJECTS)
    pid = 100
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        splits[split] = []
        for i in range(n):
            pid += 1
            kind = i % 3
            colour = list(COLOURS)[i % 3]
            problem = {"question": "Which colour is shown?" if kind == 0 else f"Which word is number {i % 2}?",
                       "choices": list(COLOURS) if kind == 0 else ["zero", "one"],
                       "answer": list(COLOURS).index(colour) if kind == 0 else i % 2,
                       "hint": "" if kind != 1 else f"The number is {i % 2}.",
                       "image": "image.png" if kind == 0 else None,
                       "subject": subjects[i % 3], "grade": f"grade{1 + (i * 5) % 12}",
                       "lecture": "", "solution": "", "split": split, "task": "closed choice"}
            problems[str(pid)] = problem
            splits[split].append(str(pid))
            if problem["image"]:
                folder = root / "images" / split / str(pid)
                folder.mkdir(parents=True, exist_ok=True)
                Image.new("RGB", (24, 24), COLOURS[colour]).save(folder / "image.png")
    splits["minitrain"] = splits["train"][:4]
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(splits))
    return root


def save_tiny_clip(folder, seed=0):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8)
    CLIPVisionModel(cfg).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def test_accuracy_table_on_hand_made_predictions():
    problems = {
        "1": {"answer": 0, "hint": "h", "image": None, "subject": "natural science", "grade": "grade2"},
        "2": {"answer": 1, "hint": "", "image": "image.png", "subject": "social science", "grade": "grade8"},
        "3": {"answer": 2, "hint": "h", "image": "image.png", "subject": "language science", "grade": "grade12"},
        "4": {"answer": 0, "hint": "", "image": None, "subject": "natural science", "grade": "grade6"},
        "5": {"answer": 1, "hint": " ", "image": None, "subject": "social science", "grade": "grade7"},
    }
    predictions = {"1": 0, "2": 1, "3": 0, "4": None, "5": 1}  # 3 right, 1 wrong, 1 with no valid letter
    table = sqa.accuracy_table(problems, predictions)
    assert table["NAT"] == 50.0 and table["SOC"] == 100.0 and table["LAN"] == 0.0
    assert table["TXT"] == 50.0  # 1 and 3 have a hint ("5"'s is blank)
    assert table["IMG"] == 50.0  # 2 right, 3 wrong
    assert table["NO"] == 50.0  # 4 (no letter) and 5 have neither
    assert table["G1-6"] == 50.0 and table["G7-12"] == pytest.approx(200 / 3) and table["Avg"] == 60.0
    assert table["counts"] == {"NAT": 2, "SOC": 2, "LAN": 1, "TXT": 2, "IMG": 2, "NO": 2, "G1-6": 2, "G7-12": 3,
                               "Avg": 5}
    assert table["no_valid_letter"] == 1
    text = sqa.format_table(table)
    assert "| zinit (measured) | 50.00 | 100.00 | 0.00 |" in text and "| LLaMA-Adapter (paper) | 84.37 |" in text
    assert sqa.accuracy_table(problems, {"1": 0})["SOC"] is None


def test_prompt_and_target_format():
    p = {"question": "Which is a mammal?", "hint": "Look closely.", "choices": ["cat", "cod", "crab"], "answer": 0}
    prompt = sqa.prompt_text(p)
    assert "### Instruction:\nQuestion: Which is a mammal?\nContext: Look closely.\nOptions: (A) cat (B) cod (C) crab" \
        in prompt and prompt.endswith("### Response:")
    assert sqa.target_text(p["answer"]) == "The answer is A."
    assert sqa.extract_answer("The answer is D.", 3) is None  # a letter past the options is no answer


def test_feature_cache_reads_back_and_another_encoder_recomputes(tmp_path, monkeypatch):
    data = sqa.load_scienceqa(write_release(tmp_path / "sqa"))
    clip = save_tiny_clip(tmp_path / "clip")
    pids = data.split("train")
    calls = []
    real = sqa.ImageEncoder.encode
    monkeypatch.setattr(sqa.ImageEncoder, "encode", lambda self, images: calls.append(len(images))
                        or real(self, images))
    encoder = sqa.ImageEncoder(str(clip), layers=[1, 3])
    first = sqa.image_features(data, "train", pids, encoder, tmp_path / "cache", progress=False)
    assert sum(calls) == 4 and len(first) == 4 and first[pids[0]].shape == (64,)
    assert encoder.dim == 64
    calls.clear()
    again = sqa.image_features(data, "train", pids, sqa.ImageEncoder(str(clip), layers=[1, 3]), tmp_path / "cache",
                               progress=False)
    assert calls == [] and all(torch.equal(again[p], first[p]) for p in first)  # no encoder call
    other = sqa.image_features(data, "train", pids, sqa.ImageEncoder(str(clip), layers=[2, 3]), tmp_path / "cache",
                               progress=False)
    assert sum(calls) == 4 and not torch.equal(other[pids[0]], first[pids[0]])
    calls.clear()
    timm_enc = sqa.ImageEncoder("timm:vit_tiny_patch16_224", layers=[4, 12])
    feats = sqa.image_features(data, "train", pids, timm_enc, tmp_path / "cache", progress=False)
    assert sum(calls) == 4 and feats[pids[0]].shape == (2 * 192,)
    calls.clear()
    image = data.image_path(pids[0], "train")  # a changed image file is re-encoded, the others are not
    Image.new("RGB", (24, 24), (1, 2, 3)).save(image)
    sqa.image_features(data, "train", pids, sqa.ImageEncoder(str(clip), layers=[1, 3]), tmp_path / "cache",
                       progress=False)
    assert calls == [1]


def test_bad_input_names_the_pid_and_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="ScienceQA problems file .*problems.json does not exist"):
        sqa.load_scienceqa(tmp_path)
    root = write_release(tmp_path / "a")
    splits = json.loads((root / "pid_splits.json").read_text())
    splits["val"].append("999999")
    (root / "pid_splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="pid 999999 of split 'val' in pid_splits.json is not in problems.json"):
        sqa.load_scienceqa(root).split("val")
    root = write_release(tmp_path / "b")
    data = sqa.load_scienceqa(root)
    pid = data.splits["test"][0]
    missing = data.image_path(pid, "test")
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=f"pid {pid}: image file .*images/test/{pid}/image.png does not exist"):
        data.split("test")
    assert len(data.split("test", images=False)) == 6  # the text-only variant does not need images
    problems = json.loads((root / "problems.json").read_text())
    problems[data.splits["val"][1]]["answer"] = 5
    (root / "problems.json").write_text(json.dumps(problems))
    with pytest.raises(ValueError, match=f"pid {data.splits['val'][1]}: answer index 5 is out of range for 2"):
        sqa.load_scienceqa(root).split("val")
    with pytest.raises(ValueError, match="split 'dev' is not in"):
        sqa.load_scienceqa(root).split("dev")


def _train_args(root, model, clip, out, *extra):
    return ["--model", str(model), "--data", str(root), "--visual-encoder", str(clip), "--output", str(out),
            "--feature-cache", str(root.parent / "cache"), "--layers", "2", "--K", "4", "--epochs", "2",
            "--warmup-epochs", "0.5", "--batch-size", "2", "--blr", "2", "--max-seq-len", "256", "--no-progress",
            "--device", "cpu", *extra]


@pytest.fixture
def release(tmp_path):
    root = write_release(tmp_path / "sqa")
    return root, save_tiny_causal_lm(tmp_path / "lm"), save_tiny_clip(tmp_path / "clip")


def test_train_selects_on_val_and_eval_reads_the_adapter(release, tmp_path, capsys):
    root, model, clip = release
    out = tmp_path / "run"
    assert cli(["train", "scienceqa", *_train_args(root, model, clip, out)]) == 0
    history = json.loads((out / "val_history.json").read_text())
    assert [h["step"] for h in history] == [6, 12]  # 12 questions / batch 2 = 6 steps per epoch
    report = json.loads((out / "report.json").read_text())
    assert report["split"] == "test" and report["table"]["counts"]["Avg"] == 6
    assert report["best_val"]["val_avg"] == max(h["val_avg"] for h in history)
    config = zinit.read_adapter_config(out / "adapter")
    assert config["visual_dim"] == 3 * 32 and config["layers"] == [1, 2]  # layers 1, 2, 3 of a 3-layer CLIP
    printed = capsys.readouterr().out
    assert "| zinit (measured) |" in printed
    assert cli(["eval", "scienceqa", "--model", str(model), "--data", str(root), "--adapter", str(out / "adapter"),
                "--split", "test", "--feature-cache", str(tmp_path / "cache"), "--output", str(tmp_path / "ev"),
                "--no-progress", "--device", "cpu"]) == 0
    again = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert again["table"] == report["table"]  # the same adapter, encoder and features
    assert cli(["eval", "scienceqa", "--model", str(model), "--data", str(root), "--adapter", str(out / "adapter"),
                "--split", "val", "--mode", "generate", "--feature-cache", str(tmp_path / "cache"), "--output",
                str(tmp_path / "gen"), "--no-progress", "--device", "cpu"]) == 0
    generated = json.loads((tmp_path / "gen" / "predictions.json").read_text())
    assert len(generated) == 6 and all("reply" in v for v in generated.values())


def test_text_only_variant_has_no_visual_projection(release, tmp_path):
    root, model, clip = release
    out = tmp_path / "text"
    assert cli(["train", "scienceqa", *_train_args(root, model, clip, out, "--no-image", "--epochs", "1")]) == 0
    config = zinit.read_adapter_config(out / "adapter")
    assert "visual_dim" not in config
    assert json.loads((out / "adapter" / sqa.RECIPE_FILE).read_text())["visual_encoder"] is None


def test_torchrun_two_processes(release, tmp_path):
    from tiny import subprocess_env

    root, model, clip = release
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29741",
           "-m", "zinit", "train", "scienceqa", *_train_args(root, model, clip, out)]
    proc = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert json.loads((out / "train_config.json").read_text())["world_size"] == 2
    assert cli(["eval", "scienceqa", "--model", str(model), "--data", str(root), "--adapter", str(out / "adapter"),
                "--feature-cache", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]) == 0


def test_other_methods_run_text_only_and_compare(release, tmp_path):
    root, model, clip = release
    out = tmp_path / "lora-image"
    assert cli(["train", "scienceqa", *_train_args(root, model, clip, out, "--method", "lora")]) == 3
    assert "--no-image" in json.loads((out / "not_applicable.json").read_text())["reason"]
    cmp = tmp_path / "cmp"
    recipe_args = _train_args(root, model, clip, "unused", "--no-image", "--epochs", "1")
    recipe_args = [a for a in recipe_args if a not in ("--output", "unused")]  # compare gives each method its own
    assert cli(["compare", "scienceqa", "--methods", "zinit,lora", "--output", str(cmp), *recipe_args]) == 0
    rows = {r["method"]: r for r in json.loads((cmp / "compare.json").read_text())["rows"]}
    assert rows["zinit"]["status"] == rows["lora"]["status"] == "ok"
    assert set(rows["lora"]["metrics"]) >= {"Avg", "NO"} and rows["lora"]["trainable_parameters"] == 3 * 8 * (
        (32 + 32) + (32 + 16))
    lora_report = json.loads((cmp / "lora" / "report.json").read_text())
    assert lora_report["method"] == "lora" and lora_report["table"]["counts"]["Avg"] == 6


def test_likelihood_scores_prompt_tuning_at_the_last_prompt_token(tmp_path):
    """peft prompt tuning returns logits for its K virtual tokens too: the scorer still reads each question at the
    token before the option letter. Reference: each question alone (no padding, no batch), the peft model's last
    logits after "<prompt>The answer is ", argmax over the option letters."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zinit.methods import registry as methods

    folder = save_tiny_causal_lm(tmp_path / "lm", seed=4)  # a model whose choice varies between the questions
    model = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = methods.prepare("prompt", model, methods.MethodContext("scienceqa", 2, 4)).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    problems = [{"question": f"Which one is number {i}?" + " Think." * i, "hint": "" if i % 2 else f"Hint {i}.",
                 "choices": ["one", "two", "three", "four"][:2 + i % 3], "answer": 0} for i in range(8)]
    got = sqa.predict(model, tokenizer, problems, None, "likelihood", batch_size=4)
    expected = []
    with torch.no_grad():
        for p in problems:
            ids = tokenizer(sqa.prompt_text(p) + "The answer is ")["input_ids"]
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
            letters = [tokenizer.convert_tokens_to_ids(letter) for letter in sqa.LETTERS[:len(p["choices"])]]
            expected.append(int(logits[letters].argmax()))
    assert [choice for choice, _ in got] == expected
    assert len(set(expected)) > 1  # not one constant letter, which a scorer could get right by chance


# ---------------------------------------------------------------------------------------------------------------
# the demo with real photos (make_scienceqa_demo --images fashion-mnist) and a timm encoder's input size


def _marked_fashion(folder, n_train=60, n_test=20):
    """A Fashion-MNIST folder (original idx layout) whose every image says where it came from: pixel (0, 27) is
    1 in the training file and 2 in the test file, (1, 27) its label, (2, 27) its index there."""
    import numpy as np
    from test_vtab import write_idx

    folder.mkdir(parents=True)
    for prefix, n, mark in (("train", n_train, 1), ("t10k", n_test, 2)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 0, 27], images[:, 1, 27], images[:, 2, 27] = mark, labels, np.arange(n)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


def test_demo_with_real_photos_asks_the_garment_each_photo_shows(tmp_path):
    from zinit.recipes import make_scienceqa_demo as demo

    source = _marked_fashion(tmp_path / "fashion")
    root = demo.make(tmp_path / "sqa", {"train": 16, "val": 8, "test": 8}, images="fashion-mnist",
                     fashion_source=source)
    data = sqa.load_scienceqa(root)  # the release format, checked on load
    seen = set()
    for split in ("train", "val", "test"):
        pids = data.split(split, images=True)
        photos = [pid for pid in pids if data.problems[pid]["image"]]
        assert len(photos) == len(pids) // 2
        for pid in photos:
            problem = data.problems[pid]
            assert problem["choices"] == list(demo.GARMENTS.values())
            with Image.open(data.image_path(pid, split)) as im:
                pixels = im.convert("L").load()
            origin, label, index = pixels[27, 0], pixels[27, 1], pixels[27, 2]
            assert origin == (2 if split == "test" else 1)  # test photos come from the test file only
            assert problem["choices"][problem["answer"]] == demo.GARMENTS[label]  # the answer is the photo's garment
            assert (origin, index) not in seen  # each photo is used once
            seen.add((origin, index))
    with pytest.raises(ValueError, match="no photo left for split 'test'"):
        demo.make(tmp_path / "big", {"train": 2, "val": 2, "test": 40}, images="fashion-mnist", fashion_source=source)
    with pytest.raises(SystemExit):  # a missing source is the parser's error, naming the folder
        demo.main([str(tmp_path / "x"), "--images", "fashion-mnist", "--fashion-source", str(tmp_path / "none")])


def test_a_timm_encoders_input_size_is_recorded_and_eval_uses_it(release, tmp_path):
    root, model, _ = release
    small = sqa.ImageEncoder("timm:vit_tiny_patch16_224", img_size=32)
    assert small.model.patch_embed.img_size == (32, 32) and small.transform.transforms[1].size == (32, 32)
    assert small.fingerprint() != sqa.ImageEncoder("timm:vit_tiny_patch16_224").fingerprint()  # another cache
    with pytest.raises(ValueError, match="--visual-img-size applies to a timm"):
        sqa.ImageEncoder(str(release[2]), img_size=32)
    out = tmp_path / "run"
    args = _train_args(root, model, "timm:vit_tiny_patch16_224", out, "--visual-img-size", "32", "--epochs", "1")
    assert cli(["train", "scienceqa", *args]) == 0
    assert json.loads((out / "adapter" / sqa.RECIPE_FILE).read_text())["visual_img_size"] == 32
    report = json.loads((out / "report.json").read_text())
    assert cli(["eval", "scienceqa", "--model", str(model), "--data", str(root), "--adapter", str(out / "adapter"),
                "--split", "test", "--feature-cache", str(tmp_path / "cache2"), "--output", str(tmp_path / "ev"),
                "--no-progress", "--device", "cpu"]) == 0  # its own cache: the features are computed again
    assert json.loads((tmp_path / "ev" / "report.json").read_text())["table"] == report["table"]
    assert [p.name for p in (tmp_path / "cache2").iterdir()] == [small.fingerprint()]  # by the 32-pixel encoder
