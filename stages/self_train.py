"""Stage self_train: how much do unlabelled faces help? Hide most training labels, train the
CNN on the rest (the baseline), then self-train in rounds on confident pseudo-labels and
compare; the hidden labels only score the pseudo-labels."""
from pathlib import Path

from ferpipe import files, models, params, runtime, selftrain, train
from ferpipe.errors import run_stage

IN_SPLITS = "data/splits.npz"
OUT_MODEL = "models/self_train.pt"
OUT_METRICS = "metrics/self_train.json"
OUT_ROUNDS = "plots/self_train.csv"
RESUME_PREFIX = "checkpoints/self_train"


def main():
    p = params.load({"cnn": models.CNN_SCHEMA, "train": train.SCHEMA,
                     "self_train": selftrain.SCHEMA})
    arch, cfg, st = models.resolve_cnn_config(p["cnn"]), p["train"], p["self_train"]
    splits = files.load_npz(IN_SPLITS, "data splits")
    rt = runtime.setup(runtime.load())
    result = selftrain.run(lambda: models.FerCNN(arch, cfg["crop"]), splits, cfg, st, rt,
                           RESUME_PREFIX)
    model = models.FerCNN(arch, cfg["crop"])
    model.load_state_dict(result["state"])
    files.save_torch(OUT_MODEL, models.checkpoint(model, "cnn", arch, cfg["crop"],
                                                  selftrain.checkpoint_meta(result)))
    m = selftrain.metrics(result)
    files.write_json(OUT_METRICS, m)
    files.write_csv(OUT_ROUNDS, selftrain.rounds_table(result))
    for path in result["resume_files"]:  # finished: a later run must start afresh
        Path(path).unlink(missing_ok=True)
    base, best = m["baseline"]["test"]["accuracy"], m["self_trained"]["test"]["accuracy"]
    test = ("n/a (no labelled test set)" if m["gain"] is None else
            f"{base:.4f} -> {best:.4f} ({m['gain']:+.4f})")
    print(f"self_train: {m['labelled_fraction']:.1%} labelled; round {m['self_trained']['round']} "
          f"chosen by validation; test accuracy {test}; {m['minutes']:.1f} min; saved {OUT_MODEL}",
          flush=True)


if __name__ == "__main__":
    run_stage(main)
