"""The project's own error type and the wrapper that turns it into a clean exit."""
import sys


class FerPipeError(Exception):
    """A problem with the user's data, files or params, phrased for the user."""


def run_stage(main):
    """Run a stage's main(); a FerPipeError becomes one readable line and exit status 2."""
    try:
        main()
    except FerPipeError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
