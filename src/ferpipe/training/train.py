"""The training loop shared by the CNN, the DNN and self-training.

`fit` reads top to bottom: build the batches, optimiser, schedule and loss; resume if a
checkpoint of the same run exists; then per epoch `train_one_epoch`, `validate`, keep the
best weights, save a checkpoint. The checkpoint holds everything needed to continue (model,
weight average, optimiser, schedule, random states, history) and is written atomically after
every epoch, so a killed run resumes where it stopped and ends exactly as an uninterrupted
one would. Under torchrun the same loop trains data-parallel: distributed.py says how the
batches, batch norm, validation and writing are shared between the processes.
"""
import copy
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ferpipe.constants import NUM_CLASSES
from ferpipe.errors import FerPipeError
from ferpipe.files import load_torch, save_torch
from ferpipe.model.infer import autocast, channels_last, device_of, predict_proba
from ferpipe.params import boolean, choice, integer, number, section
from ferpipe.training import augment, distributed, live

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


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The `train:` section, as SCHEMA validated it. Same fields in the same order, so
    dataclasses.asdict gives back the section's dict (what a run's fingerprint hashes)."""
    epochs: int
    batch_size: int
    optimizer: str
    lr: float
    momentum: float
    nesterov: bool
    weight_decay: float
    schedule: str
    warmup_epochs: float
    step_epochs: int
    step_gamma: float
    label_smoothing: float
    class_weights: str
    mixup_alpha: float
    cutmix_alpha: float
    ema_decay: float
    early_stopping: int
    seed: int
    crop: int
    augment: augment.AugmentConfig

    @classmethod
    def from_params(cls, values, where="train"):
        """Validate a `train:` section (a dict, as in params.yaml) and build it."""
        values = section(SCHEMA)(values, where)
        return cls(**{**values, "augment": augment.AugmentConfig(**values["augment"])})


# ---------------------------------------------------------------- the pieces of one step

def class_weights(labels, mode):
    if mode == "none":
        return None
    counts = np.bincount(labels, minlength=NUM_CLASSES).astype(np.float64)
    w = len(labels) / (NUM_CLASSES * np.maximum(counts, 1))
    if mode == "sqrt":
        w = np.sqrt(w)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


def make_loss(labels, training, device):
    """Cross-entropy with the class weights and label smoothing of `training` (a
    TrainConfig), over the two label sets a mixed batch carries."""
    weight = class_weights(labels, training.class_weights)
    weight = weight.to(device) if weight is not None else None
    smoothing = training.label_smoothing

    def loss(logits, y_a, y_b, lam):
        out = lam * F.cross_entropy(logits, y_a, weight=weight, label_smoothing=smoothing)
        if lam < 1.0:
            out = out + (1 - lam) * F.cross_entropy(logits, y_b, weight=weight,
                                                    label_smoothing=smoothing)
        return out
    return loss


def make_optimizer(model, training):
    # Weight decay on weights only: decaying biases and norm scales just hurts.
    decay = [p for p in model.parameters() if p.ndim > 1]
    rest = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": training.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    name, lr = training.optimizer, training.lr
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=training.momentum,
                               nesterov=training.nesterov and training.momentum > 0)
    if name == "adam":
        return torch.optim.Adam(groups, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.Adadelta(groups, lr=lr)


def make_schedule(opt, training, steps_per_epoch):
    total = training.epochs * steps_per_epoch
    warm = min(int(training.warmup_epochs * steps_per_epoch), total - 1)
    if training.schedule == "onecycle" and total >= 3:
        # OneCycleLR divides by the length of each phase: both need at least one step.
        warm = min(max(warm, 2), total - 1)
        return torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=training.lr, total_steps=total, pct_start=warm / total,
            cycle_momentum=training.optimizer == "sgd" and training.momentum > 0)
    if training.schedule == "cosine":
        def factor(step):
            if step < warm:
                return (step + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))
    elif training.schedule == "step":
        def factor(step):
            return training.step_gamma ** (step // (training.step_epochs * steps_per_epoch))
    else:
        def factor(step):
            return 1.0
    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def mix_batch(x, y, training, gen):
    """Mixup or CutMix (chosen at random when both are on); returns x, y_a, y_b, lam."""
    alphas = {"mixup": training.mixup_alpha, "cutmix": training.cutmix_alpha}
    modes = [m for m, a in alphas.items() if a > 0]
    if not modes:
        return x, y, y, 1.0
    mode = modes[int(torch.randint(len(modes), (1,), generator=gen))]
    alpha = alphas[mode]
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


class Batches:
    """The training faces, kept on the device as uint8 (4x smaller than floats), served as
    shuffled, augmented and mixed batches. The ragged last batch is dropped: batch norm
    dislikes tiny batches. Under torchrun every rank draws the same global batches and
    trains on its own slice of each (`part`)."""

    def __init__(self, images, labels, training, gen, device):
        self.x = torch.as_tensor(images).to(device)
        self.y = torch.as_tensor(labels.astype(np.int64)).to(device)
        self.training, self.gen, self.size = training, gen, training.batch_size
        self.steps = max(1, len(labels) // self.size)
        self.part = distributed.batch_part(self.size)

    def __len__(self):
        return self.steps

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=self.gen).to(self.x.device)
        for step in range(self.steps):
            yield self.batch(perm[step * self.size:(step + 1) * self.size])

    def batch(self, idx):
        """(x, y_a, y_b, lam) for the faces at `idx`."""
        x = augment.random_views(self.x[idx].unsqueeze(1).float().div_(255.0),
                                 self.training.augment, self.training.crop, self.gen)
        x, y_a, y_b, lam = mix_batch(x, self.y[idx], self.training, self.gen)
        return x[self.part], y_a[self.part], y_b[self.part], lam


class EMA:
    """An exponential moving average of a model's weights and batch-norm statistics."""

    def __init__(self, model, decay):
        self.model, self.decay = copy.deepcopy(model), decay
        # state_dict tensors share storage with the modules, so updating them in place
        # updates the averaged network.
        self.pairs = list(zip(self.model.state_dict().values(), model.state_dict().values()))

    @torch.no_grad()
    def update(self, step):
        # A shorter memory over the first steps, so the average forgets the random initial
        # weights quickly (the num_updates form of TF's moving average).
        decay = min(self.decay, (1 + step) / (10 + step))
        for avg, current in self.pairs:
            if avg.dtype.is_floating_point:
                avg.lerp_(current, 1.0 - decay)
            else:
                avg.copy_(current)  # BN's batch counter


@dataclasses.dataclass
class Learner:
    """What a step changes besides the model: the optimiser, its schedule, the loss and the
    weight average (None when train.ema_decay is 0)."""
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    loss_fn: object
    ema: EMA | None


def train_step(model, batch, learner, rt):
    """One optimiser step on one batch; returns (loss, logits), both detached."""
    x, y_a, y_b, lam = batch
    with autocast(rt.device, rt.precision):
        logits = model(channels_last(x))
    logits = logits.float()
    loss = learner.loss_fn(logits, y_a, y_b, lam)
    learner.opt.zero_grad(set_to_none=True)
    loss.backward()
    learner.opt.step()
    learner.sched.step()
    return loss.detach(), logits.detach()


def sync(device):
    """Wait for the GPU, so a timer measures the work and not its queuing."""
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_one_epoch(model, batches, learner, rt, epoch, say):
    """One pass over the batches; returns the epoch's training loss, accuracy and timings."""
    model.train()
    device = rt.device
    t0 = last_log = time.perf_counter()
    compute = loss_sum = 0.0
    correct = seen = 0
    for step, batch in enumerate(batches):
        sync(device)
        tc = time.perf_counter()
        loss, logits = train_step(model, batch, learner, rt)
        if learner.ema is not None:
            learner.ema.update((epoch - 1) * len(batches) + step)
        sync(device)
        compute += time.perf_counter() - tc
        y = batch[1]
        loss_sum += float(loss) * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        now = time.perf_counter()
        if now - last_log >= rt.log_seconds:
            left = (now - t0) / (step + 1) * (len(batches) - step - 1)
            say(f"batch {step + 1}/{len(batches)} loss {loss_sum / seen:.4f} "
                f"acc {correct / seen:.4f} epoch left {left:.0f}s")
            last_log = now
    seconds = time.perf_counter() - t0
    loss_sum, correct, seen = distributed.all_sum(loss_sum, correct, seen)
    return {"train_loss": loss_sum / seen, "train_accuracy": correct / seen, "seen": seen,
            "train_seconds": seconds, "compute_seconds": compute}


# ---------------------------------------------------------------- validation and the best weights

def score(model, x, y, crop, rt):
    """Single-crop loss and accuracy (the faces shared among the processes under torchrun)."""
    probs = distributed.map_rows(lambda part: predict_proba(model, part, crop, "none", rt), x)
    y_t = torch.as_tensor(y.astype(np.int64))
    loss = float(F.nll_loss(torch.log(torch.as_tensor(probs).clamp_min(1e-12)), y_t))
    return loss, float((probs.argmax(1) == y).mean())


def validate(model, ema, val, crop, rt):
    """Score the live weights and, with a weight average, the average too: validation
    decides which of the two is kept. Returns (history columns, better network, its accuracy)."""
    row = dict(zip(("val_loss", "val_accuracy"), score(model, *val, crop, rt)))
    if ema is None:
        return row, model, row["val_accuracy"]
    row["val_loss_ema"], row["val_accuracy_ema"] = score(ema.model, *val, crop, rt)
    if row["val_accuracy_ema"] > row["val_accuracy"]:
        return row, ema.model, row["val_accuracy_ema"]
    return row, model, row["val_accuracy"]


def new_state():
    return {"epoch": 0, "history": [], "best_acc": -1.0, "best_epoch": 0, "best_state": None,
            "bad_epochs": 0, "train_seconds": 0.0, "compute_seconds": 0.0}


def keep_best(state, net, acc, epoch, ema):
    if acc > state["best_acc"]:
        state.update(best_acc=acc, best_epoch=epoch, bad_epochs=0,
                     best_weights="ema" if ema is not None and net is ema.model else "live",
                     best_state={k: v.detach().clone().cpu() for k, v in net.state_dict().items()})
    else:
        state["bad_epochs"] += 1


# ---------------------------------------------------------------- checkpoints to resume from

def fingerprint(*parts):
    """Identifies a run's inputs, so a checkpoint from other params or data is never resumed."""
    h = hashlib.sha256()
    for p in parts:
        if dataclasses.is_dataclass(p):
            p = dataclasses.asdict(p)  # the section's dict, as params.yaml gave it
        h.update(p.tobytes() if isinstance(p, np.ndarray) else json.dumps(p, sort_keys=True).encode())
    return h.hexdigest()


def rank_random_states(device):
    """The random states one process draws dropout from: torch's CPU generator and, on a
    GPU, the CUDA generator of its device."""
    states = {"torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda_rng"] = torch.cuda.get_rng_state(device)
    return states


def set_rank_random_states(states, device):
    torch.set_rng_state(states["torch_rng"])
    if device.type == "cuda" and states.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(states["cuda_rng"], device)


class Checkpoint:
    """The resume file of one run, identified by `run_id` (a `fingerprint`). Under torchrun
    rank 0 reads and writes it for all: it holds every rank's random states."""

    def __init__(self, path, run_id):
        self.path, self.run_id = Path(path), run_id

    def read(self):
        if not self.path.exists():
            return None
        # On the CPU: the random states must stay CPU byte tensors; load_state_dict moves
        # the weights and the optimiser state to the model's device.
        ckpt = load_torch(self.path, "cpu")
        if not isinstance(ckpt, dict):
            raise FerPipeError(f"{self.path}: not a checkpoint of this pipeline; delete it "
                               "to train from the start")
        return ckpt

    def restore(self, model, learner, gen, say):
        """Load a checkpoint of this run into the given objects; its state, or None."""
        ckpt = distributed.from_main(self.read)
        if ckpt is None:
            return None
        if ckpt.get("run_id") != self.run_id:
            say(f"ignoring {self.path}: it belongs to other params or data")
            return None
        model.load_state_dict(ckpt["model"])
        if learner.ema is not None:
            learner.ema.model.load_state_dict(ckpt["ema"])
        learner.opt.load_state_dict(ckpt["optimizer"])
        learner.sched.load_state_dict(ckpt["scheduler"])
        gen.set_state(ckpt["gen"])
        ranks, rank = ckpt.get("ranks", [ckpt]), distributed.rank()
        if len(ranks) != distributed.world_size():
            say(f"note: the checkpoint was written by {len(ranks)} processes, this run has "
                f"{distributed.world_size()}: it goes on, with other dropout draws")
        if rank < len(ranks):
            set_rank_random_states(ranks[rank], device_of(model))
        say(f"resuming from the checkpoint after epoch {ckpt['state']['epoch']} ({self.path})")
        return ckpt["state"]

    def save(self, model, learner, gen, state):
        ranks = distributed.all_gather(rank_random_states(device_of(model)))
        if not distributed.is_main():
            return
        save_torch(self.path, {
            "run_id": self.run_id, "model": model.state_dict(),
            "ema": learner.ema.model.state_dict() if learner.ema is not None else None,
            "optimizer": learner.opt.state_dict(), "scheduler": learner.sched.state_dict(),
            "gen": gen.get_state(), **ranks[0], **({"ranks": ranks} if len(ranks) > 1 else {}),
            "state": state})


# ---------------------------------------------------------------- the loop

@dataclasses.dataclass(frozen=True)
class Tracking:
    """How one fit is followed: `name` heads its progress lines, `checkpoint` (a Checkpoint)
    is saved after every epoch and resumed from, `steps` (a live.Steps) logs every epoch
    through DVCLive."""
    name: str
    checkpoint: Checkpoint | None = None
    steps: live.Steps | None = None


def fit(model, train, val, training, rt, tracking):
    """Train `model` in place on `train` = (faces, labels), scoring on `val` every epoch.
    Returns (best-on-validation state dict, history rows, record). `training` is a
    TrainConfig, `rt` the runtime.Runtime of this process, `tracking` a Tracking."""
    name, checkpoint, steps = tracking.name, tracking.checkpoint, tracking.steps

    def say(text):
        print(f"[{name}] {text}", flush=True)

    device = rt.device
    model.norm.mean.fill_(float(train[0].mean()) / 255.0)
    model.norm.std.fill_(float(train[0].std()) / 255.0)
    model.to(device).to(memory_format=torch.channels_last)  # faster convolutions on CPU and GPU
    gen = torch.Generator().manual_seed(training.seed)
    batches = Batches(*train, training, gen, device)
    opt = make_optimizer(model, training)
    sched = make_schedule(opt, training, len(batches))
    if training.schedule in ("cosine", "onecycle") and training.warmup_epochs >= training.epochs:
        say(f"warning: train.warmup_epochs ({training.warmup_epochs}) >= train.epochs "
            f"({training.epochs}): the learning rate never leaves its warm-up and the run "
            "ends near its peak; lower train.warmup_epochs for a run this short")
    ema = EMA(model, training.ema_decay) if training.ema_decay > 0 else None
    learner = Learner(opt, sched, make_loss(train[1], training, device), ema)
    net = distributed.wrap(model, device)  # DDP under torchrun, else the model itself
    distributed.seed_rank(training.seed)
    state = (checkpoint and checkpoint.restore(model, learner, gen, say)) or new_state()
    if steps:
        steps.start([{"step": h["epoch"], **h} for h in state["history"]])

    for epoch in range(state["epoch"] + 1, training.epochs + 1):
        t0 = time.perf_counter()
        tr = train_one_epoch(net, batches, learner, rt, epoch,
                             lambda text: say(f"epoch {epoch}/{training.epochs} {text}"))
        distributed.sync_buffers(model, ema and ema.model)
        row, best_net, best_acc = validate(model, ema, val, training.crop, rt)
        state["history"].append({
            "epoch": epoch, "train_loss": tr["train_loss"], "train_accuracy": tr["train_accuracy"],
            **row, "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0,
            "images_per_second": tr["seen"] / tr["train_seconds"]})
        if steps:
            steps.log({"step": epoch, **state["history"][-1]})
        state["epoch"] = epoch
        state["train_seconds"] += tr["train_seconds"]
        state["compute_seconds"] += tr["compute_seconds"]
        keep_best(state, best_net, best_acc, epoch, ema)
        say(epoch_line(state, training.epochs))
        stop = training.early_stopping and state["bad_epochs"] >= training.early_stopping
        if checkpoint:
            checkpoint.save(model, learner, gen, state)
        if stop:
            say(f"early stop: no better validation accuracy for {training.early_stopping} epochs")
            break

    if state["best_state"] is None:
        raise FerPipeError(f"[{name}] training produced no epoch; check train.epochs")
    return state["best_state"], state["history"], fit_record(state, training, len(batches), device)


def epoch_line(state, epochs):
    h = state["history"][-1]
    eta = sum(r["seconds"] for r in state["history"]) / len(state["history"]) * (epochs - h["epoch"])
    return (f"epoch {h['epoch']}/{epochs} train loss {h['train_loss']:.4f} "
            f"acc {h['train_accuracy']:.4f} | val loss {h['val_loss']:.4f} acc {h['val_accuracy']:.4f} "
            + (f"(ema {h['val_accuracy_ema']:.4f}) " if "val_accuracy_ema" in h else "") +
            f"(best {state['best_acc']:.4f} @ {state['best_epoch']}) | "
            f"lr {h['lr']:.2e} | {h['seconds']:.0f}s, {h['images_per_second']:.0f} img/s, "
            f"left ~{eta / 60:.1f} min")


def fit_record(state, training, steps_per_epoch, device):
    hist = state["history"]
    record = {
        "best_val_accuracy": state["best_acc"],
        "best_epoch": state["best_epoch"],
        "epochs": len(hist),
        "stopped_early": len(hist) < training.epochs,
        "seconds_per_epoch": sum(h["seconds"] for h in hist) / len(hist),
        "images_per_second": steps_per_epoch * training.batch_size * len(hist) / state["train_seconds"],
        "train_minutes": sum(h["seconds"] for h in hist) / 60,
        "data_time_share": 1 - state["compute_seconds"] / state["train_seconds"],
        "device": device.type,
    }
    if "val_accuracy_ema" in hist[0]:
        record.update(best_weights=state["best_weights"],
                      best_val_accuracy_live=max(h["val_accuracy"] for h in hist),
                      best_val_accuracy_ema=max(h["val_accuracy_ema"] for h in hist))
    return record


# ---------------------------------------------------------------- a training stage

@dataclasses.dataclass(frozen=True)
class Network:
    """What a training stage trains: its kind (cnn or dnn), its architecture (saved in the
    checkpoint and part of the run's fingerprint) and `build()`, a fresh network."""
    kind: str
    config: dict
    build: Callable[[], torch.nn.Module]


@dataclasses.dataclass(frozen=True)
class RunFiles:
    """Where a training stage keeps its run going: `resume`, the checkpoint saved after
    every epoch and resumed from (self_train: the prefix of one per round; None: no
    resuming); `live`, the DVCLive folder the epochs (self_train: rounds) are logged to
    (None: no log)."""
    resume: str | None = None
    live: str | None = None


@dataclasses.dataclass
class TrainResult:
    """What a training stage writes: `checkpoint` (for models/), `metrics`, `history` (one
    row per epoch; an ensemble's first member), `summary` (the layer table), and
    `resume_files`, to delete once the outputs are written."""
    checkpoint: dict
    metrics: dict
    history: list
    summary: str
    resume_files: list


def run(net, splits, training, rt, members=1, run_files=RunFiles()):
    """Everything a training stage computes: build, summarise, fit `net` (a Network) with
    the TrainConfig `training`. With members > 1 it trains that many networks, seeded
    train.seed, train.seed + 1, ..., as one ensemble whose prediction averages their
    probabilities. Returns a TrainResult."""
    from ferpipe.model.networks import Ensemble, checkpoint, count_params, format_summary, summary

    kind, resume_path = net.kind, run_files.resume
    nets, hists, records, resumes = [], [], [], []
    for i in range(members):
        member = dataclasses.replace(training, seed=training.seed + i)
        torch.manual_seed(member.seed)  # before building: it fixes the initial weights
        model = net.build()
        if i == 0:
            n_params = count_params(model)
            table = format_summary(summary(model, training.crop),
                                   f"{kind.upper()} ({n_params:,} parameters, "
                                   f"input 1x{training.crop}x{training.crop})")
            if members > 1:
                table += (f"ensemble of {members} such networks, seeds "
                          f"{training.seed}..{training.seed + members - 1}\n")
            print(table, flush=True)
        # Every member keeps its own checkpoint until all are done, so a killed ensemble
        # resumes inside the member it was training and never retrains a finished one.
        resume = resume_path and (resume_path if i == 0 else
                                  str(Path(resume_path).with_suffix(f".{i + 1}.pt")))
        run_id = fingerprint(kind, net.config, member, splits["train_y"], splits["val_y"],
                             splits["train_x"][:, ::7, ::7])
        name = kind if members == 1 else f"{kind} {i + 1}/{members}"
        best, hist, record = fit(model, (splits["train_x"], splits["train_y"]),
                                 (splits["val_x"], splits["val_y"]), member, rt, Tracking(
                                     name, Checkpoint(resume, run_id) if resume else None,
                                     live.Steps(run_files.live, live.epoch_metrics(kind))
                                     if run_files.live and i == 0 else None))
        model.load_state_dict(best)
        nets.append(model.eval())
        hists.append(hist)
        records.append(record)
        resumes.append(resume)

    meta = {"crop": training.crop, "precision": rt.precision}
    if members == 1:
        model, record, extra = nets[0], records[0], {}
        meta = {"best_epoch": record["best_epoch"], "best_val_accuracy": record["best_val_accuracy"],
                **meta}
    else:
        model = Ensemble(nets)
        probs = predict_proba(model, splits["val_x"], training.crop, "none", rt)
        record = ensemble_record(records, float((probs.argmax(1) == splits["val_y"]).mean()))
        extra = {"members": members, "params_total": count_params(model)}
        meta = {"members": [{"best_epoch": r["best_epoch"], "best_val_accuracy": r["best_val_accuracy"]}
                            for r in records],
                "best_val_accuracy": record["best_val_accuracy"], **meta}
    print(f"[{kind}] best validation accuracy {record['best_val_accuracy']:.4f}"
          + (f" at epoch {record['best_epoch']}" if members == 1 else f" ({members} networks)"),
          flush=True)
    return TrainResult(
        checkpoint=checkpoint(model, kind, net.config, training.crop, meta),
        metrics={"params": n_params, **extra, **record, **rt.record(),
                 "batch_size": training.batch_size},
        history=hists[0], summary=table, resume_files=[r for r in resumes if r])


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
