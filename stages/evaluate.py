"""Stage evaluate: score the CNN and the DNN on validation and test (PublicTest, and
PrivateTest when present), draw confusion matrices, misclassified faces and training
curves, and compare the two networks; fit the CNN's temperature on validation and measure
its calibration (ECE, reliability diagram) before and after."""
import json
from pathlib import Path

import pandas as pd

from ferpipe import files, params, paths, plots, runtime
from ferpipe.errors import run_stage
from ferpipe.evaluation import calibration, scores
from ferpipe.model import infer, networks

IN_SPLITS = paths.SPLITS
IN_MODELS = paths.MODEL
IN_TRAIN_METRICS = paths.TRAIN_METRICS
IN_HISTORY = paths.HISTORY
OUT_METRICS = paths.EVALUATE_METRICS
OUT_DETAIL = paths.EVALUATE_DETAIL
OUT_PER_CLASS = paths.PER_CLASS
OUT_COMPARISON = paths.COMPARISON
OUT_CURVES = paths.TRAINING_CURVES
OUT_CONFUSION = {(kind, split, suffix): paths.confusion(kind, split, suffix)
                 for kind in paths.KINDS for split in scores.SPLITS for suffix in ("csv", "png")}
OUT_MISCLASSIFIED = paths.MISCLASSIFIED
OUT_RELIABILITY = paths.RELIABILITY
OUT_CALIBRATION = paths.CALIBRATION


def main():
    p = params.load({"infer": infer.SCHEMA, "evaluate": scores.SCHEMA})
    tta = infer.InferConfig.from_params(p["infer"]).tta
    settings = scores.EvaluateConfig.from_params(p["evaluate"])
    rt = runtime.setup(runtime.load())
    splits = files.load_npz(IN_SPLITS, "data splits")
    summary, per_class, outputs = {}, {}, {}
    for kind in paths.KINDS:
        model, ckpt = networks.load(IN_MODELS[kind], rt.device)
        trained = json.loads(Path(IN_TRAIN_METRICS[kind]).read_text())
        # Parameters of one network: the DNN is matched to one CNN, not to an ensemble.
        summary[kind] = {"params": networks.count_params(networks.single(model)),
                         "seconds_per_epoch": trained["seconds_per_epoch"]}
        if ckpt.get("members", 1) > 1:
            summary[kind]["members"] = ckpt["members"]
        res = scores.evaluate_model(model, ckpt, splits, tta, settings, rt)
        summary[kind].update(res.summary)
        per_class[kind] = res.per_class
        for split, rows in res.confusion.items():
            outputs[OUT_CONFUSION[kind, split, "csv"]] = rows
            outputs[OUT_CONFUSION[kind, split, "png"]] = res.figures[split]
        outputs[OUT_MISCLASSIFIED[kind]] = res.figures["misclassified"]
        if kind == "cnn":
            cal, outputs[OUT_RELIABILITY] = calibration.calibrate(
                model, ckpt["input_size"], splits, tta, rt)
            summary[kind]["calibration"] = cal
            outputs[OUT_CALIBRATION] = calibration.calibration_record(
                IN_MODELS[kind], files.sha256(IN_MODELS[kind]), summary[kind])
    summary["comparison"] = scores.comparison(summary)
    summary["runtime"] = rt.record()
    outputs.update({OUT_METRICS: scores.headline(summary), OUT_DETAIL: summary,
                    OUT_PER_CLASS: per_class,
                    OUT_COMPARISON: scores.comparison_table(summary),
                    OUT_CURVES: plots.training_curves({k: pd.read_csv(v) for k, v in IN_HISTORY.items()})})
    files.write_outputs(outputs)


if __name__ == "__main__":
    run_stage(main)
