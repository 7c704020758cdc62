"""Stage export: models/cnn.pt as one ONNX graph with the temperature evaluate fitted inside
it, checked against PyTorch on the validation faces and scored through onnxruntime on the
labelled splits, its PyTorch weights (for Grad-CAM), and its model card; all go to
models/export/. `make release` copies them into release/ from its long-trained run."""
import json
from pathlib import Path

from ferpipe import files, params, paths, runtime
from ferpipe.data import duplicates
from ferpipe.errors import run_stage
from ferpipe.model import networks
from ferpipe.use import export, release

IN_MODEL = paths.MODEL["cnn"]
IN_CALIBRATION = paths.CALIBRATION
IN_SPLITS = paths.SPLITS
IN_DATA_METRICS = paths.DATA_METRICS
OUT_ONNX = paths.EXPORT_ONNX
OUT_WEIGHTS = paths.EXPORT_WEIGHTS
OUT_CARD = paths.EXPORT_CARD


def main():
    settings = export.ExportConfig.from_params(params.load({"export": export.SCHEMA})["export"])
    rt = runtime.setup(runtime.load())
    model, ckpt = networks.load(IN_MODEL)
    calibration = release.read_calibration(IN_CALIBRATION, IN_MODEL)
    splits = files.load_npz(IN_SPLITS, "data splits",
                            ("train_y", "val_x", "val_y", "test_x", "test_y"))
    data = json.loads(Path(IN_DATA_METRICS).read_text())
    crop, temperature = ckpt["input_size"], calibration["temperature"]
    graph = export.to_onnx(model, crop, temperature, settings)
    weights = export.weights(model, ckpt, settings)
    measured = export.parity(model, graph, splits["val_x"], crop, temperature, rt.batch_size)
    export.check_parity(measured, settings.precision)
    # The release's own accuracy: the graph on onnxruntime with the views classify uses by
    # default (the card's tta, which evaluate fitted the temperature under), not evaluate's
    # PyTorch figure, which the card keeps beside it.
    unseen = {name: duplicates.unseen(splits, name, IN_SPLITS) for name in ("test", "private")
              if len(splits.get(f"{name}_y", ())) > 0}
    accuracy = export.release_accuracy(graph, splits, crop, calibration["tta"], rt.batch_size,
                                       unseen)
    trained_on = {"data": data["form"], "files": data["files"],
                  **{f"{name}_faces": int(len(splits[f"{name}_y"])) for name in ("train", "val", "test")}}
    made = export.Exported(graph, Path(OUT_ONNX).name, weights, Path(OUT_WEIGHTS).name, measured,
                           accuracy)
    card = export.card(made, model, ckpt, calibration, settings, trained_on)
    files.write_outputs({OUT_ONNX: graph, OUT_WEIGHTS: weights, OUT_CARD: card})
    print(f"export: wrote {OUT_ONNX} ({len(graph) / 2**20:.2f} MB, {settings.precision} weights, "
          f"temperature {temperature:.3f}) and {OUT_WEIGHTS} ({len(weights) / 2**20:.2f} MB); on "
          f"{measured['faces']} validation faces labels agree with torch on "
          f"{measured['argmax_agreement']:.4%}, largest probability gap "
          f"{measured['max_abs_diff']:.2e}", flush=True)
    for name, scored in accuracy.items():
        in_torch = calibration["accuracy"].get(name, {}).get("accuracy")
        print(f"export: {OUT_ONNX} on onnxruntime, {name}: accuracy {scored['accuracy']:.4f} "
              f"({calibration['tta']}; single crop {scored['single_crop_accuracy']:.4f})"
              + (f"; evaluate's PyTorch figure {in_torch:.4f}" if in_torch is not None else "")
              + (f"; {scored['unseen_accuracy']:.4f} on the {scored['unseen_faces']} faces with "
                 "no copy in Training" if scored.get("unseen_accuracy") is not None else ""),
              flush=True)


if __name__ == "__main__":
    run_stage(main)
