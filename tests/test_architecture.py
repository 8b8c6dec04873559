"""The house rules of zinit's code, checked on its source (docs/design.md §7): no import circle, no import of zinit's
own modules inside a function (except optional dependencies), one adapter state, and errors told apart by type.

The checker reads the source with ``ast`` (it imports nothing), and is itself tested on small packages written here
that break each rule, so a checker that stopped seeing a circle would fail too.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import zinit
from zinit import cli
from zinit import config as config_module
from zinit.errors import ZinitError, ZinitKeyError, ZinitStateError, ZinitValueError
from zinit.state import STATE_ATTR, AdapterState

from tiny import tiny_llama, tiny_vit

ROOT = Path(__file__).resolve().parent.parent
#: The repository folders and the package names they install as (pyproject.toml's package-dir).
PACKAGES = {"zinit": "zinit", "backbones": "zinit.backbones", "recipes": "zinit.recipes", "methods": "zinit.methods",
            "benchmarks": "zinit.benchmarks"}
#: Imports of zinit modules that stay inside a function, each for a reason: fastapi/uvicorn are the optional serve
#: extra (zinit serve --help works without it), ray the optional ray extra.
ALLOWED_INNER = {("zinit.serve.cli", "zinit.serve.app"), ("zinit.serve.options", "zinit.serve.app"),
                 ("zinit.serve.cli", "zinit.serve.ray"), ("zinit.benchmarks.serve", "zinit.serve.app")}


def modules_of(root: Path, packages: dict[str, str]) -> dict[str, Path]:
    """``{module name: file}`` of every Python file under the package folders."""
    found = {}
    for folder, name in packages.items():
        for path in sorted((root / folder).rglob("*.py")):
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([name, *parts])] = path
    return found


def _targets(module: str, path: Path, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The modules of ``known`` an import statement loads (the deepest known prefix of each name)."""
    if isinstance(node, ast.ImportFrom):
        base = module.split(".")
        if node.level:
            base = base if path.name == "__init__.py" else base[:-1]
            base = base[: len(base) - node.level + 1]
            package = ".".join(base + ([node.module] if node.module else []))
        else:
            package = node.module or ""
        names = [f"{package}.{a.name}" if f"{package}.{a.name}" in known else package for a in node.names]
    else:
        names = [a.name for a in node.names]
    out = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            out.add(name)
    return out


def import_graph(root: Path, packages: dict[str, str]) -> tuple[dict[str, set[str]], set[tuple[str, str]]]:
    """The import edges between the modules (every import, at any depth) and the edges made inside a function."""
    known = modules_of(root, packages)
    edges: dict[str, set[str]] = {m: set() for m in known}
    inner: set[tuple[str, str]] = set()
    for module, path in known.items():
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges[module] |= _targets(module, path, node, known)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    if isinstance(sub, (ast.Import, ast.ImportFrom)):
                        inner |= {(module, t) for t in _targets(module, path, sub, known)}
    return edges, inner


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    counter = 0
    for start in edges:
        if start in index:
            continue
        work = [(start, iter(sorted(edges[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(sorted(group))
    return groups


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_sees_a_circle_and_an_import_inside_a_function(tmp_path):
    """The rules' checker on a package that breaks them: a circle through a function-level import, a clean chain."""
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/a.py": "from . import b\n",
                      "pkg/b.py": "def f():\n    from .c import g\n    return g\n",
                      "pkg/c.py": "from .a import b\n", "pkg/d.py": "from .c import b\n"})
    edges, inner = import_graph(tmp_path, {"pkg": "pkg"})
    assert cycles(edges) == [["pkg.a", "pkg.b", "pkg.c"]]
    assert inner == {("pkg.b", "pkg.c")}
    _write(tmp_path, {"pkg/b.py": "def f():\n    return 1\n"})
    assert cycles(import_graph(tmp_path, {"pkg": "pkg"})[0]) == []


def test_zinit_imports_form_no_circle():
    """Layered bottom-up (docs/design.md §7): no group of modules imports each other, at any depth."""
    edges, _ = import_graph(ROOT, PACKAGES)
    assert len(edges) > 60  # the whole package was read
    assert cycles(edges) == []


def test_the_layers_import_downward_only():
    """core <- backbones; core <- methods <- recipes; benchmarks on top: the methods package knows no recipe, and
    no backbone knows the methods or recipes."""
    edges, _ = import_graph(ROOT, PACKAGES)
    for module, targets in edges.items():
        if module.startswith("zinit.methods"):
            assert not [t for t in targets if t.startswith("zinit.recipes")], module
        if module.startswith("zinit.backbones"):
            assert not [t for t in targets if t.startswith(("zinit.recipes", "zinit.methods"))], module


def test_no_zinit_import_hides_inside_a_function():
    """Imports inside functions dodged circles; with none left, only optional dependencies stay inside one."""
    _, inner = import_graph(ROOT, PACKAGES)
    assert sorted(inner - ALLOWED_INNER) == []


def test_one_adapter_state_for_inject_and_named_adapters():
    """inject and add_adapter keep the same record; eject removes every adapter and gives the flags back."""
    model = tiny_llama()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    zinit.add_adapter(model, "a", layers=2, K=3)
    zinit.add_adapter(model, "b", layers=[0], K=2, gate="layer")
    state = getattr(model, STATE_ATTR)
    assert type(state) is AdapterState and state.named == ["a", "b"] and state.active is None
    assert not zinit.is_injected(model) and not any(p.requires_grad for p in model.parameters()
                                                    if p not in set(zinit.adapter_parameters(model, "a"))
                                                    | set(zinit.adapter_parameters(model, "b")))
    zinit.eject(model)  # every named adapter
    assert not hasattr(model, STATE_ATTR) and {n: p.requires_grad for n, p in model.named_parameters()} == flags
    zinit.inject(model, 2, 4)
    state = getattr(model, STATE_ATTR)
    assert type(state) is AdapterState and state.active == "default" and state.named == []
    assert zinit.injection(model) is state and state.K == 4 and state.config.layers == (2, 3)
    with pytest.raises(ZinitValueError, match="injected with one adapter"):
        zinit.add_adapter(model, "c", layers=1, K=2)
    with pytest.raises(ZinitStateError, match="already injected"):
        zinit.inject(model, 1, 2)
    zinit.eject(model)
    assert not hasattr(model, STATE_ATTR) and {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_single_adapter_options_are_refused_for_named_adapters(tmp_path):
    """What changes the shared model (no gate, image features, a task head, V2) is the one active adapter's only."""
    for options, why in (({"gate": "none"}, "named adapters are gated"),
                         ({"visual_dim": 4}, "image features or a task head"),
                         ({"bias_scale": True}, "bias/scale or trained norms")):
        folder = zinit.save_adapter(zinit.inject(tiny_vit(), 1, K=2, **options), tmp_path / why[:5])
        with pytest.raises(ZinitValueError, match=why):
            zinit.add_adapter(tiny_vit(), "a", folder)
    with pytest.raises(ZinitValueError, match="named adapters are gated"):
        zinit.add_adapter(tiny_vit(), "a", layers=1, K=2, gate="none")


def test_the_command_tells_bad_input_by_type(monkeypatch, capsys):
    """A ZinitError is bad input wherever it is raised (one line; its own line breaks kept, a key error unquoted);
    a KeyError or RuntimeError that is not one is a bug and keeps its traceback."""
    from zinit import lm

    def bad(args):
        error = ZinitKeyError("no adapter named 'x'\n  loaded: ['a']")  # made here, raised from a helper below
        raise_it(error)

    def raise_it(error):
        raise error

    monkeypatch.setattr(lm, "run_generate", bad)
    assert cli.main(["generate", "hi"]) == cli.ERROR_EXIT
    assert capsys.readouterr().err == "zinit: error: no adapter named 'x'\n  loaded: ['a']\n"
    for bug in (KeyError("a key"), RuntimeError("internal")):
        monkeypatch.setattr(lm, "run_generate", lambda args, bug=bug: raise_it(bug))
        with pytest.raises(type(bug)):
            cli.main(["generate", "hi"])
    assert issubclass(ZinitKeyError, KeyError) and str(ZinitKeyError("plain")) == "plain"


def test_every_error_class_of_zinit_is_a_zinit_error():
    """The error classes zinit defines for input (the trainer's, the server's folder lock, the generic backbone's)
    derive from ZinitError, so the command and callers can catch them by one type."""
    from zinit.hfauto import Unsupported
    from zinit.train import NoGradient, TrainingDiverged
    from zinit.train.lock import OutputInUse

    for cls in (Unsupported, NoGradient, TrainingDiverged, OutputInUse):
        assert issubclass(cls, ZinitError), cls
    assert sys.modules["zinit.errors"].__all__ == sorted(sys.modules["zinit.errors"].__all__)
    assert torch.equal(torch.zeros(1), torch.zeros(1))


PLUGINS = {
    # a backbone: GPT-2 declared through the generic hf backbone's paths (README, "Adding a backbone")
    "my_backbone.py": (
        "import zinit\n"
        "from zinit.hfauto import family\n"
        "zinit.register_backbone(family('my-gpt2', ['gpt2'], layers='transformer.h', attention='attn'))\n"),
    # a recipe: a task that trains an adapter on a random-weight LLaMA and writes summary.json
    "my_recipe.py": (
        "import json, pathlib, torch, zinit\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "def add_args(p):\n"
        "    p.add_argument('--output', required=True); p.add_argument('--method', default='zinit')\n"
        "def run(args):\n"
        "    model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "                                         num_hidden_layers=2, num_attention_heads=2))\n"
        "    zinit.inject(model, 1, 2)\n"
        "    n = sum(p.numel() for p in zinit.trainable_parameters(model))\n"
        "    out = pathlib.Path(args.output); out.mkdir(parents=True, exist_ok=True)\n"
        "    summary = {'metrics': {'score': 1.0}, 'trainable_parameters': n, 'adapter_bytes': 0,\n"
        "               'peak_memory_mb': 0.0}\n"
        "    if args.method == 'head-only':  # a recipe that forgets a field: only this method's row fails\n"
        "        del summary['adapter_bytes']\n"
        "    (out / 'summary.json').write_text(json.dumps(summary))\n"
        "    return 0\n"
        "zinit.register_recipe(zinit.Recipe('my-task', 'a toy task', 'causal_lm', add_args, run,\n"
        "                                   metrics=('score',)))\n"),
    # a PEFT method: train the LM head only
    "my_method.py": (
        "from zinit.methods import Method, register_method\n"
        "def prepare(model, ctx):\n"
        "    for p in model.parameters():\n"
        "        p.requires_grad_(False)\n"
        "    for p in model.lm_head.parameters():\n"
        "        p.requires_grad_(True)\n"
        "    return model\n"
        "register_method(Method('head-only', prepare, {'causal_lm': 1e-3}, 'the LM head alone'))\n"),
}


def test_a_backbone_a_recipe_and_a_method_are_one_file_each(tmp_path):
    """Each extension is one file in the user's own package, found through the one registry type by its entry point
    (the metadata pip writes): nothing in zinit changes and nothing imports them by hand. Run in fresh processes, as
    the zinit command and a user's script do; zinit compare runs the new method on the new recipe."""
    for name, text in PLUGINS.items():
        (tmp_path / name).write_text(text)
    info = tmp_path / "my_plugins-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: my-plugins\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[zinit.backbones]\nmine = my_backbone\n[zinit.recipes]\nmine = my_recipe\n"
                                           "[zinit.methods]\nmine = my_method\n")
    script = (
        "import json, sys, torch, zinit\n"
        "from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM\n"
        "from zinit import cli\n"
        "from zinit.methods import registry as M\n"
        "gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=16)).eval()\n"
        "assert zinit.find_backbone(gpt2).name == 'my-gpt2' and 'my-gpt2' in zinit.list_backbones()\n"
        "ids = torch.randint(0, 32, (1, 5))\n"
        "with torch.no_grad():\n"
        "    base = gpt2(input_ids=ids).logits\n"
        "    assert torch.equal(zinit.inject(gpt2, 1, 3)(input_ids=ids).logits, base)\n"
        "assert zinit.list_recipes()[-1] == 'my-task'\n"
        "assert cli.main(['train', 'my-task', '--output', sys.argv[1]]) == 0\n"
        "assert json.load(open(sys.argv[1] + '/summary.json'))['trainable_parameters'] == 2 * 16 + 2\n"
        "llama = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32,\n"
        "                                     num_hidden_layers=2, num_attention_heads=2))\n"
        "ctx = M.MethodContext(recipe='my-task', layers=1, K=2)\n"
        "trained = [n for n, p in M.prepare('head-only', llama, ctx).named_parameters() if p.requires_grad]\n"
        "assert trained == ['lm_head.weight'] and M.list_methods()[-1] == 'head-only', trained\n"
        "print('ok')\n")
    import subprocess

    from tiny import subprocess_env

    env = subprocess_env()
    env["PYTHONPATH"] = str(tmp_path) + ":" + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "out")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
    compared = subprocess.run([sys.executable, "-m", "zinit", "compare", "my-task", "--methods", "zinit,head-only",
                               "--output", str(tmp_path / "cmp")], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=300)
    assert compared.returncode == 0, compared.stderr[-3000:] + compared.stdout[-3000:]
    rows = {r["method"]: r for r in json.loads((tmp_path / "cmp" / "compare.json").read_text())["rows"]}
    assert rows["zinit"]["status"] == "ok" and rows["zinit"]["metrics"] == {"score": 1.0}
    assert rows["head-only"]["status"] == "failed" and "lacks ['adapter_bytes']" in rows["head-only"]["reason"]


def test_one_registry_type_for_backbones_recipes_methods_and_schemes():
    """timm's style for all four: register / list / get, the same errors; zinit.backbones is only the package."""
    from zinit import quant, recipe, registry
    from zinit.methods import registry as methods

    for reg, known in ((registry.BACKBONES, "llama"), (recipe.RECIPES, "alpaca"), (methods.METHODS, "lora"),
                       (quant.SCHEMES, "nf4")):
        assert isinstance(reg, zinit.Registry) and known in reg and reg.get(known).name == known
        with pytest.raises(ValueError, match=f"unknown {reg.kind} 'nope'; registered {reg.kind}s: "):
            reg.get("nope")
        with pytest.raises(ValueError, match=f"a {reg.kind} named '{known}' is already registered"):
            reg.register(type(reg.get(known))(**{**reg.get(known).__dict__}))
    assert zinit.list_backbones() == sorted(zinit.list_backbones())
    assert not callable(sys.modules["zinit.backbones"])


def test_one_config_checked_once_and_taken_as_input(tmp_path):
    """AdapterConfig checks itself when made (the one place its rules live: keyword arguments, zinit.json and a
    hand-made config meet the same rule), needs no model (rules that need the depth wait for bind), and inject and
    add_adapter take one as input; the model's sizes sit beside it (Dims), never in it."""
    from dataclasses import fields as fields_of

    assert not {f.name for f in fields_of(zinit.AdapterConfig)} & set(config_module.DIM_FIELDS)
    assert zinit.AdapterConfig() == zinit.AdapterConfig(layers=None, K=10, gate="head", gate_init="zero")
    base = dict(layers=(2, 3), K=3)
    with pytest.raises(ZinitValueError, match=r"K=0 must be an int >= 1 \(the prompt length\)"):
        zinit.AdapterConfig(**{**base, "K": 0})
    with pytest.raises(ZinitValueError, match="gate='none' has no gate, so gate_init='random' does not apply"):
        zinit.AdapterConfig(**{**base, "gate": "none", "gate_init": "random"})
    with pytest.raises(ZinitValueError, match=r"K=0 must be an int >= 1 \(the prompt length\)"):  # the same rule
        zinit.inject(tiny_llama(), 2, K=0)
    deep = zinit.AdapterConfig(**{**base, "layers": (2, 9)})  # a fine config: only a model can say 9 is too deep
    with pytest.raises(ZinitValueError, match=r"layer index 9 is out of range: this model has layers 0\.\.3"):
        zinit.inject(tiny_llama(), deep)
    config = zinit.AdapterConfig(**{**base, "layers": [3, 2]})
    assert config.layers == (2, 3)  # a list is kept as a sorted tuple: the config stays hashable and comparable
    model = zinit.inject(tiny_llama(), config)
    assert zinit.injection(model).config == config.replace(backbone="llama")  # resolved: the backbone named
    folder = zinit.save_adapter(model, tmp_path / "a")
    saved, dims = zinit.AdapterConfig.from_json(zinit.read_adapter_config(folder))
    assert saved == zinit.injection(model).config and dims == zinit.injection(model).dims
    assert zinit.injection(zinit.inject(tiny_llama(), saved)).config == saved
    with pytest.raises(ZinitValueError, match=r"takes every option from the AdapterConfig; drop \['K', 'gate'\]"):
        zinit.inject(tiny_llama(), config, K=4, gate="layer")
    wide = zinit.inject(tiny_llama(hidden=64), config)  # the sizes are the model's: a config fits any of them
    assert zinit.injection(wide).dims.hidden_size == 64 and zinit.injection(wide).config == saved
    named = zinit.add_adapter(tiny_llama(), "a", config)
    assert zinit.bank.named_adapter_config(named, "a") == saved


def long_functions(root: Path, packages: dict[str, str], limit: int = 60) -> list[tuple[str, str, int]]:
    """``(module, function, lines)`` of every function whose code (its docstring not counted) is over ``limit``
    lines, nested functions included."""
    found = []
    for module, path in modules_of(root, packages).items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                first = node.body[0]
                if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                        and isinstance(first.value.value, str):
                    lines -= first.end_lineno - first.lineno + 1
                if lines > limit:
                    found.append((module, node.name, lines))
    return found


def test_no_function_is_over_60_lines_of_code(tmp_path):
    """Readable pieces: no function's code is over 60 lines (a public function's docstring, with its example, may
    add to that). The measure is checked on a function it must flag."""
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    _write(tmp_path, {"pkg/__init__.py": "", "pkg/long.py": f'def f():\n    """Doc."""\n{body}'})
    assert long_functions(tmp_path, {"pkg": "pkg"}) == [("pkg.long", "f", 62)]
    assert long_functions(ROOT, PACKAGES) == []


def test_trainer_and_adapter_options_come_from_their_dataclasses(tmp_path):
    """litgpt's style: a setting declares its flag beside its default, once. Every option TrainConfig declares is a
    flag of every recipe's train command, and what is given on the command line reaches the trainer's config."""
    from dataclasses import fields as fields_of

    from zinit.cliargs import options_of
    from zinit.recipes import common
    from zinit.train import TrainConfig

    declared = options_of(TrainConfig)
    assert {"epochs", "batch_size", "save_every_minutes", "seed"} <= set(declared)
    assert common.FLAGS["K"] == options_of(zinit.AdapterConfig)["K"]
    for name, (flag, keywords) in declared.items():
        assert common.FLAGS[name] == (flag, keywords)
        field_default = {f.name: f.default for f in fields_of(TrainConfig)}[name]
        assert keywords["default"] == (None if name == "blr" else field_default), name  # blr: the method's default
    given = {"epochs": "3", "max_steps": "7", "batch_size": "2", "grad_accum": "3", "weight_decay": "0.5",
             "warmup_epochs": "0.25", "save_every": "9", "save_every_minutes": "0", "seed": "5", "device": "cpu",
             "blr": "0.125"}
    assert set(given) == set(declared)  # a new option declared on TrainConfig must be given here too
    argv = ["train", "alpaca", "--output", str(tmp_path / "run")]
    for name, value in given.items():
        argv += [declared[name][0], value]
    args = cli.build_parser().parse_args(argv)
    config = common.TrainingRun("alpaca", args).config()
    for name, value in given.items():
        assert getattr(config, name) == (value if name == "device" else type(getattr(config, name) or 0.0)(value)), \
            name


def test_configs_from_files_and_hands_meet_every_rule(tmp_path):
    """Found by review: a config path must check what the keyword path checks (the task head's names against the
    model), malformed fields are field errors (not a TypeError), the visual widths come together, options beside a
    folder or config are refused, and a record pickled before the one adapter state still loads."""
    import pickle

    from tiny import edit_adapter_config

    vit = tiny_vit()
    config = zinit.injection(zinit.inject(tiny_vit(), 1, K=2, train_modules=["head"])).config
    with pytest.raises(ZinitValueError, match=r"train_modules: VisionTransformer has no submodule 'classifier'"):
        zinit.inject(vit, config.replace(train_modules=("classifier",)))
    assert not zinit.is_injected(vit) and all(p.requires_grad for p in vit.parameters())
    folder = zinit.save_adapter(zinit.inject(tiny_llama(), 2, K=3), tmp_path / "a")
    edit_adapter_config(folder, layers=[[2], [3]])
    with pytest.raises(ZinitValueError, match=r"field 'layers' must be a non-empty list of distinct layer indices"):
        zinit.load_adapter(tiny_llama(), folder)
    with pytest.raises(ZinitValueError, match="visual_dim=6 and visual_hidden=None: give both"):
        zinit.AdapterConfig(layers=(3,), K=3, visual_dim=6)
    assert zinit.AdapterConfig(layers=[3, 1], K=3).layers == (1, 3)  # as the keyword path sorts them
    with pytest.raises(ZinitValueError, match=r"takes every option from the source; drop \['gate', 'gate_init'\]"):
        zinit.add_adapter(tiny_llama(), "a", folder.parent / "a", gate="layer", gate_init="random")
    from zinit import quant
    with pytest.raises(KeyError, match="unknown quantization scheme 'int3'"):
        quant.SCHEMES["int3"]
    model = zinit.inject(tiny_llama(), 2, K=3)
    old = pickle.loads(pickle.dumps(zinit.injection(model)))
    old.__dict__ = {k: v for k, v in zinit.injection(model).__dict__.items()
                    if k not in ("configs", "active", "dims", "routing", "installed")}
    sized = copy.copy(zinit.injection(model).config)  # an AdapterConfig as pickled when it held the model's sizes
    sized.__dict__.update(dataclasses.asdict(zinit.injection(model).dims))
    old.__dict__["config"] = sized  # the record as zinit wrote it before the one adapter state
    revived = pickle.loads(pickle.dumps(old))
    assert revived.active == "default" and revived.config == zinit.injection(model).config and revived.K == 3
    assert revived.dims == zinit.injection(model).dims and "hidden_size" not in revived.config.__dict__
