"""Stage prepare: read the raw FER2013 data in whichever form it comes, validate every row
and image, and write one compact array file plus counts and a class-distribution chart."""
from ferpipe import data, params, plots
from ferpipe.errors import run_stage
from ferpipe.files import save_figure, save_npz, write_json

OUT_DATA = "data/prepared/faces.npz"
OUT_METRICS = "metrics/data.json"
OUT_PLOT = "plots/class_distribution.png"


def main():
    p = params.load({"prepare": data.PREPARE_SCHEMA})["prepare"]
    arrays, report = data.read_raw(p["raw"], p["on_error"], p["max_image_pixels"],
                                   p["max_archive_bytes"], p["max_archive_entries"])
    print(f"prepare: {report['faces']} faces from {report['form']} ({', '.join(report['files'])}); "
          f"{report['skipped']} skipped, {report['converted_rgb']} converted from colour, "
          f"{report['resized']} resized; {report['junk_skipped']} junk files skipped, "
          f"{report['float_labels']} float labels, {report['whitespace_stripped']} fields "
          f"stripped of whitespace, {report['quoted_fields']} quoted", flush=True)
    save_npz(OUT_DATA, **arrays)
    write_json(OUT_METRICS, report)
    save_figure(OUT_PLOT, plots.class_distribution(report["counts"]))


if __name__ == "__main__":
    run_stage(main)
