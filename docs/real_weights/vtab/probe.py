"""Why does the ordering hold or not: one method at one setting, trained on train800 and scored on val200 only (the
recipe's own grid step, `zinit.recipes.vtab._run_one` + `top1`; test is never read), with the gates at the end.

    OMP_NUM_THREADS=1 python docs/real_weights/vtab/probe.py OUT.jsonl --task digits --classes 10 --method zinit \
        --blr 0.05 --epochs 10 --layers 12 --K 10 --img-size 56

Appends one JSON line per run to OUT.jsonl: the settings, val200 top-1, train wall, final training loss and the mean
|tanh(gate)| per adapted layer (zinit variants).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--data", default="/tmp/vtab-real")
    p.add_argument("--task", default="digits")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--method", default="zinit")
    p.add_argument("--blr", type=float, nargs="+", default=[0.05])
    p.add_argument("--epochs", type=float, default=10)
    p.add_argument("--warmup-epochs", type=float, default=1)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--K", type=int, default=10)
    p.add_argument("--img-size", type=int, default=56)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--wd", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pretrained-file", default=str(Path.home() / ".cache/zinit/weights/dinov2-small.safetensors"))
    a = p.parse_args()

    from timm.data import resolve_model_data_config

    from zinit.recipes import vtab
    from zinit.train import dist as D

    env = D.setup("cpu")
    data = vtab.VtabData(a.data, a.task, a.classes)
    base = vtab.build_vit("vit_small_patch14_dinov2", a.pretrained_file, a.img_size)
    cfg = resolve_model_data_config(base)
    pre = vtab.Preprocess(cfg["mean"], cfg["std"])
    train800 = vtab.load_images(data.split("train800"), a.img_size, "train800", False)
    val200 = vtab.load_images(data.split("val200"), a.img_size, "val200", False)
    settings = vtab.VtabSettings(model="vit_small_patch14_dinov2", pretrained_file=a.pretrained_file,
                                 img_size=a.img_size, layers=a.layers, K=a.K, epochs=a.epochs,
                                 warmup_epochs=a.warmup_epochs, batch_size=a.batch_size, num_classes=a.classes,
                                 device="cpu", progress=False, method=a.method)
    tag = f"{a.task}_{a.method}_L{a.layers}_K{a.K}_s{a.img_size}_e{a.epochs:g}_seed{a.seed}"
    for blr in a.blr:
        folder = Path(a.out).parent / "runs" / f"{tag}_blr{blr:g}"
        start = time.perf_counter()
        model = vtab._run_one(base, data.spec, settings, train800, pre, blr, a.wd, a.seed, folder, env)
        wall = time.perf_counter() - start
        acc = vtab.top1(model, *val200, pre, a.img_size)
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        gates = rows[-1].get("gates") or {}
        record = {"task": a.task, "method": a.method, "blr": blr, "epochs": a.epochs, "layers": a.layers, "K": a.K,
                  "img_size": a.img_size, "seed": a.seed, "val_top1": acc, "train_wall_s": round(wall, 1),
                  "final_loss": rows[-1]["loss"],
                  "mean_abs_tanh_gate": (sum(abs(v) for v in gates.values()) / len(gates)) if gates else None,
                  "gates": gates}
        with open(a.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if k != "gates"}), flush=True)
        del model
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
