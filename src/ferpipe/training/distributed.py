"""Data-parallel training with PyTorch's DistributedDataParallel under `torchrun`.

A training stage (train_cnn, train_dnn, self_train) is one process unless `runtime.processes`
is above 1: then `setup` replaces the process by `torchrun --standalone --nproc-per-node N`
running the same script, so `dvc repro` and `dvc exp run` need no other command. A stage
started by torchrun itself (several machines: `--nnodes`, docs/scale-out.md) joins the group
torchrun describes. Gloo on the CPU, NCCL on CUDA GPUs (one per process).

How the work is shared (train.Batches, train.fit):
- every rank holds the whole training set and draws the same seeded permutation, augmentation
  and mixing of each global batch of train.batch_size faces, then trains on its own slice of
  batch_size / world_size faces (`batch_part`); DDP averages the gradients, so a step sees
  the same global batch at any number of processes;
- batch norm is per rank: its statistics come from the rank's slice (SyncBatchNorm runs on
  GPUs only). DDP hands rank 0's running statistics to every rank at each forward pass, and
  `sync_buffers` again after each epoch, so every rank validates the same network;
- validation is split between the ranks and gathered (`map_rows`): every rank sees the same
  accuracies and keeps the same best epoch;
- rank 0 alone writes outputs, metrics and the resume checkpoint (which holds every rank's
  random state); the other ranks print nothing.
"""
import atexit
import ctypes
import dataclasses
import os
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist

from ferpipe import runtime
from ferpipe.errors import FerPipeError


def launched():
    """Is this process one of torchrun's workers?"""
    return "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


def world_size():
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank():
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main():
    """Rank 0, the one process that writes (always true outside torchrun)."""
    return rank() == 0


# ---------------------------------------------------------------- starting and joining

def relaunch(processes, threads):
    """With processes > 1 outside torchrun, become torchrun running this script `processes`
    times on this machine; otherwise return."""
    if processes <= 1 or launched():
        return
    per_rank = threads or max(1, (os.cpu_count() or 1) // processes)
    os.environ.setdefault("OMP_NUM_THREADS", str(per_rank))
    print(f"[distributed] runtime.processes {processes}: starting torchrun "
          f"--nproc-per-node {processes}", flush=True)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                              "--nnodes=1", f"--nproc-per-node={processes}", *sys.argv])


def _die_with_launcher():
    # A SIGKILL of torchrun cannot be passed on: ask the kernel (Linux) to kill this worker
    # when its launcher dies, so a killed run leaves no rank training on and writing.
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def setup(settings):
    """runtime.setup for a training stage: relaunch under torchrun when `runtime.processes`
    asks for it; inside torchrun, join the process group (gloo, or NCCL with one GPU per
    process) and silence every rank but 0. Returns the runtime.Runtime of this process: under
    torchrun its own GPU, the world size, the backend and its rank."""
    relaunch(settings["processes"], settings["threads"])
    if not launched():
        return runtime.setup(settings)
    _die_with_launcher()
    local, local_world = int(os.environ["LOCAL_RANK"]), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if settings["threads"] == 0:  # all cores, shared among this machine's processes
        settings = {**settings, "threads": max(1, (os.cpu_count() or 1) // local_world)}
    if settings["device"] != "cpu" and torch.cuda.is_available():
        if local >= torch.cuda.device_count():
            raise FerPipeError(f"process {local} of this machine has no GPU of its own "
                               f"({torch.cuda.device_count()} GPUs): use at most that many "
                               "processes per machine")
        torch.cuda.set_device(local)
    rt = runtime.setup(settings)
    device = torch.device("cuda", local) if rt.device.type == "cuda" else rt.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    atexit.register(dist.destroy_process_group)
    if dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")  # progress lines come from rank 0 alone
    print(f"[distributed] {dist.get_world_size()} processes ({backend}), "
          f"{rt.threads} threads each", flush=True)
    return dataclasses.replace(rt, device=device, hardware=runtime.hardware(device),
                               world_size=dist.get_world_size(), backend=backend,
                               rank=dist.get_rank())


# ---------------------------------------------------------------- training

def wrap(model, device):
    """The model DDP trains (the model itself in a single process)."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def batch_part(batch_size):
    """This rank's slice of every global batch of `batch_size` faces."""
    n = world_size()
    if batch_size % n:
        raise FerPipeError(f"params.yaml: train.batch_size {batch_size} is the global batch; "
                           f"it must divide among the {n} processes")
    share = batch_size // n
    return slice(rank() * share, (rank() + 1) * share)


def seed_rank(seed):
    """Dropout draws of their own for every rank but 0 (rank 0 draws as a single process)."""
    if rank() > 0:
        torch.manual_seed(seed * 1000 + rank())


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def all_sum(*numbers):
    """The sums of these numbers over the ranks (the numbers themselves in one process)."""
    if world_size() == 1:
        return numbers
    t = torch.tensor(numbers, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return tuple(type(n)(v) for n, v in zip(numbers, t.tolist()))


def sync_buffers(*models):
    """Give every rank rank 0's buffers (batch-norm running statistics)."""
    if world_size() == 1:
        return
    for model in models:
        if model is not None:
            for buf in model.buffers():
                dist.broadcast(buf, 0)


def map_rows(fn, x):
    """fn over the rows of `x`, split between the ranks; every rank gets all of fn's rows."""
    if world_size() == 1:
        return fn(x)
    bounds = np.linspace(0, len(x), world_size() + 1).astype(int)
    mine = fn(x[bounds[rank()]:bounds[rank() + 1]])
    parts = [None] * world_size()
    dist.all_gather_object(parts, mine)
    return np.concatenate(parts)


def all_gather(obj):
    """Every rank's `obj`, in rank order ([obj] in one process)."""
    if world_size() == 1:
        return [obj]
    parts = [None] * world_size()
    dist.all_gather_object(parts, obj)
    return parts


def from_main(read):
    """read() on rank 0, its result on every rank (a FerPipeError too)."""
    if world_size() == 1:
        return read()
    box = [None]
    if is_main():
        try:
            box[0] = read()
        except FerPipeError as err:
            box[0] = err
    dist.broadcast_object_list(box, 0)
    if isinstance(box[0], FerPipeError):
        raise box[0]
    return box[0]
