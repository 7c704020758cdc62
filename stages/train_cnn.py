"""Stage train_cnn: train the configurable CNN (or an ensemble of them, ensemble.members);
keep the weights best on validation."""
from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.model import networks
from ferpipe.training import distributed, train

IN_SPLITS = paths.SPLITS
OUT_MODEL = paths.MODEL["cnn"]
OUT_METRICS = paths.TRAIN_METRICS["cnn"]
OUT_HISTORY = paths.HISTORY["cnn"]
OUT_LAYER_TABLE = paths.LAYER_TABLE["cnn"]
OUT_LIVE_STEPS = paths.LIVE_STEPS["cnn"]  # written by DVCLive as training goes
OUT_LIVE_SUMMARY = paths.LIVE_SUMMARY["cnn"]
RESUME = paths.RESUME["cnn"]
LIVE = paths.LIVE["cnn"]


def main():
    rt = distributed.setup(runtime.load())  # under torchrun when runtime.processes > 1
    p = params.load({"cnn": networks.CNN_SCHEMA, "train": train.SCHEMA,
                     "ensemble": networks.ENSEMBLE_SCHEMA})
    arch = networks.resolve_cnn_config(p["cnn"])
    training = train.TrainConfig.from_params(p["train"])
    members = networks.EnsembleConfig.from_params(p["ensemble"]).members
    splits = files.load_npz(IN_SPLITS, "data splits")
    cnn = train.Network("cnn", arch, lambda: networks.FerCNN(arch, training.crop))
    result = train.run(cnn, splits, training, rt, members, train.RunFiles(RESUME, LIVE))
    if distributed.is_main():  # the only process that writes
        files.write_outputs({OUT_MODEL: result.checkpoint, OUT_METRICS: result.metrics,
                             OUT_HISTORY: result.history, OUT_LAYER_TABLE: result.summary})
        files.remove(result.resume_files)  # finished: a later run must start afresh
        print(f"train_cnn: saved {OUT_MODEL}", flush=True)


if __name__ == "__main__":
    run_stage(main)
