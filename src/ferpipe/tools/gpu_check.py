"""`make gpu-check`: the pipeline's GPU path in one command, on a small synthetic set.

Makes a demo repository (demo.create) with runtime device auto and precision auto (bf16 where
the GPU has it, else fp32) and, with 2 or more GPUs, runtime.processes = the number of GPUs
(DDP over NCCL, one GPU a process); runs `dvc repro` there (every stage: training, evaluate,
predict, saliency, filters, self-training); then prints per network the device, precision,
processes and training images/s, and checks that the GPU was used as asked. Exit status 1
when a check fails or there is no CUDA GPU (`--cpu` runs the same on the CPU, to try the
command itself).

    python -m ferpipe.tools.gpu_check [--dest DIR] [--per-class 400] [--epochs 3] [--cpu]
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ferpipe.tools import demo

SMALL = {  # the explanation stages on a few faces: the check is about the GPU path
    "infer": {"tta": "flip"},
    "evaluate": {"misclassified": 8},
    "saliency": {"per_class": 1, "smoothgrad_samples": 3},
    "filters": {"filters": 4, "steps": 5, "feature_maps": 7, "dnn_units": 4},
    "self_train": {"unlabeled_fraction": 0.5, "rounds": 1, "epochs": 0, "tta": "none"},
}


def expected(cpu):
    """What runtime auto should choose here: device, precision, processes."""
    if cpu:
        return {"device": "cpu", "processes": 1}
    gpus = torch.cuda.device_count()
    return {"device": "cuda", "precision": "bf16" if torch.cuda.is_bf16_supported() else "fp32",
            "processes": gpus if gpus >= 2 else 1}


def check(metrics, want):
    """The problems with one training's metrics against `want` (an empty list: none)."""
    got = {"device": metrics["device"], "processes": metrics.get("processes", 1),
           "precision": metrics["precision"]}
    return [f"{key}: {got[key]}, expected {value}" for key, value in want.items()
            if got[key] != value]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dest", help="where to make the repository (default: a temporary folder)")
    ap.add_argument("--per-class", type=int, default=400, help="synthetic training faces per class")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (to try this command)")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU here (torch.cuda.is_available() is False); "
              "--cpu runs the same check on the CPU", file=sys.stderr)
        return 1
    want = expected(a.cpu)
    dest = Path(a.dest or tempfile.mkdtemp(prefix="ferpipe-gpu-check-")) / "repo"
    runtime = {"device": "cpu" if a.cpu else "auto", "precision": "auto", "log_seconds": 30,
               "processes": want["processes"]}
    demo.create(dest, {**SMALL, "train": {"epochs": a.epochs}, "runtime": runtime},
                train_per_class=a.per_class, test_per_class=max(1, a.per_class // 5))
    print(f"gpu-check: {want}; dvc repro in {dest}", flush=True)
    t0 = time.time()
    if demo.dvc(dest, "repro", check=False).returncode != 0:
        print("gpu-check: FAILED: dvc repro did not finish", file=sys.stderr)
        return 1
    problems = []
    for kind in ("cnn", "dnn"):
        m = json.loads((dest / f"metrics/train_{kind}.json").read_text())
        print(f"gpu-check: {kind}: {m['device']} {m.get('gpu', m.get('cpu_capability', ''))}, "
              f"{m['precision']}, {m.get('processes', 1)} process(es): "
              f"{m['images_per_second']:.0f} training images/s, "
              f"best validation accuracy {m['best_val_accuracy']:.3f}", flush=True)
        problems += [f"{kind}: {p}" for p in check(m, want)]
    print(f"gpu-check: the whole pipeline in {(time.time() - t0) / 60:.1f} min", flush=True)
    for p in problems:
        print(f"gpu-check: FAILED: {p}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
