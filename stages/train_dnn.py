"""Stage train_dnn: a fully connected network whose hidden widths are computed so its
parameter count matches the CNN's, trained by the same loop with the same settings."""
from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.model import networks
from ferpipe.training import distributed, train

IN_SPLITS = paths.SPLITS
OUT_MODEL = paths.MODEL["dnn"]
OUT_METRICS = paths.TRAIN_METRICS["dnn"]
OUT_HISTORY = paths.HISTORY["dnn"]
OUT_LAYER_TABLE = paths.LAYER_TABLE["dnn"]
OUT_LIVE_STEPS = paths.LIVE_STEPS["dnn"]  # written by DVCLive as training goes
OUT_LIVE_SUMMARY = paths.LIVE_SUMMARY["dnn"]
RESUME = paths.RESUME["dnn"]
LIVE = paths.LIVE["dnn"]


def main():
    rt = distributed.setup(runtime.load())  # under torchrun when runtime.processes > 1
    p = params.load({"cnn": networks.CNN_SCHEMA, "dnn": networks.DNN_SCHEMA, "train": train.SCHEMA})
    training = train.TrainConfig.from_params(p["train"])
    target = networks.count_params(networks.FerCNN(networks.resolve_cnn_config(p["cnn"]),
                                               training.crop))
    layers = networks.DnnConfig.from_params(p["dnn"])
    widths = networks.dnn_widths(layers, training.crop, target)
    print(f"dnn: hidden widths {widths} to match the CNN's {target:,} parameters", flush=True)
    splits = files.load_npz(IN_SPLITS, "data splits")
    config = layers.with_widths(widths)
    dnn = train.Network("dnn", config, lambda: networks.build("dnn", config, training.crop))
    result = train.run(dnn, splits, training, rt, run_files=train.RunFiles(RESUME, LIVE))
    if distributed.is_main():  # the only process that writes
        files.write_outputs({OUT_MODEL: result.checkpoint, OUT_METRICS: result.metrics,
                             OUT_HISTORY: result.history, OUT_LAYER_TABLE: result.summary})
        files.remove(result.resume_files)  # finished: a later run must start afresh
        print(f"train_dnn: saved {OUT_MODEL}", flush=True)


if __name__ == "__main__":
    run_stage(main)
