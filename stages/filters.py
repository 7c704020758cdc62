"""Stage filters: what the CNN's filters respond to. Gradient ascent on the input (from
noise, for two objectives, and from a real face) for the first filters of chosen layers,
the feature maps of one face, the first convolution's kernels and the DNN's first-layer
weights as images."""
from ferpipe import files, params, paths, runtime
from ferpipe.errors import run_stage
from ferpipe.explanations import filters
from ferpipe.explanations.figures import (
    dnn_weights_figure,
    face_trajectory_figure,
    feature_maps_figure,
    filters_figure,
    kernels_figure,
)
from ferpipe.files import save_figure, write_json
from ferpipe.model import networks

IN_SPLITS = paths.SPLITS
IN_CNN = paths.MODEL["cnn"]
IN_DNN = paths.MODEL["dnn"]
OUT_FROM_NOISE = paths.FILTERS_FROM_NOISE
OUT_FROM_FACE = paths.FILTERS_FROM_FACE
OUT_FEATURE_MAPS = paths.FEATURE_MAPS
OUT_KERNELS = paths.CONV1_KERNELS
OUT_DNN_WEIGHTS = paths.DNN_WEIGHTS
OUT_METRICS = paths.FILTERS_METRICS


def main():
    ascent = filters.FiltersConfig.from_params(params.load({"filters": filters.SCHEMA})["filters"])
    splits = files.load_npz(IN_SPLITS, "data splits")
    # Gradients stay in fp32 (bf16 would blur small saliency values); threads and device
    # come from the runtime section.
    device = runtime.setup(runtime.load()).device
    cnn, cnn_ckpt = networks.load(IN_CNN, device)
    cnn = networks.single(cnn)  # an ensemble is explained through its first network
    dnn, _ = networks.load(IN_DNN, device)
    res = filters.filters_study(cnn, cnn_ckpt["input_size"], dnn, splits["val_x"],
                                splits["val_y"], ascent)
    save_figure(OUT_FROM_NOISE, filters_figure(res))
    save_figure(OUT_FROM_FACE, face_trajectory_figure(res))
    save_figure(OUT_FEATURE_MAPS, feature_maps_figure(res))
    save_figure(OUT_KERNELS, kernels_figure(res))
    save_figure(OUT_DNN_WEIGHTS, dnn_weights_figure(res))
    metrics = filters.filters_metrics(res)
    write_json(OUT_METRICS, metrics)
    print("filters: " + "; ".join(
        f"{name}: {m['filters']} filters, centre unit {m['centre']['start']:.2f} -> "
        f"{m['centre']['reached']:.2f} (edge energy {m['centre']['tile_edge']:.3f}), mean "
        f"{m['mean']['start']:.2f} -> {m['mean']['reached']:.2f} (edge energy "
        f"{m['mean']['tile_edge']:.3f}); from the face, RMS distance "
        f"{', '.join(map(str, m['face']['distance']))} at steps "
        f"{', '.join(map(str, m['face']['steps']))}" for name, m in metrics["layers"].items()),
        flush=True)


if __name__ == "__main__":
    run_stage(main)
