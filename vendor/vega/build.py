"""Rebuild offline.html, DVC's HTML template with vega, vega-lite and vega-embed inlined.

    cd /tmp && npm pack vega@5.33.1 vega-lite@5.23.0 vega-embed@6.29.0
    python vendor/vega/build.py /tmp          # the folder holding the three .tgz

The tarballs and the files taken from them must match the sha256 sums below (and in
README.md): a new version means new sums, written here and there by hand. No network.
"""
import hashlib
import sys
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = HERE / "offline.html"

# (package, version, file inside the tarball, sha256 of the tarball, sha256 of the file),
# in loading order: vega-lite needs vega, vega-embed needs both.
LIBRARIES = [
    ("vega", "5.33.1", "package/build/vega.min.js",
     "1b8504b6731c5311be3269c4d84ca996a5cc293bc772283293ede20c490e16c3",
     "463f3db6a40b20e9747b4ed38f37ed0add508838f9141b1cf8366784b07b30c8"),
    ("vega-lite", "5.23.0", "package/build/vega-lite.min.js",
     "e4cbfdd8f6f1abe381c59cd558fd6a559c12b1496bfdf2e0c3295263a40fe4da",
     "58c27358e26f2d319cf62f45bc17a4c8362f08645001df2ec8d341eee4097c7f"),
    ("vega-embed", "6.29.0", "package/build/vega-embed.min.js",
     "ecf1ee709c2bac9e0a4ead6908114b05b62c71493e10a8a4308109bb070f8eb1",
     "12d02acfbe3ec59ef9a37dd4822a2e04e2961b5bbb671bbe661d2221715b99da"),
]

# dvc-render fills {refresh_tag} and {plot_divs}. {scripts}, where it would put its
# <script src="https://cdn.jsdelivr.net/..."> tags, is left out on purpose.
HEAD = """<!DOCTYPE html>
<html>
<head>
<meta charset="utf-8">
{refresh_tag}
<title>DVC plots (offline)</title>
<style>
  body { font-family: sans-serif; }
  table { border-spacing: 15px; }
</style>
"""
TAIL = """</head>
<body>
{plot_divs}
</body>
</html>
"""
# Strings the libraries must not contain: they would end the <script> element early or be
# replaced by dvc-render's str.replace of its placeholders.
FORBIDDEN = ("</script", "<!--", "{plot_divs}", "{scripts}", "{refresh_tag}")


def sha256(data):
    return hashlib.sha256(data).hexdigest()


def build(tarball_dir):
    parts = [HEAD]
    for name, version, member, tar_sum, file_sum in LIBRARIES:
        tgz = Path(tarball_dir) / f"{name}-{version}.tgz"
        if sha256(tgz.read_bytes()) != tar_sum:
            raise SystemExit(f"{tgz}: sha256 differs from the one recorded in build.py")
        with tarfile.open(tgz) as tar:
            data = tar.extractfile(member).read()
        if sha256(data) != file_sum:
            raise SystemExit(f"{tgz}:{member}: sha256 differs from the one recorded in build.py")
        text = data.decode("utf-8")
        bad = [s for s in FORBIDDEN if s in text.lower()]
        if bad:
            raise SystemExit(f"{name}: contains {bad}; cannot be inlined as is")
        parts.append(f'<script data-library="{name}@{version}" data-sha256="{file_sum}">\n'
                     f"{text}</script>\n")  # byte for byte
    parts.append(TAIL)
    TEMPLATE.write_text("".join(parts), encoding="utf-8")
    return TEMPLATE


if __name__ == "__main__":
    print(build(sys.argv[1] if len(sys.argv) > 1 else "."))
