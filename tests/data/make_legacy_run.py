"""Write tests/data/legacy_run/: a run directory as `python -m nli finetune` wrote it before issue 17.

Made once, with the code of commit 4734998 (before the training engine was rebuilt), and kept so the
tests can check that runs written by that version still load for `evaluate` and `predict` (its
`best/` is a finished model) and continue with `--resume` (it was stopped by Ctrl-C in epoch 2, so
its `checkpoint/` is mid-epoch). The BERT is book-layout and tiny (32 hidden units, a vocabulary of
the first 200 real pairs' words), so the whole directory stays well under a megabyte.

    python tests/data/make_legacy_run.py      # from the repository root; rewrites tests/data/legacy_run/
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join("tests", "data", "legacy_run")  # relative: the run's saved settings name these paths
PAIRS = os.path.join("tests", "data", "snli_1.0_dev_pairs.tsv")
MODEL = os.path.join(OUT, "bert.tiny")
RUN = os.path.join(OUT, "run")
# The command the tests compare a resumed legacy run against (with the run dir appended).
FINETUNE = ["finetune", "--model", MODEL, "--train", PAIRS, "--test", PAIRS, "--limit-train", "96",
            "--limit-test", "32", "--dev-fraction", "0.25", "--recipe", "tuned", "--epochs", "2", "--batch-size",
            "8", "--max-len", "32", "--lr", "1e-3", "--log-every", "1", "--devices", "cpu", "--seed", "5",
            "--quiet", "--out"]


def save_tiny_bert(folder, num_pairs=200):
    """A `d2l.BERTModel` (32 hidden, 2 heads, 1 block) saved as the book's zips hold it, with its vocab.json."""
    import mxnet as mx
    from d2l import mxnet as d2l
    from mxnet import init, np, npx
    sys.path.insert(0, ROOT)
    from nli import snli
    npx.set_np()
    mx.random.seed(0)
    premises, hypotheses, _ = snli.read_pairs(PAIRS)
    tokens = [t for s in premises[:num_pairs] + hypotheses[:num_pairs] for t in snli.tokenize(s)]
    vocab = d2l.Vocab(tokens, reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    sizes = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_blks=1, max_len=64)
    bert = d2l.BERTModel(len(vocab), dropout=0.1, **sizes)
    bert.initialize(init.Xavier())
    x = np.array([[1, 2, 3, 4]], dtype="int32")
    bert(x, np.zeros_like(x), np.array([4.0]), np.array([[1, 2]]))  # runs every head once
    os.makedirs(folder)
    bert.save_parameters(os.path.join(folder, "pretrained.params"))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab.idx_to_token, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(sizes, dropout=0.1), f)


def stopped_in_epoch_two(run_dir):
    """True once metrics.jsonl shows two updates of epoch 2."""
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            entries = [json.loads(line) for line in f]
    except FileNotFoundError:
        return False
    return sum(1 for m in entries if m["kind"] == "step" and m["epoch"] == 2) >= 2


def main():
    os.chdir(ROOT)
    shutil.rmtree(OUT, ignore_errors=True)
    save_tiny_bert(MODEL)
    env = {**os.environ, "PYTHONPATH": ROOT, "NLI_DATA_DIR": tempfile.mkdtemp()}
    process = subprocess.Popen([sys.executable, "-m", "nli", *FINETUNE, RUN], env=env)
    while not stopped_in_epoch_two(RUN):
        if process.poll() is not None:
            sys.exit("the run ended before it could be stopped in epoch 2")
        time.sleep(0.005)
    process.send_signal(signal.SIGINT)  # Ctrl-C: a checkpoint is saved at the next update
    assert process.wait() == 130
    shutil.rmtree(os.path.join(RUN, "features"), ignore_errors=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
