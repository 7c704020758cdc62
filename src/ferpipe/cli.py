"""The `ferpipe` console script: `ferpipe classify ...` runs ferpipe.use.classify (also
`python -m ferpipe.use.classify ...`); `ferpipe compare [more dvc exp show options]` runs the
experiment table that fits a terminal (live.COMPARE)."""
import shlex
import subprocess
import sys

USAGE = ("usage: ferpipe classify PATH... [options]   (ferpipe classify --help for the options)\n"
         "       ferpipe compare [dvc exp show options]   (the experiments, only what people compare)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "classify":
        from ferpipe.use import classify

        return classify.main(argv[1:])
    if argv and argv[0] == "compare":
        from ferpipe.training import live

        cmd = [*live.COMPARE, *argv[1:]]
        print("$ " + shlex.join(cmd), flush=True)
        sys.exit(subprocess.run(cmd).returncode)
    print(USAGE, file=sys.stderr)
    sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)


if __name__ == "__main__":
    main()
