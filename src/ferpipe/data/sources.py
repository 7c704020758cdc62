"""Where the raw bytes come from: a folder, a zip or a tar archive, or one gzip-compressed
CSV, with the safety rules.

A source lists its entries (regular files, by their path inside it) and reads them into
memory; nothing is ever extracted to disk. What forms.py then makes of the entries, which
form they are and how they parse, is not decided here.

The rules, the same for every source:
  * an archive entry whose path is absolute or climbs out with `..` is refused, and so is
    a link inside an archive: nothing is extracted, but such entries are the signs of a
    crafted archive, so they are refused rather than guessed at;
  * a symbolic link inside the raw folder that points outside it is refused: following it
    would let a planted link make prepare read (and report on) any file on the machine.
    The raw path the user names in params is trusted, link or not;
  * an archive may hold at most `max_entries` entries and unpack to at most `max_bytes`,
    checked on what its headers claim before anything is read, and for tar and a .csv.gz
    (whose header claims nothing reliable) on the bytes actually decompressed;
  * junk that other systems add to archives and folders (__MACOSX/, AppleDouble ._* files,
    .DS_Store, Thumbs.db, desktop.ini) is skipped and counted, never an error.
Refusals are (file, place, problem) triples, like the row problems of forms.py, so that
prepare.on_error decides whether they stop the stage.
"""
import bz2
import contextlib
import gzip
import lzma
import os
import re
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from ferpipe.errors import FerPipeError

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".csv.gz")
JUNK_FILES = (".ds_store", "thumbs.db", "desktop.ini")
HEAD_BYTES = 65536  # enough for any header line; CSVs are told apart by their headers


def is_archive(name):
    return str(name).lower().endswith(ARCHIVE_SUFFIXES)


def is_junk(path):
    """Files other systems add beside the data: macOS resource forks and folder settings,
    Windows thumbnails and folder settings."""
    parts = PurePosixPath(path).parts
    return ("__MACOSX" in parts or parts[-1].startswith("._")
            or parts[-1].lower() in JUNK_FILES)


def escapes(name):
    """An archive path that is absolute (/x, C:x) or climbs out of the archive's folder."""
    return (name.startswith("/") or ".." in PurePosixPath(name).parts
            or re.match(r"^[A-Za-z]:", name) is not None)


class Limits:
    def __init__(self, max_bytes=2_000_000_000, max_entries=100_000):
        self.max_bytes, self.max_entries = max_bytes, max_entries


class Entry:
    """A regular file of a source. `name` is as stored (shown in messages), `path` the
    normalised relative path the forms are recognised by, `ref` the source's handle."""

    def __init__(self, name, size, ref):
        self.name = name
        self.path = PurePosixPath(name.replace("\\", "/")).as_posix()
        self.size = size
        self.ref = ref
        self.head = None


class Source:
    """Base: `entries` (sorted by path), `refused` (file, place, problem), `junk` count."""

    kind = None

    def __init__(self, shown):
        self.shown = Path(shown)  # the path as the user wrote it, for messages
        self.entries, self.refused, self.junk = [], [], 0

    def locate(self, entry):
        """(file, place) naming the entry in messages; place is None for a file on disk."""
        return str(self.shown), f"entry {entry.name!r}"

    def label(self, entry):
        file, place = self.locate(entry)
        return f"{file}: {place}" if place else file

    def read(self, entries):
        """Yield (entry, bytes, None) or (entry, None, problem) for each entry, in order."""
        raise NotImplementedError

    def read_head(self, entry):
        """The entry's first HEAD_BYTES (b"" when they cannot be read: reading the whole
        entry later reports why)."""
        raise NotImplementedError

    def head(self, entry):
        if entry.head is None:
            entry.head = self.read_head(entry)
        return entry.head

    def close(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _refuse(self, place, problem):
        self.refused.append((str(self.shown), place, problem))

    def _too_many(self, n):
        raise FerPipeError(f"{self.shown}: holds {n} entries or more, over the limit of "
                           f"{self.limits.max_entries} (prepare.max_archive_entries); refusing "
                           "to read it (a crafted archive?)")

    def _too_big(self, n, claimed=True):
        how = "its headers claim" if claimed else "it decompresses to"
        raise FerPipeError(f"{self.shown}: {how} {n} bytes or more uncompressed, over the limit "
                           f"of {self.limits.max_bytes} (prepare.max_archive_bytes); refusing "
                           "to read it (a decompression bomb?)")


# ---------------------------------------------------------------- folders

class FolderSource(Source):
    """The files under `root`. With `only`, just those names directly in root: the file the
    user named and its siblings, without walking a folder that may be their Downloads."""

    kind = "folder"

    def __init__(self, root, only=None, trusted=None):
        super().__init__(root)
        self.root = Path(root).resolve()  # links in the path the user named are theirs
        if only is None:
            self._walk()
        else:
            for name in only:
                self._add(self.root / name, name, trusted=(name == trusted))
        self.entries.sort(key=lambda e: e.path)

    def locate(self, entry):
        return str(self.shown / entry.name), None

    def include(self, name):
        """Add the file `name` directly in root (under the link rule); return its entry, or
        None if it was refused."""
        before = len(self.entries)
        self._add(self.root / name, name)
        return self.entries[-1] if len(self.entries) > before else None

    def _walk(self):
        for folder, dirs, names in os.walk(self.root, followlinks=False):
            here = Path(folder)
            for d in sorted(dirs):
                rel = (here / d).relative_to(self.root).as_posix()
                if is_junk(rel):
                    dirs.remove(d)
                    self.junk += sum(len(f) for _, _, f in os.walk(here / d))
                elif (here / d).is_symlink():
                    dirs.remove(d)  # os.walk would not descend anyway; say why it is left out
                    self._check_link(here / d, rel)
            for name in sorted(names):
                rel = (here / name).relative_to(self.root).as_posix()
                self._add(here / name, rel)

    def _check_link(self, path, rel):
        """Return True if a symbolic link may be followed, else refuse it."""
        shown = self.shown / rel
        try:
            target = path.resolve()
        except (OSError, RuntimeError):  # a loop of links
            self.refused.append((str(shown), "symbolic link", "cannot be resolved (a loop?)"))
            return False
        if not target.is_relative_to(self.root):
            self.refused.append((str(shown), "symbolic link", (
                f"points to {os.readlink(path)}, outside {self.shown}; refused, since a link "
                f"could make prepare read any file on this machine: copy the file into "
                f"{self.shown} instead (make data copies the shared FER2013 archive)")))
            return False
        if target.is_dir():
            self.refused.append((str(shown), "symbolic link", "points to a folder; links to "
                                 "folders are not followed (the faces would be read twice)"))
            return False
        return True

    def _add(self, path, rel, trusted=False):
        if is_junk(rel):
            self.junk += 1
            return
        if path.is_symlink() and not trusted and not self._check_link(path, rel):
            return
        try:
            st = path.stat()
        except OSError as err:
            self.refused.append((str(self.shown / rel), "file", f"cannot be read: "
                                 f"{err.strerror or err}"))
            return
        if not stat.S_ISREG(st.st_mode):  # a FIFO or a device would block or never end
            self.refused.append((str(self.shown / rel), "file", "is not a regular file"))
            return
        self.entries.append(Entry(rel, st.st_size, path))

    def read_head(self, entry):
        try:
            with open(entry.ref, "rb") as f:
                return f.read(HEAD_BYTES)
        except OSError:
            return b""

    def read(self, entries):
        for e in entries:
            try:
                yield e, e.ref.read_bytes(), None
            except OSError as err:
                yield e, None, f"cannot be read: {err.strerror or err}"


# ---------------------------------------------------------------- zip

def _zip_claimed_entries(path):
    """The entry count the end-of-central-directory record claims (zip64 too), read before
    zipfile parses the whole directory into memory; None if there is no such record."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 22 - 65535))  # the record, then a comment of up to 64 KiB
        tail = f.read()
        at = tail.rfind(b"PK\x05\x06")
        if at < 0 or len(tail) - at < 22:
            return None
        count = int.from_bytes(tail[at + 10:at + 12], "little")
        if count == 0xFFFF and at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07":
            f.seek(int.from_bytes(tail[at - 12:at - 4], "little"))
            record = f.read(56)
            if record[:4] == b"PK\x06\x06" and len(record) == 56:
                count = int.from_bytes(record[32:40], "little")
        return count


# bad CRC, encrypted, unknown compression method, cut short
_ZIP_ERRORS = (zipfile.BadZipFile, RuntimeError, NotImplementedError, OSError, EOFError,
               ValueError, zlib.error)


class ZipSource(Source):
    kind = "zip"

    def __init__(self, path, limits, shown=None):
        super().__init__(shown or path)
        self.limits = limits
        try:
            claimed = _zip_claimed_entries(path)
            if claimed is not None and claimed > limits.max_entries:
                self._too_many(claimed)
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise FerPipeError(f"{self.shown}: not a readable zip archive: {err}") from None
        infos = self.zip.infolist()
        if len(infos) > limits.max_entries:
            self.zip.close()
            self._too_many(len(infos))
        total = sum(i.file_size for i in infos)
        if total > limits.max_bytes:
            self.zip.close()
            self._too_big(total)
        for info in infos:
            if info.is_dir():
                continue
            name = info.filename
            if escapes(name.replace("\\", "/")):
                self._refuse(f"entry {name!r}", "the path escapes the archive's folder")
            elif is_junk(name.replace("\\", "/")):
                self.junk += 1
            elif stat.S_ISLNK(info.external_attr >> 16):
                self._refuse(f"entry {name!r}", "is a symbolic link; links in archives are "
                             "not followed")
            else:
                self.entries.append(Entry(name, info.file_size, info))
        self.entries.sort(key=lambda e: e.path)

    def close(self):
        self.zip.close()

    def _read(self, entry, n=-1):
        # zipfile stops at the size the directory claims, so a lying entry cannot unpack
        # to more than was checked against the limit above.
        with self.zip.open(entry.ref) as f:
            return f.read(n)

    def read_head(self, entry):
        try:
            return self._read(entry, HEAD_BYTES)
        except _ZIP_ERRORS:  # reading the whole entry later names the problem
            return b""

    def read(self, entries):
        for e in entries:
            try:
                yield e, self._read(e), None
            except _ZIP_ERRORS as err:
                yield e, None, f"cannot be read from the archive: {err}"


# ---------------------------------------------------------------- tar

class _Counted:
    """A read-only stream that stops once more than `limit` bytes have come out of it: the
    tar headers' sizes are checked, but long-name and pax headers are read whole by tarfile
    before we see them, so the decompressed stream itself is bounded too."""

    def __init__(self, raw, limit, on_over):
        self.raw, self.limit, self.on_over, self.count = raw, limit, on_over, 0

    def read(self, n=-1):
        if n is None or n < 0:
            n = self.limit - self.count + 1
        data = self.raw.read(n)
        self.count += len(data)
        if self.count > self.limit:
            self.on_over(self.count)
        return data

    def close(self):
        self.raw.close()


_TAR_ERRORS = (tarfile.TarError, OSError, EOFError, zlib.error, lzma.LZMAError, ValueError)


class TarSource(Source):
    """A tar, plain or gzip-, bzip2- or xz-compressed, read as a stream: once to list it,
    once more to read the entries wanted (a compressed tar cannot be read at random)."""

    kind = "tar"

    def __init__(self, path, limits, shown=None):
        super().__init__(shown or path)
        self.path, self.limits = Path(path), limits
        total = 0
        try:
            with self._open() as tf:
                for i, m in enumerate(tf):
                    if i + 1 > limits.max_entries:
                        self._too_many(i + 1)
                    total += m.size if m.isfile() else 0
                    if total > limits.max_bytes:
                        self._too_big(total)
                    if not m.isdir():
                        self._member(tf, i, m)
        except _TAR_ERRORS as err:
            raise FerPipeError(f"{self.shown}: not a readable tar archive: "
                               f"{err or type(err).__name__}") from None
        self.entries.sort(key=lambda e: e.path)

    @contextlib.contextmanager
    def _open(self):
        with open(self.path, "rb") as f:
            magic = f.read(6)
        if magic[:2] == b"\x1f\x8b":
            raw = gzip.open(self.path, "rb")
        elif magic[:3] == b"BZh":
            raw = bz2.open(self.path, "rb")
        elif magic == b"\xfd7zXZ\x00":
            raw = lzma.open(self.path, "rb")
        else:
            raw = open(self.path, "rb")
        stream = _Counted(raw, self.limits.max_bytes, lambda n: self._too_big(n, claimed=False))
        try:
            with tarfile.open(fileobj=stream, mode="r|") as tf:
                yield tf
        finally:
            raw.close()  # tarfile leaves a stream it was handed open

    def _member(self, tf, index, m):
        name, place = m.name, f"entry {m.name!r}"
        if escapes(name):
            self._refuse(place, "the path escapes the archive's folder")
        elif is_junk(name):
            self.junk += 1
        elif m.issym() or m.islnk():
            self._refuse(place, f"is a link to {m.linkname!r}; links in archives are not "
                         "followed")
        elif not m.isfile():
            self._refuse(place, "is not a regular file (a device or FIFO entry)")
        else:
            entry = Entry(name, m.size, index)
            if entry.path.lower().endswith(".csv"):
                entry.head = tf.extractfile(m).read(HEAD_BYTES)  # now: the stream moves on
            self.entries.append(entry)

    def read_head(self, entry):
        return b""  # heads of CSVs were read while listing; others are never asked for

    def read(self, entries):
        wanted = {e.ref for e in entries}
        blobs = {}
        if wanted:
            try:
                with self._open() as tf:
                    for i, m in enumerate(tf):
                        if i in wanted:
                            blobs[i] = tf.extractfile(m).read()
                            if len(blobs) == len(wanted):
                                break
            except _TAR_ERRORS as err:
                raise FerPipeError(f"{self.shown}: cannot be read to the end: "
                                   f"{err or type(err).__name__}") from None
        # In name order, as from a zip or a folder, so every source gives the same arrays.
        for e in entries:
            yield e, blobs[e.ref], None


# ---------------------------------------------------------------- one gzip-compressed CSV

_GZIP_ERRORS = (OSError, EOFError, zlib.error)  # gzip.BadGzipFile is an OSError


class GzipSource(Source):
    """fer2013.csv.gz: one entry, the CSV, named by the file without its .gz. Decompressed in
    memory, never past max_bytes + 1: gzip's own size field is the size modulo 4 GiB, so
    only the bytes that come out can be trusted."""

    kind = "gzip"

    def __init__(self, path, limits, shown=None):
        super().__init__(shown or path)
        self.path, self.limits = Path(path), limits
        entry = Entry(self.shown.name[:-len(".gz")], None, None)
        try:
            entry.head = self._read(HEAD_BYTES)
        except _GZIP_ERRORS as err:
            raise FerPipeError(f"{self.shown}: not a readable gzip file: "
                               f"{err or type(err).__name__}") from None
        self.entries.append(entry)

    def locate(self, entry):
        return str(self.shown), None  # one file: rows are named by it, as a plain CSV's

    def _read(self, n):
        """Up to n decompressed bytes, in blocks: one read(n) would ask for n at once."""
        parts, count = [], 0
        with gzip.open(self.path, "rb") as f:
            while count < n:
                block = f.read(min(1 << 20, n - count))
                if not block:
                    break
                parts.append(block)
                count += len(block)
                if count > self.limits.max_bytes:
                    self._too_big(count, claimed=False)
        return b"".join(parts)

    def read_head(self, entry):
        return entry.head

    def read(self, entries):
        for e in entries:
            try:
                yield e, self._read(self.limits.max_bytes + 1), None
            except _GZIP_ERRORS as err:
                yield e, None, f"not a readable gzip file: {err or type(err).__name__}"


def open_archive(path, limits, shown=None):
    name = str(path).lower()
    if name.endswith(".zip"):
        return ZipSource(path, limits, shown)
    if name.endswith(".csv.gz"):
        return GzipSource(path, limits, shown)
    return TarSource(path, limits, shown)
