"""Data as published on the Hugging Face Hub (zinit.recipes.published): tatsu-lab/alpaca, yahma/alpaca-cleaned,
rajpurkar/squad, rajpurkar/squad_v2 and derek-thomas/ScienceQA, written here as small local files in their exact
layouts (file names, folders, columns, the parquet written as ``datasets`` writes it for the Hub, the ScienceQA PNGs
embedded), read by each recipe into the same records as the equivalent official-format fixture; a Hub id read from a
(faked) snapshot, and offline with nothing cached the error that names the fix. No network is used."""

from __future__ import annotations

import importlib.util
import io
import json
import socket
import sys

import pytest
import torch

from tiny import alpaca_records
from zinit.cli import main as cli
from zinit.methods import registry as methods
from zinit.recipes import alpaca, instructions, make_squad_demo, published, squad
from zinit.recipes import scienceqa as sqa


def _importable(*names: str) -> bool:
    """Whether each module can be imported (found, and not blocked in sys.modules), without importing it."""
    try:
        return all(importlib.util.find_spec(name) is not None for name in names)
    except (ImportError, ValueError):  # ValueError: sys.modules[name] is None
        return False


HAVE_DATASETS = _importable("datasets", "pyarrow")
needs_datasets = pytest.mark.skipif(not HAVE_DATASETS, reason="needs the data extra: pip install 'zinit[data]'")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    """zinit's data cache in the test's folder, and no socket may connect (everything here is local)."""
    monkeypatch.setenv(published.CACHE_ENV, str(tmp_path / "zinit-cache"))

    def refuse(*args, **kwargs):
        raise AssertionError("a test of published data tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tmp_path / "zinit-cache" / "data"


def write_parquet(path, rows, features=None):
    """A parquet file as ``datasets`` writes it for the Hub (``push_to_hub`` / ``to_parquet``: the features in the
    schema metadata; an Image column stored as the struct ``{bytes, path}``)."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    datasets.Dataset.from_list(rows, features=features).to_parquet(str(path))
    return path


def fake_snapshot(monkeypatch, folder, expected_repo):
    """``huggingface_hub.snapshot_download`` answering with ``folder`` (a Hub repo's layout) for ``expected_repo``."""
    import huggingface_hub

    calls = []

    def snapshot(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        assert repo_id == expected_repo and kwargs["repo_type"] == "dataset"
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot)
    return calls


# ---------------------------------------------------------------------------------------------------------------
# Alpaca: tatsu-lab/alpaca (parquet) and yahma/alpaca-cleaned (JSON)


TATSU_PARQUET = "data/train-00000-of-00001-a09b74b3ef9c3b56.parquet"


def tatsu_rows(records):
    """tatsu-lab/alpaca's columns: instruction, input, output and text (the formatted prompt and answer)."""
    return [{**r, "text": instructions.prompt_of(r) + r["output"]} for r in records]


def write_tatsu(root, records):
    write_parquet(root / TATSU_PARQUET, tatsu_rows(records))
    (root / "README.md").write_text("---\nlicense: cc-by-nc-4.0\n---\n")
    # what `hf download --local-dir` leaves beside the files: skipped (a hidden folder), even a parquet-named file
    junk = root / ".cache" / "huggingface" / "download" / "data"
    junk.mkdir(parents=True)
    (junk / "train-00000-of-00001-a09b74b3ef9c3b56.parquet.metadata").write_text("abc\n")
    (junk / "train-stale.parquet").write_bytes(b"not parquet")
    return root


@needs_datasets
def test_alpaca_published_layouts_read_as_alpaca_data_json(tmp_path, cache, monkeypatch):
    records = alpaca_records()
    official = tmp_path / "alpaca_data.json"
    official.write_text(json.dumps(records))
    expected = instructions.load_records(official)
    assert alpaca.resolve_data(str(official)) == official  # (a) the official file: unchanged

    tatsu = write_tatsu(tmp_path / "tatsu-lab-alpaca", records)
    yahma = tmp_path / "yahma-alpaca-cleaned"
    yahma.mkdir()
    (yahma / "alpaca_data_cleaned.json").write_text(json.dumps(records, indent=4))
    jsonl = tmp_path / "alpaca.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in tatsu_rows(records)))
    for spec in (tatsu, tatsu / TATSU_PARQUET, yahma, yahma / "alpaca_data_cleaned.json", jsonl):
        path = alpaca.resolve_data(str(spec))
        assert instructions.load_records(path) == expected, spec
    assert alpaca.resolve_data(str(yahma)) == yahma / "alpaca_data_cleaned.json"  # the official format: as it is

    converted = alpaca.resolve_data(str(tatsu))
    assert converted.is_relative_to(cache / "alpaca")
    monkeypatch.setattr(published, "read_rows", lambda *a, **k: pytest.fail("converted again"))
    assert alpaca.resolve_data(str(tatsu)) == converted  # once: an unchanged source is not read again
    monkeypatch.undo()
    monkeypatch.setenv(published.CACHE_ENV, str(tmp_path / "zinit-cache"))
    write_parquet(tatsu / TATSU_PARQUET, tatsu_rows(records[:5]))  # a changed source is converted again
    assert len(instructions.load_records(alpaca.resolve_data(str(tatsu)))) == 5

    calls = fake_snapshot(monkeypatch, tatsu, "tatsu-lab/alpaca")  # (c) the Hub id: its snapshot, read as (b)
    assert instructions.load_records(alpaca.resolve_data("tatsu-lab/alpaca")) == expected[:5]
    assert calls[0][1]["allow_patterns"] == list(published.DATA_PATTERNS) and calls[0][1]["revision"] is None
    calls = fake_snapshot(monkeypatch, yahma, "yahma/alpaca-cleaned")
    assert alpaca.resolve_data("yahma/alpaca-cleaned@main") == yahma / "alpaca_data_cleaned.json"
    assert calls[0][1]["revision"] == "main"


@needs_datasets
def test_alpaca_published_input_is_refused_with_its_name(tmp_path):
    bad = write_parquet(tmp_path / "bad" / "train-00000-of-00001.parquet", [{"prompt": "x", "output": "y"}])
    with pytest.raises(ValueError, match=r"train-00000-of-00001.parquet has no column\(s\) \['instruction'\] "
                                         r"\(it has \['prompt', 'output'\]\)"):
        alpaca.resolve_data(str(bad))
    none = write_parquet(tmp_path / "none" / "train-0.parquet", [{"instruction": "a", "input": None, "output": "b"},
                                                                  {"instruction": None, "input": "", "output": "c"}])
    with pytest.raises(ValueError, match=r"train-0.parquet: row 1 has a NoneType 'instruction', not a string"):
        alpaca.resolve_data(str(none))
    several = tmp_path / "several"
    several.mkdir()
    for name in ("a.json", "b.jsonl"):
        (several / name).write_text("[]")
    with pytest.raises(ValueError, match=r"holds several data files \(a.json, b.jsonl\) and no train-\*.parquet: "
                                         "pass the one to train on with --data FILE"):
        alpaca.resolve_data(str(several))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no Alpaca data: expected alpaca_data.json"):
        alpaca.resolve_data(str(tmp_path / "empty"))


@needs_datasets
def test_alpaca_trains_on_the_published_layout_as_on_the_official_file(tmp_path, tiny_model_dir, monkeypatch):
    """``zinit train alpaca --data FOLDER``: the training examples are those of ``alpaca_data.json``."""
    records = alpaca_records()
    official = tmp_path / "alpaca_data.json"
    official.write_text(json.dumps(records))
    tatsu = write_tatsu(tmp_path / "tatsu", records)
    seen = []

    def fake_train(model, task, config, callbacks=()):
        seen.append(task)
        raise SystemExit(0)

    monkeypatch.setattr(alpaca, "train", fake_train)
    for i, data in enumerate((official, tatsu)):
        with pytest.raises(SystemExit):
            cli(["train", "alpaca", "--model", str(tiny_model_dir), "--data", str(data), "--output",
                 str(tmp_path / f"out{i}"), "--layers", "1", "--K", "2", "--max-seq-len", "256", "--no-progress",
                 "--device", "cpu"])
    assert len(seen) == 2 and len(seen[0].examples) == len(records)
    assert seen[1].examples == seen[0].examples


# ---------------------------------------------------------------------------------------------------------------
# SQuAD: rajpurkar/squad (plain_text/) and rajpurkar/squad_v2 (squad_v2/)


def squad_rows(path):
    """The rows of an official SQuAD JSON file as the Hub publishes them: one per question, ``answers`` a struct of
    two lists (empty for an unanswerable question)."""
    raw = json.loads(path.read_text())
    return [{"id": qa["id"], "title": article.get("title", ""), "context": para["context"],
             "question": qa["question"],
             "answers": {"text": [a["text"] for a in qa["answers"]],
                         "answer_start": [a["answer_start"] for a in qa["answers"]]}}
            for article in raw["data"] for para in article["paragraphs"] for qa in para["qas"]]


def write_squad_repo(root, official, version):
    """A folder laid out as rajpurkar/squad (``plain_text/``) or rajpurkar/squad_v2 (``squad_v2/``): the parquet
    written with pyarrow in the published schema (``answers`` a struct of two lists, ``answer_start`` int32)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("id", pa.string()), ("title", pa.string()), ("context", pa.string()),
                        ("question", pa.string()),
                        ("answers", pa.struct([("text", pa.list_(pa.string())),
                                               ("answer_start", pa.list_(pa.int32()))]))])
    # the features in the schema metadata as datasets 2.x wrote them for these files (``Sequence`` of a dict)
    text = {"dtype": "string", "_type": "Value"}
    features = {"id": text, "title": text, "context": text, "question": text,
                "answers": {"feature": {"text": text, "answer_start": {"dtype": "int32", "_type": "Value"}},
                            "_type": "Sequence"}}
    metadata = {"huggingface": json.dumps({"info": {"features": features}})}
    config = "plain_text" if version == "1.1" else "squad_v2"
    (root / config).mkdir(parents=True)
    for split, name in (("train", "train"), ("dev", "validation")):
        rows = squad_rows(official / f"{split}-v{version}.json")
        table = pa.Table.from_pylist(rows, schema=schema).replace_schema_metadata(metadata)
        pq.write_table(table, root / config / f"{name}-00000-of-00001.parquet")
    return root


@needs_datasets
@pytest.mark.parametrize("version", ["1.1", "2.0"])
def test_squad_published_layout_gives_the_examples_of_the_official_files(tmp_path, cache, monkeypatch, version):
    official = tmp_path / "official"
    make_squad_demo.make(official, train_paragraphs=3, dev_paragraphs=2)
    repo = write_squad_repo(tmp_path / "repo", official, version)
    train, dev = squad.find_files(repo, version)
    assert train.is_relative_to(cache / "squad") and train.name == f"train-v{version}.json"
    for got, want in ((train, official / f"train-v{version}.json"), (dev, official / f"dev-v{version}.json")):
        got, want = squad.load_squad(got), squad.load_squad(want)
        assert got.examples == want.examples and got.version_2 == want.version_2 == (version == "2.0")
    assert any(ex["is_impossible"] for ex in squad.load_squad(dev).examples) == (version == "2.0")
    other = "1.1" if version == "2.0" else "2.0"
    with pytest.raises(ValueError, match=f"is SQuAD v{version} .*but --version {other}: pass --version {version}"):
        squad.find_files(repo, other)
    assert squad.locate(repo, None) == (train, dev, version)  # zinit eval squad: the version found in the rows
    config = "plain_text" if version == "1.1" else "squad_v2"
    single = squad.squad_file(repo / config / "validation-00000-of-00001.parquet")
    assert squad.load_squad(single).examples == squad.load_squad(official / f"dev-v{version}.json").examples

    repo_id = "rajpurkar/squad" if version == "1.1" else "rajpurkar/squad_v2"
    fake_snapshot(monkeypatch, repo, repo_id)
    hub_train, hub_dev = squad.find_files(repo_id, version)
    assert hub_train.parent.name.startswith(repo_id.replace("/", "--"))
    assert [squad.load_squad(p).examples for p in (hub_train, hub_dev)] == \
        [squad.load_squad(p).examples for p in (train, dev)]


@needs_datasets
def test_squad_trains_and_evaluates_from_the_published_layout(tmp_path, monkeypatch, capsys):
    """``zinit train squad --data FOLDER`` reads the converted files (it stops once they are read, before the model);
    ``zinit eval squad --data FOLDER`` scores the validation split, its version found from the rows."""
    official = tmp_path / "official"
    make_squad_demo.make(official, train_paragraphs=3, dev_paragraphs=2)
    repo = write_squad_repo(tmp_path / "repo", official, "2.0")
    read = []
    real_load = squad.load_squad

    def spy(path):
        data = real_load(path)
        read.append(data)
        return data

    def stop(*args, **kwargs):
        raise methods.NotApplicable("stopped after reading the data")

    monkeypatch.setattr(squad, "load_squad", spy)
    monkeypatch.setattr(squad, "load_model", stop)
    assert cli(["train", "squad", "--data", str(repo), "--version", "2.0", "--output", str(tmp_path / "out"),
                "--no-progress", "--device", "cpu"]) == 3
    assert [d.examples for d in read] == [real_load(official / f"{s}-v2.0.json").examples for s in ("train", "dev")]
    assert cli(["train", "squad", "--data", str(repo), "--output", str(tmp_path / "out1"), "--no-progress",
                "--device", "cpu"]) == 2  # the default --version 1.1
    assert "is SQuAD v2.0 (it has unanswerable questions), but --version 1.1: pass --version 2.0" in \
        capsys.readouterr().err
    read.clear()
    monkeypatch.setattr(squad.zinit.hub, "resolve_adapter", lambda source, **k: tmp_path)
    monkeypatch.setattr(squad.zinit, "read_adapter_config", lambda folder: {})
    with pytest.raises(methods.NotApplicable):
        cli(["eval", "squad", "--data", str(repo), "--adapter", "x", "--no-progress", "--device", "cpu"])
    assert [d.examples for d in read] == [real_load(official / "dev-v2.0.json").examples]


# ---------------------------------------------------------------------------------------------------------------
# ScienceQA: derek-thomas/ScienceQA (parquet with the images embedded)


SCIENCEQA_FILES = {"train": "data/train-00000-of-00001-1028f23e353fbe3e.parquet",
                   "validation": "data/validation-00000-of-00001-6c7328ff6c84284c.parquet",
                   "test": "data/test-00000-of-00001-f0e719df791966ff.parquet"}


def scienceqa_features():
    """derek-thomas/ScienceQA's features, in its column order."""
    import datasets

    text = datasets.Value("string")
    return datasets.Features({"image": datasets.Image(), "question": text, "choices": datasets.Sequence(text),
                              "answer": datasets.Value("int8"), "hint": text, "task": text, "grade": text,
                              "subject": text, "topic": text, "category": text, "skill": text, "lecture": text,
                              "solution": text})


def release_and_published(tmp_path):
    """The ScienceQA release fixture of test_scienceqa (with the release's topic/category/skill fields added), and
    the same problems in derek-thomas/ScienceQA's layout: one parquet per split in pid_splits order, each PNG
    embedded (None where the problem has no image)."""
    from test_scienceqa import write_release

    root = write_release(tmp_path / "release")
    problems = json.loads((root / "problems.json").read_text())
    for pid, p in problems.items():
        p.update(topic="colors" if p["image"] else "words", category="Identify", skill=f"skill {int(pid) % 4}")
    (root / "problems.json").write_text(json.dumps(problems))
    data = sqa.load_scienceqa(root)
    repo = tmp_path / "derek-thomas-ScienceQA"
    for name, release in sqa.PUBLISHED_SPLITS.items():
        rows = []
        for pid in data.splits[release]:
            p = problems[pid]
            image = data.image_path(pid, release)
            rows.append({"image": {"bytes": image.read_bytes(), "path": None} if image else None,
                         **{k: p[k] for k in sqa.PUBLISHED_FIELDS}})
        write_parquet(repo / SCIENCEQA_FILES[name], rows, scienceqa_features())
    return data, repo


@needs_datasets
def test_scienceqa_published_parquet_becomes_the_release(tmp_path, cache, monkeypatch):
    official, repo = release_and_published(tmp_path)
    data = sqa.load_scienceqa(repo)
    assert data.root.is_relative_to(cache / "scienceqa")
    assert set(data.splits) == {"train", "val", "test"}
    with_image = without = 0
    for split in ("train", "val", "test"):
        pids = data.split(split)  # every pid checked, images present
        assert pids == [f"{split}-{i}" for i in range(len(official.splits[split]))]
        for pid, original in zip(pids, official.splits[split]):
            assert data.problems[pid] == official.problems[original]
            mine, theirs = data.image_path(pid, split), official.image_path(original, split)
            if theirs is None:
                assert mine is None
                without += 1
            else:
                assert mine == data.root / "images" / split / pid / "image.png"
                assert mine.read_bytes() == theirs.read_bytes()
                with_image += 1
    assert with_image and without  # both kinds of rows were read

    fake_snapshot(monkeypatch, repo, "derek-thomas/ScienceQA")
    hub = sqa.load_scienceqa("derek-thomas/ScienceQA")
    assert hub.problems == data.problems and hub.root.name.startswith("derek-thomas--ScienceQA-")
    one = sqa.load_scienceqa(repo / SCIENCEQA_FILES["validation"])  # one split's file
    assert one.splits == {"val": data.splits["val"]}
    monkeypatch.setattr(sqa, "convert_published", lambda *a, **k: pytest.fail("converted again"))
    assert sqa.load_scienceqa(repo).root == data.root  # once: an unchanged source is not read again
    assert sqa.load_scienceqa("derek-thomas/ScienceQA").root == hub.root


@needs_datasets
def test_scienceqa_image_by_path_and_bad_rows(tmp_path):
    """An image struct without bytes (a parquet written without embedding) is read from its path, relative to the
    folder; a path that is no file is refused naming the row, and nothing half-converted is kept."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    png = io.BytesIO()
    Image.new("RGB", (8, 8), (1, 2, 3)).save(png, format="PNG")
    (tmp_path / "repo" / "pics").mkdir(parents=True)
    (tmp_path / "repo" / "pics" / "a.png").write_bytes(png.getvalue())
    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("question", pa.string()), ("choices", pa.list_(pa.string())), ("answer", pa.int8()),
                        ("hint", pa.string())])
    base = {"question": "Which?", "choices": ["a", "b"], "answer": 1, "hint": None}

    def write(path, rows):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)

    write(tmp_path / "repo" / "test-0.parquet", [{**base, "image": {"bytes": None, "path": "pics/a.png"}},
                                                 {**base, "image": None}])
    data = sqa.load_scienceqa(tmp_path / "repo")
    assert data.image_path("test-0", "test").read_bytes() == png.getvalue()
    assert data.problems["test-1"]["image"] is None and data.problems["test-1"]["hint"] == ""
    assert data.split("test") == ["test-0", "test-1"]
    write(tmp_path / "bad" / "test-0.parquet", [{**base, "image": {"bytes": None, "path": "gone.png"}}])
    with pytest.raises(FileNotFoundError, match=r"test row 0: the image has no embedded bytes and its path "
                                                r"'gone.png' is not a file"):
        sqa.load_scienceqa(tmp_path / "bad")
    write(tmp_path / "bad" / "test-0.parquet", [{**base, "answer": None, "image": None}])
    with pytest.raises(ValueError, match=r"test row 0: 'choices' must be a list and 'answer' an int, got "
                                         r"\['a', 'b'\] and None"):
        sqa.load_scienceqa(tmp_path / "bad")
    left = [p.name for p in (tmp_path / "zinit-cache" / "data" / "scienceqa").iterdir()]
    assert len(left) == 1 and left[0].startswith("repo-")  # nothing half-built is kept


@needs_datasets
def test_scienceqa_trains_on_the_published_layout_as_on_the_release(tmp_path, monkeypatch):
    """``zinit train scienceqa --data FOLDER``: the same training examples (tokens and image features) as the
    release folder gives."""
    from test_scienceqa import save_tiny_clip
    from tiny import save_tiny_causal_lm

    official, repo = release_and_published(tmp_path)
    model, clip = save_tiny_causal_lm(tmp_path / "lm"), save_tiny_clip(tmp_path / "clip")
    seen = []

    def fake_train(model, task, config, callbacks=()):
        seen.append(task)
        raise SystemExit(0)

    monkeypatch.setattr(sqa, "train", fake_train)
    for i, data in enumerate((official.root, repo)):
        with pytest.raises(SystemExit):
            cli(["train", "scienceqa", "--model", str(model), "--data", str(data), "--visual-encoder", str(clip),
                 "--output", str(tmp_path / f"out{i}"), "--feature-cache", str(tmp_path / f"features{i}"),
                 "--layers", "2", "--K", "4", "--max-seq-len", "256", "--no-progress", "--device", "cpu"])
    first, second = (t.examples for t in seen)
    assert len(first) == len(official.splits["train"]) == len(second)
    for a, b in zip(first, second):
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
        assert (a["features"] is None) == (b["features"] is None)
        if a["features"] is not None:
            assert torch.equal(a["features"], b["features"])


# ---------------------------------------------------------------------------------------------------------------
# Hub ids offline, and the extra missing


@needs_datasets
def test_a_hub_id_offline_and_not_cached_names_the_fix(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    fix = r"not in the Hugging Face cache and downloads are off \(HF_HUB_OFFLINE=1\)\. Fix: run once with network " \
          r"access .*`hf download {} --repo-type dataset --local-dir DIR`.*pass --data DIR"
    for repo, read in (("tatsu-lab/alpaca", alpaca.resolve_data),
                       ("rajpurkar/squad_v2", lambda spec: squad.find_files(spec, "2.0")),
                       ("derek-thomas/ScienceQA", sqa.load_scienceqa)):
        with pytest.raises(FileNotFoundError, match=fix.format(repo)):
            read(repo)
    assert cli(["train", "alpaca", "--data", "yahma/alpaca-cleaned", "--output", str(tmp_path / "out"),
                "--device", "cpu"]) == 2
    assert "Hub dataset yahma/alpaca-cleaned is not in the Hugging Face cache" in capsys.readouterr().err


def test_without_datasets_the_error_names_the_extra_and_official_formats_still_work(tmp_path, monkeypatch,
                                                                                     alpaca_file):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(published.MissingDataExtra, match=r"reading Hub dataset rajpurkar/squad needs Hugging Face "
                                                         r"datasets and pyarrow .*pip install 'zinit\[data\]'"):
        squad.find_files("rajpurkar/squad", "1.1")  # before any download
    parquet = tmp_path / "train-0.parquet"
    parquet.write_bytes(b"PAR1")
    with pytest.raises(ImportError, match=r"pip install 'zinit\[data\]'"):
        alpaca.resolve_data(str(parquet))
    with pytest.raises(RuntimeError):  # also a RuntimeError, as the earlier parquet reader raised
        alpaca.resolve_data(str(parquet))
    assert alpaca.resolve_data(str(alpaca_file)) == alpaca_file  # the official formats need no extra
    yahma = tmp_path / "yahma"
    yahma.mkdir()
    (yahma / "alpaca_data_cleaned.json").write_text(alpaca_file.read_text())
    fake_snapshot(monkeypatch, yahma, "yahma/alpaca-cleaned")  # a Hub repo in the official format: no extra either
    assert alpaca.resolve_data("yahma/alpaca-cleaned") == yahma / "alpaca_data_cleaned.json"
    official = tmp_path / "squad"
    make_squad_demo.make(official, train_paragraphs=1, dev_paragraphs=1)
    assert squad.find_files(official, "1.1") == (official / "train-v1.1.json", official / "dev-v1.1.json")
