"""VTAB-1k image classification with zero-init prompts on a timm ViT (the paper's vision result).

Data: the VPT / NOAH folder layout (docs/design.md §4), ``<root>/<task>/{train800,val200,train800val200,test}.txt`` with
lines ``images/<split>/<n>.jpg <label>`` (paths relative to the task folder). The 19 tasks are registered with their
group and class count; folder names that differ between public preparations (``cifar`` / ``cifar100``,
``oxford_iiit_pet`` / ``oxford_pet`` ...) are accepted. Any other folder in that layout is a custom task when
``--num-classes`` is given.

Model: any timm ViT (default ``vit_base_patch16_224.orig_in21k``, weights from ``--pretrained-file`` on an offline
machine), zinit on the top L blocks and a new linear head, both trained; images resized to the model's input size
(bicubic, as VPT) and normalised with the model's own mean/std.

Protocol (never selects on test): every (blr, weight decay) of a small grid is trained on ``train800`` and scored on
``val200``; the best is retrained on ``train800val200`` once per seed and only then is ``test`` read and scored.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import zinit
from zinit.files import atomic_write, write_json
from zinit.cliargs import float_list, int_at_least, positive_int
from zinit.train import Task, TrainConfig, train
from zinit.train import dist as D

from zinit.methods import registry as methods
from .common import TrainingRun, add_flags, base_lr
from .vision import DEFAULT_VIT, build_vit

SPLITS = ("train800", "val200", "train800val200", "test")
GROUPS = ("Natural", "Specialized", "Structured")
DEFAULT_MODEL = DEFAULT_VIT


@dataclass(frozen=True)
class VtabTask:
    """One VTAB-1k task: canonical name, group, class count, and the folder names public preparations use."""

    name: str
    group: str
    num_classes: int
    aliases: tuple[str, ...] = ()


TASKS: dict[str, VtabTask] = {t.name: t for t in (
    VtabTask("cifar", "Natural", 100, ("cifar100", "cifar-100", "cifar_100")),
    VtabTask("caltech101", "Natural", 102, ("caltech",)),
    VtabTask("dtd", "Natural", 47),
    VtabTask("oxford_flowers102", "Natural", 102, ("flowers102", "oxford_flowers", "flowers")),
    VtabTask("oxford_iiit_pet", "Natural", 37, ("oxford_pet", "pets", "pet")),
    VtabTask("svhn", "Natural", 10, ("svhn_cropped",)),
    VtabTask("sun397", "Natural", 397, ("sun",)),
    VtabTask("patch_camelyon", "Specialized", 2, ("camelyon", "pcam")),
    VtabTask("eurosat", "Specialized", 10),
    VtabTask("resisc45", "Specialized", 45, ("resisc",)),
    VtabTask("diabetic_retinopathy", "Specialized", 5, ("retinopathy", "diabetic_retinopathy_detection")),
    VtabTask("clevr_count", "Structured", 8, ("clevr_count_all",)),
    VtabTask("clevr_dist", "Structured", 6, ("clevr_distance", "clevr_closest_object_distance")),
    VtabTask("dmlab", "Structured", 6),
    VtabTask("kitti", "Structured", 4, ("kitti_dist", "kitti_distance")),
    VtabTask("dsprites_loc", "Structured", 16, ("dsprites_location", "dsprites_label_x_position")),
    VtabTask("dsprites_ori", "Structured", 16, ("dsprites_orientation", "dsprites_label_orientation")),
    VtabTask("smallnorb_azi", "Structured", 18, ("smallnorb_azimuth", "smallnorb_label_azimuth")),
    VtabTask("smallnorb_ele", "Structured", 9, ("smallnorb_elevation", "smallnorb_label_elevation")),
)}

#: VPT-deep, ViT-B/16 IN-21k, test top-1 % per task (VPT paper, Table 1); its group means are docs/design.md §3's.
VPT_DEEP = {"cifar": 78.8, "caltech101": 90.8, "dtd": 65.8, "oxford_flowers102": 98.0, "oxford_iiit_pet": 88.3,
            "svhn": 78.1, "sun397": 49.6, "patch_camelyon": 81.8, "eurosat": 96.1, "resisc45": 83.4,
            "diabetic_retinopathy": 68.4, "clevr_count": 68.5, "clevr_dist": 60.0, "dmlab": 46.5, "kitti": 72.8,
            "dsprites_loc": 73.6, "dsprites_ori": 47.9, "smallnorb_azi": 32.9, "smallnorb_ele": 37.8}
#: Group means (test top-1 %) from the paper (docs/design.md §3): zero-init attention, VPT-deep, full fine-tuning.
PAPER_GROUPS = {
    "zero-init (paper)": {"Natural": 81.74, "Specialized": 84.43, "Structured": 56.75},
    "VPT-deep": {"Natural": 78.48, "Specialized": 82.43, "Structured": 54.98},
    "full FT": {"Natural": 75.88, "Specialized": 83.36, "Structured": 47.64},
}


def find_task(root: str | Path, name: str, num_classes: int | None = None) -> tuple[VtabTask, Path]:
    """The task spec and its folder under ``root``, accepting every known folder name of the task.

    A name that is not one of the 19 tasks is a custom task: it needs ``num_classes`` (group "Custom").
    """
    root = Path(root)
    spec = TASKS.get(name) or next((t for t in TASKS.values() if name in t.aliases), None)
    if spec is None:
        if num_classes is None:
            raise ValueError(
                f"{name!r} is not a VTAB-1k task ({', '.join(TASKS)}); for your own data in the same layout pass "
                "--num-classes"
            )
        spec = VtabTask(name, "Custom", num_classes)
    elif num_classes is not None and num_classes != spec.num_classes:
        raise ValueError(f"--num-classes {num_classes} contradicts {spec.name}, which has {spec.num_classes} classes")
    for candidate in (name, spec.name, *spec.aliases):
        if (root / candidate).is_dir():
            return spec, root / candidate
    raise FileNotFoundError(
        f"no folder for task {spec.name} under {root} (looked for {', '.join((spec.name,) + spec.aliases)})"
    )


def read_split(folder: Path, split: str, num_classes: int) -> list[tuple[Path, int]]:
    """``[(image path, label)]`` of one split file; errors name the file, the line and what is wrong."""
    path = folder / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"VTAB split file {path} does not exist (a task folder holds {', '.join(SPLITS)}.txt)")
    items = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise ValueError(f"{path}:{number}: expected '<image path> <integer label>', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise ValueError(f"{path}:{number}: label {label} is outside 0..{num_classes - 1} ({num_classes} classes)")
        image = folder / parts[0]
        if not image.is_file():
            raise FileNotFoundError(f"{path}:{number}: image {image} does not exist")
        items.append((image, label))
    if not items:
        raise ValueError(f"VTAB split file {path} lists no images")
    return items


class VtabData:
    """The splits of one task, read on demand; ``reads`` records the order in which splits were read, so the
    protocol can be checked: ``test`` must come last."""

    def __init__(self, root: str | Path, task: str, num_classes: int | None = None) -> None:
        self.spec, self.folder = find_task(root, task, num_classes)
        for split in SPLITS:
            if not (self.folder / f"{split}.txt").is_file():
                raise FileNotFoundError(f"VTAB split file {self.folder / (split + '.txt')} does not exist")
        self.reads: list[str] = []

    def split(self, name: str) -> list[tuple[Path, int]]:
        if name not in SPLITS:
            raise ValueError(f"split {name!r} is not one of {SPLITS}")
        self.reads.append(name)
        return read_split(self.folder, name, self.spec.num_classes)


def load_image(path: Path, size: int) -> Tensor:
    """An RGB image resized to ``size × size`` (bicubic) as a uint8 tensor ``[3, size, size]``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    except (UnidentifiedImageError, OSError) as exc:
        raise ValueError(f"image {path} cannot be decoded: {exc}; replace the file with the image, or remove its "
                         "line from the split file") from None
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(2, 0, 1)


def load_images(items: Sequence[tuple[Path, int]], size: int, desc: str, progress: bool = True) -> tuple[Tensor, Tensor]:
    """Decode a split once into ``uint8 [N, 3, size, size]`` and labels ``[N]`` (the frozen backbone makes the
    decoded split worth keeping across epochs)."""
    from tqdm.auto import tqdm

    images = torch.empty(len(items), 3, size, size, dtype=torch.uint8)
    for i, (path, _) in enumerate(tqdm(items, desc=desc, unit="img", disable=not progress, leave=False)):
        images[i] = load_image(path, size)
    return images, torch.tensor([label for _, label in items])


class Preprocess:
    """uint8 images -> the model's normalised float input."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean = torch.tensor(mean).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(std).view(1, 3, 1, 1) * 255

    def __call__(self, images: Tensor) -> Tensor:
        return (images.float() - self.mean.to(images.device)) / self.std.to(images.device)


def group_means(top1: dict[str, float]) -> dict[str, dict[str, Any]]:
    """Mean test top-1 per VTAB group over the tasks given: ``{group: {"mean", "tasks", "of"}}``.

    >>> group_means({"cifar": 70.0, "dtd": 60.0, "eurosat": 90.0})["Natural"]
    {'mean': 65.0, 'tasks': 2, 'of': 7}
    """
    out = {}
    for group in GROUPS:
        names = [t.name for t in TASKS.values() if t.group == group]
        values = [top1[n] for n in names if n in top1]
        if values:
            out[group] = {"mean": sum(values) / len(values), "tasks": len(values), "of": len(names)}
    return out


@torch.no_grad()
def top1(model: nn.Module, images: Tensor | Sequence[tuple[Path, int]], labels: Tensor | None, preprocess: Preprocess,
         size: int, batch_size: int = 128, progress: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy (%) on decoded images (with labels) or on a list of ``(path, label)`` decoded batch by batch."""
    from tqdm.auto import tqdm

    model.eval()
    device = next(model.parameters()).device
    autocast = D.autocast(device)
    n = len(images)
    correct = 0
    for s in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress, leave=False):
        if isinstance(images, Tensor):
            x, y = images[s:s + batch_size], labels[s:s + batch_size]
        else:
            chunk = images[s:s + batch_size]
            x = torch.stack([load_image(p, size) for p, _ in chunk])
            y = torch.tensor([label for _, label in chunk])
        with autocast:
            logits = model(preprocess(x.to(device)))
        correct += int((logits.argmax(-1).cpu() == y).sum())
    return 100.0 * correct / n


@dataclass
class VtabSettings:
    """Hyperparameters of the VTAB recipe (defaults: VPT/NOAH practice with the official zinit schedule)."""

    model: str = DEFAULT_MODEL
    pretrained_file: str | None = None
    img_size: int | None = None
    layers: int = 12
    K: int = 10
    epochs: float = 100.0
    warmup_epochs: float = 10.0
    batch_size: int = 64
    blr_grid: tuple[float, ...] = (1e-2, 0.1, 0.5)  # zinit's default_blr_grid
    wd_grid: tuple[float, ...] = (1e-4, 1e-2)
    seeds: tuple[int, ...] = (0,)
    num_classes: int | None = None
    device: str | None = None
    progress: bool = True
    method: str = "zinit"  #: see zinit.methods (zinit compare)


def _run_one(base: nn.Module, spec: VtabTask, settings: VtabSettings, train_set: tuple[Tensor, Tensor],
             preprocess: Preprocess, blr: float, wd: float, seed: int, output: Path, env: D.Dist) -> nn.Module:
    model = copy.deepcopy(base)
    torch.manual_seed(seed)
    model.reset_classifier(spec.num_classes)
    layers = min(settings.layers, len(model.blocks))
    model = methods.prepare(settings.method, model, methods.MethodContext(
        "vtab", layers, settings.K, head=["head"], task="image_classification"))
    images, labels = train_set

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, int]:
        return F.cross_entropy(m(preprocess(batch["images"])), batch["labels"]), batch["labels"].numel()

    task = Task(
        examples=list(range(len(labels))),
        collate=lambda idx: {"images": images[idx], "labels": labels[idx]},
        loss=loss,
        fingerprint={"recipe": "vtab", "method": settings.method, "task": spec.name, "model": settings.model,
                     "pretrained_file": settings.pretrained_file, "img_size": settings.img_size,
                     "examples": len(labels), "layers": layers, "K": settings.K},
    )
    batch = min(settings.batch_size, len(labels) // env.world_size)
    config = TrainConfig(output=str(output), epochs=settings.epochs, batch_size=batch, blr=blr, weight_decay=wd,
                         warmup_epochs=settings.warmup_epochs, seed=seed, group_by_length=False,
                         save_every=10**9, device=settings.device, progress=settings.progress)
    train(model, task, config)
    return model


def _search(base: nn.Module, spec: VtabTask, settings: VtabSettings, preprocess: Preprocess, size: int, out: Path,
            env: D.Dist, decoded: Callable[[str], tuple[Tensor, Tensor]]
            ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Step 1: each (blr, weight decay) of the grid trained on train800, scored on val200; the records and the best."""
    search: list[dict[str, Any]] = []
    todo = [(b, w) for b in settings.blr_grid for w in settings.wd_grid]
    seed0 = settings.seeds[0]
    pending = [(b, w) for b, w in todo if not (out / "search" / f"blr{b:g}_wd{w:g}" / "val.json").is_file()]
    if pending:
        train800, val200 = decoded("train800"), decoded("val200")
    for blr, wd in todo:
        folder = out / "search" / f"blr{blr:g}_wd{wd:g}"
        done = folder / "val.json"
        if not done.is_file():
            model = _run_one(base, spec, settings, train800, preprocess, blr, wd, seed0, folder, env)
            if env.is_main:
                write_json(done, {"blr": blr, "weight_decay": wd, "val_top1": top1(model, *val200, preprocess, size)})
            D.barrier()
            del model
        search.append(json.loads(done.read_text()))
    best = max(search, key=lambda r: (r["val_top1"], -r["blr"], -r["weight_decay"]))
    return search, best


def _finals(base: nn.Module, data: VtabData, settings: VtabSettings, preprocess: Preprocess, size: int, out: Path,
            env: D.Dist, decoded: Callable[[str], tuple[Tensor, Tensor]], best: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps 2 and 3: the best retrained on train800val200 per seed, and only then test read and scored."""
    spec = data.spec
    finals = []
    needed = [s for s in settings.seeds if not (out / f"final_seed{s}" / "test.json").is_file()]
    if needed:
        trainval = decoded("train800val200")
    for seed in settings.seeds:
        folder = out / f"final_seed{seed}"
        done = folder / "test.json"
        if not done.is_file():
            model = _run_one(base, spec, settings, trainval, preprocess, best["blr"], best["weight_decay"], seed,
                             folder, env)
            if env.is_main:
                methods.save_trained(model, folder / "adapter")
                test = data.split("test")
                acc = top1(model, test, None, preprocess, size, progress=settings.progress, desc=f"{spec.name}/test")
                write_json(done, {"seed": seed, "test_top1": acc, "test_images": len(test), "trainable_parameters":
                                   methods.trainable_count(model)})
            D.barrier()
            del model
        finals.append(json.loads(done.read_text()))
    return finals


def run_task(root: str | Path, task: str, output: str | Path, settings: VtabSettings,
             base: nn.Module | None = None) -> dict[str, Any]:
    """The whole protocol for one task: grid on train800→val200, retrain the best on train800val200 per seed, then
    (and only then) test top-1. Every finished piece is kept in ``output`` and skipped when the command is re-run.

    Returns the task's result (also written to ``output/result.json``).
    """
    env = D.setup(settings.device)
    data = VtabData(root, task, settings.num_classes)
    spec = data.spec
    out = Path(output)
    if base is None:
        base = build_vit(settings.model, settings.pretrained_file, settings.img_size)
    base = base.to(env.device)
    size = base.patch_embed.img_size[0]
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(base)  # the model's own mean/std (0.5 for orig_in21k), timm's defaults otherwise
    preprocess = Preprocess(cfg["mean"], cfg["std"])

    def decoded(split: str) -> tuple[Tensor, Tensor]:
        return load_images(data.split(split), size, f"{spec.name}/{split}", settings.progress and env.is_main)

    # 1. choose (blr, weight decay) on train800 -> val200
    search, best = _search(base, spec, settings, preprocess, size, out, env, decoded)

    # 2. retrain the best on train800val200 per seed; 3. only then read test
    finals = _finals(base, data, settings, preprocess, size, out, env, decoded, best)
    accs = [f["test_top1"] for f in finals]
    result = {"task": spec.name, "group": spec.group, "num_classes": spec.num_classes, "folder": str(data.folder),
              "search": search, "best": {"blr": best["blr"], "weight_decay": best["weight_decay"],
                                         "val_top1": best["val_top1"]},
              "test_top1": accs, "mean": statistics.fmean(accs),
              "std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "trainable_parameters": finals[0]["trainable_parameters"],
              "splits_read": data.reads}
    if env.is_main:
        write_json(out / "result.json", result)
    return result


def format_report(results: Sequence[dict[str, Any]]) -> str:
    """The per-task table (measured mean ± std beside VPT-deep) and the group means beside the paper's."""
    lines = ["| task | group | test top-1 (%) | VPT-deep | best blr / wd (val top-1) |", "|---|---|---|---|---|"]
    for r in results:
        spread = f" ± {r['std']:.2f}" if len(r["test_top1"]) > 1 else ""
        vpt = f"{VPT_DEEP[r['task']]:.1f}" if r["task"] in VPT_DEEP else "–"
        b = r["best"]
        lines.append(f"| {r['task']} | {r['group']} | {r['mean']:.2f}{spread} | {vpt} | "
                     f"{b['blr']:g} / {b['weight_decay']:g} ({b['val_top1']:.1f}) |")
    means = group_means({r["task"]: r["mean"] for r in results})
    if means:
        lines += ["", "| group | measured | " + " | ".join(PAPER_GROUPS) + " |",
                  "|---|---|" + "---|" * len(PAPER_GROUPS)]
        for group, m in means.items():
            paper = " | ".join(f"{v[group]:.2f}" for v in PAPER_GROUPS.values())
            lines.append(f"| {group} | {m['mean']:.2f} ({m['tasks']}/{m['of']} tasks) | {paper} |")
    return "\n".join(lines)


def plot_report(results: Sequence[dict[str, Any]], path: Path) -> Path:
    """Bar chart: measured test top-1 per task beside VPT-deep, then the group means beside the paper's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["task"] for r in results]
    means = group_means({r["task"]: r["mean"] for r in results})
    fig, axes = plt.subplots(1, 2, figsize=(max(7, 0.7 * len(names) + 5), 4.2),
                             gridspec_kw={"width_ratios": [max(len(names), 2), len(GROUPS) + 1]})
    x = range(len(names))
    axes[0].bar([i - 0.2 for i in x], [r["mean"] for r in results], 0.4,
                yerr=[r["std"] for r in results], label="zinit (measured)", color="tab:blue")
    axes[0].bar([i + 0.2 for i in x], [VPT_DEEP.get(n, math.nan) for n in names], 0.4, label="VPT-deep (paper)",
                color="tab:gray")
    axes[0].set_xticks(list(x), names, rotation=45, ha="right")
    axes[0].set_ylabel("test top-1 (%)")
    axes[0].legend(fontsize=8)
    groups = list(GROUPS)  # the paper's means are drawn even where no task of a group was run (measured: none)
    series = [("measured", [means[g]["mean"] if g in means else math.nan for g in groups], "tab:blue")] + [
        (label, [v[g] for g in groups], color)
        for (label, v), color in zip(PAPER_GROUPS.items(), ("tab:orange", "tab:gray", "tab:green"))]
    w = 0.8 / len(series)
    for j, (label, values, color) in enumerate(series):
        axes[1].bar([i + (j - (len(series) - 1) / 2) * w for i in range(len(groups))], values, w, label=label,
                    color=color)
    axes[1].set_xticks(range(len(groups)), groups)
    axes[1].set_title("group means" + ("" if means else " (paper; no VTAB task measured)"), fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def add_train_args(p: argparse.ArgumentParser) -> None:
    """The options of ``zinit train vtab``."""
    p.add_argument("--task", required=True, help="a VTAB-1k task name, a comma-separated list, or 'all'")
    p.add_argument("--data", required=True, help="VTAB-1k root (<root>/<task>/{train800,val200,train800val200,test}.txt)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"timm ViT name (default {DEFAULT_MODEL})")
    p.add_argument("--pretrained-file", default=None,
                   help="local weights for --model (.safetensors, or a timm/PyTorch checkpoint read weights-only)")
    p.add_argument("--img-size", type=positive_int, default=None, help="input size (default: the model's, 224)")
    p.add_argument("--num-classes", type=int_at_least(2, "the class count"), default=None,
                   help="class count of a custom task in the VTAB layout")
    add_flags(p, "output", "method", "layers", "K", "epochs", "warmup_epochs", "batch_size", "device", "no_progress",
              layers=12, epochs={"default": 100.0, "help": "epochs per training run (default %(default)s)"},
              warmup_epochs=10.0, batch_size={"default": 64, "help": "images per process per step (default %(default)s)"})
    p.add_argument("--blr-grid", default=None, help="base lrs to try, lr = blr·batch/256 (default: the method's "
                   "default base lr × " + ", ×".join(f"{m:g}" for m in LR_MULTIPLES) + ", the same multiples for every "
                   "method; zinit: 0.01,0.1,0.5)")
    p.add_argument("--wd-grid", default="1e-4,1e-2", help="weight decays to try (default %(default)s)")
    p.add_argument("--seeds", default="0", help="seeds of the final runs, e.g. 0,1,2 (mean ± std)")


#: The default lr grid of every method: its default base lr (:func:`zinit.recipes.common.base_lr`) times these. One set
#: of multiples for all methods, so that no row of a comparison gets a wider search than another. Wide, as VPT's
#: protocol searches base lrs over three decades: on the real DINOv2 ViT-S/14 (README, "Does it work on real
#: weights?") zinit and the linear probe do best at 10-50× their default base lr and VPT at 1-10×, while the earlier
#: 0.5-5× grid stopped below zinit's best (val200 82.5 % at 1× against 96.0 % at 50× on digits).
LR_MULTIPLES = (1.0, 10.0, 50.0)


def default_blr_grid(method: str) -> tuple[float, ...]:
    """The base lrs ``zinit train vtab`` tries for ``method`` when ``--blr-grid`` is not given: the method's default
    base lr times :data:`LR_MULTIPLES`, the same multiples for every method.

    >>> default_blr_grid("zinit"), default_blr_grid("full")
    ((0.01, 0.1, 0.5), (0.0001, 0.001, 0.005))
    """
    blr = base_lr("vtab", method)
    if blr is None:
        raise ValueError(f"method {method!r} has no default base lr for vtab: pass --blr-grid")
    return tuple(float(f"{blr * m:.6g}") for m in LR_MULTIPLES)


def _seeds(text: str) -> tuple[int, ...]:
    values = float_list(text, "--seeds", lambda v: v >= 0 and v == int(v), "whole numbers >= 0")
    if len(set(values)) != len(values):
        raise ValueError(f"--seeds {text!r} names a seed twice")
    return tuple(int(v) for v in values)


def run_train(args: argparse.Namespace) -> int:
    """``zinit train vtab``: the protocol for each task, then the report (Markdown, JSON, bar chart)."""
    names = list(TASKS) if args.task == "all" else [t.strip() for t in args.task.split(",") if t.strip()]
    if not names:
        raise ValueError(f"--task {args.task!r} names no task: pass a VTAB-1k task name, a comma-separated list, "
                         "or 'all'")
    grid = args.blr_grid if args.blr_grid is not None else ",".join(f"{b:g}" for b in default_blr_grid(args.method))
    settings = VtabSettings(
        model=args.model, pretrained_file=args.pretrained_file, img_size=args.img_size, layers=args.layers, K=args.K,
        epochs=args.epochs, warmup_epochs=args.warmup_epochs, batch_size=args.batch_size,
        blr_grid=float_list(grid, "--blr-grid", lambda v: v > 0, "base learning rates > 0"),
        wd_grid=float_list(args.wd_grid, "--wd-grid", lambda v: v >= 0, "weight decays >= 0"),
        seeds=_seeds(args.seeds), num_classes=args.num_classes,
        device=args.device, progress=not args.no_progress, method=args.method)
    for name in names:  # fail on a missing task before hours of training on the others
        VtabData(args.data, name, settings.num_classes)
    with TrainingRun("vtab", args) as run:
        out = run.out
        base = build_vit(settings.model, settings.pretrained_file, settings.img_size)
        if run.is_main and settings.pretrained_file is None:
            print(f"note: {settings.model} has random weights (no --pretrained-file): numbers will not approach the "
                  "paper's")
        results = []
        with run.hold():  # one run at a time writes this folder
            for name in names:
                result = run_task(args.data, name, out / name, settings, base)
                results.append(result)
                if run.is_main:
                    print(f"{result['task']}: test top-1 {result['mean']:.2f} (best blr {result['best']['blr']:g}, "
                          f"wd {result['best']['weight_decay']:g}, val {result['best']['val_top1']:.1f})")
            if run.is_main:
                report = format_report(results)
                write_json(out / "report.json", {"model": settings.model, "pretrained_file": settings.pretrained_file,
                                                  "tasks": results, "groups": group_means(
                                                      {r["task"]: r["mean"] for r in results}),
                                                  "paper": PAPER_GROUPS})
                atomic_write(out / "report.md", lambda tmp: Path(tmp).write_text(report + "\n"))
                plot_report(results, out / "vtab.png")
                adapter = out / names[0] / f"final_seed{settings.seeds[0]}" / "adapter"
                means = {g: m["mean"] for g, m in group_means({r["task"]: r["mean"] for r in results}).items()}
                methods.write_summary(out, args.method, {"top1": statistics.fmean(r["mean"] for r in results),
                                                         **means}, results[0]["trainable_parameters"], adapter,
                                      run.device)
                print(report)
                print(f"report: {out / 'report.md'}, {out / 'report.json'}, {out / 'vtab.png'}")
    return run.status


RECIPE = zinit.register_recipe(zinit.Recipe(
    name="vtab", task="image_classification",
    description="VTAB-1k image classification on a timm ViT (grid on val, report on test)",
    add_train_args=add_train_args, run_train=run_train, metrics=("top1", *GROUPS), throughput_unit="images/s",
    default_blr=1e-2, lr_flag="--blr-grid", lr_grid_flag="--blr-grid",
    paper=lambda args: {f"{name.replace(' (paper)', '')}, ViT-B/16 IN-21k": groups
                        for name, groups in PAPER_GROUPS.items()},
))
