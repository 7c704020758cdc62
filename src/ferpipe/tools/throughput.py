"""Inference throughput of classify's two backends on this machine, in faces per second:

    python -m ferpipe.tools.throughput                      # models/cnn.pt and models/export/fer_cnn.onnx
    python -m ferpipe.tools.throughput --threads 1 4 --tta none tencrop

48x48 faces (validation faces from data/splits.npz, else synthetic ones) go through
infer.predict_proba, views and averaging included, in batches of --batch: the model's share
of a classify run, without reading files or detecting faces. torch runs in fp32, and in bf16
where the CPU runs it natively; onnxruntime in fp32.
"""
import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch

from ferpipe import paths, runtime
from ferpipe.model import infer, networks
from ferpipe.tools import synthetic
from ferpipe.use import release


def faces_per_second(model, faces, crop, tta, rt, seconds=5.0, passes=3):
    """Faces/s of the fastest of at least `passes` passes over `faces` (after a warm-up
    batch), passes going on for `seconds`: on a shared machine the fastest pass is the one
    least slowed by other work."""
    infer.predict_proba(model, faces[:rt.batch_size], crop, tta, rt)
    best, start, done = 0.0, time.perf_counter(), 0
    while done < passes or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        infer.predict_proba(model, faces, crop, tta, rt)
        best, done = max(best, len(faces) / (time.perf_counter() - t)), done + 1
    return best


@dataclasses.dataclass(frozen=True)
class Sweep:
    """What measure times: each thread count in `threads` with each tta mode in `ttas`, in
    batches of `batch`, each measurement going on for `seconds`."""
    threads: list
    ttas: list
    batch: int
    seconds: float = 5.0


def measure(model_path, graph_path, faces, sweep):
    """Rows of backend, precision, threads, tta and faces/s over the `sweep`."""
    net, ckpt = networks.load(model_path)
    rows = []
    for n in sweep.threads:
        fp32 = runtime.make("cpu", n, "fp32", sweep.batch)
        auto = fp32.with_precision("auto")  # bf16 only where this CPU runs it natively
        graph = release.load_onnx(graph_path, n)[0] if graph_path else None
        for tta in sweep.ttas:
            for rt in [fp32] + ([auto] if auto.precision == "bf16" else []):
                rows.append(("torch", rt.precision, n, tta, faces_per_second(
                    net, faces, ckpt["input_size"], tta, rt, sweep.seconds)))
            if graph:
                rows.append(("onnxruntime", "fp32", n, tta, faces_per_second(
                    graph, faces, ckpt["input_size"], tta, fp32, sweep.seconds)))
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=paths.MODEL["cnn"])
    ap.add_argument("--onnx", default=paths.EXPORT_ONNX)
    ap.add_argument("--splits", default=paths.SPLITS)
    ap.add_argument("--faces", type=int, default=512)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, torch.get_num_threads()])
    ap.add_argument("--tta", nargs="+", default=["none"], choices=infer.TTA_MODES)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    a = ap.parse_args(argv)
    if Path(a.splits).exists():
        with np.load(a.splits) as z:
            faces = z["val_x"][:a.faces]
    else:
        faces = synthetic.make_faces(-(-a.faces // 7), seed=0)[0][:a.faces]
    graph = a.onnx if Path(a.onnx).exists() else None
    print(f"cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"native bf16 {runtime.native_bf16(torch.device('cpu'))}; {len(faces)} faces, batch {a.batch}")
    print("| backend | precision | threads | tta | faces/s |\n|---|---|---|---|---|")
    sweep = Sweep(a.threads, a.tta, a.batch, a.seconds)
    for backend, precision, n, tta, rate in measure(a.model, graph, faces, sweep):
        print(f"| {backend} | {precision} | {n} | {tta} | {rate:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
