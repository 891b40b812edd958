"""The book's code, as the reference that tests and benchmarks hold nli to.

Source: Dive into Deep Learning, chapter "Natural Language Inference: Fine-Tuning BERT" (MXNet tab),
run on d2l 1.0.3's own functions (`from d2l import mxnet as d2l`). `SNLIBERTDataset` and
`BERTClassifier` are the chapter's, as it prints them; `predict_snli` is the book's function of that
name (section "Natural Language Inference: Using Attention") given the inputs this chapter's dataset
makes; the script below fine-tunes as the chapter does, with `d2l.train_ch13`.

d2l 1.0.3 pins numpy 1.23.5, so it installs on Python 3.11 only: tests that import this module skip
where d2l does not import. This module must not import nli: nli sets OMP_NUM_THREADS, and the book's
loop is measured with the threads the user left.

Run as a script, it trains and writes its figures as JSON (bench/bench_train.py reads them):

    python tests/book_reference.py --max-steps 5 --eval-limit 512 --epochs 1 --out /tmp/book.json

What differs from the chapter, because of this machine: the book's bert.small weights and SNLI zip
cannot be downloaded here, so the pairs come from a tab-separated file (tests/data by default) and
the model is a bert.small-shaped `d2l.BERTModel` with random weights, its vocabulary `d2l.Vocab`
over the training sentences (accuracy is then near chance); `d2l.try_all_gpus()` is `[]` without a
GPU, so the devices fall back to the CPU; `d2l.Animator` draws as in the book but is shown only as
a saved PNG (--plot), since its Jupyter display fails or prints figure reprs in a script; seeds are fixed.
"""
import argparse
import contextlib
import csv
import io
import json
import multiprocessing
import os
import pathlib
import platform
import random
import re
import sys
import time
import types
import warnings

import matplotlib

matplotlib.use("Agg")  # a script has no display; see the module's docstring

import mxnet as mx  # noqa: E402
import numpy as onp  # noqa: E402
from d2l import mxnet as d2l  # noqa: E402
from mxnet import gluon, init, np, npx  # noqa: E402
from mxnet.gluon import nn  # noqa: E402

npx.set_np()

DEV_PAIRS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "snli_1.0_dev_pairs.tsv")
LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}  # d2l.read_snli's ids
RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]


class SNLIBERTDataset(gluon.data.Dataset):
    def __init__(self, dataset, max_len, vocab=None):
        all_premise_hypothesis_tokens = [[
            p_tokens, h_tokens] for p_tokens, h_tokens in zip(
            *[d2l.tokenize([s.lower() for s in sentences])
              for sentences in dataset[:2]])]

        self.labels = np.array(dataset[2])
        self.vocab = vocab
        self.max_len = max_len
        (self.all_token_ids, self.all_segments,
         self.valid_lens) = self._preprocess(all_premise_hypothesis_tokens)
        print('read ' + str(len(self.all_token_ids)) + ' examples')

    def _preprocess(self, all_premise_hypothesis_tokens):
        pool = multiprocessing.Pool(4)  # Use 4 worker processes
        out = pool.map(self._mp_worker, all_premise_hypothesis_tokens)
        all_token_ids = [
            token_ids for token_ids, segments, valid_len in out]
        all_segments = [segments for token_ids, segments, valid_len in out]
        valid_lens = [valid_len for token_ids, segments, valid_len in out]
        return (np.array(all_token_ids, dtype='int32'),
                np.array(all_segments, dtype='int32'),
                np.array(valid_lens))

    def _mp_worker(self, premise_hypothesis_tokens):
        p_tokens, h_tokens = premise_hypothesis_tokens
        self._truncate_pair_of_tokens(p_tokens, h_tokens)
        tokens, segments = d2l.get_tokens_and_segments(p_tokens, h_tokens)
        token_ids = self.vocab[tokens] + [self.vocab['<pad>']] \
                             * (self.max_len - len(tokens))
        segments = segments + [0] * (self.max_len - len(segments))
        valid_len = len(tokens)
        return token_ids, segments, valid_len

    def _truncate_pair_of_tokens(self, p_tokens, h_tokens):
        # Reserve slots for '<CLS>', '<SEP>', and '<SEP>' tokens for the BERT
        # input
        while len(p_tokens) + len(h_tokens) > self.max_len - 3:
            if len(p_tokens) > len(h_tokens):
                p_tokens.pop()
            else:
                h_tokens.pop()

    def __getitem__(self, idx):
        return (self.all_token_ids[idx], self.all_segments[idx],
                self.valid_lens[idx]), self.labels[idx]

    def __len__(self):
        return len(self.all_token_ids)


class BERTClassifier(nn.Block):
    def __init__(self, bert):
        super(BERTClassifier, self).__init__()
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.output = nn.Dense(3)

    def forward(self, inputs):
        tokens_X, segments_X, valid_lens_x = inputs
        encoded_X = self.encoder(tokens_X, segments_X, valid_lens_x)
        return self.output(self.hidden(encoded_X[:, 0, :]))


def predict_snli(net, vocab, premise, hypothesis, max_len=128):
    """Predict the logical relationship between the premise and hypothesis (word-token lists), one pair
    at a time as the book does, the pair made into BERT's inputs as `SNLIBERTDataset` makes them."""
    dataset = SNLIBERTDataset.__new__(SNLIBERTDataset)  # its per-example code, without its Pool
    dataset.vocab, dataset.max_len = vocab, max_len
    token_ids, segments, valid_len = dataset._mp_worker([list(premise), list(hypothesis)])
    inputs = (np.array([token_ids], dtype='int32', ctx=d2l.try_gpu()),
              np.array([segments], dtype='int32', ctx=d2l.try_gpu()),
              np.array([valid_len], ctx=d2l.try_gpu()))
    label = np.argmax(net(inputs), axis=1)
    return 'entailment' if label == 0 else 'contradiction' if label == 1 \
            else 'neutral'


def read_pairs(path, limit=None):
    """(premises, hypotheses, labels) of a tab-separated pair file, with d2l.read_snli's label ids."""
    premises, hypotheses, labels = [], [], []
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if next(rows)[:3] != ["premise", "hypothesis", "label"]:
            sys.exit(f"{path}: expected the header premise, hypothesis, label")
        for premise, hypothesis, label, *_ in rows:
            if limit is not None and len(labels) >= limit:
                break
            if label in LABELS:
                premises.append(premise)
                hypotheses.append(hypothesis)
                labels.append(LABELS[label])
    return premises, hypotheses, labels


def timed_evaluation(log):
    """`d2l.evaluate_accuracy_gpus`, appending each call's accuracy and seconds to `log`, so the
    training loop's own time can be told apart from train_ch13's evaluations."""
    evaluate = d2l.evaluate_accuracy_gpus

    def evaluate_and_time(net, data_iter, split_f=d2l.split_batch):
        start = time.perf_counter()
        accuracy = evaluate(net, data_iter, split_f)
        log.append({"accuracy": accuracy, "seconds": time.perf_counter() - start})
        return accuracy
    return evaluate_and_time


def main():
    parser = argparse.ArgumentParser(description="Fine-tune as the book's chapter does, with d2l.train_ch13.")
    parser.add_argument("--train", default=DEV_PAIRS, help="tab-separated pairs: premise, hypothesis, label")
    parser.add_argument("--eval", default=DEV_PAIRS, help="the same, to test on")
    parser.add_argument("--eval-limit", type=int, help="test on the first N pairs only")
    parser.add_argument("--max-steps", type=int, help="train on the first N batches' worth of pairs (N >= 5: "
                        "train_ch13 records every num_batches // 5 batches)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--num-workers", type=int, default=d2l.get_dataloader_workers())
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", help="save train_ch13's curves to this PNG")
    parser.add_argument("--out", help="write the figures to this JSON file")
    args = parser.parse_args()
    if args.max_steps is not None and args.max_steps < 5:
        parser.error("--max-steps must be at least 5")
    random.seed(args.seed)
    onp.random.seed(args.seed)
    mx.random.seed(args.seed)
    # d2l.Animator is made for Jupyter: it asks for SVG output, which starts an IPython shell that
    # matplotlib then fails to hook into, and shows every update with IPython's display(), which prints
    # the figure's repr in a script. Draw on the figure as the book does, show nothing, save it at the end.
    d2l.use_svg_display = lambda: None
    d2l.display = types.SimpleNamespace(display=lambda *figures: None, clear_output=lambda wait=False: None)
    warnings.filterwarnings("ignore", "Attempting to set identical")  # train_ch13's xlim is [1, 1] for 1 epoch

    batch_size, max_len, num_workers = args.batch_size, args.max_len, args.num_workers
    devices = d2l.try_all_gpus() or [mx.cpu()]  # d2l 1.0.3 returns [] on a machine without a GPU
    train_data, test_data = read_pairs(args.train), read_pairs(args.eval, args.eval_limit)
    vocab = d2l.Vocab(d2l.tokenize([s.lower() for s in train_data[0] + train_data[1]]), min_freq=1,
                      reserved_tokens=RESERVED)
    start = time.perf_counter()
    train_set = SNLIBERTDataset(train_data, max_len, vocab)
    built = time.perf_counter()
    test_set = SNLIBERTDataset(test_data, max_len, vocab)
    construction = {"train_pairs": len(train_set), "train_seconds": built - start,
                    "eval_pairs": len(test_set), "eval_seconds": time.perf_counter() - built}
    padding_efficiency = float(train_set.valid_lens.sum()) / train_set.all_token_ids.size
    if args.max_steps is not None:
        train_set = train_set.take(args.max_steps * batch_size)
    train_iter = gluon.data.DataLoader(train_set, batch_size, shuffle=True,
                                       num_workers=num_workers)
    test_iter = gluon.data.DataLoader(test_set, batch_size,
                                      num_workers=num_workers)

    bert = d2l.BERTModel(len(vocab), 256, 512, 4, 2, 0.1, 512)  # bert.small's shape
    bert.initialize(init.Xavier(), ctx=devices)  # where the book loads bert.small's weights
    net = BERTClassifier(bert)
    net.output.initialize(ctx=devices)
    trainer = gluon.Trainer(net.collect_params(), 'adam',
                            {'learning_rate': args.lr})
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    evaluations = []
    d2l.evaluate_accuracy_gpus = timed_evaluation(evaluations)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()) as printed:  # its figures are only printed
        d2l.train_ch13(net, train_iter, test_iter, loss, trainer, args.epochs, devices,
                       d2l.split_batch_multi_inputs)
    npx.waitall()
    seconds = time.perf_counter() - start
    print(printed.getvalue(), end="")
    if args.plot:
        d2l.plt.gcf().savefig(args.plot)  # train_ch13's Animator figure, the last one made

    train_examples = len(train_set) * args.epochs
    train_loop_seconds = seconds - sum(e["seconds"] for e in evaluations)
    reported = re.search(r"([\d.]+) examples/sec", printed.getvalue())
    results = {
        "peer": "book_reference", "command": " ".join([sys.executable] + sys.argv), "config": vars(args),
        "versions": {"python": platform.python_version(), "mxnet": mx.__version__,
                     "d2l": sys.modules["d2l"].__version__, "numpy": onp.__version__},
        "devices": str(devices), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "vocab_size": len(vocab),
        "construction": construction,
        "token_lengths_train": {"padding_efficiency_at_max_len": padding_efficiency},
        "training": {"epochs": args.epochs, "steps": len(train_iter) * args.epochs,
                     "train_examples": train_examples, "train_ch13_printed": printed.getvalue().splitlines(),
                     "train_ch13_examples_per_sec": float(reported.group(1)),
                     "wallclock_train_loop_seconds": train_loop_seconds,
                     "wallclock_train_examples_per_sec": train_examples / train_loop_seconds,
                     "train_ch13_total_seconds": seconds},
        "eval": {"per_epoch": evaluations, "final_test_accuracy": evaluations[-1]["accuracy"],
                 "eval_pairs": len(test_set), "note": "random weights, not bert.small's: near chance"},
    }
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(results, indent=1), encoding="utf-8")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
