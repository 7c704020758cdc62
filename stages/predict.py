"""Stage predict: label the unlabelled faces (or the test split when there are none) with
the CNN, as an `id,label` CSV."""
from ferpipe import files, infer, models, params, predict
from ferpipe.errors import run_stage
from ferpipe.files import write_csv

IN_SPLITS = "data/splits.npz"
IN_MODEL = "models/cnn.pt"
OUT_CSV = "predictions.csv"


def main():
    p = params.load({"infer": predict.SCHEMA})["infer"]
    splits = files.load_npz(IN_SPLITS, "data splits")
    which, x, ids = predict.faces_to_predict(splits)
    device = infer.pick_device("auto")
    model, ckpt = models.load(IN_MODEL, device)
    probs = infer.predict_proba(model, x, ckpt["input_size"], p["tta"], p["batch_size"],
                                ckpt["meta"]["precision"], device)
    write_csv(OUT_CSV, predict.table(ids, probs))
    print(f"predict: {len(ids)} {which} faces labelled (tta {p['tta']}); wrote {OUT_CSV}", flush=True)


if __name__ == "__main__":
    run_stage(main)
