"""Stage prepare: read the raw FER2013 data in whichever form it comes, validate every row
and image, find duplicate faces, and write one compact array file (with each face's
duplicate group) plus counts, a class-distribution chart and a figure of duplicate groups."""
from ferpipe import data, duplicates, params, plots
from ferpipe.errors import run_stage
from ferpipe.files import save_figure, save_npz, write_json

OUT_DATA = "data/prepared/faces.npz"
OUT_METRICS = "metrics/data.json"
OUT_PLOT = "plots/class_distribution.png"
OUT_DUPLICATES_PLOT = "plots/duplicates.png"


def main():
    p = params.load({"prepare": data.PREPARE_SCHEMA})["prepare"]
    arrays, report = data.read_raw(p["raw"], p["on_error"], p["max_image_pixels"])
    print(f"prepare: {report['faces']} faces from {report['form']} ({', '.join(report['files'])}); "
          f"{report['skipped']} skipped, {report['converted_rgb']} converted from colour, "
          f"{report['resized']} resized", flush=True)
    group, exact, info = duplicates.find_groups(arrays["images"], p["near_duplicates"])
    dup = duplicates.report(group, exact, arrays, info)
    # The figure shows the data as read, before any face is dropped.
    rows = duplicates.example_groups(group, exact, arrays)
    dup["dedupe"] = p["dedupe"]
    if p["dedupe"] == "drop_from_train":
        arrays, group, dup["dropped_from_train"] = duplicates.drop_from_train(arrays, group)
        # faces and counts describe the file written, the duplicate counts the data as read.
        report["faces"] = int(len(arrays["labels"]))
        report["counts"] = data.count_by_usage(arrays)
    report["duplicates"] = dup
    print(duplicates.summary(dup), flush=True)
    save_npz(OUT_DATA, **arrays, group=group)
    write_json(OUT_METRICS, report)
    save_figure(OUT_PLOT, plots.class_distribution(report["counts"]))
    save_figure(OUT_DUPLICATES_PLOT,
                plots.face_rows(rows, "Duplicate faces: example groups") if rows
                else plots.message("No duplicate faces found"))


if __name__ == "__main__":
    run_stage(main)
