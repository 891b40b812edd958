"""Files written whole and files known by their SHA-1: the leaf that `hub`, `rundir` and the writers of reports share."""
import contextlib
import hashlib
import json
import os
import shutil


def write_atomically(path, write):
    """Call `write(tmp)` then rename tmp over `path`, so a crash never leaves a half-written file and a
    failed write leaves no temporary one."""
    tmp = f"{path}.{os.getpid()}.tmp"  # one per process: workers may write the same file at once
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def write_json(path, obj, indent=1):
    """Write `obj` as JSON to `path`, atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
    write_atomically(path, write)


def replace_dir(path, write):
    """Fill `path`.new with `write(dir)` and swap it in for `path`: a crash at any moment leaves a
    complete `path`, `path`.new or `path`.old (see `rundir.find_checkpoint`)."""
    new, old = path + ".new", path + ".old"
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    try:
        write(new)
        for folder, _, names in os.walk(new):  # on disk before the rename makes them the current files
            for name in names:
                with open(os.path.join(folder, name), "rb") as f:
                    os.fsync(f.fileno())
    except BaseException:  # a full disk, say: no partial copy left taking its space; `path` is still whole
        shutil.rmtree(new, ignore_errors=True)
        raise
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def sha1_of(path, chunk_size=1 << 20):
    """SHA-1 hex digest of a file, read in chunks so big archives need little memory."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()
