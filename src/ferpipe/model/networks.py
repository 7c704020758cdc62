"""Network definitions: a configurable CNN, a fully connected DNN sized to match it,
named presets, saving/loading, and a Keras-style layer table.

The `cnn:` section stays the validated dict, resolved by resolve_cnn_config: that dict is
what checkpoints and the release save as `config` (resolution puts pool_last_block first,
so its key order is not the schema's) and what `load` rebuilds networks from, including
checkpoints saved before a key existed. The `dnn:` and `ensemble:` sections are typed."""
import dataclasses
import math
from collections import OrderedDict
from typing import ClassVar

import torch
import torch.nn as nn

from ferpipe.constants import NUM_CLASSES
from ferpipe.errors import FerPipeError
from ferpipe.params import Section, boolean, choice, integer, list_of, number

ACTIVATIONS = ("relu", "prelu", "elu", "leaky_relu", "gelu")

CNN_SCHEMA = {
    "preset": choice("custom", "course_keras", "vgg"),
    "widths": list_of(integer(lo=1), min_len=1),
    "convs": list_of(integer(lo=1), min_len=1),
    "kernel": choice(3, 5, 7),
    "batch_norm": boolean(),
    "residual": boolean(),
    "activation": choice(*ACTIVATIONS),
    "pooling": choice("max", "avg"),
    "pool_last_block": boolean(),
    "block_dropout": number(lo=0.0, hi=1.0, hi_open=True),
    "global_pool": choice("avg", "flatten"),
    "head": list_of(integer(lo=1)),
    "head_dropout": number(lo=0.0, hi=1.0, hi_open=True),
}
DNN_SCHEMA = {
    "hidden_layers": integer(lo=1, hi=20),
    "taper": number(lo=0.0, hi=1.0, lo_open=True),
    "batch_norm": boolean(),
    "activation": choice(*ACTIVATIONS),
    "dropout": number(lo=0.0, hi=1.0, hi_open=True),
    "tolerance": number(lo=0.0, hi=1.0, lo_open=True),
}

# Architectures from elsewhere, kept for comparison; `preset: custom` uses the params as given.
PRESETS = {
    # The course report's Keras CNN: three blocks of two 3x3 convolutions (32/64/128),
    # max-pooling and dropout, then dense 1024-512-256-128.
    "course_keras": {
        "widths": [32, 64, 128], "convs": [2, 2, 2], "kernel": 3, "batch_norm": False,
        "residual": False, "activation": "relu", "pooling": "max", "pool_last_block": True,
        "block_dropout": 0.25,
        "global_pool": "flatten", "head": [1024, 512, 256, 128], "head_dropout": 0.5,
    },
    # The long configuration's network (README, "Long runs"): VGG-style, the family behind
    # the best from-scratch FER2013 results: 5.0M parameters, ~2x the default's multiply-adds.
    "vgg": {
        "widths": [64, 128, 256, 512], "convs": [2, 2, 2, 2], "kernel": 3, "batch_norm": True,
        "residual": False, "activation": "relu", "pooling": "max", "pool_last_block": True,
        "block_dropout": 0.1,
        "global_pool": "avg", "head": [512], "head_dropout": 0.4,
    },
}
ENSEMBLE_SCHEMA = {
    "members": integer(lo=1, hi=50),  # CNNs trained with seeds train.seed, train.seed + 1, ...
}


@dataclasses.dataclass(frozen=True)
class DnnConfig(Section):
    """The `dnn:` section, as DNN_SCHEMA validated it (same fields, same order)."""
    SCHEMA: ClassVar[dict] = DNN_SCHEMA
    NAME: ClassVar[str] = "dnn"

    hidden_layers: int
    taper: float
    batch_norm: bool
    activation: str
    dropout: float
    tolerance: float

    def with_widths(self, widths):
        """The DNN's config as checkpoints save it: the section's dict and its `widths`."""
        return {**dataclasses.asdict(self), "widths": widths}


@dataclasses.dataclass(frozen=True)
class EnsembleConfig(Section):
    """The `ensemble:` section, as ENSEMBLE_SCHEMA validated it."""
    SCHEMA: ClassVar[dict] = ENSEMBLE_SCHEMA
    NAME: ClassVar[str] = "ensemble"

    members: int


def resolve_cnn_config(arch):
    if len(arch["widths"]) != len(arch["convs"]):
        raise FerPipeError(f"params.yaml: cnn.convs: has {len(arch['convs'])} entries but "
                           f"cnn.widths has {len(arch['widths'])}; give one per block")
    if arch["preset"] != "custom":
        arch = {**arch, **PRESETS[arch["preset"]]}
    # Models saved before the key existed pooled after every block.
    return {"pool_last_block": True, **arch}


def _activation(name, channels):
    if name == "prelu":
        return nn.PReLU(channels)
    return {"relu": nn.ReLU, "elu": nn.ELU, "leaky_relu": nn.LeakyReLU, "gelu": nn.GELU}[name]()


class Normalize(nn.Module):
    """Maps pixels in [0, 1] to zero mean, unit variance with the training set's statistics,
    so a saved model takes plain images and saliency is measured in pixel units."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor(0.5))
        self.register_buffer("std", torch.tensor(0.25))

    def forward(self, x):
        return (x - self.mean) / self.std


class ConvBlock(nn.Module):
    """`n` convolutions from `cin` to `cout` channels, each with its batch norm and
    activation, a residual connection, pooling (where `pool`) and dropout, as the resolved
    `arch` (see resolve_cnn_config) asks."""

    def __init__(self, cin, cout, n, arch, pool=True):
        super().__init__()
        kernel, batch_norm, activation = arch["kernel"], arch["batch_norm"], arch["activation"]
        dropout, residual = arch["block_dropout"], arch["residual"]
        self.layer_names = []
        for i in range(n):
            self.add_module(f"conv{i + 1}", nn.Conv2d(cin if i == 0 else cout, cout, kernel,
                                                       padding=kernel // 2, bias=not batch_norm))
            self.layer_names.append(f"conv{i + 1}")
            if batch_norm:
                self.add_module(f"bn{i + 1}", nn.BatchNorm2d(cout))
                self.layer_names.append(f"bn{i + 1}")
            self.add_module(f"act{i + 1}", _activation(activation, cout))
            self.layer_names.append(f"act{i + 1}")
        self.skip = None
        if residual:
            self.skip = nn.Identity() if cin == cout else nn.Sequential(
                nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout) if batch_norm else nn.Identity())
        if not pool:
            self.pool = nn.Identity()
        else:
            self.pool = nn.MaxPool2d(2) if arch["pooling"] == "max" else nn.AvgPool2d(2)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x):
        y = x
        for name in self.layer_names:
            y = getattr(self, name)(y)
        if self.skip is not None:
            y = y + self.skip(x)
        return self.drop(self.pool(y))


def _dense_head(n_in, widths, batch_norm, activation, dropout):
    layers = OrderedDict()
    for i, w in enumerate(widths):
        layers[f"fc{i + 1}"] = nn.Linear(n_in, w, bias=not batch_norm)
        if batch_norm:
            layers[f"bn{i + 1}"] = nn.BatchNorm1d(w)
        layers[f"act{i + 1}"] = _activation(activation, w)
        if dropout > 0:
            layers[f"drop{i + 1}"] = nn.Dropout(dropout)
        n_in = w
    layers["out"] = nn.Linear(n_in, NUM_CLASSES)
    return nn.Sequential(layers)


class FerCNN(nn.Module):
    def __init__(self, arch, input_size):
        super().__init__()
        arch = resolve_cnn_config(arch)
        self.norm = Normalize()
        blocks, cin, size = OrderedDict(), 1, input_size
        n_blocks = len(arch["widths"])
        for i, (width, n) in enumerate(zip(arch["widths"], arch["convs"])):
            # 2x2 pooling floors odd sizes: a 40px crop reaches the last block at 5x5, whose
            # pooling keeps the top-left 4x4 and drops the bottom row and the right column.
            pool = i < n_blocks - 1 or arch["pool_last_block"]
            if pool and size < 2:
                raise FerPipeError(f"params.yaml: cnn.widths: {len(arch['widths'])} pooling blocks "
                                   f"shrink a {input_size}px input below 1px; use fewer blocks")
            blocks[f"block{i + 1}"] = ConvBlock(cin, width, n, arch, pool)
            cin, size = width, size // 2 if pool else size
        self.features = nn.Sequential(blocks)
        if arch["global_pool"] == "avg":
            self.pool, n_flat = nn.AdaptiveAvgPool2d(1), cin
        else:
            self.pool, n_flat = nn.Identity(), cin * size * size
        self.head = _dense_head(n_flat, arch["head"], arch["batch_norm"], arch["activation"],
                                arch["head_dropout"])

    def forward(self, x):
        return self.head(torch.flatten(self.pool(self.features(self.norm(x))), 1))


class FerDNN(nn.Module):
    def __init__(self, widths, dnn, input_size):
        """Hidden layers of `widths` with the batch norm, activation and dropout of `dnn`
        (a DnnConfig)."""
        super().__init__()
        self.norm = Normalize()
        self.head = _dense_head(input_size * input_size, widths, dnn.batch_norm,
                                dnn.activation, dnn.dropout)

    def forward(self, x):
        return self.head(torch.flatten(self.norm(x), 1))


class Ensemble(nn.Module):
    """Networks trained from different seeds. The output is the log of the members' mean
    softmax, so softmax(output), and hence predict_proba, averages their probabilities."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        logp = torch.stack([torch.log_softmax(m(x).float(), 1) for m in self.members])
        return torch.logsumexp(logp, 0) - math.log(len(self.members))


def single(model):
    """The network to explain: an ensemble's first member (saliency and filters look at
    one network's gradients and layers), or the model itself."""
    return model.members[0] if isinstance(model, Ensemble) else model


def count_params(model):
    return sum(p.numel() for p in model.parameters())


def dnn_widths(dnn, input_size, target):
    """Hidden widths, tapering by dnn.taper, whose total parameter count is closest to
    `target`; raises if the best is still outside dnn.tolerance (`dnn`: a DnnConfig)."""
    def widths_for(base):
        return [max(1, round(base * dnn.taper ** i)) for i in range(dnn.hidden_layers)]

    def params_for(base):
        with torch.device("meta"):  # counts shapes only: no memory, no initialisation
            return count_params(FerDNN(widths_for(base), dnn, input_size))

    lo, hi = 1, 1
    while params_for(hi) < target:
        hi *= 2
        if hi > 1 << 20:
            break
    while hi - lo > 1:  # the count grows with the base width: bisect
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if params_for(mid) < target else (lo, mid)
    base = min((lo, hi), key=lambda b: abs(params_for(b) - target))
    got = params_for(base)
    if abs(got - target) > dnn.tolerance * target:
        raise FerPipeError(f"params.yaml: dnn: no widths with hidden_layers="
                           f"{dnn.hidden_layers} and taper={dnn.taper} come within "
                           f"{dnn.tolerance:.0%} of the CNN's {target} parameters "
                           f"(closest: {got}); change dnn.hidden_layers or dnn.taper")
    return widths_for(base)


def build(kind, config, input_size, members=1):
    """Build a model from the config saved with it (see `checkpoint`)."""
    def one():
        if kind == "cnn":
            return FerCNN(config, input_size)
        # the saved config: the dnn: section's keys and the widths (DnnConfig.with_widths)
        return FerDNN(config["widths"],
                      DnnConfig(**{k: v for k, v in config.items() if k != "widths"}),
                      input_size)
    return one() if members == 1 else Ensemble([one() for _ in range(members)])


def checkpoint(model, kind, config, input_size, meta):
    """A plain dict of tensors and builtins: loadable with torch.load(weights_only=True)."""
    ckpt = {"kind": kind, "config": config, "input_size": input_size,
            "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "meta": meta}
    if isinstance(model, Ensemble):
        ckpt["members"] = len(model.members)
    return ckpt


def load(path, device="cpu"):
    """Load a model saved by a training stage; refuses files that would run code."""
    from ferpipe.files import load_torch

    ckpt = load_torch(path, device, "run the training stage first (dvc repro)")
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or ckpt.get("kind") not in ("cnn", "dnn"):
        raise FerPipeError(f"{path}: not a model saved by this pipeline")
    try:
        members = ckpt.get("members", 1)
        if not isinstance(members, int) or members < 1:
            raise TypeError(f"members is {members!r}, not a positive integer")
        model = build(ckpt["kind"], ckpt["config"], ckpt["input_size"], members)
        model.load_state_dict(ckpt["state_dict"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise FerPipeError(f"{path}: its weights do not fit the config saved with them "
                           f"({type(err).__name__}: {first})") from None
    return model.to(device).eval(), ckpt


def summary(model, input_size):
    """Keras-style table of leaf layers: (name, type, output shape, parameters)."""
    rows, hooks = [], []
    for name, module in model.named_modules():
        if name and not list(module.children()):
            def hook(mod, inp, out, name=name):
                rows.append((name, type(mod).__name__, tuple(out.shape[1:]),
                             sum(p.numel() for p in mod.parameters())))
            hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        model(torch.zeros(1, 1, input_size, input_size, device=next(model.parameters()).device))
    model.train(was_training)
    for h in hooks:
        h.remove()
    return rows


def format_summary(rows, title):
    total = sum(r[3] for r in rows)
    lines = [title, f"{'layer':<28}{'type':<18}{'output shape':<20}{'params':>10}", "-" * 76]
    for name, kind, shape, n in rows:
        lines.append(f"{name:<28}{kind:<18}{str(shape):<20}{n:>10,}")
    lines += ["-" * 76, f"total parameters: {total:,}"]
    return "\n".join(lines) + "\n"
