"""Fine-tuning throughput: `nli`'s loop against the book's `train_ch13`, on the real SNLI pairs.

Same machine, same data (tests/data/snli_1.0_dev_pairs.tsv, 9,842 pairs), same model size: a
bert.small-shaped BERT (256 hidden, 512 ffn, 4 heads, 2 layers, dropout 0.1; random init, the
book's vocabulary built from the data), the book's classifier head, Adam at 1e-4, batch 512,
max_len 128. The book's side is the chapter's code run by tests/book_reference.py in a child process
(it needs d2l; nli's sections do not). Examples/sec count only the training steps (forward, backward,
update), as `train_ch13`'s own timer does; wall-clock figures are given beside them.

Beyond the book: what hybridization buys (`nli_imperative`), the feature-extraction mode against full
fine-tuning per epoch (`features`), and OpenMP threads that spin while waiting (`nli_spinning_threads`,
OMP_WAIT_POLICY=ACTIVE, against nli's PASSIVE).

Sections run in order and each writes its figures into the results JSON, so one can be re-run
alone (`--sections nli`) without losing the others. To add one, write `def section_NAME(setup, args)`
returning a dict and list it in SECTIONS.

    python bench/bench_train.py     # all sections (~30 min on 2 cores); bench/results/bench_train.json
"""
import os

BOOK_ENV = dict(os.environ)  # the environment the book's code runs in, before nli sets OMP_NUM_THREADS

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from unittest import mock  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nli  # noqa: E402  (first: it sets OMP_NUM_THREADS before MXNet loads)
import mxnet as mx  # noqa: E402
import numpy as onp  # noqa: E402
from mxnet import init  # noqa: E402

from nli import bert, data, model, snli, train  # noqa: E402
from nli.recipe import BOOK  # noqa: E402
from results_file import write_results  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
BOOK_SCRIPT = os.path.join(ROOT, "tests", "book_reference.py")
SMALL = dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, dropout=0.1, max_len=512)  # bert.small
BATCH_SIZE, MAX_LEN, LR = 512, 128, 1e-4  # the book's


def build_setup(seed):
    """What every section shares: the real pairs, the book's vocabulary over them, their encoding."""
    premises, hypotheses, labels = snli.read_pairs(DATA)
    vocab = bert.Vocab([t for s in premises + hypotheses for t in snli.tokenize(s)],
                       reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    encoded = snli.encode_pairs(premises, hypotheses, labels, vocab, MAX_LEN)
    return {"vocab": vocab, "encoded": encoded, "seed": seed, "device": mx.cpu()}


def small_classifier(setup, hybridize=True):
    """A bert.small-shaped `BERTClassifier`, randomly initialized, hybridized as `finetune` runs it."""
    mx.random.seed(setup["seed"])
    encoder = bert.BERTModel(len(setup["vocab"]), **SMALL)
    encoder.initialize(init.Xavier(), ctx=setup["device"])
    net = model.BERTClassifier(encoder)
    net.output.initialize(init.Xavier(), ctx=setup["device"])
    net.hybridize(static_alloc=True, active=hybridize)
    return net


def small_model_dir(setup, folder):
    """A bert.small-shaped BERT of random weights, saved in the book's layout (vocab.json, pretrained.params, its
    sizes in config.json) for `nli.run` to load as it loads bert.small."""
    mx.random.seed(setup["seed"])
    encoder = bert.BERTModel(len(setup["vocab"]), **SMALL, pretraining_heads=False)
    encoder.initialize(init.Xavier())
    os.makedirs(folder, exist_ok=True)
    encoder.save_parameters(os.path.join(folder, "pretrained.params"))
    bert.save_vocab(setup["vocab"], os.path.join(folder, "vocab.json"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**SMALL, "pretraining_heads": False}, f)
    return folder


def run_nli(setup, hybridize=True, **changes):
    """`nli.run` on the real pairs (the first 512 as the test set too, as the book's test loop scores), with the
    bert.small-shaped BERT and the book's recipe: its epochs' metrics."""
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as changes_for_this_run:
        os.environ["NLI_DATA_DIR"] = os.path.join(tmp, "data")  # the encoding cache, as a first run builds it
        if not hybridize:  # the classifier `nli.run` builds stays imperative: what hybridization buys
            changes_for_this_run.enter_context(mock.patch.object(model.BERTClassifier, "hybridize",
                                                                 lambda self, **kwargs: None))
        out = nli.run("book", model=small_model_dir(setup, os.path.join(tmp, "bert.small")), train=DATA, test=DATA,
                      limit_test=512, batch_size=BATCH_SIZE, max_len=MAX_LEN, lr=LR, seed=setup["seed"],
                      devices="cpu", out=os.path.join(tmp, "run"), quiet=True, **changes)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            return [m for m in map(json.loads, f) if m["kind"] == "epoch"]


def run_book(steps, env, label):
    """The book's code (tests/book_reference.py) for `steps` steps of one epoch of train_ch13: its figures."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "book.json")
        command = [sys.executable, BOOK_SCRIPT, "--train", DATA, "--eval", DATA, "--eval-limit", "512",
                   "--max-steps", str(steps), "--epochs", "1", "--out", out]
        print(f"[{label}] {' '.join(command)}  (OMP_NUM_THREADS={env.get('OMP_NUM_THREADS', 'unset')})",
              flush=True)
        subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            peer = json.load(f)
    training = peer["training"]
    return {"command": " ".join(command[1:]), "OMP_NUM_THREADS": env.get("OMP_NUM_THREADS"),
            "OMP_WAIT_POLICY": env.get("OMP_WAIT_POLICY"),
            "MXNET_USE_OPERATOR_TUNING": env.get("MXNET_USE_OPERATOR_TUNING"),
            "steps": training["steps"], "examples": training["train_examples"],
            "examples_per_sec": training["train_ch13_examples_per_sec"],
            "wallclock_examples_per_sec": training["wallclock_train_examples_per_sec"],
            "padding_efficiency": peer["token_lengths_train"]["padding_efficiency_at_max_len"]}


def section_book(setup, args):
    """The book's loop as the book runs it (OMP_NUM_THREADS as the user left it)."""
    return run_book(args.book_steps, BOOK_ENV, "book")


def section_book_all_cores(setup, args):
    """The book's loop with the threading nli runs with (every core, threads that sleep while they wait, every
    kernel on all threads): the thread-matched baseline."""
    matched = {"OMP_NUM_THREADS": str(os.cpu_count()),
               **{name: os.environ[name] for name in ("OMP_WAIT_POLICY", "MXNET_USE_OPERATOR_TUNING")}}
    return run_book(args.book_steps, {**BOOK_ENV, **matched}, "book_all_cores")


def section_nli(setup, args, hybridize=True):
    """nli's loop (`nli.run`, as `nli finetune` runs it): length-bucketed batches (the book recipe's bucket width), a
    hybridized model, all cores. Epoch 1 includes building a graph for each new batch shape; epoch 2 is the
    steady state, and the figure compared."""
    encoded = setup["encoded"]
    started = time.perf_counter()
    metrics = run_nli(setup, hybridize, epochs=2)
    wall = time.perf_counter() - started
    epochs = [{"epoch": m["epoch"], "examples_per_sec": m["examples_per_sec"]}
              for m in metrics if "examples_per_sec" in m]
    recipe = dataclasses.replace(BOOK, batch_size=BATCH_SIZE, seed=setup["seed"])  # how `run_nli` batches
    for epoch in epochs:
        batches = [data.make_batch(encoded, indices, recipe.bucket_width)
                   for indices in train.Shards(encoded.valid_lens, recipe, 1).batches(epoch["epoch"])[0]]
        epoch["padding_efficiency"] = (sum(float(b[2].sum()) for b in batches)
                                       / sum(b[0].size for b in batches))
    return {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "epochs": epochs,
            "examples_per_sec": epochs[-1]["examples_per_sec"],
            "wallclock_seconds_two_epochs_with_eval": wall}


def section_nli_imperative(setup, args):
    """Section nli with the model left imperative (not hybridized): what hybridization buys."""
    return section_nli(setup, args, hybridize=False)


def section_features(setup, args):
    """`finetune --extract-features` against full fine-tuning: seconds of training per epoch.

    Full fine-tuning runs one epoch. The feature mode computes the encoder's `<cls>` features once
    (`train.pooled_features`, timed on its own here) and trains the head on them for the book's 5 epochs."""
    encoded, devices = setup["encoded"], [setup["device"]]
    start = time.perf_counter()
    train.pooled_features(small_classifier(setup), encoded, onp.arange(len(encoded)), devices, BATCH_SIZE)
    extraction = time.perf_counter() - start
    epoch_seconds = {}
    for mode, epochs in (("full", 1), ("features", 5)):
        metrics = run_nli(setup, epochs=epochs, mode=mode)
        epoch_seconds[mode] = [len(encoded) / m["examples_per_sec"] for m in metrics]
        print(f"[features] {mode}: {epoch_seconds[mode]} s per epoch", flush=True)
    full, features = epoch_seconds["full"][0], onp.mean(epoch_seconds["features"])
    return {"full_epoch_seconds": full, "features_epoch_seconds": epoch_seconds["features"],
            "extraction_seconds": extraction, "examples_per_sec": len(encoded) / features,
            "speedup_per_epoch": full / features,
            "speedup_5_epochs_with_extraction": 5 * full / (extraction + 5 * features)}


def section_nli_spinning_threads(setup, args):
    """Section nli with OMP_WAIT_POLICY=ACTIVE (threads spin while they wait), in a child process since
    OpenMP reads it once; nli's own default is PASSIVE. Spinning costs most on a busy machine."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "spinning.json")
        load = os.getloadavg()[0]
        subprocess.run([sys.executable, os.path.abspath(__file__), "--sections", "nli", "--seed", str(args.seed),
                        "--out", out], env={**os.environ, "OMP_WAIT_POLICY": "ACTIVE"}, check=True)
        with open(out) as f:
            figures = json.load(f)["nli"]
    return {**figures, "OMP_WAIT_POLICY": "ACTIVE", "load_average_before_after": [load, os.getloadavg()[0]]}


SECTIONS = {"book": section_book, "book_all_cores": section_book_all_cores, "nli": section_nli,
            "nli_imperative": section_nli_imperative, "features": section_features,
            "nli_spinning_threads": section_nli_spinning_threads}


def ratios(results):
    """nli's steady-state throughput over each book baseline that has been measured."""
    if "nli" not in results:
        return {}
    found = {f"nli_over_{name}": results["nli"]["examples_per_sec"] / results[name]["examples_per_sec"]
             for name in ("book", "book_all_cores", "nli_imperative", "nli_spinning_threads") if name in results}
    if "features" in results:
        found["features_over_full_per_epoch"] = results["features"]["speedup_per_epoch"]
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--book-steps", type=int, default=5, help="train_ch13 steps (>= 5, its minimum)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_train.json"))
    args = parser.parse_args()
    results = {}
    if os.path.exists(args.out):
        with open(args.out) as f:
            results = json.load(f)
    setup = build_setup(args.seed)
    for name in args.sections:
        load_before = os.getloadavg()[0]  # other jobs on the machine slow every figure: keep a trace of them
        results[name] = SECTIONS[name](setup, args)
        results[name]["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
        results[name]["load_average_1min_before_after"] = [load_before, os.getloadavg()[0]]
        results["ratios"] = ratios(results)
        results["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(),
                              "mxnet": mx.__version__, "note": "shared machine: other jobs may run"}
        results["command"] = " ".join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])
        write_results(results, args.out)
    for name in SECTIONS:
        if "examples_per_sec" in results.get(name, {}):
            print(f"{name:>15}: {results[name]['examples_per_sec']:8.1f} examples/sec")
    for name, value in results["ratios"].items():
        print(f"{name:>15}: {value:.1f}x")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
