"""Stage check_params: every section of params.yaml, and the rules that tie sections
together, checked before any other stage runs. DVC removes a stage's outputs right before it
runs the stage, so a value refused by the stage that reads it comes too late; every stage
depends on this one's record, whose bytes do not change with the values, so a change still
re-runs only the stages that declare the changed section. On a refusal the error says how to
put params.yaml back."""
from ferpipe import files, paramcheck, params, paths, runtime
from ferpipe.data import forms, split
from ferpipe.errors import FerPipeError, run_stage
from ferpipe.evaluation import scores
from ferpipe.explanations import filters, saliency
from ferpipe.model import infer, networks
from ferpipe.training import selftrain, train
from ferpipe.use import export

OUT_CHECKED = paths.PARAMS_CHECKED


def main():
    try:
        p = params.load({"prepare": forms.PREPARE_SCHEMA, "split": split.SCHEMA,
                         "cnn": networks.CNN_SCHEMA, "ensemble": networks.ENSEMBLE_SCHEMA,
                         "dnn": networks.DNN_SCHEMA, "train": train.SCHEMA, "infer": infer.SCHEMA,
                         "evaluate": scores.SCHEMA, "export": export.SCHEMA,
                         "saliency": saliency.SCHEMA, "filters": filters.SCHEMA,
                         "self_train": selftrain.SCHEMA})
        # runtime changes speed only and no stage declares it, this one included (a change
        # there re-runs nothing); it is checked whenever another section changes.
        paramcheck.across_sections(p, runtime.load())
    except FerPipeError as err:
        raise FerPipeError(f"{err}\n{paramcheck.how_to_restore()}") from None
    for note in paramcheck.notes(p):
        print(f"check_params: note: {note}", flush=True)
    files.write_json(OUT_CHECKED, paramcheck.RECORD)
    print(f"check_params: params.yaml passed ({len(p)} sections and runtime)", flush=True)


if __name__ == "__main__":
    run_stage(main)
