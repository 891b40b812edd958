"""Fixtures in the real layouts: a book-style BERT zip, an SNLI zip, and a loopback HTTP server."""
import functools
import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import nli  # noqa: E402,F401  (before any test imports mxnet: it repairs numpy for mxnet on Python 3.12+)
from bench.results_file import cpu_description  # noqa: E402  (the benchmarks record the CPU the same way)


def pytest_report_header(config):
    """Name the CPU in the log: floats computed elsewhere differ in their last bits, and a failure reads by it."""
    return f"cpu: {cpu_description()}"


def pytest_terminal_summary(terminalreporter, config):
    """Under -q (as .ci/run calls pytest), which prints no header, the CPU line ends the log instead."""
    if config.get_verbosity() < 0:
        terminalreporter.write_line(f"cpu: {cpu_description()}")


def import_d2l():
    """The book's library (d2l.mxnet), or None where it is not installed (Python 3.12+: see requirements.txt)."""
    try:
        from d2l import mxnet as d2l
    except ImportError:
        return None
    return d2l


D2L = import_d2l()
needs_d2l = pytest.mark.skipif(D2L is None, reason="compares with the book's own code: d2l 1.0.3 pins "
                                                   "numpy==1.23.5, which has no wheel for Python 3.12+, "
                                                   "so it is installed on Python 3.11 only")
DATA = os.path.join(ROOT, "tests", "data")  # real SNLI pairs; see its README.md
SAMPLE_DIR = os.path.join(DATA, "snli_1.0_format_sample")
DEV_PAIRS = os.path.join(DATA, "snli_1.0_dev_pairs.tsv")
SNLI_TXT_COLUMNS = ["gold_label", "sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse",
                    "sentence2_parse", "sentence1", "sentence2", "captionID", "pairID",
                    "label1", "label2", "label3", "label4", "label5"]
RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]
SMALL = dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, max_len=512)  # bert.small


def sha1(path):
    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()


def jsonl_to_txt(jsonl_path):
    """An SNLI .txt split written from its .jsonl twin, columns as in the zip (the sample lacks train.txt)."""
    lines = ["\t".join(SNLI_TXT_COLUMNS)]
    with open(jsonl_path, encoding="utf-8") as f:
        for line in f:
            obj = json.loads(line)
            labels = obj["annotator_labels"] + [""] * (5 - len(obj["annotator_labels"]))
            lines.append("\t".join([obj[c] for c in SNLI_TXT_COLUMNS[:9]] + labels))
    return "\n".join(lines) + "\n"


def build_vocab_tokens():
    """Lower-cased word tokens of the real dev pairs and the format samples."""
    from nli import snli
    tokens = []
    paths = [DEV_PAIRS] + [os.path.join(SAMPLE_DIR, f"snli_1.0_{s}.jsonl") for s in ("train", "dev", "test")]
    for path in paths:
        premises, hypotheses, _ = snli.read_pairs(path)
        tokens += [t for s in premises + hypotheses for t in snli.tokenize(s)]
    return tokens


def save_book_bert(folder, **sizes):
    """A `d2l.BERTModel` saved with `save_parameters`, and its `vocab.json`, as the book's zips hold them.

    Where d2l is not installed, nli's own BERTModel writes them: the same parameter names and shapes
    (tests/test_book_parity.py checks nli against d2l-made files on every Python).
    """
    import mxnet as mx
    from mxnet import init, np, npx
    from nli import bert as nli_bert
    npx.set_np()
    mx.random.seed(0)
    vocab = nli_bert.Vocab(build_vocab_tokens(), reserved_tokens=RESERVED)
    bert = (D2L or nli_bert).BERTModel(len(vocab), dropout=0.1, **sizes)
    bert.initialize(init.Xavier())
    tokens = np.array([[1, 2, 3, 4]], dtype="int32")
    bert(tokens, np.zeros_like(tokens), np.array([4.0]), np.array([[1, 2]]))  # runs every head once
    os.makedirs(folder, exist_ok=True)
    bert.save_parameters(os.path.join(folder, "pretrained.params"))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab.idx_to_token, f)
    return folder


def zip_folder(folder, zip_path):
    """Zip `folder` with its name as the archive's top directory, as d2l's zips are laid out."""
    base = os.path.dirname(folder)
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for dirpath, _, files in os.walk(folder):
            for name in sorted(files):
                path = os.path.join(dirpath, name)
                z.write(path, os.path.relpath(path, base))
    return zip_path


def build_snli_zip(zip_path):
    """`snli_1.0.zip` in the real layout, from the real format samples."""
    with zipfile.ZipFile(zip_path, "w", zipfile.ZIP_DEFLATED) as z:
        for split in ("train", "dev", "test"):
            jsonl = os.path.join(SAMPLE_DIR, f"snli_1.0_{split}.jsonl")
            txt = os.path.join(SAMPLE_DIR, f"snli_1.0_{split}.txt")
            z.write(jsonl, f"snli_1.0/snli_1.0_{split}.jsonl")
            if os.path.exists(txt):
                z.write(txt, f"snli_1.0/snli_1.0_{split}.txt")
            else:
                z.writestr(f"snli_1.0/snli_1.0_{split}.txt", jsonl_to_txt(jsonl))
    return zip_path


@pytest.fixture(scope="session")
def served_dir(tmp_path_factory):
    """A folder of files in the real layouts: bert.small.zip and snli_1.0.zip."""
    root = tmp_path_factory.mktemp("served")
    build_dir = tmp_path_factory.mktemp("build")
    zip_folder(save_book_bert(str(build_dir / "bert.small"), **SMALL), str(root / "bert.small.zip"))
    build_snli_zip(str(root / "snli_1.0.zip"))
    return root


@pytest.fixture(scope="session")
def training_bert_dir(tmp_path_factory):
    """A book-layout BERT small enough to train in tests (32 hidden units, 2 heads, 1 block, dropout 0.1)."""
    sizes = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_blks=1, max_len=64)
    folder = save_book_bert(str(tmp_path_factory.mktemp("training") / "bert.training"), **sizes)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(sizes, dropout=0.1), f)
    return folder


@pytest.fixture(scope="session")
def tiny_hf_bert(tmp_path_factory):
    """A tiny random BERT checkpoint in Hugging Face's layout (tests/test_hf.py's), for `hf:DIR` runs in seconds."""
    import numpy as onp
    from test_hf import tiny_tensors, tiny_vocab, write_checkpoint
    vocab = tiny_vocab()
    tensors = tiny_tensors(len(vocab), onp.random.RandomState(0))
    return write_checkpoint(str(tmp_path_factory.mktemp("hf") / "tiny"), tensors, vocab)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="session")
def http_server(served_dir):
    """A loopback HTTP server over `served_dir`; yields its base URL."""
    handler = functools.partial(QuietHandler, directory=str(served_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def hub_env(tmp_path, served_dir, http_server, monkeypatch):
    """Environment pointing the hub at the loopback server through a manifest, with an empty data dir."""
    manifest = {name: {"url": f"{http_server}/{file}", "sha1": sha1(served_dir / file)}
                for name, file in (("bert.small", "bert.small.zip"), ("SNLI", "snli_1.0.zip"))}
    manifest_path = tmp_path / "manifest.json"
    manifest_path.write_text(json.dumps(manifest))
    monkeypatch.setenv("NLI_HUB_MANIFEST", str(manifest_path))
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NLI_MIRROR", raising=False)
    return dict(os.environ)


def closed_port():
    """A loopback port nothing listens on: connecting to it is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args, env=None, cwd=None):
    """Run `python -m nli ARGS` in a subprocess; return the completed process."""
    return subprocess.run([sys.executable, "-m", "nli", *map(str, args)], capture_output=True, text=True,
                          env={**(env or os.environ), "PYTHONPATH": ROOT}, cwd=cwd or ROOT, timeout=600)


def budget_for(net, pairs_per_micro_batch, length):
    """The --max-memory whose micro-batches hold `pairs_per_micro_batch` pairs of `length` tokens."""
    from nli import memory
    plan = memory.MemoryPlan(1, memory.Shape.of(net), length)
    return plan.expected_peak(pairs_per_micro_batch, length)
