"""The training loop shared by the CNN and the DNN stages.

Read top to bottom: set up the optimiser and schedule, then for each epoch shuffle,
augment a batch, step, evaluate on validation, keep the best weights, checkpoint.
A checkpoint holding everything needed to continue (model, optimiser, schedule, random
states, history) is written atomically after every epoch, so a killed run resumes where
it stopped and ends exactly as an uninterrupted one would.
"""
import copy
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import NUM_CLASSES, augment, runtime
from .errors import FerPipeError
from .infer import autocast, channels_last, predict_proba
from .files import load_torch, save_torch
from .params import boolean, choice, integer, number, section

SCHEMA = {
    "epochs": integer(lo=1),
    "batch_size": integer(lo=1),
    "optimizer": choice("sgd", "adam", "adamw", "adadelta"),
    "lr": number(lo=0.0, lo_open=True),
    "momentum": number(lo=0.0, hi=1.0, hi_open=True),
    "nesterov": boolean(),
    "weight_decay": number(lo=0.0),
    "schedule": choice("onecycle", "cosine", "step", "constant"),
    "warmup_epochs": number(lo=0.0),
    "step_epochs": integer(lo=1),
    "step_gamma": number(lo=0.0, hi=1.0, lo_open=True),
    "label_smoothing": number(lo=0.0, hi=1.0, hi_open=True),
    "class_weights": choice("none", "balanced", "sqrt"),
    "mixup_alpha": number(lo=0.0),
    "cutmix_alpha": number(lo=0.0),
    "ema_decay": number(lo=0.0, hi=1.0, hi_open=True),
    "early_stopping": integer(lo=0),
    "seed": integer(lo=0),
    "crop": augment.CROP,
    "augment": section(augment.SCHEMA),
}


def class_weights(labels, mode):
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    w = len(labels) / (NUM_CLASSES * np.maximum(counts, 1))
    if mode == "sqrt":
        w = np.sqrt(w)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def make_optimizer(model, cfg):
    # Weight decay on weights only: decaying biases and norm scales just hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": cfg["weight_decay"]},
              {"params": rest, "weight_decay": 0.0}]
    name, lr = cfg["optimizer"], cfg["lr"]
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg["momentum"],
                               nesterov=cfg["nesterov"] and cfg["momentum"] > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.Adadelta(groups, lr=lr)


def make_schedule(opt, cfg, steps_per_epoch):
    total = cfg["epochs"] * steps_per_epoch
    warm = min(int(cfg["warmup_epochs"] * steps_per_epoch), total - 1)
    if cfg["schedule"] == "onecycle" and total >= 3:
        # OneCycleLR divides by the length of each phase: both need at least one step.
        warm = min(max(warm, 2), total - 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=cfg["lr"], total_steps=total, pct_start=warm / total,
            cycle_momentum=cfg["optimizer"] == "sgd" and cfg["momentum"] > 0)
    if cfg["schedule"] == "cosine":
        def factor(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    elif cfg["schedule"] == "step":
        def factor(step):
            return cfg["step_gamma"] ** (step // (cfg["step_epochs"] * steps_per_epoch))
    else:
        def factor(step):
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def mix_batch(x, y, cfg, gen):
    """Mixup or CutMix (chosen at random when both are on); returns x, y_a, y_b, lam."""
    modes = [m for m in ("mixup", "cutmix") if cfg[f"{m}_alpha"] > 0]
    if not modes:
        return x, y, y, 1.0
    mode = modes[int(torch.randint(len(modes), (1,), generator=gen))]
    alpha = cfg[f"{mode}_alpha"]
    # torch's Beta sampler ignores generators; seed numpy's from ours to stay resumable.
    lam = float(np.random.default_rng(int(torch.randint(2**31, (1,), generator=gen))).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=gen).to(x.device)
    if mode == "mixup":
        return lam * x + (1 - lam) * x[perm], y, y[perm], lam
    h, w = x.shape[-2:]
    ch, cw = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
    cy, cx = (int(torch.randint(h, (1,), generator=gen)), int(torch.randint(w, (1,), generator=gen)))
    y0, y1, x0, x1 = max(cy - ch // 2, 0), min(cy + ch // 2, h), max(cx - cw // 2, 0), min(cx + cw // 2, w)
    x = x.clone()
    x[..., y0:y1, x0:x1] = x[perm][..., y0:y1, x0:x1]
    lam = 1 - (y1 - y0) * (x1 - x0) / (h * w)
    return x, y, y[perm], lam


def ema_pairs(ema, model):
    """(averaged, live) tensor pairs; state_dict tensors share storage with the modules, so
    updating them in place updates the averaged network."""
    return list(zip(ema.state_dict().values(), model.state_dict().values()))


@torch.no_grad()
def ema_update(pairs, decay):
    for avg, live in pairs:
        if avg.dtype.is_floating_point:
            avg.lerp_(live, 1.0 - decay)
        else:
            avg.copy_(live)  # BN's batch counter


def fingerprint(*parts):
    """Identifies a run's inputs, so a checkpoint from other params or data is never resumed."""
    h = hashlib.sha256()
    for p in parts:
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()


def fit(model, train_x, train_y, val_x, val_y, cfg, rt, name, resume_path=None, run_id=""):
    """Train `model` in place; return the best-on-validation state dict and a record.
    `cfg` is the `train:` section, `rt` the resolved run-time settings (runtime.setup)."""
    device = rt["device"]
    model.norm.mean.fill_(float(train_x.mean()) / 255.0)
    model.norm.std.fill_(float(train_x.std()) / 255.0)
    model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    x_all = torch.as_tensor(train_x).to(device)  # uint8 in memory: 4x smaller than floats
    y_all = torch.as_tensor(train_y.astype(np.int64)).to(device)
    n, bs = len(train_y), cfg["batch_size"]
    steps_per_epoch = max(1, n // bs)  # drop the ragged last batch: BN dislikes tiny batches
    opt = make_optimizer(model, cfg)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    weight = class_weights(train_y, cfg["class_weights"])
    weight = weight.to(device) if weight is not None else None
    gen = torch.Generator().manual_seed(cfg["seed"])
    # An exponential moving average of the weights and BN statistics, scored on validation
    # beside the live weights every epoch: validation decides which of the two is kept.
    ema = copy.deepcopy(model) if cfg["ema_decay"] > 0 else None

    state = {"epoch": 0, "history": [], "best_acc": -1.0, "best_epoch": 0, "best_state": None,
             "bad_epochs": 0, "train_seconds": 0.0, "compute_seconds": 0.0}
    if resume_path and Path(resume_path).exists():
        ckpt = load_torch(resume_path, device)
        if not isinstance(ckpt, dict):
            raise FerPipeError(f"{resume_path}: not a checkpoint of this pipeline; delete it "
                               "to train from the start")
        if ckpt.get("run_id") == run_id:
            model.load_state_dict(ckpt["model"])
            if ema is not None:
                ema.load_state_dict(ckpt["ema"])
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            gen.set_state(ckpt["gen"])
            torch.set_rng_state(ckpt["torch_rng"])
            state = ckpt["state"]
            print(f"[{name}] resuming from the checkpoint after epoch {state['epoch']} "
                  f"({resume_path})", flush=True)
        else:
            print(f"[{name}] ignoring {resume_path}: it belongs to other params or data", flush=True)

    pairs = ema_pairs(ema, model) if ema is not None else []
    for epoch in range(state["epoch"] + 1, cfg["epochs"] + 1):
        model.train()
        t0 = time.perf_counter()
        compute = 0.0
        loss_sum = correct = seen = 0
        last_log = t0
        perm = torch.randperm(n, generator=gen).to(device)
        for step in range(steps_per_epoch):
            idx = perm[step * bs:(step + 1) * bs]
            x = augment.random_views(x_all[idx].unsqueeze(1).float().div_(255.0),
                                     cfg["augment"], cfg["crop"], gen)
            y = y_all[idx]
            x, y_a, y_b, lam = mix_batch(x, y, cfg, gen)
            x = channels_last(x)
            if device.type == "cuda":
                torch.cuda.synchronize()
            tc = time.perf_counter()
            with autocast(device, rt["precision"]):
                logits = model(x)
            logits = logits.float()
            loss = lam * F.cross_entropy(logits, y_a, weight=weight,
                                         label_smoothing=cfg["label_smoothing"])
            if lam < 1.0:
                loss = loss + (1 - lam) * F.cross_entropy(logits, y_b, weight=weight,
                                                          label_smoothing=cfg["label_smoothing"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if ema is not None:
                # A shorter memory over the first steps, so the average forgets the random
                # initial weights quickly (the num_updates form of TF's moving average).
                t = (epoch - 1) * steps_per_epoch + step
                ema_update(pairs, min(cfg["ema_decay"], (1 + t) / (10 + t)))
            if device.type == "cuda":
                torch.cuda.synchronize()
            compute += time.perf_counter() - tc
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y_a).sum())
            seen += len(y)
            now = time.perf_counter()
            if now - last_log >= rt["log_seconds"]:
                left = (now - t0) / (step + 1) * (steps_per_epoch - step - 1)
                print(f"[{name}] epoch {epoch}/{cfg['epochs']} batch {step + 1}/{steps_per_epoch} "
                      f"loss {loss_sum / seen:.4f} acc {correct / seen:.4f} "
                      f"epoch left {left:.0f}s", flush=True)
                last_log = now
        train_time = time.perf_counter() - t0

        val_loss, val_acc = score(model, val_x, val_y, cfg, rt)
        row = {"val_loss": val_loss, "val_accuracy": val_acc}
        best_net, best_acc = model, val_acc
        if ema is not None:
            row["val_loss_ema"], row["val_accuracy_ema"] = score(ema, val_x, val_y, cfg, rt)
            if row["val_accuracy_ema"] > val_acc:
                best_net, best_acc = ema, row["val_accuracy_ema"]
        epoch_time = time.perf_counter() - t0

        state["epoch"] = epoch
        state["train_seconds"] += train_time
        state["compute_seconds"] += compute
        state["history"].append({
            "epoch": epoch, "train_loss": loss_sum / seen, "train_accuracy": correct / seen,
            **row, "lr": opt.param_groups[0]["lr"],
            "seconds": epoch_time, "images_per_second": seen / train_time})
        if best_acc > state["best_acc"]:
            state.update(best_acc=best_acc, best_epoch=epoch, bad_epochs=0,
                         best_weights="ema" if best_net is ema else "live",
                         best_state={k: v.detach().clone().cpu() for k, v in best_net.state_dict().items()})
        else:
            state["bad_epochs"] += 1
        done_epochs = len(state["history"])
        eta = sum(h["seconds"] for h in state["history"]) / done_epochs * (cfg["epochs"] - epoch)
        print(f"[{name}] epoch {epoch}/{cfg['epochs']} train loss {loss_sum / seen:.4f} "
              f"acc {correct / seen:.4f} | val loss {val_loss:.4f} acc {val_acc:.4f} "
              + (f"(ema {row['val_accuracy_ema']:.4f}) " if ema is not None else "") +
              f"(best {state['best_acc']:.4f} @ {state['best_epoch']}) | "
              f"lr {opt.param_groups[0]['lr']:.2e} | {epoch_time:.0f}s, {seen / train_time:.0f} img/s, "
              f"left ~{eta / 60:.1f} min", flush=True)
        stop = cfg["early_stopping"] and state["bad_epochs"] >= cfg["early_stopping"]
        if resume_path:
            save_torch(resume_path, {
                "run_id": run_id, "model": model.state_dict(),
                "ema": ema.state_dict() if ema is not None else None, "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "gen": gen.get_state(),
                "torch_rng": torch.get_rng_state(), "state": state})
        if stop:
            print(f"[{name}] early stop: no better validation accuracy for "
                  f"{cfg['early_stopping']} epochs", flush=True)
            break

    if state["best_state"] is None:
        raise FerPipeError(f"[{name}] training produced no epoch; check train.epochs")
    hist = state["history"]
    record = {
        "best_val_accuracy": state["best_acc"],
        "best_epoch": state["best_epoch"],
        "epochs": len(hist),
        "stopped_early": len(hist) < cfg["epochs"],
        "seconds_per_epoch": sum(h["seconds"] for h in hist) / len(hist),
        "images_per_second": steps_per_epoch * bs * len(hist) / state["train_seconds"],
        "train_minutes": sum(h["seconds"] for h in hist) / 60,
        "data_time_share": 1 - state["compute_seconds"] / state["train_seconds"],
        "device": device.type,
    }
    if ema is not None:
        record.update(best_weights=state["best_weights"],
                      best_val_accuracy_live=max(h["val_accuracy"] for h in hist),
                      best_val_accuracy_ema=max(h["val_accuracy_ema"] for h in hist))
    return state["best_state"], hist, record


def score(model, val_x, val_y, cfg, rt):
    """Single-crop validation loss and accuracy."""
    probs = predict_proba(model, val_x, cfg["crop"], "none", rt["batch_size"], rt["precision"],
                          rt["device"])
    val_y_t = torch.as_tensor(val_y.astype(np.int64))
    loss = float(F.nll_loss(torch.log(torch.as_tensor(probs).clamp_min(1e-12)), val_y_t))
    return loss, float((probs.argmax(1) == val_y).mean())


def run(kind, make_model, config, splits, cfg, rt, out_model, out_metrics, out_history,
        out_summary, resume_path, members=1):
    """Everything a training stage does: build, summarise, fit, save. With members > 1 it
    trains that many networks, seeded train.seed, train.seed + 1, ..., and saves them as one
    ensemble whose prediction averages their probabilities."""
    import pandas as pd

    from .models import Ensemble, checkpoint, count_params, format_summary, summary
    from .files import write_csv, write_json, write_text

    nets, hists, records, resumes = [], [], [], []
    for i in range(members):
        member_cfg = {**cfg, "seed": cfg["seed"] + i}
        torch.manual_seed(member_cfg["seed"])  # before building: it fixes the initial weights
        model = make_model()
        if i == 0:
            n_params = count_params(model)
            table = format_summary(summary(model, cfg["crop"]),
                                   f"{kind.upper()} ({n_params:,} parameters, "
                                   f"input 1x{cfg['crop']}x{cfg['crop']})")
            if members > 1:
                table += f"ensemble of {members} such networks, seeds {cfg['seed']}..{cfg['seed'] + members - 1}\n"
            print(table, flush=True)
        # Every member keeps its own checkpoint until all are done, so a killed ensemble
        # resumes inside the member it was training and never retrains a finished one.
        resume = resume_path and (resume_path if i == 0 else
                                  str(Path(resume_path).with_suffix(f".{i + 1}.pt")))
        run_id = fingerprint(kind, config, member_cfg, splits["train_y"], splits["val_y"],
                             splits["train_x"][:, ::7, ::7])
        name = kind if members == 1 else f"{kind} {i + 1}/{members}"
        best, hist, record = fit(model, splits["train_x"], splits["train_y"], splits["val_x"],
                                 splits["val_y"], member_cfg, rt, name, resume, run_id)
        model.load_state_dict(best)
        nets.append(model.eval())
        hists.append(hist)
        records.append(record)
        resumes.append(resume)

    if members == 1:
        model, record = nets[0], records[0]
        meta = {"best_epoch": record["best_epoch"], "best_val_accuracy": record["best_val_accuracy"],
                "crop": cfg["crop"], "precision": rt["precision"]}
        extra = {}
    else:
        model = Ensemble(nets)
        probs = predict_proba(model, splits["val_x"], cfg["crop"], "none", rt["batch_size"],
                              rt["precision"], rt["device"])
        record = ensemble_record(records, float((probs.argmax(1) == splits["val_y"]).mean()))
        meta = {"members": [{"best_epoch": r["best_epoch"], "best_val_accuracy": r["best_val_accuracy"]}
                            for r in records],
                "best_val_accuracy": record["best_val_accuracy"],
                "crop": cfg["crop"], "precision": rt["precision"]}
        extra = {"members": members, "params_total": count_params(model)}
    save_torch(out_model, checkpoint(model, kind, config, cfg["crop"], meta))
    write_json(out_metrics, {"params": n_params, **extra, **record, **runtime.record(rt),
                             "batch_size": cfg["batch_size"]})
    write_csv(out_history, pd.DataFrame(hists[0]))  # an ensemble plots its first member
    write_text(out_summary, table)
    for resume in resumes:
        if resume:
            Path(resume).unlink(missing_ok=True)  # finished: a later run must start afresh
    print(f"[{kind}] best validation accuracy {record['best_val_accuracy']:.4f}"
          + (f" at epoch {record['best_epoch']}" if members == 1 else f" ({members} networks)")
          + f"; saved {out_model}", flush=True)


def ensemble_record(records, val_accuracy):
    """One record for several fitted networks: times add up; rates and shares are averaged
    with each network's minutes as weights."""
    minutes = [r["train_minutes"] for r in records]
    total = sum(minutes)
    return {
        "best_val_accuracy": val_accuracy,
        "member_val_accuracy": [r["best_val_accuracy"] for r in records],
        "member_best_epoch": [r["best_epoch"] for r in records],
        "epochs": sum(r["epochs"] for r in records),
        "stopped_early": any(r["stopped_early"] for r in records),
        "seconds_per_epoch": sum(r["seconds_per_epoch"] * r["epochs"] for r in records)
        / sum(r["epochs"] for r in records),
        "images_per_second": sum(r["images_per_second"] * m for r, m in zip(records, minutes)) / total,
        "train_minutes": total,
        "data_time_share": sum(r["data_time_share"] * m for r, m in zip(records, minutes)) / total,
        "device": records[0]["device"],
    }
