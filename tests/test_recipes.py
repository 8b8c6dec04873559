"""The recipe protocol (``zinit.Recipe``), its registry, and the shape of the outer ring: a recipe is one file that
``zinit train``, ``zinit eval`` and ``zinit compare`` find with no other file edited; the core (``zinit/``) imports
no recipe and no benchmark; no recipe imports another."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import zinit
from zinit import recipe as R
from tiny import subprocess_env

ROOT = Path(__file__).resolve().parent.parent

#: A complete user recipe in one file: learn random token rows on a tiny random LLaMA built from a config. It uses
#: only zinit's public pieces (the shared options and run skeleton of zinit.recipes.common, the trainer).
TOY_RECIPE = '''
"""toy: fit random token rows with a tiny random LLaMA (a user's recipe, one file)."""
import json

import torch

import zinit
from zinit.recipes.common import TrainingRun, add_train_flags
from zinit.train import Task, causal_lm_loss, train
from zinit.train.data import pad_collate


def _model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    return LlamaForCausalLM(cfg).eval()


def _rows(split):
    g = torch.Generator().manual_seed({"train": 1, "val": 2, "test": 3}[split])
    return [{"input_ids": r.tolist(), "labels": r.tolist()} for r in torch.randint(0, 64, (8, 10), generator=g)]


def _score(model, split):
    with torch.no_grad():
        return -float(causal_lm_loss(model, pad_collate(_rows(split), 0))[0])


def add_train_args(p):
    p.add_argument("--split", default="test", help="scored after training")
    add_train_flags(p, layers=2, K=4, epochs=2.0, warmup_epochs=0.0, batch_size=4)


def run_train(args):
    with TrainingRun("toy", args) as run:
        model = run.prepare(_model())
        task = Task(examples=_rows("train"), collate=lambda b: pad_collate(b, 0), loss=causal_lm_loss,
                    fingerprint={"recipe": "toy", "method": args.method})
        with run.hold():
            train(model, task, run.config())
            if run.is_main:
                run.finish(model, {"neg_loss": _score(model, args.split)})
                (run.out / "split.txt").write_text(args.split)
    return run.status


def add_eval_args(p):
    p.add_argument("--adapter", required=True)
    p.add_argument("--split", default="test")


def run_eval(args):
    model = zinit.load_adapter(_model(), args.adapter)
    print(json.dumps({"toy_eval": args.split, "neg_loss": _score(model, args.split)}))
    return 0


def validation_args(recipe_args, folder):
    return list(recipe_args) + ["--split", "val"]


zinit.register_recipe(zinit.Recipe(
    name="toy", task="causal_lm", description="toy: fit random token rows (a user recipe)",
    add_train_args=add_train_args, run_train=run_train, add_eval_args=add_eval_args, run_eval=run_eval,
    eval_description="toy: score an adapter", metrics=("neg_loss",), blr={"zinit": 0.5}, default_blr=0.05,
    validation_args=validation_args,
))
'''


def _install_toy(folder: Path) -> dict[str, str]:
    """Put the toy recipe file in ``folder`` and expose it the way a user's package does, through a ``zinit.recipes``
    entry point (the metadata pip writes); returns the environment that sees it."""
    (folder / "toy_recipe.py").write_text(TOY_RECIPE)
    info = folder / "toy_recipe-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-recipe\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[zinit.recipes]\ntoy = toy_recipe\n")
    env = subprocess_env()
    env["PYTHONPATH"] = f"{folder}:{env['PYTHONPATH']}"
    return env


def _zinit(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zinit", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def test_a_recipe_in_one_file_appears_in_train_eval_and_compare(tmp_path):
    env = _install_toy(tmp_path)
    for verb in ("train", "eval"):
        listing = _zinit([verb, "-h"], env, tmp_path)
        assert listing.returncode == 0, listing.stderr
        assert "toy" in listing.stdout and "alpaca" in listing.stdout if verb == "train" else "toy" in listing.stdout

    out = tmp_path / "run"
    trained = _zinit(["train", "toy", "--output", str(out), "--no-progress", "--device", "cpu"], env, tmp_path)
    assert trained.returncode == 0, trained.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "zinit" and summary["trainable_parameters"] == 2 * 4 * 32 + 2 * 4
    config = json.loads((out / "train_config.json").read_text())
    assert config["blr"] == 0.5  # the recipe's own default for zinit

    scored = _zinit(["eval", "toy", "--adapter", str(out / "adapter"), "--split", "val"], env, tmp_path)
    assert scored.returncode == 0, scored.stderr[-3000:]
    assert json.loads(scored.stdout.strip().splitlines()[-1])["toy_eval"] == "val"

    compared = _zinit(["compare", "toy", "--methods", "zinit,lora", "--output", str(tmp_path / "cmp"), "--lr-grid", "1",
                       "--epochs", "1", "--no-progress", "--device", "cpu"], env, tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:] + compared.stdout[-3000:]
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| neg_loss |" in table.splitlines()[0]
    rows = json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]
    assert [(r["method"], r["status"]) for r in rows] == [("zinit", "ok"), ("lora", "ok")]
    # --lr-grid ran each method on the recipe's validation split, centred on its default for this recipe: the toy's
    # own table for zinit, lora's default for causal LMs (zinit.methods)
    assert [r["lr_grid"][0]["blr"] for r in rows] == [0.5, 0.032]
    grid_run = tmp_path / "cmp" / "zinit" / "_lr_grid" / "x1" / "zinit"
    assert (grid_run / "split.txt").read_text() == "val"
    assert (tmp_path / "cmp" / "zinit" / "split.txt").read_text() == "test"  # the final run scores the test split


def test_the_core_imports_no_recipe_and_no_benchmark():
    for path in sorted((ROOT / "zinit").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("zinit.recipes", "zinit.benchmarks", "zinit.methods", "recipes",
                                            "benchmarks", "methods")), \
                    f"{path.relative_to(ROOT)} imports {name}"
    script = ("import sys, zinit, zinit.cli, zinit.lm\n"
              "print(sorted(m for m in sys.modules if m.startswith(('zinit.recipes', 'zinit.benchmarks', "
              "'zinit.methods'))))")
    done = subprocess.run([sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def _imports(path: Path) -> set[str]:
    """The modules of the recipes package that ``path`` imports (``from . import x``, ``from .x import``,
    ``zinit.recipes.x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1:
                found |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif (node.module or "").startswith("zinit.recipes"):
                rest = node.module[len("zinit.recipes"):].lstrip(".")
                found |= {rest.split(".")[0]} if rest else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[2] for a in node.names if a.name.startswith("zinit.recipes.")}
    return found


def test_no_recipe_imports_another_and_the_shared_modules_import_none():
    from zinit.recipes import BUILTIN

    assert set(BUILTIN) == {"alpaca", "scienceqa", "vtab", "squad"}
    for path in sorted((ROOT / "recipes").glob("*.py")) + sorted((ROOT / "benchmarks").glob("*.py")):
        own = {path.stem}
        assert not (_imports(path) & set(BUILTIN)) - own, f"{path.relative_to(ROOT)} imports a recipe"


def test_the_builtin_recipes_are_registered_in_their_listed_order_with_what_compare_needs():
    assert zinit.list_recipes()[:4] == ["alpaca", "scienceqa", "vtab", "squad"]
    for name in ("alpaca", "scienceqa", "vtab", "squad"):
        spec = zinit.get_recipe(name)
        assert spec.metrics and spec.headline == spec.metrics[0]
        assert spec.validation_args is not None or spec.lr_grid_flag is not None
    assert [n for n in zinit.list_recipes()[:4] if zinit.get_recipe(n).run_eval] == ["scienceqa", "squad"]


def test_default_learning_rates_come_from_one_lookup():
    from zinit.cli import build_parser
    from zinit.recipes.common import base_lr

    def lr(recipe, method, *args):
        parsed = build_parser().parse_args(["train", recipe, *args, "--method", method, "--output", "x"])
        return base_lr(recipe, method, parsed)

    assert lr("alpaca", "zinit") == 0.6  # the embedded run
    assert lr("alpaca", "zinit", "--model", "m", "--data", "d.json") == 9e-3  # the official recipe
    assert lr("alpaca", "lora") == lr("scienceqa", "lora", "--data", "d") == 0.032  # lora's causal-LM default
    assert lr("scienceqa", "zinit", "--data", "d") == 9e-3
    assert lr("squad", "full") == 1e-4 and lr("vtab", "lora", "--task", "t", "--data", "d") == 4e-3


def test_recipe_validation_and_registry_errors():
    def noop(_):
        return 0

    with pytest.raises(ValueError, match=r"recipe name 'My Task': use lowercase letters"):
        zinit.Recipe("My Task", "x", "causal_lm", noop, noop)
    with pytest.raises(ValueError, match="give both add_eval_args and run_eval"):
        zinit.Recipe("half", "x", "causal_lm", noop, noop, run_eval=noop)
    with pytest.raises(ValueError, match=r"blr\['lora'\] = 0 must be > 0"):
        zinit.Recipe("bad-lr", "x", "causal_lm", noop, noop, blr={"lora": 0})
    with pytest.raises(TypeError, match="takes a zinit.Recipe"):
        zinit.register_recipe("alpaca")
    with pytest.raises(ValueError, match="a recipe named 'alpaca' is already registered"):
        zinit.register_recipe(zinit.Recipe("alpaca", "x", "causal_lm", noop, noop))
    with pytest.raises(ValueError, match=r"unknown recipe 'nope'; registered recipes: alpaca, scienceqa, vtab, squad"):
        zinit.get_recipe("nope")
    spare = zinit.Recipe("spare-test", "x", "causal_lm", noop, noop)
    try:
        assert zinit.register_recipe(spare) is spare and zinit.register_recipe(spare) is spare  # same object: fine
        other = zinit.Recipe("spare-test", "y", "causal_lm", noop, noop)
        assert zinit.register_recipe(other, override=True) is zinit.get_recipe("spare-test") is other
    finally:
        R.RECIPES._items.pop("spare-test", None)


def test_compare_refuses_lr_grid_for_a_recipe_without_a_validation_split(tmp_path):
    from zinit.methods import compare

    def noop(_):
        return 0

    zinit.register_recipe(zinit.Recipe("no-val", "x", "causal_lm", noop, noop, metrics=("m",)))
    try:
        with pytest.raises(ValueError, match="recipe 'no-val' cannot select a learning rate"):
            compare.compare("no-val", ["zinit"], tmp_path, [], lr_grid=[1.0])
    finally:
        R.RECIPES._items.pop("no-val", None)


def test_shared_options_are_declared_once():
    """Every recipe's shared options come from zinit.recipes.common.FLAGS: no recipe declares one itself."""
    from zinit.recipes import BUILTIN
    from zinit.recipes.common import FLAGS

    # an eval command's --output (optional: where to write the scores) is another option than training's
    shared = {flag for flag, _ in FLAGS.values()} - {"--output"}
    for path in [ROOT / "recipes" / f"{name}.py" for name in BUILTIN]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "add_argument" and node.args
                    and isinstance(node.args[0], ast.Constant)):
                assert node.args[0].value not in shared, f"{path.name} declares {node.args[0].value} itself"
