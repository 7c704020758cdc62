"""Stage predict: label the unlabelled faces (or the test split when there are none) with
the CNN, as an `id,label` CSV."""
from ferpipe import files, infer, models, params, predict, runtime
from ferpipe.errors import run_stage
from ferpipe.files import write_csv

IN_SPLITS = "data/splits.npz"
IN_MODEL = "models/cnn.pt"
OUT_CSV = "predictions.csv"


def main():
    p = params.load({"infer": predict.SCHEMA})["infer"]
    splits = files.load_npz(IN_SPLITS, "data splits")
    which, x, ids = predict.faces_to_predict(splits)
    rt = runtime.setup(runtime.load())
    model, ckpt = models.load(IN_MODEL, rt["device"])
    # The precision that suits this machine, not the one the model was trained with.
    probs = infer.predict_proba(model, x, ckpt["input_size"], p["tta"], rt["batch_size"],
                                rt["precision"], rt["device"])
    write_csv(OUT_CSV, predict.table(ids, probs))
    print(f"predict: {len(ids)} {which} faces labelled (tta {p['tta']}, {rt['precision']}); "
          f"wrote {OUT_CSV}", flush=True)


if __name__ == "__main__":
    run_stage(main)
