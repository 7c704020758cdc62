"""Stage export: models/cnn.pt as one ONNX graph with the temperature evaluate fitted inside
it, checked against PyTorch on the validation faces, and its model card; both go to
release/, which git carries, so a fresh clone classifies without training."""
import json
from pathlib import Path

from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.model import networks
from ferpipe.use import export, release

IN_MODEL = paths.MODEL["cnn"]
IN_CALIBRATION = paths.CALIBRATION
IN_SPLITS = paths.SPLITS
IN_DATA_METRICS = paths.DATA_METRICS
OUT_ONNX = paths.RELEASE_ONNX
OUT_CARD = paths.RELEASE_CARD


def main():
    settings = params.load({"export": export.SCHEMA})["export"]
    rt = runtime.setup(runtime.load())
    model, ckpt = networks.load(IN_MODEL)
    calibration = release.read_calibration(IN_CALIBRATION, IN_MODEL)
    splits = files.load_npz(IN_SPLITS, "data splits", ("train_y", "val_x", "val_y", "test_y"))
    data = json.loads(Path(IN_DATA_METRICS).read_text())
    crop, temperature = ckpt["input_size"], calibration["temperature"]
    graph = export.to_onnx(model, crop, temperature, settings)
    measured = export.parity(model, graph, splits["val_x"], crop, temperature, rt.batch_size)
    export.check_parity(measured, settings["precision"])
    trained_on = {"data": data["form"], "files": data["files"],
                  **{f"{name}_faces": int(len(splits[f"{name}_y"])) for name in ("train", "val", "test")}}
    card = export.card(graph, Path(OUT_ONNX).name, model, ckpt, calibration, measured, settings,
                       trained_on)
    files.write_outputs({OUT_ONNX: graph, OUT_CARD: card})
    print(f"export: wrote {OUT_ONNX} ({len(graph) / 2**20:.2f} MB, {settings['precision']} weights, "
          f"temperature {temperature:.3f}); on {measured['faces']} validation faces labels agree "
          f"with torch on {measured['argmax_agreement']:.4%}, largest probability gap "
          f"{measured['max_abs_diff']:.2e}", flush=True)


if __name__ == "__main__":
    run_stage(main)
