"""Stage evaluate: score the CNN and the DNN on validation and test (PublicTest, and
PrivateTest when present), draw confusion matrices, misclassified faces and training
curves, and compare the two networks."""
import json
from pathlib import Path

import numpy as np
import pandas as pd

from ferpipe import EMOTIONS, evaluation, files, infer, models, params, plots, runtime
from ferpipe.augment import TTA_MODES
from ferpipe.errors import run_stage
from ferpipe.files import save_figure, write_csv, write_json, write_text
from ferpipe.predict import SCHEMA as INFER_SCHEMA

IN_SPLITS = "data/splits.npz"
IN_MODELS = {"cnn": "models/cnn.pt", "dnn": "models/dnn.pt"}
IN_TRAIN_METRICS = {"cnn": "metrics/train_cnn.json", "dnn": "metrics/train_dnn.json"}
IN_HISTORY = {"cnn": "plots/train_cnn.csv", "dnn": "plots/train_dnn.csv"}
OUT_METRICS = "metrics/evaluate.json"
OUT_PER_CLASS = "metrics/evaluate_per_class.json"
OUT_COMPARISON = "plots/comparison.md"
OUT_CURVES = "plots/training_curves.png"
SPLITS = ("val", "test", "private")


def main():
    p = params.load({"infer": INFER_SCHEMA, "evaluate": evaluation.SCHEMA})
    tta = p["infer"]["tta"]
    rt = runtime.setup(runtime.load())
    # The precision that suits this machine, not the one the models were trained with.
    device, precision, batch = rt["device"], rt["precision"], rt["batch_size"]
    splits = files.load_npz(IN_SPLITS, "data splits")
    summary, per_class = {}, {}
    for kind, path in IN_MODELS.items():
        model, ckpt = models.load(path, device)
        crop = ckpt["input_size"]
        trained = json.loads(Path(IN_TRAIN_METRICS[kind]).read_text())
        # Parameters of one network: the DNN is matched to one CNN, not to an ensemble.
        summary[kind] = {"params": models.count_params(models.single(model)),
                         "seconds_per_epoch": trained["seconds_per_epoch"]}
        if ckpt.get("members", 1) > 1:
            summary[kind]["members"] = ckpt["members"]
        per_class[kind] = {}
        for name in SPLITS:
            x, y = splits[f"{name}_x"], splits[f"{name}_y"]
            if len(y) == 0:
                if name == "test":  # course data: test.csv has no labels; DVC still expects the files
                    write_csv(f"plots/confusion_{kind}_test.csv", pd.DataFrame(columns=["actual", "predicted"]))
                    save_figure(f"plots/confusion_{kind}_test.png", plots.message(
                        "No labelled test faces in this data set\n(the course's test.csv has no labels)"))
                continue
            probs = infer.predict_proba(model, x, crop, tta, batch, precision, device)
            single = probs if tta == "none" else infer.predict_proba(model, x, crop, "none", batch,
                                                                     precision, device)
            s = evaluation.score(y, probs)
            summary[kind][name] = {"accuracy": s["accuracy"], "macro_f1": s["macro_f1"],
                                   "single_crop_accuracy": evaluation.score(y, single)["accuracy"],
                                   "tta": tta}
            per_class[kind][name] = s["per_class"]
            cm = s["confusion"]
            pred = probs.argmax(1)
            write_csv(f"plots/confusion_{kind}_{name}.csv",
                      pd.DataFrame({"actual": np.asarray(EMOTIONS)[y], "predicted": np.asarray(EMOTIONS)[pred]}))
            save_figure(f"plots/confusion_{kind}_{name}.png", plots.confusion_heatmap(
                cm, f"{kind.upper()} on {name}: accuracy {s['accuracy']:.3f} ({tta})"))
            if name == "val":
                # TTA modes on validation, so infer.tta can be chosen without the test split.
                by_tta = {tta: s["accuracy"], "none": summary[kind][name]["single_crop_accuracy"]}
                for m in p["evaluate"]["tta_modes"]:
                    if m not in by_tta:
                        by_tta[m] = evaluation.score(y, infer.predict_proba(
                            model, x, crop, m, batch, precision, device))["accuracy"]
                summary[kind]["val_accuracy_by_tta"] = {m: by_tta[m] for m in TTA_MODES
                                                        if m in by_tta}
                summary[kind]["most_confused"] = evaluation.most_confused(cm)
                wrong = np.flatnonzero(pred != y)
                rng = np.random.default_rng(p["evaluate"]["seed"])
                pick = np.sort(rng.choice(wrong, min(len(wrong), p["evaluate"]["misclassified"]),
                                          replace=False))
                save_figure(f"plots/misclassified_{kind}_val.png", plots.face_grid(
                    x[pick], [f"true {EMOTIONS[y[i]]}\npred {EMOTIONS[pred[i]]} {probs[i].max():.2f}"
                              for i in pick], f"{kind.upper()}: misclassified validation faces"))
            print(f"evaluate: {kind} {name}: accuracy {s['accuracy']:.4f} "
                  f"(single crop {summary[kind][name]['single_crop_accuracy']:.4f}), "
                  f"macro-F1 {s['macro_f1']:.4f}", flush=True)
    summary["comparison"] = comparison(summary)
    summary["runtime"] = runtime.record(rt)
    write_json(OUT_METRICS, summary)
    write_json(OUT_PER_CLASS, per_class)
    write_text(OUT_COMPARISON, comparison_table(summary))
    save_figure(OUT_CURVES, plots.training_curves(
        {k: pd.read_csv(v) for k, v in IN_HISTORY.items()}))


def comparison(summary):
    cnn, dnn = summary["cnn"], summary["dnn"]
    out = {"param_gap": (dnn["params"] - cnn["params"]) / cnn["params"],
           "epoch_time_ratio_dnn_to_cnn": dnn["seconds_per_epoch"] / cnn["seconds_per_epoch"]}
    for name in SPLITS:
        if name in cnn:
            out[f"{name}_accuracy_gain_cnn_over_dnn"] = cnn[name]["accuracy"] - dnn[name]["accuracy"]
    return out


def comparison_table(summary):
    rows = ["| model | parameters | seconds per epoch | " +
            " | ".join(f"{n} accuracy | {n} macro-F1" for n in SPLITS if n in summary["cnn"]) + " |"]
    rows.append("|" + "---|" * (3 + 2 * sum(n in summary["cnn"] for n in SPLITS)))
    for kind in ("cnn", "dnn"):
        s = summary[kind]
        cells = [kind.upper(), f"{s['params']:,}", f"{s['seconds_per_epoch']:.1f}"]
        for n in SPLITS:
            if n in s:
                cells += [f"{s[n]['accuracy']:.4f}", f"{s[n]['macro_f1']:.4f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    run_stage(main)
