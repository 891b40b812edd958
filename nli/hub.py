"""The registry of downloadable files, and downloading, verifying and extracting them."""
import dataclasses
import hashlib
import json
import os
import zipfile

import requests

from .errors import UserError

DATA_URL = "http://d2l-data.s3-accelerate.amazonaws.com/"  # d2l.DATA_URL


@dataclasses.dataclass(frozen=True)
class Entry:
    """One downloadable archive: where it lives, its SHA-1 and the members it must contain."""
    url: str
    sha1: str
    members: tuple = ()

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
    """The download cache: `NLI_DATA_DIR`, or `data/` in the working directory."""
    return os.path.abspath(os.environ.get("NLI_DATA_DIR", "data"))


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
        entries[name] = Entry(spec["url"], spec["sha1"].lower(), members)
    return entries


def entry(name):
    """The registry entry called `name`, or a clear error listing the names there are."""
    entries = registry()
    if name not in entries:
        raise UserError(f"Unknown download {name!r}; known names: {', '.join(sorted(entries))}.")
    return entries[name]


def sha1_of(path, chunk_size=1 << 20):
    """SHA-1 hex digest of a file, read in chunks so big archives need little memory."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(name, folder=None):
    """Download entry `name` into the data dir (unless a verified copy is there) and return its path."""
    e = entry(name)
    folder = folder or data_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, e.file_name)
    if os.path.exists(path) and sha1_of(path) == e.sha1:
        return path
    part = path + ".part"
    try:
        with requests.get(e.url, stream=True, timeout=(10, 60)) as r:
            r.raise_for_status()
            with open(part, "wb") as f:
                for chunk in r.iter_content(1 << 20):
                    f.write(chunk)
    except requests.RequestException as err:
        _remove(part)
        raise UserError(f"Downloading {name} from {e.url} failed ({err}). Set NLI_MIRROR to a mirror, "
                        f"or NLI_HUB_MANIFEST to a manifest naming another URL.") from err
    actual = sha1_of(part)
    if actual != e.sha1:
        _remove(part)
        raise UserError(f"{e.url} gave a file with SHA-1 {actual}, expected {e.sha1}; nothing was kept.")
    os.replace(part, path)
    return path


def extract(path, folder):
    """Extract a zip archive into `folder` and return `folder`."""
    try:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(folder)
    except zipfile.BadZipFile as err:
        raise UserError(f"{path} is not a readable zip archive ({err}).") from err
    return folder


def download_extract(name, folder=None):
    """Download and extract entry `name`; return the directory the archive unpacks to (as d2l does)."""
    e = entry(name)
    path = download(name, folder)
    base = os.path.dirname(path)
    target = os.path.splitext(path)[0]
    if not all(os.path.exists(os.path.join(base, m)) for m in e.members) or not e.members:
        extract(path, base)
    missing = [m for m in e.members if not os.path.exists(os.path.join(base, m))]
    if missing:
        raise UserError(f"{path} does not contain {', '.join(missing)}.")
    return target


def _remove(path):
    """Delete a file if it exists."""
    if os.path.exists(path):
        os.remove(path)

