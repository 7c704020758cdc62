"""Stage self_train: how much do unlabelled faces help? Hide most training labels, train the
CNN on the rest (the baseline), then self-train in rounds on confident pseudo-labels and
compare; the hidden labels only score the pseudo-labels."""
from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.model import networks
from ferpipe.training import distributed, selftrain, train

IN_SPLITS = paths.SPLITS
OUT_MODEL = paths.SELF_TRAIN_MODEL
OUT_METRICS = paths.SELF_TRAIN_METRICS
OUT_DETAIL = paths.SELF_TRAIN_DETAIL
OUT_ROUNDS = paths.SELF_TRAIN_ROUNDS
OUT_LIVE_STEPS = paths.LIVE_STEPS["self_train"]  # written by DVCLive round by round
OUT_LIVE_SUMMARY = paths.LIVE_SUMMARY["self_train"]
LIVE = paths.LIVE["self_train"]
RESUME_PREFIX = paths.SELF_TRAIN_RESUME


def main():
    rt = distributed.setup(runtime.load())  # under torchrun when runtime.processes > 1
    p = params.load({"cnn": networks.CNN_SCHEMA, "train": train.SCHEMA,
                     "self_train": selftrain.SCHEMA})
    arch = networks.resolve_cnn_config(p["cnn"])
    training = train.TrainConfig.from_params(p["train"])
    st = selftrain.SelfTrainConfig.from_params(p["self_train"])
    splits = files.load_npz(IN_SPLITS, "data splits")
    result = selftrain.run(lambda: networks.FerCNN(arch, training.crop), splits, training, st,
                           rt, train.RunFiles(RESUME_PREFIX, LIVE))
    model = networks.FerCNN(arch, training.crop)
    model.load_state_dict(result.state)
    if not distributed.is_main():  # rank 0 alone writes
        return
    m = selftrain.metrics(result)
    files.write_outputs({
        OUT_MODEL: networks.checkpoint(model, "cnn", arch, training.crop,
                                     selftrain.checkpoint_meta(result)),
        OUT_METRICS: selftrain.headline(m), OUT_DETAIL: m,
        OUT_ROUNDS: selftrain.rounds_table(result)})
    files.remove(result.resume_files)  # finished: a later run must start afresh
    base, best = m["baseline"]["test"]["accuracy"], m["self_trained"]["test"]["accuracy"]
    test = ("n/a (no labelled test set)" if m["gain"] is None else
            f"{base:.4f} -> {best:.4f} ({m['gain']:+.4f})")
    print(f"self_train: {m['labelled_fraction']:.1%} labelled; round {m['self_trained']['round']} "
          f"chosen by validation; test accuracy {test}; {m['minutes']:.1f} min; saved {OUT_MODEL}",
          flush=True)


if __name__ == "__main__":
    run_stage(main)
