"""Training throughput of CNN presets on this machine, without a full run:

    python -m ferpipe.tools.bench custom vgg --steps 60
    python -m ferpipe.tools.bench custom --precision fp32 bf16   # compare precisions
    python -m ferpipe.tools.bench custom --compile    # the same with torch.compile, to see if it pays
    python -m ferpipe.tools.bench custom --batch-size 64 128 256 512   # larger batches
    python -m ferpipe.tools.bench custom --cnn residual=true --cnn 'convs=[1,2,2,2]'  # a variant

Each preset takes `--steps` optimiser steps (after 10 warm-up steps) of the training loop's
own `train.train_step` on shuffled batches of the prepared training faces, with the
augmentation, mixing, class weights, optimiser, schedule and weight average of params.yaml's
`train:` section, and the device, threads and precision of its `runtime:` section (or
`--precision`). Prints the CPU capability (or GPU), the precision and threads, and images/s.
To see what an AVX2-only CPU does on an AVX-512 machine, limit the kernels:
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m ferpipe.tools.bench custom`.
"""
import argparse
import dataclasses
import math
import time

import numpy as np
import torch

from ferpipe import files, params, paths, runtime
from ferpipe.model import networks
from ferpipe.training import train

WARMUP = 10


def images_per_second(model, faces, labels, training, rt, steps):
    """Training images/s over `steps` steps of the loop's own train_step: the same batches
    (augmentation, mixing), loss, optimiser, schedule and weight average as train.fit, in
    the precision of `rt`."""
    device = rt.device
    model.to(device).to(memory_format=torch.channels_last).train()
    gen = torch.Generator().manual_seed(training.seed)
    batches = train.Batches(faces, labels, training, gen, device)
    # Long enough a schedule for the timed steps: OneCycleLR refuses to step past its end.
    epochs = max(training.epochs, math.ceil((WARMUP + steps) / len(batches)))
    opt = train.make_optimizer(model, training)
    sched = train.make_schedule(opt, dataclasses.replace(training, epochs=epochs), len(batches))
    ema = train.EMA(model, training.ema_decay) if training.ema_decay > 0 else None
    learner = train.Learner(opt, sched, train.make_loss(labels, training, device), ema)
    stream = (batch for _ in range(epochs) for batch in batches)
    for step, batch in zip(range(WARMUP + steps), stream):
        if step == WARMUP:
            train.sync(device)
            t0 = time.perf_counter()
        train.train_step(model, batch, learner, rt)
        if ema is not None:
            ema.update(step)
    train.sync(device)
    return steps * training.batch_size / (time.perf_counter() - t0)


def overrides(pairs):
    """`KEY=VALUE` strings as a dict, each value read as YAML (true, 0.1, [1, 2, 2, 2])."""
    import yaml

    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"bench: --cnn {pair!r}: expected KEY=VALUE, e.g. residual=true")
        out[key.strip()] = yaml.safe_load(value)
    return out


def describe(hw):
    if "gpu" in hw:
        return f"GPU {hw['gpu']}"
    return (f"CPU {hw['cpu_capability']}, "
            f"{'native' if hw['native_bf16'] else 'no native'} bf16")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+", choices=["custom", *networks.PRESETS])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--splits", default=paths.SPLITS)
    ap.add_argument("--precision", nargs="+", choices=["auto", "bf16", "fp32"],
                    help="precisions to time (default: runtime.precision)")
    ap.add_argument("--compile", action="store_true",
                    help="wrap each model in torch.compile (compilation happens in the warm-up steps)")
    ap.add_argument("--batch-size", type=int, nargs="+",
                    help="training batch sizes to time (default: train.batch_size)")
    ap.add_argument("--cnn", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the cnn: section (a YAML value), as "
                         "`dvc exp run -S cnn.KEY=VALUE` would; repeat for several")
    args = ap.parse_args(argv)
    p = params.load({"cnn": networks.CNN_SCHEMA, "train": train.SCHEMA, "runtime": runtime.SCHEMA})
    training = train.TrainConfig.from_params(p["train"])
    arch = params.section(networks.CNN_SCHEMA)({**p["cnn"], **overrides(args.cnn)}, "cnn")
    rt = runtime.setup(p["runtime"])
    device = rt.device
    splits = files.load_npz(args.splits, "data splits", ("train_x", "train_y"))
    faces, labels = splits["train_x"], splits["train_y"].astype(np.int64)
    print(f"bench: {describe(rt.hardware)}; {rt.threads} threads; torch {torch.__version__}",
          flush=True)
    changed = "".join(f", {o}" for o in args.cnn)
    for preset in args.presets:
        for asked in args.precision or [rt.precision_requested]:
            for batch_size in args.batch_size or [training.batch_size]:
                timed = rt.with_precision(asked)
                sized = dataclasses.replace(training, batch_size=batch_size)
                torch.manual_seed(training.seed)
                model = networks.FerCNN({**arch, "preset": preset}, training.crop)
                n_params = networks.count_params(model)
                if args.compile:
                    model = torch.compile(model)
                rate = images_per_second(model, faces, labels, sized, timed, args.steps)
                print(f"{preset}{changed}{' (compiled)' if args.compile else ''}: "
                      f"{n_params:,} parameters, {rate:.0f} training images/s "
                      f"({device.type}, {rt.threads} threads, {timed.precision}"
                      f"{' from auto' if asked == 'auto' else ''}, batch {batch_size}); "
                      f"an epoch of {len(labels):,} faces ≈ {len(labels) / rate:.0f} s", flush=True)


if __name__ == "__main__":
    main()
