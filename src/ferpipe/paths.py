"""Every file the stages pass to one another, named once.

dvc.yaml spells these paths too; tests/test_wiring.py checks that each stage's IN_/OUT_
constants (taken from here) match its `deps` and `outs`, so the two cannot drift apart.
"""
# metrics/*.json are what dvc.yaml declares as metrics: the few figures `dvc exp show` and
# `dvc metrics diff` compare. metrics/detail/*.json are the stages' full records (per class,
# per TTA mode, data counts, run-time facts): outputs, not metrics, so they stay out of
# those tables; `dvc metrics show metrics/detail/evaluate.json` still reads one.
DETAIL = "metrics/detail"
KINDS = ("cnn", "dnn")        # the two networks the study compares
EVAL_SPLITS = ("val", "test", "private")

# check_params' record that params.yaml passed: its bytes never change, so every stage can
# depend on it (and so run after the check) without re-running when another section changes.
PARAMS_CHECKED = f"{DETAIL}/params_check.json"

PREPARED = "data/prepared/faces.npz"
DATA_METRICS = f"{DETAIL}/data.json"
CLASS_DISTRIBUTION = "plots/class_distribution.png"
DUPLICATES_FIGURE = "plots/duplicates.png"

SPLITS = "data/splits.npz"
SPLIT_METRICS = f"{DETAIL}/split.json"

MODEL = {kind: f"models/{kind}.pt" for kind in KINDS}
TRAIN_METRICS = {kind: f"metrics/train_{kind}.json" for kind in KINDS}
HISTORY = {kind: f"plots/train_{kind}.csv" for kind in KINDS}
LAYER_TABLE = {kind: f"plots/{kind}_summary.txt" for kind in KINDS}
RESUME = {kind: f"checkpoints/{kind}.resume.pt" for kind in KINDS}
# DVCLive's folder per training stage (live.py): step files under plots/, summary metrics.json.
LIVE = {"cnn": "dvclive/train_cnn", "dnn": "dvclive/train_dnn", "self_train": "dvclive/self_train"}
LIVE_STEPS = {name: f"{folder}/plots" for name, folder in LIVE.items()}
LIVE_SUMMARY = {name: f"{folder}/metrics.json" for name, folder in LIVE.items()}

EVALUATE_METRICS = "metrics/evaluate.json"
EVALUATE_DETAIL = f"{DETAIL}/evaluate.json"
PER_CLASS = f"{DETAIL}/evaluate_per_class.json"
COMPARISON = "plots/comparison.md"
TRAINING_CURVES = "plots/training_curves.png"
RELIABILITY = "plots/reliability_cnn.png"
# What evaluate learned about models/cnn.pt (the temperature fitted on validation, the
# accuracy and calibration error it measured), tied to it by its sha256: train_cnn owns the
# checkpoint, so the temperature travels beside it.
CALIBRATION = "models/calibration.json"


def confusion(kind, split, suffix):
    """The confusion matrix of one network on one split: its rows (.csv) or picture (.png)."""
    return f"plots/confusion_{kind}_{split}.{suffix}"


MISCLASSIFIED = {kind: f"plots/misclassified_{kind}_val.png" for kind in KINDS}

PREDICTIONS = "predictions.csv"

# The export stage's CNN as ONNX, its PyTorch weights (for Grad-CAM) and its model card: a
# DVC output of this run, like models/cnn.pt.
EXPORT_ONNX = "models/export/fer_cnn.onnx"
EXPORT_WEIGHTS = "models/export/fer_cnn.pt"
EXPORT_CARD = "models/export/model_card.json"

# The release: the same three files from the long-trained recipe (release/recipe.yaml, `make
# release`), committed in git, so a fresh clone classifies and explains; classify's default.
RELEASE_ONNX = "release/fer_cnn.onnx"
RELEASE_WEIGHTS = "release/fer_cnn.pt"
RELEASE_CARD = "release/model_card.json"
RELEASE_RECIPE = "release/recipe.yaml"
RELEASE_BUILD = "build/release"  # the clone `make release` trains in (git-ignored)

SALIENCY_FACES = "plots/saliency_faces.png"
SALIENCY_CNN_VS_DNN = "plots/saliency_cnn_vs_dnn.png"
SALIENCY_CLASS_AVERAGE = "plots/saliency_class_average.png"
SALIENCY_METRICS = f"{DETAIL}/saliency.json"

FILTERS_FROM_NOISE = "plots/filters_from_noise.png"
FILTERS_FROM_FACE = "plots/filters_from_face.png"
FEATURE_MAPS = "plots/feature_maps.png"
CONV1_KERNELS = "plots/conv1_kernels.png"
DNN_WEIGHTS = "plots/dnn_first_layer.png"
FILTERS_METRICS = f"{DETAIL}/filters.json"

SELF_TRAIN_MODEL = "models/self_train.pt"
SELF_TRAIN_METRICS = "metrics/self_train.json"
SELF_TRAIN_DETAIL = f"{DETAIL}/self_train.json"
SELF_TRAIN_ROUNDS = "plots/self_train.csv"
SELF_TRAIN_RESUME = "checkpoints/self_train"  # + .round<r>.resume.pt
