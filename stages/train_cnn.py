"""Stage train_cnn: train the configurable CNN (or an ensemble of them, ensemble.members);
keep the weights best on validation."""
from ferpipe import files, models, params, runtime, train
from ferpipe.errors import run_stage

IN_SPLITS = "data/splits.npz"
OUT_MODEL = "models/cnn.pt"
OUT_METRICS = "metrics/train_cnn.json"
OUT_HISTORY = "plots/train_cnn.csv"
OUT_SUMMARY = "plots/cnn_summary.txt"
RESUME = "checkpoints/cnn.resume.pt"


def main():
    p = params.load({"cnn": models.CNN_SCHEMA, "train": train.SCHEMA,
                     "ensemble": models.ENSEMBLE_SCHEMA})
    arch, cfg = models.resolve_cnn_config(p["cnn"]), p["train"]
    rt = runtime.setup(runtime.load())
    splits = files.load_npz(IN_SPLITS, "data splits")
    train.run("cnn", lambda: models.FerCNN(arch, cfg["crop"]), arch, splits, cfg, rt, OUT_MODEL,
              OUT_METRICS, OUT_HISTORY, OUT_SUMMARY, RESUME, p["ensemble"]["members"])


if __name__ == "__main__":
    run_stage(main)
