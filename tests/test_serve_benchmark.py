"""The fault mode of the serve load test (``python -m zinit.benchmarks.serve --faults``, issue 26 section 5) end to
end on a tiny shape: well-formed requests of several adapters, the base model and an adapter loaded and unloaded
while serving, streams cut by the client, and every kind of malformed or over-limit request. A correctness check
(no failed well-formed request, every greedy answer identical to generate() alone, every bad request its documented
4xx), not a timing."""

from __future__ import annotations

import argparse
import json

import pytest

pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

from zinit.benchmarks import serve  # noqa: E402


def test_the_request_plan_is_fixed_by_its_seed_and_has_the_exact_shares():
    args = argparse.Namespace(seed=3, requests=1000, prompts=12, cut_fraction=0.10, bad_fraction=0.05)
    names = [f"adapter{i}" for i in range(8)]
    plan = serve._plan(args, names)
    assert plan == serve._plan(args, names)
    assert plan != serve._plan(argparse.Namespace(**{**vars(args), "seed": 4}), names)
    kinds = [item["kind"] for item in plan]
    assert (kinds.count("ok"), kinds.count("cut"), kinds.count("bad")) == (850, 100, 50)
    assert {item["bad"] for item in plan if item["kind"] == "bad"} == set(serve.BAD_KINDS)
    assert {item["model"] for item in plan if item["kind"] == "ok"} == set(names) | {serve.BASE, serve.CHURN}
    assert all(item["stream"] and 1 <= item["cut_after"] <= 3 for item in plan if item["kind"] == "cut")


def test_the_fault_mode_serves_every_well_formed_request_and_refuses_every_bad_one(tmp_path):
    out = serve.main(["--faults", "--shape", "tiny", "--adapters", "3", "--L", "2", "--K", "4", "--requests", "60",
                      "--concurrency", "4", "--max-tokens", "4", "--prompts", "4", "--churn-seconds", "0.2",
                      "--bad-fraction", "0.2", "--json", str(tmp_path / "faults.json")])
    assert json.loads((tmp_path / "faults.json").read_text())["mode"] == "faults"
    assert out["kinds"] == {"well_formed": 42, "cut_stream": 6, "bad": 12}
    assert (out["sent"], out["not_sent"]) == (60, 0)
    well = out["well_formed"]
    assert well["failed"] == 0, well["failures"]
    assert well["completed"] + well["churned_404"] == 42  # the churned adapter: served, or a 404 while unloaded
    same = out["identical"]
    assert same["identical"] == same["compared"] == well["completed"], same["mismatches"]
    assert out["preflight_identical"] == "8/8"
    assert out["distinct_answers_per_prompt"] > 1  # the adapters change the answers: identity means something
    assert out["cut_streams"]["cut"] == 6 and out["cut_streams"]["failed"] == 0, out["cut_streams"]
    assert all(b["sent"] >= 1 for b in out["bad"].values())  # every kind of bad request was sent
    assert out["bad_all_4xx"] and out["bad_all_as_documented"], out["bad"]
    assert out["churn"]["loads"] >= 1 and out["churn"]["unloads"] == out["churn"]["loads"], out["churn"]
    assert not out["churn"]["errors"]
    assert out["rows_left"] == 0 and out["server_errors_logged"] == 0, out["server_errors"]
    assert set(out["rss_mb"]) == {"window", "first", "last", "growth_pct", "trace"} and out["rss_mb"]["window"] == 12
    assert all(out[key] > 0 for key in ("p50_s", "p95_s", "tokens_per_s", "wall_s"))
