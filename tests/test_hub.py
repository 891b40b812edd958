"""The hub against a loopback server that misbehaves on purpose: each case ends in a verified file or a clear error."""
import hashlib
import http.server
import io
import json
import os
import random
import re
import socket
import stat
import subprocess
import sys
import tarfile
import threading
import zipfile

import pytest

from conftest import ROOT, run_cli
from nli import hub
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
    assert hub.sha1_of(path) == digest(DATA)
    assert not os.path.exists(path + ".part")


def test_server_ignoring_range_restarts_from_zero(server, publish):
    path = publish("blob", "blob.bin", DATA, drops=1, ignore_range=True)
    hub.download("blob", quiet=True)
    assert server.gets("blob.bin") == [None, f"bytes={len(DATA) // 2}-"]
    assert os.path.getsize(path) == len(DATA) and hub.sha1_of(path) == digest(DATA)


def test_wrong_bytes_fail_naming_url_and_both_sha1s(server, publish):
    wrong = DATA[::-1]
    path = publish("blob", "blob.bin", DATA, body=wrong)
    with pytest.raises(UserError) as err:
        hub.download("blob", quiet=True)
    assert f"{server.url}/blob.bin" in str(err.value)
    assert digest(wrong) in str(err.value) and digest(DATA) in str(err.value)
    assert not os.path.exists(path) and not os.path.exists(path + ".part")
    assert len(server.gets("blob.bin")) == 1


@pytest.mark.parametrize("status, tries", [(404, 1), (500, 3)])  # 500: the first try and NLI_HUB_RETRIES=2 more
def test_http_errors_stop_after_bounded_tries(server, publish, status, tries):
    path = publish("blob", "blob.bin", DATA, status=status)
    with pytest.raises(UserError, match=f"HTTP {status}") as err:
        hub.download("blob", quiet=True)
    assert f"{server.url}/blob.bin" in str(err.value)
    assert len(server.gets("blob.bin")) == tries
    assert not os.path.exists(path)


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
        hub.download("blob", quiet=True)
        assert hub.sha1_of(path) == digest(DATA)
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


def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_offline_cli_prints_the_ways_out_without_traceback(tmp_path):
    mirror = f"http://127.0.0.1:{closed_port()}/"
    env = {**os.environ, "NLI_MIRROR": mirror, "NLI_DATA_DIR": str(tmp_path / "data"),
           "NLI_HUB_RETRIES": "1", "NLI_HUB_BACKOFF": "0.01"}
    env.pop("NLI_HUB_MANIFEST", None)
    result = run_cli("download", "bert.small", env=env)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    *retry_notes, message = result.stderr.strip().splitlines()  # the error is one paragraph, after the notes
    assert message.startswith("error: Could not download bert.small") and len(retry_notes) == 1
    for needed in (mirror + "bert.small.zip", "Connection refused", "NLI_MIRROR", "NLI_HUB_MANIFEST",
                   "python -m nli download bert.small --from FILE", hub.BUILTIN["bert.small"].sha1):
        assert needed in message


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
    rows = {line.split()[0]: line for line in result.stdout.splitlines()}
    assert set(rows) == set(hub.BUILTIN) | {"blob", "other"}
    assert re.search(rf"verified\s+256kB\s+{server.url}/blob.bin$", rows["blob"])
    assert "SHA-1 differs" in rows["other"]
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
    assert hub.sha1_of(path) == digest(archive) and not os.path.exists(path + ".part")
    assert os.path.getsize(tmp_path / "data" / "pack" / "weights.bin") == 2 << 20
