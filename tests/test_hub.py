"""The hub against a loopback server that misbehaves on purpose: each case ends in a verified file or a clear error."""
import hashlib
import http.server
import io
import json
import os
import random
import re
import shutil
import socket
import stat
import struct
import subprocess
import sys
import tarfile
import threading
import time
import zipfile

import pytest

from conftest import ROOT, closed_port, run_cli
from nli import fileio, hub
from nli.errors import UserError

DATA = random.Random(0).randbytes(256 * 1024)


def digest(data):
    return hashlib.sha1(data).hexdigest()


class MisbehavingServer(http.server.ThreadingHTTPServer):
    """In-memory files on 127.0.0.1 that can drop, ignore Range, lie, fail or stall, as each file's faults say."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), MisbehavingHandler)
        self.files, self.faults = {}, {}
        self.requests = []  # (file, Range header or None), in the order they came
        self.stopping = threading.Event()
        self.url = f"http://127.0.0.1:{self.server_address[1]}"

    def gets(self, file):
        return [r for f, r in self.requests if f == file]


class MisbehavingHandler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0, so each answer ends by closing the connection: stopping early is a dropped connection."""

    def do_GET(self):
        srv, file = self.server, self.path.lstrip("/")
        srv.requests.append((file, self.headers.get("Range")))
        fault = srv.faults.get(file, {})
        if len(srv.gets(file)) <= fault.get("resets", 0):  # close with a TCP reset, before any answer
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return self.connection.close()
        if file not in srv.files or "status" in fault:
            return self.send_error(fault.get("status", 404))
        data = fault.get("body", srv.files[file])
        asked = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        start = int(asked[1]) if asked and not fault.get("ignore_range") else 0
        if start >= len(data) > 0:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            return self.end_headers()
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        if len(srv.gets(file)) <= fault.get("drops", 0):
            body = body[:len(body) // 2]
        if "stall" in fault:
            return srv.stopping.wait(fault["stall"])  # headers sent, then silence
        for i in range(0, len(body), 1 << 16):
            self.wfile.write(body[i:i + (1 << 16)])
            if "rate" in fault and srv.stopping.wait((1 << 16) / fault["rate"]):
                return

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = MisbehavingServer()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    yield srv
    srv.stopping.set()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def publish(server, tmp_path, monkeypatch):
    """publish(name, file, data, **faults): serve `data` and name it in the hub's manifest, with fast retries."""
    manifest = {}
    monkeypatch.setenv("NLI_HUB_MANIFEST", str(tmp_path / "manifest.json"))
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NLI_MIRROR", raising=False)
    monkeypatch.setenv("NLI_HUB_RETRIES", "2")
    monkeypatch.setenv("NLI_HUB_BACKOFF", "0.01")
    monkeypatch.setenv("NLI_HUB_TIMEOUT", "5")

    def publish(name, file, data, members=(), sha1=None, **faults):
        server.files[file], server.faults[file] = data, faults
        manifest[name] = {"url": f"{server.url}/{file}", "sha1": sha1 or digest(data), "members": list(members)}
        (tmp_path / "manifest.json").write_text(json.dumps(manifest))
        return os.path.join(tmp_path, "data", file)
    return publish


def zip_bytes(members):
    """A zip archive of {name: bytes}, in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buffer.getvalue()


def test_dropped_connection_resumes_with_range(server, publish):
    path = publish("blob", "blob.bin", DATA, drops=1)
    assert hub.download("blob", quiet=True) == path
    assert server.gets("blob.bin") == [None, f"bytes={len(DATA) // 2}-"]
    assert fileio.sha1_of(path) == digest(DATA)
    assert not os.path.exists(path + ".part")


def test_server_ignoring_range_restarts_from_zero(server, publish):
    path = publish("blob", "blob.bin", DATA, drops=1, ignore_range=True)
    hub.download("blob", quiet=True)
    assert server.gets("blob.bin") == [None, f"bytes={len(DATA) // 2}-"]
    assert os.path.getsize(path) == len(DATA) and fileio.sha1_of(path) == digest(DATA)


def test_wrong_bytes_fail_naming_url_and_both_sha1s_and_are_kept_aside(server, publish):
    wrong = DATA[::-1]
    path = publish("blob", "blob.bin", DATA, body=wrong)
    with pytest.raises(UserError) as err:
        hub.download("blob", quiet=True)
    assert f"{server.url}/blob.bin" in str(err.value)
    assert digest(wrong) in str(err.value) and digest(DATA) in str(err.value)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")
    aside = hub.mismatch_path(path, digest(wrong))  # fetching it again would cost as much: it is kept
    assert f"--from {aside}" in str(err.value) and open(aside, "rb").read() == wrong
    assert len(server.gets("blob.bin")) == 1


@pytest.mark.parametrize("status, tries", [(404, 1), (500, 3)])  # 500: the first try and NLI_HUB_RETRIES=2 more
def test_http_errors_stop_after_bounded_tries(server, publish, status, tries):
    path = publish("blob", "blob.bin", DATA, status=status)
    with pytest.raises(UserError, match=f"HTTP {status}") as err:
        hub.download("blob", quiet=True)
    assert f"{server.url}/blob.bin" in str(err.value)
    assert len(server.gets("blob.bin")) == tries
    assert not os.path.exists(path)


def test_reset_connections_are_retried(server, publish):
    path = publish("blob", "blob.bin", DATA, resets=2)  # NLI_HUB_RETRIES=2: the third try gets it
    assert hub.download("blob", quiet=True) == path
    assert len(server.gets("blob.bin")) == 3 and fileio.sha1_of(path) == digest(DATA)


def test_stalled_server_times_out(server, publish, monkeypatch):
    monkeypatch.setenv("NLI_HUB_TIMEOUT", "0.3")
    monkeypatch.setenv("NLI_HUB_RETRIES", "1")
    path = publish("blob", "blob.bin", DATA, stall=30)
    with pytest.raises(UserError, match="timed out"):
        hub.download("blob", quiet=True)
    assert len(server.gets("blob.bin")) == 2
    assert not os.path.exists(path)


def test_cached_file_is_trusted_by_its_record_until_it_changes(server, publish, monkeypatch):
    path = publish("blob", "blob.bin", DATA)
    hub.download("blob", quiet=True)
    with monkeypatch.context() as m:
        m.setattr(hub, "sha1_of", lambda path: pytest.fail("an unchanged verified file was hashed again"))
        assert hub.download("blob", quiet=True) == path
    assert len(server.gets("blob.bin")) == 1
    for tamper in ("ab", "r+b"):  # longer; then the same size with a different byte (only the mtime tells)
        with open(path, tamper) as f:
            f.write(b"\0")
        os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 10**9))
        assert not hub.is_verified(path, digest(DATA))
        changed = open(path, "rb").read()
        with pytest.raises(UserError, match=f"its SHA-1 is {digest(changed)}"):  # kept, and refused
            hub.download("blob", quiet=True)
        assert open(path, "rb").read() == changed
        hub.download("blob", quiet=True, replace=True)
        assert fileio.sha1_of(path) == digest(DATA)
        assert open(hub.mismatch_path(path, digest(changed)), "rb").read() == changed
    assert len(server.gets("blob.bin")) == 3


def link_zip():
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as z:
        link = zipfile.ZipInfo("pack/link")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        z.writestr(link, "../../../outside")
    return buffer.getvalue()


def tar_bytes(name, link_to=None):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as t:
        info = tarfile.TarInfo(name)
        if link_to:
            info.type, info.linkname = tarfile.SYMTYPE, link_to
            t.addfile(info)
        else:
            info.size = 4
            t.addfile(info, io.BytesIO(b"evil"))
    return buffer.getvalue()


@pytest.mark.parametrize("file, archive", [
    ("pack.zip", lambda tmp: zip_bytes({"pack/ok.txt": b"ok", "../../escape.txt": b"evil"})),
    ("pack.zip", lambda tmp: zip_bytes({"pack/ok.txt": b"ok", f"{tmp}/escape.txt": b"evil"})),
    ("pack.zip", lambda tmp: link_zip()),
    ("pack.tar.gz", lambda tmp: tar_bytes("../../escape.txt")),
    ("pack.tar.gz", lambda tmp: tar_bytes("pack/link", link_to=f"{tmp}/escape.txt")),
], ids=["zip-dotdot", "zip-absolute", "zip-link", "tar-dotdot", "tar-link-outside"])
def test_unsafe_archive_is_refused_and_nothing_written(publish, tmp_path, file, archive):
    path = publish("pack", file, archive(tmp_path))
    with pytest.raises(UserError, match="nothing was extracted"):
        hub.download_extract("pack", quiet=True)
    assert not os.path.exists(tmp_path / "escape.txt")
    assert sorted(os.listdir(tmp_path)) == ["data", "manifest.json"]
    leftovers = set(os.listdir(tmp_path / "data")) - {file, file + ".verified", file + ".lock"}
    assert not leftovers and os.path.exists(path)


def corrupt_middle(data):
    """The archive with bytes in the middle of its second member's data overwritten: a CRC error mid-way."""
    at = len(data) // 2
    return data[:at] + bytes(b ^ 0xFF for b in data[at:at + 64]) + data[at + 64:]


@pytest.mark.parametrize("damage", [lambda data: data[:len(data) * 2 // 3], corrupt_middle],
                         ids=["truncated", "corrupt-member"])
def test_broken_zip_fails_clearly_and_leaves_no_directory(publish, tmp_path, damage):
    good = zip_bytes({"pack/first.txt": b"first", "pack/second.bin": DATA})
    publish("pack", "pack.zip", damage(good), members=["pack/first.txt", "pack/second.bin"])
    with pytest.raises(UserError, match="truncated or corrupt"):
        hub.download_extract("pack", quiet=True)
    assert sorted(os.listdir(tmp_path / "data")) == ["pack.zip", "pack.zip.lock", "pack.zip.verified"]


def test_missing_member_fails_and_extracts_nothing(publish, tmp_path):
    publish("pack", "pack.zip", zip_bytes({"pack/vocab.json": b"[]"}),
            members=["pack/vocab.json", "pack/pretrained.params"])
    with pytest.raises(UserError, match="does not contain pack/pretrained.params"):
        hub.download_extract("pack", quiet=True)
    assert not os.path.exists(tmp_path / "data" / "pack")


def test_extraction_replaces_a_stale_directory_whole(server, publish, tmp_path):
    publish("pack", "pack.zip", zip_bytes({"pack/new.txt": b"new"}), members=["pack/new.txt"])
    os.makedirs(tmp_path / "data" / "pack")
    (tmp_path / "data" / "pack" / "stale.txt").write_text("left by an older archive")
    assert hub.download_extract("pack", quiet=True) == str(tmp_path / "data" / "pack")
    assert os.listdir(tmp_path / "data" / "pack") == ["new.txt"]
    assert hub.download_extract("pack", quiet=True) == str(tmp_path / "data" / "pack")
    assert len(server.gets("pack.zip")) == 1


def test_real_layouts_extract_where_d2l_puts_them(hub_env):
    data = hub_env["NLI_DATA_DIR"]
    assert hub.download_extract("bert.small", quiet=True) == os.path.join(data, "bert.small")
    assert hub.download_extract("SNLI", quiet=True) == os.path.join(data, "snli_1.0")
    for name in ("bert.small", "SNLI"):
        assert all(os.path.isfile(os.path.join(data, m)) for m in hub.entry(name).members)


SLOW_RETRIES = {"NLI_HUB_RETRIES": "3", "NLI_HUB_BACKOFF": "3"}  # 3 + 6 + 9 s of waiting, were they spent


@pytest.mark.parametrize("name, without", [
    ("bert.small", ["--model hf:DIR", "--model hf:ORG/NAME from the Hugging Face cache", "HF_HUB_OFFLINE=1"]),
    ("SNLI", [f"{os.path.join(ROOT, 'tests', 'data', 'snli_1.0_dev_pairs.tsv')} holds 9,842 real SNLI pairs",
              "--pairs FILE to the chapter script", "--train FILE --test-fraction 0.2 to `nli finetune`"])])
def test_offline_cli_prints_the_ways_out_at_once_without_traceback(tmp_path, name, without):
    mirror = f"http://127.0.0.1:{closed_port()}/"
    env = {**os.environ, **SLOW_RETRIES, "NLI_MIRROR": mirror, "NLI_DATA_DIR": str(tmp_path / "data")}
    env.pop("NLI_HUB_MANIFEST", None)
    result = run_cli("download", name, env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [message] = result.stderr.strip().splitlines()  # one paragraph, and no retry notes before it
    assert message.startswith(f"error: Could not download {name}")
    file = hub.BUILTIN[name].file_name
    for needed in (mirror + f"{file}: Connection refused", "NLI_MIRROR", "NLI_HUB_MANIFEST",
                   f"python -m nli download {name} --from FILE", hub.BUILTIN[name].sha1, *without):
        assert needed in message
    assert os.path.exists(os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv"))  # the pairs it names


def data_dir_from(tmp_path, package_root, **env):
    """`hub.data_dir()` as a Python started in an empty directory sees it, importing nli from `package_root`."""
    clean = {k: v for k, v in os.environ.items() if k not in ("NLI_DATA_DIR", "XDG_CACHE_HOME")}
    (tmp_path / "elsewhere").mkdir(exist_ok=True)
    result = subprocess.run([sys.executable, "-c", "from nli import hub; print(hub.data_dir())"],
                            capture_output=True, text=True, cwd=tmp_path / "elsewhere", timeout=120,
                            env={**clean, "PYTHONPATH": str(package_root), **env})
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def installed_copy(tmp_path, pyproject=None):
    """The nli package copied into a folder of its own, as pip installs it (with `pyproject` beside it if given)."""
    site = tmp_path / "site"
    shutil.copytree(os.path.join(ROOT, "nli"), site / "nli", ignore=shutil.ignore_patterns("__pycache__"))
    if pyproject:
        (site / "pyproject.toml").write_text(pyproject)
        (site / "data").mkdir()
        (site / "data" / "README.md").write_text("another project's data\n")
    return site


def test_the_data_dir_is_nli_data_dir_from_any_directory(tmp_path):
    assert data_dir_from(tmp_path, ROOT, NLI_DATA_DIR=str(tmp_path / "mine")) == str(tmp_path / "mine")
    assert data_dir_from(tmp_path, ROOT, NLI_DATA_DIR="relative") == str(tmp_path / "elsewhere" / "relative")


def test_the_data_dir_of_a_checkout_is_its_data_folder_from_any_directory(tmp_path):
    assert hub.source_checkout() == ROOT
    assert data_dir_from(tmp_path, ROOT, XDG_CACHE_HOME=str(tmp_path / "xdg")) == os.path.join(ROOT, "data")


def test_the_data_dir_of_an_installed_nli_is_the_users_cache(tmp_path):
    site = installed_copy(tmp_path)
    assert data_dir_from(tmp_path, site, XDG_CACHE_HOME=str(tmp_path / "xdg")) == str(tmp_path / "xdg" / "nli")
    assert data_dir_from(tmp_path, site, HOME=str(tmp_path / "home")) == str(tmp_path / "home" / ".cache" / "nli")
    assert data_dir_from(tmp_path, site, HOME=str(tmp_path / "home"), XDG_CACHE_HOME="relative/xdg") == \
        str(tmp_path / "home" / ".cache" / "nli")  # XDG: a relative path is ignored


def test_nli_vendored_beside_another_projects_pyproject_is_not_a_checkout(tmp_path):
    site = installed_copy(tmp_path, pyproject='[project]\nname = "other"\n')
    assert data_dir_from(tmp_path, site, XDG_CACHE_HOME=str(tmp_path / "xdg")) == str(tmp_path / "xdg" / "nli")


@pytest.mark.parametrize("url, reason", [
    (lambda server: f"http://127.0.0.1:{closed_port()}/blob.bin", "Connection refused"),
    (lambda server: "http://nli-test.invalid/blob.bin", "the host nli-test.invalid is unknown"),  # never resolves
    (lambda server: f"{server.url}/missing.bin", "the server answered HTTP 404 Not Found"),
    (lambda server: f"{server.url}/forbidden.bin", "the server answered HTTP 403 Forbidden"),
], ids=["refused", "unknown-host", "404", "403"])
def test_errors_that_retrying_cannot_fix_fail_at_once(server, publish, monkeypatch, tmp_path, url, reason):
    path = publish("blob", "blob.bin", DATA)
    server.files["forbidden.bin"], server.faults["forbidden.bin"] = DATA, {"status": 403}
    url = url(server)
    (tmp_path / "manifest.json").write_text(json.dumps({"blob": {"url": url, "sha1": digest(DATA)}}))
    for var, value in SLOW_RETRIES.items():
        monkeypatch.setenv(var, value)
    start = time.perf_counter()
    with pytest.raises(UserError) as err:
        hub.download("blob", quiet=True)
    assert time.perf_counter() - start < 5
    assert str(err.value).startswith(f"Could not download blob: {url}: {reason}")
    assert len(server.requests) <= 1 and not os.path.exists(path)


def test_download_from_file_checks_sha1_then_extracts(tmp_path):
    good = zip_bytes({"pack/vocab.json": b"[]"})
    (tmp_path / "pack.zip").write_bytes(good)
    (tmp_path / "wrong.zip").write_bytes(good + b"\0")
    manifest = {"pack": {"url": f"http://127.0.0.1:{closed_port()}/pack.zip", "sha1": digest(good),
                         "members": ["pack/vocab.json"]}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "NLI_HUB_MANIFEST": str(tmp_path / "manifest.json"), "NLI_DATA_DIR": str(tmp_path / "data")}
    wrong = run_cli("download", "pack", "--from", tmp_path / "wrong.zip", env=env)
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert digest(good) in wrong.stderr and digest(good + b"\0") in wrong.stderr
    assert not os.path.exists(tmp_path / "data" / "pack.zip")
    result = run_cli("download", "pack", "--from", tmp_path / "pack.zip", "--quiet", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(tmp_path / "data" / "pack")
    assert (tmp_path / "data" / "pack" / "vocab.json").read_bytes() == b"[]"


def test_list_shows_every_entry_cached_and_verified_or_not(server, publish, tmp_path):
    publish("blob", "blob.bin", DATA)
    other = publish("other", "other.bin", DATA[:1000])
    hub.download("blob", quiet=True)
    with open(other, "wb") as f:
        f.write(b"not the file")
    result = run_cli("download", "--list", env=dict(os.environ))
    assert result.returncode == 0, result.stderr
    *table, advice = result.stdout.splitlines()
    rows = {line.split()[0]: line for line in table}
    assert set(rows) == set(hub.BUILTIN) | {"blob", "other"}
    assert re.search(rf"verified\s+256kB\s+{server.url}/blob.bin$", rows["blob"])
    assert "SHA-1 differs" in rows["other"]
    assert advice.startswith("other: ") and "`python -m nli download other --replace` keeps it aside" in advice
    for name, e in hub.BUILTIN.items():
        assert "missing" in rows[name] and rows[name].endswith(e.url)


def test_two_processes_end_with_one_good_copy(server, publish, tmp_path):
    archive = zip_bytes({"pack/weights.bin": random.Random(1).randbytes(2 << 20)})
    path = publish("pack", "pack.zip", archive, members=["pack/weights.bin"], rate=2 << 20)  # about 1 s
    command = [sys.executable, "-m", "nli", "download", "pack"]
    env = {**os.environ, "PYTHONPATH": ROOT}
    procs = [subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(tmp_path / "data" / "pack")] * 2
    assert sum("Waiting for another process" in err for _, err in outputs) == 1
    assert len(server.gets("pack.zip")) == 1
    assert fileio.sha1_of(path) == digest(archive) and not os.path.exists(path + ".part")
    assert os.path.getsize(tmp_path / "data" / "pack" / "weights.bin") == 2 << 20


def file_state(path):
    """What a refused command must leave alone: a file's bytes and its mtime."""
    return open(path, "rb").read(), os.stat(path).st_mtime_ns


def test_a_file_imported_under_one_manifest_is_kept_and_refused_without_it(tmp_path):
    mine = zip_bytes({f"snli_1.0/snli_1.0_{split}.txt": split.encode() for split in ("train", "dev", "test")})
    (tmp_path / "my_snli.zip").write_bytes(mine)
    (tmp_path / "manifest.json").write_text(json.dumps({"SNLI": {"url": "http://nli-test.invalid/snli_1.0.zip",
                                                                 "sha1": digest(mine)}}))
    env = {**os.environ, "NLI_DATA_DIR": str(tmp_path / "data"), "NLI_MIRROR": f"http://127.0.0.1:{closed_port()}/"}
    imported = run_cli("download", "SNLI", "--from", tmp_path / "my_snli.zip", "--quiet",
                       env={**env, "NLI_HUB_MANIFEST": str(tmp_path / "manifest.json")})
    assert imported.returncode == 0, imported.stderr
    cached = tmp_path / "data" / "snli_1.0.zip"
    before = file_state(cached)

    env.pop("NLI_HUB_MANIFEST", None)  # the built-in SNLI is in force again
    refused = run_cli("download", "SNLI", env=env)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    [message] = refused.stderr.strip().splitlines()
    for needed in (str(cached), digest(mine), hub.BUILTIN["SNLI"].sha1, "The file is kept",
                   f"NLI_HUB_MANIFEST={tmp_path / 'manifest.json'}", "--replace",
                   hub.mismatch_path(str(cached), digest(mine))):
        assert needed in message, needed
    again = run_cli("download", "SNLI", "--from", tmp_path / "my_snli.zip", env=env)  # not the built-in SNLI
    assert again.returncode == 2 and f"my_snli.zip gave a file with SHA-1 {digest(mine)}" in again.stderr
    assert run_cli("download", "--list", env=env).returncode == 0
    assert file_state(cached) == before and file_state(tmp_path / "my_snli.zip")[0] == mine

    replaced = run_cli("download", "SNLI", "--replace", env=env)  # moved aside, then the mirror is down
    assert replaced.returncode == 2 and "Connection refused" in replaced.stderr
    assert not cached.exists() and open(hub.mismatch_path(str(cached), digest(mine)), "rb").read() == mine


def test_import_and_replace_under_another_manifest(server, publish, tmp_path):
    theirs = DATA[:1000]
    path = publish("blob", "blob.bin", DATA)
    (tmp_path / "theirs.bin").write_bytes(theirs)
    (tmp_path / "good.bin").write_bytes(DATA)
    other = {"blob": {"url": f"{server.url}/theirs/blob.bin", "sha1": digest(theirs)}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.MonkeyPatch.context() as m:
        m.setenv("NLI_HUB_MANIFEST", str(tmp_path / "other.json"))
        hub.import_file("blob", tmp_path / "theirs.bin", quiet=True)
    before = file_state(path)
    with pytest.raises(UserError, match=f"verified against the manifest {tmp_path / 'other.json'}"):
        hub.import_file("blob", tmp_path / "good.bin", quiet=True)  # the right file, but another is in the way
    with pytest.raises(UserError, match="The file is kept"):
        hub.download_extract("blob", quiet=True)
    assert file_state(path) == before and not server.requests and not os.path.exists(path + ".part")
    assert hub.import_file("blob", tmp_path / "good.bin", quiet=True, replace=True) == path
    assert fileio.sha1_of(path) == digest(DATA) and open(hub.mismatch_path(path, digest(theirs)), "rb").read() == theirs
    assert hub.download("blob", quiet=True) == path and not server.requests


def test_file_urls_are_copied_checked_and_left_alone(tmp_path, monkeypatch):
    archive, other = zip_bytes({"pack/vocab.json": b"[]"}), b"another file"
    mirror = tmp_path / "mirror dir"  # a space, which the URL spells %20
    mirror.mkdir()
    (mirror / "pack.zip").write_bytes(archive)
    (mirror / "other.zip").write_bytes(other)
    before = [file_state(mirror / f) for f in ("pack.zip", "other.zip")]
    manifest = {"pack": {"url": (mirror / "pack.zip").as_uri(), "sha1": digest(archive),
                         "members": ["pack/vocab.json"]},
                "wrong": {"url": (mirror / "other.zip").as_uri(), "sha1": digest(archive)},
                "gone": {"url": (mirror / "gone.zip").as_uri(), "sha1": digest(archive)},
                "remote": {"url": "file://elsewhere/remote.zip", "sha1": digest(archive)}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("NLI_HUB_MANIFEST", str(tmp_path / "manifest.json"))
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NLI_MIRROR", raising=False)

    assert hub.download_extract("pack", quiet=True) == str(tmp_path / "data" / "pack")
    assert (tmp_path / "data" / "pack" / "vocab.json").read_bytes() == b"[]"
    assert hub.is_verified(str(tmp_path / "data" / "pack.zip"), digest(archive))
    with pytest.raises(UserError, match=f"gave a file with SHA-1 {digest(other)}, but the manifest .* expects "
                                        f"{digest(archive)} for wrong; the copy was not kept"):
        hub.download("wrong", quiet=True)
    with pytest.raises(UserError, match=f"Could not download gone: {mirror / 'gone.zip'}: No such file"):
        hub.download("gone", quiet=True)
    with pytest.raises(UserError, match="host 'elsewhere' is not this machine"):
        hub.download("remote", quiet=True)
    assert sorted(os.listdir(tmp_path / "data")) == ["gone.zip.lock", "other.zip.lock", "pack", "pack.zip",
                                                     "pack.zip.lock", "pack.zip.verified", "remote.zip.lock"]
    assert [file_state(mirror / f) for f in ("pack.zip", "other.zip")] == before


def test_a_file_url_mirror_is_checked_against_the_built_in_sha1(tmp_path):
    (tmp_path / "bert.small.zip").write_bytes(b"not the book's bert.small")
    env = {**os.environ, "NLI_MIRROR": tmp_path.as_uri() + "/", "NLI_DATA_DIR": str(tmp_path / "data")}
    env.pop("NLI_HUB_MANIFEST", None)
    result = run_cli("download", "bert.small", env=env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert digest(b"not the book's bert.small") in result.stderr and hub.BUILTIN["bert.small"].sha1 in result.stderr
    assert "No connection adapters" not in result.stderr
    assert (tmp_path / "bert.small.zip").read_bytes() == b"not the book's bert.small"
