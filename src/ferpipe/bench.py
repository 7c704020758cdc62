"""Training throughput of CNN presets on this machine, without a full run:

    python -m ferpipe.bench custom vgg --steps 60
    python -m ferpipe.bench custom --precision fp32 bf16   # compare precisions
    python -m ferpipe.bench custom --compile    # the same with torch.compile, to see if it pays

Each preset takes `--steps` optimiser steps (after 10 warm-up steps) on random batches of
the prepared training faces, with the augmentation, batch size and optimiser of params.yaml's
`train:` section, and the device, threads and precision of its `runtime:` section (or
`--precision`). Prints the CPU capability (or GPU), the precision and threads, and images/s.
To see what an AVX2-only CPU does on an AVX-512 machine, limit the kernels:
`ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 python -m ferpipe.bench custom`.
"""
import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from . import augment, files, infer, models, params, runtime, train
from .infer import autocast, channels_last

WARMUP = 10


def images_per_second(model, x_all, y_all, cfg, device, precision, steps):
    model.to(device).to(memory_format=torch.channels_last).train()
    opt = train.make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg["seed"])
    bs = cfg["batch_size"]
    for step in range(WARMUP + steps):
        if step == WARMUP:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
        idx = torch.randint(len(y_all), (bs,), generator=gen).to(device)
        x = augment.random_views(x_all[idx].unsqueeze(1).float().div_(255.0), cfg["augment"],
                                 cfg["crop"], gen)
        with autocast(device, precision):
            logits = model(channels_last(x))
        loss = F.cross_entropy(logits.float(), y_all[idx], label_smoothing=cfg["label_smoothing"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * bs / (time.perf_counter() - t0)


def describe(hw):
    if "gpu" in hw:
        return f"GPU {hw['gpu']}"
    return (f"CPU {hw['cpu_capability']}, "
            f"{'native' if hw['native_bf16'] else 'no native'} bf16")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("presets", nargs="+", choices=["custom", *models.PRESETS])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--splits", default="data/splits.npz")
    ap.add_argument("--precision", nargs="+", choices=["auto", "bf16", "fp32"],
                    help="precisions to time (default: runtime.precision)")
    ap.add_argument("--compile", action="store_true",
                    help="wrap each model in torch.compile (compilation happens in the warm-up steps)")
    args = ap.parse_args(argv)
    p = params.load({"cnn": models.CNN_SCHEMA, "train": train.SCHEMA, "runtime": runtime.SCHEMA})
    cfg = p["train"]
    rt = runtime.setup(p["runtime"])
    device = rt["device"]
    splits = files.load_npz(args.splits, "data splits", ("train_x", "train_y"))
    x_all = torch.as_tensor(splits["train_x"]).to(device)
    y_all = torch.as_tensor(splits["train_y"].astype(np.int64)).to(device)
    print(f"bench: {describe(rt['hardware'])}; {rt['threads']} threads; torch {torch.__version__}",
          flush=True)
    for preset in args.presets:
        for asked in args.precision or [p["runtime"]["precision"]]:
            precision = infer.resolve_precision(asked, device)
            torch.manual_seed(cfg["seed"])
            model = models.FerCNN({**p["cnn"], "preset": preset}, cfg["crop"])
            n_params = models.count_params(model)
            if args.compile:
                model = torch.compile(model)
            rate = images_per_second(model, x_all, y_all, cfg, device, precision, args.steps)
            print(f"{preset}{' (compiled)' if args.compile else ''}: {n_params:,} parameters, "
                  f"{rate:.0f} training images/s "
                  f"({device.type}, {rt['threads']} threads, {precision}"
                  f"{' from auto' if asked == 'auto' else ''}, batch {cfg['batch_size']}); "
                  f"an epoch of {len(y_all):,} faces ≈ {len(y_all) / rate:.0f} s", flush=True)


if __name__ == "__main__":
    main()
