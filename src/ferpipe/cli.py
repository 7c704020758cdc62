"""The `ferpipe` console script: `ferpipe classify ...` runs ferpipe.classify (also
`python -m ferpipe.classify ...`)."""
import sys

USAGE = "usage: ferpipe classify PATH... [options]   (ferpipe classify --help for the options)"


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] != "classify":
        print(USAGE, file=sys.stderr)
        sys.exit(0 if argv and argv[0] in ("-h", "--help") else 2)
    from . import classify

    classify.main(argv[1:])


if __name__ == "__main__":
    main()
