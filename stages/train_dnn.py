"""Stage train_dnn: a fully connected network whose hidden widths are computed so its
parameter count matches the CNN's, trained by the same loop with the same settings."""
from ferpipe import files, models, params, runtime, train
from ferpipe.errors import run_stage

IN_SPLITS = "data/splits.npz"
OUT_MODEL = "models/dnn.pt"
OUT_METRICS = "metrics/train_dnn.json"
OUT_HISTORY = "plots/train_dnn.csv"
OUT_SUMMARY = "plots/dnn_summary.txt"
RESUME = "checkpoints/dnn.resume.pt"


def main():
    p = params.load({"cnn": models.CNN_SCHEMA, "dnn": models.DNN_SCHEMA, "train": train.SCHEMA})
    cfg = p["train"]
    target = models.count_params(models.FerCNN(models.resolve_cnn_config(p["cnn"]), cfg["crop"]))
    widths = models.dnn_widths(p["dnn"], cfg["crop"], target)
    print(f"dnn: hidden widths {widths} to match the CNN's {target:,} parameters", flush=True)
    rt = runtime.setup(runtime.load())
    splits = files.load_npz(IN_SPLITS, "data splits")
    config = {**p["dnn"], "widths": widths}
    train.run("dnn", lambda: models.build("dnn", config, cfg["crop"]), config, splits, cfg, rt,
              OUT_MODEL, OUT_METRICS, OUT_HISTORY, OUT_SUMMARY, RESUME)


if __name__ == "__main__":
    run_stage(main)
