"""Stage saliency: where the CNN looks. Vanilla gradient, SmoothGrad and Grad-CAM maps on
chosen validation faces, the same faces through the DNN, and class-average maps over the
whole validation split."""
from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.explanations import saliency
from ferpipe.explanations.figures import (
    class_average_figure,
    model_comparison_figure,
    saliency_faces_figure,
)
from ferpipe.explanations.probe import Subject
from ferpipe.files import save_figure, write_json
from ferpipe.model import networks

IN_SPLITS = paths.SPLITS
IN_CNN = paths.MODEL["cnn"]
IN_DNN = paths.MODEL["dnn"]
OUT_FACES = paths.SALIENCY_FACES
OUT_CNN_VS_DNN = paths.SALIENCY_CNN_VS_DNN
OUT_CLASS_AVERAGE = paths.SALIENCY_CLASS_AVERAGE
OUT_METRICS = paths.SALIENCY_METRICS


def main():
    p = params.load({"saliency": saliency.SCHEMA})
    sal = saliency.SaliencyConfig.from_params(p["saliency"])
    splits = files.load_npz(IN_SPLITS, "data splits")
    # Gradients stay in fp32 (bf16 would blur small saliency values); threads and device
    # come from the runtime section.
    device = runtime.setup(runtime.load()).device
    cnn, cnn_ckpt = networks.load(IN_CNN, device)
    cnn = networks.single(cnn)  # an ensemble is explained through its first network
    dnn, dnn_ckpt = networks.load(IN_DNN, device)
    res = saliency.saliency_study(Subject(cnn, cnn_ckpt["input_size"]),
                                  Subject(dnn, dnn_ckpt["input_size"]), splits["val_x"],
                                  splits["val_y"], sal)
    save_figure(OUT_FACES, saliency_faces_figure(res))
    save_figure(OUT_CNN_VS_DNN, model_comparison_figure(res))
    save_figure(OUT_CLASS_AVERAGE, class_average_figure(res))
    metrics = saliency.saliency_metrics(res)
    write_json(OUT_METRICS, metrics)
    print(f"saliency: {metrics['faces_shown']} faces explained, class averages over "
          f"{len(splits['val_y'])} validation faces; Grad-CAM at {res['gradcam_layer']}; "
          f"wrote {OUT_FACES}, {OUT_CNN_VS_DNN}, {OUT_CLASS_AVERAGE}", flush=True)


if __name__ == "__main__":
    run_stage(main)
