"""Stage split: a stratified, seeded validation set carved from Training, each group of
duplicate faces wholly on one side; PublicTest is the test set, PrivateTest (when present) a
second one, unlabelled faces are kept for predict. Test faces with a copy in Training are
marked (test_seen, private_seen) so their share of a test score can be told apart."""
from ferpipe import params, paths
from ferpipe.data import split
from ferpipe.errors import run_stage
from ferpipe.files import save_npz, write_json

IN_DATA = paths.PREPARED
OUT_SPLITS = paths.SPLITS
OUT_METRICS = paths.SPLIT_METRICS


def main():
    cfg = split.SplitConfig.from_params(params.load({"split": split.SCHEMA})["split"])
    splits = split.carve(split.load_prepared(IN_DATA), cfg.val_fraction, cfg.seed, IN_DATA)
    counts = split.split_counts(splits)
    for name in ("test", "private"):
        counts[name]["seen_in_training"] = int(splits[f"{name}_seen"].sum())
    print("split: " + ", ".join(f"{k} {v['total']}" for k, v in counts.items())
          + f"; test faces with a copy in Training: {counts['test']['seen_in_training']}"
          + (f", private {counts['private']['seen_in_training']}" if counts["private"]["total"]
             else ""), flush=True)
    save_npz(OUT_SPLITS, **splits)
    write_json(OUT_METRICS, counts)


if __name__ == "__main__":
    run_stage(main)
