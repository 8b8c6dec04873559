"""VTAB-1k recipe: the loader on a fixture in the exact layout, the protocol's order, group means, a full tiny run
and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from zinit.recipes import vision, vtab
from tiny import tiny_vit
from zinit.cli import main as cli

SIZES = {"train800": 12, "val200": 6, "test": 8}
#: where Debian's dataset-fashion-mnist puts the real files (only the skip-if-missing test reads them)
REAL_FASHION = "/usr/share/datasets/fashion-mnist"


def write_task(root, folder="cifar100", classes=3, sizes=SIZES):
    """A task in the VPT/NOAH layout: each class is a distinct colour, so it can be learnt."""
    task = root / folder
    lines = {}
    for split, n in sizes.items():
        (task / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for i in range(n):
            label = i % classes
            colour = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][label % 3]
            Image.new("RGB", (20, 20), colour).save(task / "images" / split / f"{i}.jpg")
            lines[split].append(f"images/{split}/{i}.jpg {label}")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, rows in lines.items():
        (task / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return task


def test_loader_reads_the_layout_and_accepts_other_folder_names(tmp_path):
    write_task(tmp_path, "cifar100", classes=3)
    data = vtab.VtabData(tmp_path, "cifar")
    assert data.spec.name == "cifar" and data.spec.num_classes == 100 and data.folder.name == "cifar100"
    items = data.split("val200")
    assert len(items) == 6 and items[1] == (data.folder / "images/val200/1.jpg", 1)
    assert data.reads == ["val200"]
    images, labels = vtab.load_images(items, 16, "val", progress=False)
    assert images.shape == (6, 3, 16, 16) and images.dtype == torch.uint8 and labels.tolist() == [0, 1, 2, 0, 1, 2]
    assert images[0, 0].float().mean() > 150 and images[0, 2].float().mean() < 80  # red stays red
    assert vtab.find_task(tmp_path, "cifar100")[0].name == "cifar"
    write_task(tmp_path, "oxford_pet")
    assert vtab.find_task(tmp_path, "oxford_iiit_pet")[1].name == "oxford_pet"


def test_group_means_on_hand_made_numbers():
    top1 = {"cifar": 70.0, "svhn": 80.0, "eurosat": 95.0, "resisc45": 85.0, "patch_camelyon": 75.0,
            "dmlab": 40.0}
    means = vtab.group_means(top1)
    assert means == {"Natural": {"mean": 75.0, "tasks": 2, "of": 7},
                     "Specialized": {"mean": 85.0, "tasks": 3, "of": 4},
                     "Structured": {"mean": 40.0, "tasks": 1, "of": 8}}
    vpt = vtab.group_means(vtab.VPT_DEEP)  # the per-task VPT numbers give the paper's group means
    assert [round(vpt[g]["mean"], 2) for g in vtab.GROUPS] == [78.49, 82.42, 55.0]
    assert [sum(t.group == g for t in vtab.TASKS.values()) for g in vtab.GROUPS] == [7, 4, 8]
    assert {n: vtab.TASKS[n].num_classes for n in ("cifar", "sun397", "patch_camelyon", "dsprites_loc",
                                                   "smallnorb_ele")} == {
        "cifar": 100, "sun397": 397, "patch_camelyon": 2, "dsprites_loc": 16, "smallnorb_ele": 9}


def test_protocol_never_reads_test_before_the_final_training(tmp_path, monkeypatch):
    write_task(tmp_path, "dtd")
    events = []
    real_read, real_train = vtab.read_split, vtab.train
    monkeypatch.setattr(vtab, "read_split", lambda folder, split, n: events.append(("read", split))
                        or real_read(folder, split, n))
    monkeypatch.setattr(vtab, "train", lambda model, task, config: events.append(("train", config.output))
                        or real_train(model, task, config))
    settings = vtab.VtabSettings(layers=2, K=2, epochs=1, warmup_epochs=0, batch_size=4, blr_grid=(1e-2, 1e-1),
                                 wd_grid=(0.0,), seeds=(0, 1), device="cpu", progress=False)
    result = vtab.run_task(tmp_path, "dtd", tmp_path / "out", settings, base=tiny_vit(num_classes=0))
    kinds = [e if e[0] == "read" else ("train", e[1].split("/")[-1]) for e in events]
    assert kinds == [("read", "train800"), ("read", "val200"), ("train", "blr0.01_wd0"), ("train", "blr0.1_wd0"),
                     ("read", "train800val200"), ("train", "final_seed0"), ("read", "test"),
                     ("train", "final_seed1"), ("read", "test")]
    assert result["splits_read"] == ["train800", "val200", "train800val200", "test", "test"]
    assert len(result["search"]) == 2 and len(result["test_top1"]) == 2
    assert result["trainable_parameters"] == 2 * (2 * 48 + 3) + 47 * 48 + 47
    events.clear()  # a re-run finds every piece done: it trains nothing and reads nothing
    again = vtab.run_task(tmp_path, "dtd", tmp_path / "out", settings, base=tiny_vit(num_classes=0))
    assert events == [] and again["test_top1"] == result["test_top1"]


def test_full_tiny_run_writes_the_report(tmp_path, capsys):
    write_task(tmp_path / "data", "kitti", classes=3)
    out = tmp_path / "out"
    assert cli(["train", "vtab", "--task", "kitti", "--data", str(tmp_path / "data"), "--output", str(out),
                "--model", "vit_tiny_patch16_224", "--img-size", "32", "--layers", "2", "--K", "2", "--epochs", "2",
                "--warmup-epochs", "0", "--batch-size", "6", "--blr-grid", "0.1", "--wd-grid", "0",
                "--device", "cpu", "--no-progress"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert [t["task"] for t in report["tasks"]] == ["kitti"] and report["groups"]["Structured"]["tasks"] == 1
    assert 0.0 <= report["tasks"][0]["mean"] <= 100.0
    assert (out / "vtab.png").stat().st_size > 0 and "| kitti | Structured |" in (out / "report.md").read_text()
    assert (out / "kitti" / "final_seed0" / "adapter" / "adapter.safetensors").is_file()
    printed = capsys.readouterr().out
    assert "random weights" in printed and "zero-init (paper)" in printed


def test_bad_input_names_the_file(tmp_path):
    task = write_task(tmp_path, "eurosat", classes=3)
    (task / "val200.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"val200.txt does not exist"):
        vtab.VtabData(tmp_path, "eurosat")

    task = write_task(tmp_path, "svhn", classes=3)
    (task / "test.txt").write_text("images/test/0.jpg 12\n")
    with pytest.raises(ValueError, match=r"test.txt:1: label 12 is outside 0..9 \(10 classes\)"):
        vtab.VtabData(tmp_path, "svhn").split("test")
    (task / "test.txt").write_text("images/test/0.jpg\n")
    with pytest.raises(ValueError, match=r"test.txt:1: expected '<image path> <integer label>'"):
        vtab.VtabData(tmp_path, "svhn").split("test")
    (task / "test.txt").write_text("images/test/99.jpg 1\n")
    with pytest.raises(FileNotFoundError, match=r"test.txt:1: image .*99.jpg does not exist"):
        vtab.VtabData(tmp_path, "svhn").split("test")
    broken = task / "images" / "test" / "0.jpg"
    broken.write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"image .*images/test/0.jpg cannot be decoded"):
        vtab.load_image(broken, 16)

    with pytest.raises(ValueError, match=r"'flowers_of_mars' is not a VTAB-1k task .*--num-classes"):
        vtab.VtabData(tmp_path, "flowers_of_mars")
    with pytest.raises(FileNotFoundError, match="no folder for task dmlab"):
        vtab.VtabData(tmp_path, "dmlab")
    with pytest.raises(ValueError, match="--num-classes 5 contradicts svhn"):
        vtab.VtabData(tmp_path, "svhn", num_classes=5)


def test_pretrained_file_loads_without_pickle_and_refuses_a_wrong_one(tmp_path):
    from safetensors.torch import save_file

    source = vision.build_vit("vit_tiny_patch16_224", None, 32)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "w.safetensors")
    torch.save({"model": source.state_dict()}, tmp_path / "w.pth")
    for name in ("w.safetensors", "w.pth"):
        loaded = vision.build_vit("vit_tiny_patch16_224", str(tmp_path / name), 32)
        assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items()
                   if not k.startswith("head."))
    with pytest.raises(ValueError, match="does not fit VisionTransformer"):
        vision.build_vit("vit_small_patch16_224", str(tmp_path / "w.safetensors"), 32)
    with pytest.raises(FileNotFoundError, match="--pretrained-file .*nope.pth does not exist"):
        vision.build_vit("vit_tiny_patch16_224", str(tmp_path / "nope.pth"), 32)


@pytest.mark.parametrize("method", ["zinit", "vpt", "full", "linear", "lora", "bitfit", "zinit_random", "zinit_v2"])
def test_default_lr_grid_uses_the_same_multiples_for_every_method(tmp_path, monkeypatch, method):
    """Without --blr-grid, `zinit train vtab` searches every method over its own default base lr times one set of
    multiples: no row of a comparison gets a wider search than another (zinit used to get ×0.5..×5, the rest ×0.5..×2)."""
    from zinit.recipes.common import base_lr

    write_task(tmp_path / "data", "dtd", classes=3)
    seen = {}

    def fake_run_task(root, name, out, settings, base):
        seen["grid"] = settings.blr_grid
        raise SystemExit(0)  # the grid is all this test needs

    monkeypatch.setattr(vtab, "run_task", fake_run_task)
    monkeypatch.setattr(vtab, "build_vit", lambda *a, **k: tiny_vit(num_classes=0))
    with pytest.raises(SystemExit):
        cli(["train", "vtab", "--task", "dtd", "--data", str(tmp_path / "data"), "--output", str(tmp_path / "out"),
             "--method", method, "--device", "cpu", "--no-progress"])
    blr = base_lr("vtab", method)
    assert [round(b / blr, 6) for b in seen["grid"]] == list(vtab.LR_MULTIPLES)


# ---------------------------------------------------------------------------------------------------------------
# the demo tasks from real images (recipes/make_vtab_demo.py): digits, Fashion-MNIST, Fashion-MNIST rotation


def write_idx(path, array, gz=True):
    """``array`` (uint8) as an idx file, the format of the original MNIST / Fashion-MNIST files (gzipped as they ship,
    or not)."""
    import gzip

    import numpy as np

    array = np.ascontiguousarray(array, dtype=np.uint8)
    raw = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes() + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def fake_fashion(folder, n_train=1000, n_test=40):
    """A Fashion-MNIST folder in the original layout whose images can still be checked after JPEG: image i has class
    i % 10, its bottom half at grey level 20 + 10·class and a white 10×10 block in its top-left corner (which way it
    was turned). The test labels are not gzipped: the writer reads both."""
    import numpy as np

    folder.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.zeros((n, 28, 28), np.uint8)
        images[:, 14:, :] = (20 + 10 * labels)[:, None, None]
        images[:, :10, :10] = 255
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        if prefix == "train":
            write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
        else:
            write_idx(folder / f"{prefix}-labels-idx1-ubyte", labels, gz=False)
    return folder


def read_lines(task, split):
    return [(line.split()[0], int(line.split()[1])) for line in (task / f"{split}.txt").read_text().splitlines()]


def test_fashion_tasks_are_written_in_the_vtab_layout(tmp_path):
    import numpy as np

    from zinit.recipes import make_vtab_demo as demo

    source = fake_fashion(tmp_path / "fashion")
    written = demo.make_tasks(tmp_path / "data", ["fashion_mnist", "fashion_rotation"], source, test_size=40)
    for name, folder in written.items():
        assert folder == tmp_path / "data" / name
        lines = {s: read_lines(folder, s) for s in vtab.SPLITS}
        assert [len(lines[s]) for s in vtab.SPLITS] == [800, 200, 1000, 40]
        assert lines["train800val200"] == lines["train800"] + lines["val200"]
        for split in ("train800", "val200", "test"):
            assert [p for p, _ in lines[split]] == [f"images/{split}/{n}.jpg" for n in range(len(lines[split]))]
        data = vtab.VtabData(tmp_path / "data", name, num_classes=demo.CLASSES[name])  # the recipe's own loader
        images, labels = vtab.load_images(data.split("val200"), 28, "val", progress=False)
        assert images.shape == (200, 3, 28, 28)
        grey = images.float().mean(1)  # [N, 28, 28]
        if name == "fashion_mnist":  # the class of each line is the class its image encodes
            assert sorted(set(labels.tolist())) == list(range(10))
            quadrant = grey[:, 16:, 14:].mean((1, 2))  # the class-coded bottom half, away from the corner block
            assert torch.allclose(quadrant, 20 + 10 * labels.float(), atol=3)
        else:  # label k: k counter-clockwise quarter turns, so the bright corner moves TL -> BL -> BR -> TR
            corners = torch.stack([grey[:, :8, :8], grey[:, -8:, :8], grey[:, -8:, -8:], grey[:, :8, -8:]], 1)
            assert corners.mean((2, 3)).argmax(1).tolist() == labels.tolist()
            for split in ("train800", "val200", "test"):  # balanced in every split
                counts = np.bincount([label for _, label in lines[split]], minlength=4)
                assert counts.tolist() == [len(lines[split]) // 4] * 4


def test_fashion_draw_is_disjoint_seeded_and_per_task():
    from zinit.recipes import make_vtab_demo as demo

    draw = demo.fashion_draw("fashion_mnist", 60000, 10000, seed=0, test_size=1000)
    assert [len(draw[s]) for s in ("train800", "val200", "test")] == [800, 200, 1000]
    assert not set(draw["train800"]) & set(draw["val200"]) and len(set(draw["test"])) == 1000
    assert draw == demo.fashion_draw("fashion_mnist", 60000, 10000, seed=0, test_size=1000)
    assert draw != demo.fashion_draw("fashion_mnist", 60000, 10000, seed=1, test_size=1000)
    assert draw != demo.fashion_draw("fashion_rotation", 60000, 10000, seed=0, test_size=1000)
    with pytest.raises(ValueError, match="holds 999 images; VTAB-1k needs 1000"):
        demo.fashion_draw("fashion_mnist", 999, 10000, seed=0, test_size=10)
    with pytest.raises(ValueError, match="--test-size 20 asks for more"):
        demo.fashion_draw("fashion_mnist", 1000, 10, seed=0, test_size=20)


def test_demo_writer_is_deterministic_and_keeps_the_digits_cli(tmp_path, capsys):
    from zinit.recipes import make_vtab_demo as demo

    source = fake_fashion(tmp_path / "fashion", n_test=12)
    args = ["--task", "all", "--fashion-source", str(source), "--test-size", "12"]
    demo.main([str(tmp_path / "a"), *args])
    out = capsys.readouterr()
    assert out.out.splitlines() == [str(tmp_path / "a" / t) for t in ("digits", "fashion_mnist", "fashion_rotation")]
    assert "--task fashion_rotation --num-classes 4" in out.err
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 3 * 4 + 1797 + 2 * (1000 + 12)
    demo.main([str(tmp_path / "b"), "--task", "fashion_rotation", *args[2:]])  # the same seed, the same bytes
    again = sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    assert again == [f for f in files if f.parts[0] == "fashion_rotation"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in again)
    assert [len(read_lines(tmp_path / "a" / "digits", s)) for s in vtab.SPLITS] == [800, 200, 1000, 797]
    with Image.open(tmp_path / "a" / "digits" / "images" / "test" / "0.jpg") as im:
        assert im.size == (32, 32) and im.mode == "RGB"  # digits as before: 32 px; Fashion-MNIST its own 28
    with Image.open(tmp_path / "a" / "fashion_mnist" / "images" / "test" / "0.jpg") as im:
        assert im.size == (28, 28)
    demo.main([str(tmp_path / "c"), "--task", "fashion", "--seed", "1", "--fashion-source", str(source),
               "--test-size", "12", "--size", "16"])
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["fashion_mnist"]
    assert read_lines(tmp_path / "c" / "fashion_mnist", "train800") != read_lines(tmp_path / "a" / "fashion_mnist",
                                                                                  "train800")
    with Image.open(tmp_path / "c" / "fashion_mnist" / "images" / "val200" / "0.jpg") as im:
        assert im.size == (16, 16)


def test_missing_fashion_source_skips_or_stops_with_a_message(tmp_path, capsys):
    from zinit.recipes import make_vtab_demo as demo

    missing = str(tmp_path / "no-fashion")
    demo.main([str(tmp_path / "out"), "--task", "all", "--fashion-source", missing])  # digits, and says what it skipped
    out = capsys.readouterr()
    assert out.out.splitlines() == [str(tmp_path / "out" / "digits")]
    assert "skipping fashion_mnist, fashion_rotation: no Fashion-MNIST idx files in" in out.err
    assert "apt-get install dataset-fashion-mnist" in out.err
    with pytest.raises(SystemExit) as stop:  # asked for by name: an error before anything is written
        demo.main([str(tmp_path / "out2"), "--task", "fashion_rotation", "--fashion-source", missing])
    assert stop.value.code == 2 and "argument --fashion-source: no Fashion-MNIST idx files" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
    with pytest.raises(FileNotFoundError, match="no-fashion does not exist .*apt-get install dataset-fashion-mnist"):
        demo.make_fashion(tmp_path / "out3", "fashion_mnist", missing)


def test_idx_reader_refuses_what_is_not_an_idx_file(tmp_path):
    import gzip

    import numpy as np

    from zinit.recipes import make_vtab_demo as demo

    write_idx(tmp_path / "ok.gz", np.arange(24).reshape(2, 3, 4))
    assert demo.read_idx(tmp_path / "ok.gz").tolist() == np.arange(24).reshape(2, 3, 4).tolist()
    (tmp_path / "raw").write_bytes(gzip.decompress((tmp_path / "ok.gz").read_bytes()))  # not gzipped: read as well
    assert demo.read_idx(tmp_path / "raw").shape == (2, 3, 4)
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match=r"png is not an idx file \(it starts 89504e47"):
        demo.read_idx(tmp_path / "png")
    (tmp_path / "short").write_bytes((tmp_path / "raw").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"short: its idx header says 2×3×4 values of 1 byte\(s\) \(24 bytes\) but 23"):
        demo.read_idx(tmp_path / "short")
    source = fake_fashion(tmp_path / "fashion", n_train=20, n_test=10)
    write_idx(source / "t10k-labels-idx1-ubyte", np.arange(9), gz=False)  # 9 labels for 10 images
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: expected 10 labels"):
        demo.load_fashion(source)


@pytest.mark.skipif(not Path(REAL_FASHION).is_dir(),
                    reason=f"Fashion-MNIST not installed in {REAL_FASHION} (apt-get install dataset-fashion-mnist)")
def test_real_fashion_mnist_files_read():
    from zinit.recipes import make_vtab_demo as demo

    data = demo.load_fashion(REAL_FASHION)
    assert data["train"][0].shape == (60000, 28, 28) and data["test"][0].shape == (10000, 28, 28)
    assert sorted(set(data["test"][1].tolist())) == list(range(10))
