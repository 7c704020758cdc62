"""Stage predict: label the unlabelled faces (or the test split when there are none) with
the CNN, as an `id,label` CSV."""
from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.model import infer, networks

IN_SPLITS = paths.SPLITS
IN_MODEL = paths.MODEL["cnn"]
OUT_CSV = paths.PREDICTIONS


def main():
    tta = infer.InferConfig.from_params(params.load({"infer": infer.SCHEMA})["infer"]).tta
    splits = files.load_npz(IN_SPLITS, "data splits")
    which, x, ids = infer.faces_to_predict(splits)
    rt = runtime.setup(runtime.load())
    model, ckpt = networks.load(IN_MODEL, rt.device)
    probs = infer.predict(model, x, ckpt["input_size"], tta, rt,
                          label=f"[predict] {which}, tta {tta}")
    files.write_csv(OUT_CSV, infer.predictions_table(ids, probs))
    print(f"predict: {len(ids)} {which} faces labelled (tta {tta}, {rt.precision}); "
          f"wrote {OUT_CSV}", flush=True)


if __name__ == "__main__":
    run_stage(main)
