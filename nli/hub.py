"""The registry of downloadable files, and downloading, verifying and extracting them safely.

A download streams into `NAME.part`, resumes with an HTTP Range request after a dropped
connection, retries with backoff what retrying can fix, and becomes `NAME` only once its SHA-1
matches; a file lock keeps two processes from fetching the same file at once. A cached file is
never deleted: one whose SHA-1 is not the entry's is refused, or moved aside when asked. Archives
are unpacked into a temporary directory next to the target and renamed into place after every
path and member is checked.
"""
import contextlib
import dataclasses
import gzip
import json
import os
import re
import shutil
import socket
import stat
import sys
import tarfile
import tempfile
import time
import tomllib
import urllib.parse
import urllib.request
import zipfile
import zlib

import filelock
import requests
from tqdm import tqdm

from .errors import UserError
from .fileio import sha1_of, write_json

DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"  # d2l.DATA_URL
DEV_PAIRS = os.path.join("tests", "data", "snli_1.0_dev_pairs.tsv")  # SNLI's dev split, in the repository

# Each is overridden by its environment variable, read on every download.
RETRIES = 5  # NLI_HUB_RETRIES: failed attempts in a row (without new bytes) allowed after the first
TIMEOUT = 30.0  # NLI_HUB_TIMEOUT: seconds to connect, and to wait for the next bytes
BACKOFF = 1.0  # NLI_HUB_BACKOFF: seconds before the first retry, doubled after each failure
MAX_BACKOFF = 60.0
REACH_TIMEOUT = 3.0  # seconds `nli doctor` waits for a download host
CHUNK_SIZE = 1 << 16
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar", ".gz")  # d2l extracts .tar and .gz with tarfile too
CORRUPT_ARCHIVE = (zipfile.BadZipFile, tarfile.ReadError, tarfile.CompressionError, zlib.error,
                   gzip.BadGzipFile, EOFError)
# No server listens there, or there is no such host: asking again at once gets the same answer.
PERMANENT_NETWORK_ERRORS = (ConnectionRefusedError, socket.gaierror)


@dataclasses.dataclass(frozen=True)
class Entry:
    """One downloadable archive: where it lives, its SHA-1, the members it must contain, and who says so."""
    url: str
    sha1: str
    members: tuple = ()
    manifest: str = None  # the NLI_HUB_MANIFEST file that names this entry; None: the built-in registry

    @property
    def origin(self):
        return f"the manifest {self.manifest}" if self.manifest else "the built-in registry"

    @property
    def file_name(self):
        return self.url.rstrip("/").split("/")[-1]


BUILTIN = {
    "bert.small": Entry(DATA_URL + "bert.small.zip", "a4e718a47137ccd1809c9107ab4f5edd317bae2c",
                        ("bert.small/vocab.json", "bert.small/pretrained.params")),
    "bert.base": Entry(DATA_URL + "bert.base.zip", "7b3820b35da691042e5d34c0971ac3edbd80d3f4",
                       ("bert.base/vocab.json", "bert.base/pretrained.params")),
    "SNLI": Entry("https://nlp.stanford.edu/projects/snli/snli_1.0.zip",
                  "9fcde07509c7e87ec61c640c1b2753d9041758e4",
                  tuple(f"snli_1.0/snli_1.0_{split}.txt" for split in ("train", "dev", "test"))),
}


def data_dir():
    """The download cache, the same from any working directory: `NLI_DATA_DIR`; else the checkout's `data/` when nli
    runs from a source checkout, as the book keeps its data beside its code; else the user's cache directory."""
    if os.environ.get("NLI_DATA_DIR"):
        return os.path.abspath(os.environ["NLI_DATA_DIR"])
    checkout = source_checkout()
    if checkout:
        return os.path.join(checkout, "data")
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return os.path.join(cache if os.path.isabs(cache) else os.path.expanduser("~/.cache"), "nli")  # XDG's rule


def source_checkout():
    """The nli repository this package is imported from (a clone, or `pip install -e`), or None when installed.

    A checkout is the package's parent folder holding the repository's own pyproject.toml, one that names the
    project nli, and data/README.md: an installed nli sits in site-packages, which holds neither, and a project
    that merely vendors nli beside its own pyproject.toml names another project.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        with open(os.path.join(root, "pyproject.toml"), "rb") as f:
            project = tomllib.load(f).get("project", {})
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return root if project.get("name") == "nli" and os.path.isfile(os.path.join(root, "data", "README.md")) else None


def registry():
    """The registry in force: built-in entries, re-based on `NLI_MIRROR`, then `NLI_HUB_MANIFEST`."""
    entries = dict(BUILTIN)
    mirror = os.environ.get("NLI_MIRROR")
    if mirror:
        entries = {name: dataclasses.replace(e, url=mirror.rstrip("/") + "/" + e.file_name)
                   for name, e in entries.items()}
    manifest = os.environ.get("NLI_HUB_MANIFEST")
    if manifest:
        entries.update(_read_manifest(manifest, entries))
    return entries


def _read_manifest(path, known):
    """Entries of a JSON manifest `{name: {"url": ..., "sha1": ...}}`; members default to the known entry's."""
    try:
        with open(path, encoding="utf-8") as f:
            raw = json.load(f)
    except OSError as e:
        raise UserError(f"Cannot read the hub manifest {path} (NLI_HUB_MANIFEST): {e.strerror}.")
    except json.JSONDecodeError as e:
        raise UserError(f"{path}, line {e.lineno}: the hub manifest is not valid JSON ({e.msg}).")
    if not isinstance(raw, dict):
        raise UserError(f"{path}: the hub manifest must be a JSON object of name -> {{url, sha1}}.")
    entries = {}
    for name, spec in raw.items():
        if not isinstance(spec, dict) or not {"url", "sha1"} <= spec.keys():
            raise UserError(f"{path}: entry {name!r} needs both \"url\" and \"sha1\".")
        members = tuple(spec.get("members", known[name].members if name in known else ()))
        entries[name] = Entry(spec["url"], spec["sha1"].lower(), members, os.path.abspath(path))
    return entries


def entry(name):
    """The registry entry called `name`, or a clear error listing the names there are."""
    entries = registry()
    if name not in entries:
        raise UserError(f"Unknown download {name!r}; known names: {', '.join(sorted(entries))}.")
    return entries[name]


def is_verified(path, sha1, manifest=None):
    """Whether `path` holds the file with this SHA-1; its sidecar record spares re-hashing an unchanged file."""
    actual, record, st = _sha1_and_record(path)
    if actual == sha1 and record is None:
        _write_record(path, sha1, manifest, st)
    return actual == sha1


def _sha1_and_record(path):
    """(SHA-1, sidecar record or None, stat) of the file at `path`; (None, None, None) when there is none."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, None, None
    try:
        with open(path + ".verified", encoding="utf-8") as f:
            record = json.load(f)
        if (record["size"], record["mtime_ns"]) == (st.st_size, st.st_mtime_ns):
            return record["sha1"], record, st
    except (OSError, ValueError, KeyError, TypeError):
        pass  # no record, an unreadable one, or the file changed since: hash the file
    return sha1_of(path), None, st


def _write_record(path, sha1, manifest, st=None):
    """Write `PATH.verified` atomically: size and mtime from the stat taken before hashing (a later change
    then shows), the SHA-1, and the manifest that named it (None: the built-in registry)."""
    st = st or os.stat(path)
    record = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha1": sha1, "manifest": manifest}
    write_json(path + ".verified", record, indent=None)


def download(name, folder=None, quiet=False, replace=False):
    """Download entry `name` into the data dir (unless a verified copy is there) and return its path.

    A cached file with another SHA-1 is refused, never deleted; `replace` moves it aside first."""
    e = entry(name)
    path = _cache_path(e, folder)
    with _locked(path, quiet):
        if is_verified(path, e.sha1, e.manifest):
            return path
        _clear_the_way(name, e, path, replace, quiet)
        if e.url.startswith("file:"):
            source = _local_path(name, e)
            _copy(source, path + ".part",
                  lambda reason: _unreachable(name, e, path + ".part", f"{source}: {reason}"))
            _install(name, e, path, e.url, keep_mismatch=False)
        else:
            _fetch(name, e, path + ".part", quiet)
            _install(name, e, path, e.url, keep_mismatch=True)
    return path


def import_file(name, source, folder=None, quiet=False, replace=False):
    """Copy a file fetched by other means into the cache as entry `name`, once its SHA-1 is checked."""
    e = entry(name)
    path = _cache_path(e, folder)
    with _locked(path, quiet):
        if is_verified(path, e.sha1, e.manifest):
            return path
        _copy(source, path + ".part",
              lambda reason: UserError(f"Cannot read {source} to import it as {name}: {reason}."))
        _install(name, e, path, source, keep_mismatch=False, replace=replace, quiet=quiet)
    return path


def download_extract(name, folder=None, quiet=False, replace=False):
    """Download and extract entry `name`; return the directory the archive unpacks to (as d2l does)."""
    e = entry(name)
    path = download(name, folder, quiet, replace)
    base = os.path.dirname(path)
    target = os.path.join(base, _archive_stem(e.file_name))
    with _locked(path, quiet):
        if not (os.path.isdir(target) and all(os.path.exists(os.path.join(base, m)) for m in e.members)):
            extract(path, base, e.members)
    return target


def extract(path, folder, members=()):
    """Unpack archive `path` into `folder` via a temporary directory, refusing paths that leave it."""
    os.makedirs(folder, exist_ok=True)
    scratch = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", dir=folder)
    try:
        _unpack(path, scratch)
        missing = [m for m in members if not os.path.exists(os.path.join(scratch, m))]
        if missing:
            raise UserError(f"{path} does not contain {', '.join(missing)}; nothing was extracted.")
        for item in os.listdir(scratch):
            dest = os.path.join(folder, item)
            if os.path.lexists(dest):  # an older copy: move it into the scratch dir, deleted below
                os.rename(dest, os.path.join(scratch, f".old.{item}"))
            os.rename(os.path.join(scratch, item), dest)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder


def status(folder=None):
    """(name, url, size in bytes or None, state) for each entry; state: verified, SHA-1 differs, partial, missing."""
    rows = []
    for name, e in sorted(registry().items()):
        path = _cache_path(e, folder)
        if os.path.exists(path):
            verified = is_verified(path, e.sha1, e.manifest)
            size, state = os.path.getsize(path), "verified" if verified else "SHA-1 differs"
        elif os.path.exists(path + ".part"):
            size, state = os.path.getsize(path + ".part"), "partial"
        else:
            size, state = None, "missing"
        rows.append((name, e.url, size, state))
    return rows


def download_hosts():
    """{host: one of its URLs} for each host the registry in force downloads from over HTTP."""
    urls = {}
    for e in registry().values():
        parts = urllib.parse.urlsplit(e.url)
        if parts.scheme in ("http", "https"):
            urls.setdefault(parts.netloc, e.url)
    return urls


def reach(url, timeout=REACH_TIMEOUT):
    """Whether the host of `url` answers a HEAD of it, in a few words: "reachable", or why it is not."""
    try:
        answer = requests.head(url, timeout=(timeout, timeout), allow_redirects=False)
    except requests.RequestException as err:
        return f"unreachable: {_network_reason(err, _root_cause(err), timeout)}"
    if answer.status_code >= 400:
        return f"reachable, but {url} answers HTTP {answer.status_code} {answer.reason}"
    return "reachable"


def mismatch_path(path, sha1):
    """Where a file that is not the entry's is moved aside: `NAME.mismatch-` and the start of its SHA-1."""
    return f"{path}.mismatch-{sha1[:12]}"


def _cache_path(e, folder):
    """Where entry `e` is cached: its file name in `folder` or the data dir."""
    return os.path.join(folder or data_dir(), e.file_name)


@contextlib.contextmanager
def _locked(path, quiet):
    """Hold `PATH.lock`, so two processes fetching the same file end with one good copy."""
    folder = os.path.dirname(path)
    try:  # filelock takes a lock file it cannot create for one another process holds, and would wait for ever
        os.makedirs(folder, exist_ok=True)
        open(path + ".lock", "a").close()
    except OSError as e:
        raise UserError(f"Cannot write to the data folder {folder} ({e.strerror}): set NLI_DATA_DIR to a folder "
                        f"this user can write (the default is the checkout's data/, else ~/.cache/nli).") from None
    lock = filelock.FileLock(path + ".lock")
    try:
        lock.acquire(timeout=0)
    except filelock.Timeout:
        _say(quiet, f"Waiting for another process using {path} ...")
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def _fetch(name, e, part, quiet):
    """Stream `e.url` into `part`, resuming after failures; retries are spent only by attempts that add no bytes."""
    retries = _setting("NLI_HUB_RETRIES", RETRIES)
    timeout = _setting("NLI_HUB_TIMEOUT", TIMEOUT)
    backoff = _setting("NLI_HUB_BACKOFF", BACKOFF)
    attempts, failures, best = 0, 0, _size(part)
    with requests.Session() as session:
        while True:
            attempts += 1
            try:
                return _fetch_once(session, e, part, timeout, quiet)
            except _Transient as err:
                reason = str(err)
            except _Permanent as err:
                raise _unreachable(name, e, part, f"{e.url}: {err}") from None
            except requests.RequestException as err:  # a malformed URL, say
                raise _unreachable(name, e, part, f"{e.url}: {err}") from None
            failures = 0 if _size(part) > best else failures + 1
            best = max(best, _size(part))
            if failures > retries:
                raise _unreachable(name, e, part, f"{e.url} failed {attempts} times, last with {reason}")
            wait = min(backoff * 2 ** max(failures - 1, 0), MAX_BACKOFF)
            _say(quiet, f"{e.file_name}: {reason}; trying again in {wait:g} s"
                        + (f", resuming at {_size(part):,} bytes." if _size(part) else "."))
            time.sleep(wait)


class _Transient(Exception):
    """A failure worth another attempt: a lost connection, a timeout, a 5xx answer."""


class _Permanent(Exception):
    """A failure that another attempt would repeat: connection refused, an unknown host, a 4xx answer."""


def _fetch_once(session, e, part, timeout, quiet):
    """One GET of `e.url` into `part`, asking for the missing tail when `part` holds a head already."""
    offset = _size(part)
    headers = {"Accept-Encoding": "identity"}  # byte ranges must count the file's own bytes
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        with session.get(e.url, headers=headers, stream=True, timeout=(timeout, timeout)) as r:
            if r.status_code == 416:  # asked from past the end: the part is whole already, or too long
                if r.headers.get("Content-Range") == f"bytes */{offset}":
                    return
                _remove(part)
                raise _Transient("the partial download is longer than the file")
            if r.status_code >= 500 or r.status_code in (408, 429):
                raise _Transient(f"HTTP {r.status_code} {r.reason}")
            if r.status_code >= 400:
                raise _Permanent(f"the server answered HTTP {r.status_code} {r.reason}")
            if r.status_code != 206 or not r.headers.get("Content-Range", "").startswith(f"bytes {offset}-"):
                offset = 0  # the server ignored the Range: start again from the first byte
            length = r.headers.get("Content-Length")
            total = offset + int(length) if length and length.isdigit() else None
            with open(part, "ab" if offset else "wb") as f, \
                    tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                         desc=e.file_name, disable=True if quiet else None) as bar:
                for chunk in r.iter_content(CHUNK_SIZE):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
        cause = _root_cause(err)
        if isinstance(cause, PERMANENT_NETWORK_ERRORS) and not isinstance(err, requests.Timeout):
            raise _Permanent(_network_reason(err, cause, timeout)) from None
        raise _Transient(_network_reason(err, cause, timeout)) from None
    if total is not None and _size(part) != total:  # urllib3 1.x does not raise on a short body
        raise _Transient(f"the connection closed at {_size(part):,} of {total:,} bytes")


def _root_cause(err):
    """The socket's own error under requests' and urllib3's wrapping of a network error."""
    cause = err
    while True:
        inner = next((x for x in (*cause.args, getattr(cause, "reason", None), cause.__cause__)
                      if isinstance(x, BaseException)), None)
        if inner is None:
            return cause
        cause = inner


def _network_reason(err, cause, timeout):
    """A few words on a network error, from its root cause."""
    if isinstance(err, requests.Timeout) or isinstance(cause, TimeoutError):
        return f"no answer for {timeout:g} s (timed out)"
    if isinstance(err, requests.exceptions.ChunkedEncodingError):
        return "the connection dropped"
    if isinstance(cause, socket.gaierror):
        return f"the host {urllib.parse.urlsplit(err.request.url).hostname} is unknown ({cause.strerror})"
    return getattr(cause, "strerror", None) or str(cause)


def _unreachable(name, e, part, what):
    """The error for a download that could not be done, with the three ways to get the file anyway, and the
    routes that do without it."""
    kept = f"; the {_size(part):,} bytes received are kept in {part} for the next try" if _size(part) else ""
    return UserError(
        f"Could not download {name}: {what}{kept}. If this machine is offline or the host is blocked, "
        f"there are three ways out: set NLI_MIRROR=http://host/path/ to a server holding {e.file_name}; "
        f"set NLI_HUB_MANIFEST=manifest.json to a JSON file naming another URL and SHA-1 for {name}; "
        f"or fetch {e.file_name} by other means and run `nli download {name} --from FILE`, "
        f"which imports it after checking its SHA-1 ({e.sha1}).{_without(name)}")


def _without(name):
    """How to go on without entry `name`: a Hugging Face BERT for the book's, the repository's SNLI pairs for SNLI."""
    if name in ("bert.small", "bert.base"):
        return (" Or do without it: fine-tune a Hugging Face BERT, --model hf:DIR (a checkpoint directory) or "
                "--model hf:ORG/NAME from the Hugging Face cache (as hf:sentence-transformers/all-MiniLM-L6-v2, "
                "with HF_HUB_OFFLINE=1 when it is cached).")
    if name == "SNLI":
        checkout = source_checkout()
        pairs = (os.path.join(checkout, DEV_PAIRS) if checkout
                 else f"{DEV_PAIRS} of a clone of the nli repository")
        return (f" Or do without it: {pairs} holds 9,842 real SNLI pairs; give them as --pairs FILE to the "
                f"chapter script, or as --train FILE --test-fraction 0.2 to `nli finetune`.")
    return ""


def _install(name, e, path, source, keep_mismatch, replace=False, quiet=True):
    """Rename `PATH.part` to `path` if its SHA-1 is the entry's; otherwise fail naming both.

    A wrong download is kept aside (fetching it again would cost as much); a wrong copy of a local
    file is deleted, as its source is still there."""
    part = path + ".part"
    actual = sha1_of(part)
    if actual != e.sha1:
        if keep_mismatch:
            os.replace(part, mismatch_path(path, actual))
            kept = (f"it is kept as {mismatch_path(path, actual)}. If the file changed on purpose, name its "
                    f"SHA-1 for {name} in a manifest (NLI_HUB_MANIFEST) and import the kept file with "
                    f"`nli download {name} --from {mismatch_path(path, actual)}`")
        else:
            _remove(part)
            kept = (f"the copy was not kept and {source} is untouched. If the file changed on purpose, "
                    f"name its SHA-1 for {name} in a manifest (NLI_HUB_MANIFEST)")
        raise UserError(f"{source} gave a file with SHA-1 {actual}, but {e.origin} expects {e.sha1} "
                        f"for {name}; {kept}.")
    try:
        _clear_the_way(name, e, path, replace, quiet)
    except UserError:
        _remove(part)
        raise
    os.replace(part, path)
    _write_record(path, e.sha1, e.manifest)


def _clear_the_way(name, e, path, replace, quiet):
    """Before a new copy takes `path`: refuse when another file is there, or with `replace` move it aside."""
    actual, record, _ = _sha1_and_record(path)
    if actual is None:
        return
    aside = mismatch_path(path, actual)
    if replace:
        os.replace(path, aside)
        _remove(path + ".verified")
        _say(quiet, f"Moved {path} (SHA-1 {actual}) aside to {aside}.")
        return
    if record and "manifest" in record and record["manifest"] != e.manifest:
        was = record.get("manifest")
        use_it = (f"It was verified against the manifest {was}: set NLI_HUB_MANIFEST={was} to use it again."
                  if was else f"It was verified against the built-in registry: run without {e.origin} "
                              f"(NLI_HUB_MANIFEST) to use it again.")
    else:
        use_it = f"If it is the file you want, name its SHA-1 for {name} in a manifest (NLI_HUB_MANIFEST)."
    raise UserError(
        f"{path} is not the file {name} is set to: its SHA-1 is {actual}, and {e.origin} expects {e.sha1}. "
        f"The file is kept and was not used. {use_it} To put {name} as {e.origin} names it in its place, add "
        f"--replace to `nli download {name}` (with or without --from FILE): the file is then moved "
        f"aside to {aside}.")


def _local_path(name, e):
    """The path a `file:` URL names (file:///abs/path, or file://localhost/abs/path)."""
    url = urllib.parse.urlsplit(e.url)
    if url.netloc not in ("", "localhost"):
        raise UserError(f"{e.url} ({name} in {e.origin}): a file URL names a local path, as in "
                        f"file:///data/{e.file_name}; host {url.netloc!r} is not this machine.")
    return urllib.request.url2pathname(url.path)


def _copy(source, part, failure):
    """Copy the local file `source` to `part`; on failure remove `part` and raise `failure(reason)`."""
    try:
        shutil.copyfile(source, part)
    except OSError as err:
        _remove(part)
        raise failure(err.strerror) from None


def _unpack(path, dest):
    """Unpack a zip or tar archive into `dest`, refusing absolute paths, `..` and links."""
    try:
        if path.endswith(ZIP_SUFFIXES):
            with zipfile.ZipFile(path) as archive:
                for info in archive.infolist():
                    _check_member(path, info.filename)
                    if stat.S_ISLNK(info.external_attr >> 16):
                        raise UserError(f"{path}: member {info.filename} is a symbolic link; the hub "
                                        f"extracts regular files only, so nothing was extracted.")
                archive.extractall(dest)
        elif path.endswith(TAR_SUFFIXES):
            with tarfile.open(path) as archive:
                for member in archive.getmembers():
                    _check_member(path, member.name)
                archive.extractall(dest, filter="data")  # also refuses links that point outside
        else:
            raise UserError(f"{path}: only .zip and .tar(.gz) archives can be extracted.")
    except tarfile.FilterError as err:
        raise UserError(f"{path}: {err}; nothing was extracted.") from None
    except CORRUPT_ARCHIVE as err:
        raise UserError(f"{path} is a truncated or corrupt archive ({err}); nothing was extracted. Its "
                        f"SHA-1 matched the registry, so the entry itself names a broken file.") from None


def _check_member(path, name):
    """Refuse an archive member whose path is absolute or climbs out with `..`."""
    parts = name.replace("\\", "/").split("/")
    if name.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", name) or ".." in parts:
        raise UserError(f"{path}: member {name!r} would be written outside the folder it is extracted "
                        f"into; the archive is refused and nothing was extracted.")


def _archive_stem(file_name):
    """`bert.small.zip` -> `bert.small`, `x.tar.gz` -> `x`: the directory an archive unpacks to."""
    for suffix in ZIP_SUFFIXES + TAR_SUFFIXES:
        if file_name.endswith(suffix):
            return file_name[:-len(suffix)]
    return os.path.splitext(file_name)[0]


def _setting(var, default):
    """A number from environment variable `var`, else `default`, so slow links and tests can tune the hub."""
    value = os.environ.get(var)
    if value is None:
        return default
    try:
        return type(default)(value)
    except ValueError:
        raise UserError(f"{var}={value!r}: expected a number such as {default}.") from None


def _say(quiet, message):
    """A note on stderr about retries and waits, unless quiet."""
    if not quiet:
        print(message, file=sys.stderr, flush=True)


def _size(path):
    """Size of a file in bytes, 0 when it does not exist."""
    try:
        return os.path.getsize(path)
    except FileNotFoundError:
        return 0


def _remove(path):
    """Delete a file if it exists."""
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)
