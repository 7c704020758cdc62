"""The `ferpipe` console script: one line per subcommand in `ferpipe --help`, each
subcommand's own options in `ferpipe SUBCOMMAND --help`."""
import sys

COMMANDS = {
    "classify": "say what the faces in photos, folders, videos or a webcam feel (the release "
                "or models/cnn.pt)",
    "compare": "the experiments side by side in this terminal's width, changed params first "
               "(dvc exp show underneath)",
}
USAGE = "usage: ferpipe {classify,compare} ... (ferpipe SUBCOMMAND --help for its options)"


def help_text():
    width = max(map(len, COMMANDS))
    return "\n".join([USAGE, "", "FER2013 emotion classifier: use the model, compare experiments.",
                      "", "subcommands:",
                      *(f"  {name.ljust(width)}  {text}" for name, text in COMMANDS.items())])


COMPARE_HELP = """usage: ferpipe compare [dvc exp show options]

Shows the experiments of this repository side by side: `dvc exp show --only-changed` without
DVCLive's step values, the creation time and the dependency hashes, drawn in this terminal's
width with the changed params first; metric columns that do not fit are named below the table.
Other options are passed on to `dvc exp show` (for example `-n 5`, `--all-commits`); with
--json, --csv or --md its own output is printed unchanged."""


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv else (None, [])
    if command == "classify":
        from ferpipe.use import classify

        return classify.main(rest)
    if command == "compare":
        if rest[:1] in (["-h"], ["--help"]):
            print(COMPARE_HELP)
            sys.exit(0)
        from ferpipe.tools import compare

        sys.exit(compare.compare(rest))
    if command in ("-h", "--help"):
        print(help_text())
        sys.exit(0)
    print(help_text(), file=sys.stderr)
    problem = "no subcommand given" if command is None else f"unknown subcommand {command!r}"
    print(f"\nferpipe: {problem}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
