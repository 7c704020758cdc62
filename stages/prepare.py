"""Stage prepare: read the raw FER2013 data in whichever form it comes, validate every row
and image, find duplicate faces, and write one compact array file (with each face's
duplicate group) plus counts, a class-distribution chart and a figure of duplicate groups."""
import time

from ferpipe import files, params, paths, plots
from ferpipe.data import duplicates, forms
from ferpipe.errors import run_stage

OUT_DATA = paths.PREPARED
OUT_METRICS = paths.DATA_METRICS
OUT_PLOT = paths.CLASS_DISTRIBUTION
OUT_DUPLICATES_PLOT = paths.DUPLICATES_FIGURE


def main():
    p = forms.PrepareConfig.from_params(params.load({"prepare": forms.PREPARE_SCHEMA})["prepare"])
    arrays, report = forms.read_raw(p.raw, p.on_error, p.max_image_pixels, p.max_archive_bytes,
                                   p.max_archive_entries)
    print(f"prepare: {report['faces']} faces from {report['form']} ({', '.join(report['files'])}); "
          f"{report['skipped']} skipped, {report['converted_rgb']} converted from colour, "
          f"{report['resized']} resized; {report['junk_skipped']} junk files skipped, "
          f"{report['float_labels']} float labels, {report['whitespace_stripped']} fields "
          f"stripped of whitespace, {report['quoted_fields']} quoted", flush=True)
    t0 = time.perf_counter()
    arrays, group, report["duplicates"], rows = duplicates.study(arrays, p.near_duplicates,
                                                                 p.dedupe)
    # Printed, not recorded: the outputs stay byte-identical when the data has not changed.
    print(f"prepare: duplicates searched in {time.perf_counter() - t0:.2f} s", flush=True)
    if p.dedupe == "drop_from_train":
        # faces and counts describe the file written, the duplicate counts the data as read.
        report["faces"], report["counts"] = int(len(arrays["labels"])), forms.count_by_usage(arrays)
    print(duplicates.summary(report["duplicates"]), flush=True)
    files.save_npz(OUT_DATA, **arrays, group=group)
    files.write_outputs({
        OUT_METRICS: report, OUT_PLOT: plots.class_distribution(report["counts"]),
        OUT_DUPLICATES_PLOT: (plots.face_rows(rows, "Duplicate faces: example groups") if rows
                              else plots.message("No duplicate faces found"))})


if __name__ == "__main__":
    run_stage(main)
