"""Prediction throughput: `nli`'s batched, length-sorted `Predictor` vs the book's one-pair-at-a-time loop.

Both run in this process on the real SNLI dev pairs (tests/data), with the same weights: a
bert.small-shaped `d2l.BERTModel` (256 hidden, 512 ffn, 4 heads, 2 layers; random init, vocabulary
from the data) under the book's `BERTClassifier`. The book's side is the chapter's own code, from
tests/book_reference.py (it needs d2l): each pair goes through `SNLIBERTDataset`'s preprocessing
(padded to max_len 128) and then alone through the un-hybridized classifier, as the book's
`predict_snli` runs one pair. It is slow, so it runs on a seeded sample (--book-pairs). Other
jobs share the machine, so the three ways (book loop, `nli` one pair at a time, `nli` batched on all
pairs) take turns in --rounds rounds and their medians are compared.

    python bench/bench_predict.py            # writes bench/results/bench_predict.json
"""
import argparse
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # nli, and the book's code (tests/book_reference.py)

import nli  # noqa: E402  (first: it sets OMP_NUM_THREADS before MXNet loads)
import mxnet as mx  # noqa: E402
import numpy as onp  # noqa: E402
from mxnet import init  # noqa: E402
from d2l import mxnet as d2l  # noqa: E402

import book_reference as book  # noqa: E402
from nli import bert, model, predict, snli  # noqa: E402
from results_file import write_results  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
MAX_LEN = 128  # the book's
SMALL = dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, dropout=0.1, max_len=512)  # bert.small


def book_predict_loop(net, vocab, pairs):
    """The book's way: each pair tokenized as SNLIBERTDataset does, then `predict_snli` on it alone."""
    return [book.predict_snli(net, vocab, *d2l.tokenize([premise.lower(), hypothesis.lower()]), MAX_LEN)
            for premise, hypothesis in pairs]


def timed(function):
    """(result, seconds) of `function()`."""
    start = time.perf_counter()
    result = function()
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--book-pairs", type=int, default=300, help="sample size for the book's loop")
    parser.add_argument("--rounds", type=int, default=3, help="the three ways take turns this many times")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_predict.json"))
    args = parser.parse_args()
    mx.random.seed(args.seed)
    device = mx.cpu()

    premises, hypotheses, _ = snli.read_pairs(DATA)
    pairs = list(zip(premises, hypotheses))
    sample = [pairs[i] for i in onp.random.RandomState(args.seed).choice(len(pairs), args.book_pairs, False)]
    vocab = bert.Vocab([t for s in premises + hypotheses for t in snli.tokenize(s)],
                       reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])

    book_bert = d2l.BERTModel(len(vocab), **SMALL)
    book_net = book.BERTClassifier(book_bert)
    book_net.initialize(init.Xavier(), ctx=device)
    book_predict_loop(book_net, vocab, sample[:5])  # warm-up, and finishes deferred init

    with tempfile.TemporaryDirectory() as run_dir:  # the same weights, as a run dir `nli` loads
        book_net.save_parameters(os.path.join(run_dir, "book.params"))
        encoder = bert.BERTModel(len(vocab), **SMALL)
        net = model.BERTClassifier(encoder)
        net.load_parameters(os.path.join(run_dir, "book.params"), ctx=device)
        model.save_run(run_dir, net, vocab, {"max_len": MAX_LEN, "truncation": "longest_first"})
        predictor = predict.load_predictor(run_dir, [device], args.batch_size)

    print(f"{len(pairs)} pairs; the book's loop on a sample of {len(sample)}, in {args.rounds} rounds; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    predictor.predict_pairs(sample[:5], tokenized=True)  # warm-up of the batch-of-one graph
    _, cold_seconds = timed(lambda: predictor.predict_pairs(pairs, tokenized=True))
    print(f"nli, batched, first pass (a graph built per batch shape): {len(pairs) / cold_seconds:.1f} pairs/s")
    # Other people's jobs share this machine: the three ways take turns within each round, so a busy
    # stretch slows all of them, and the medians over rounds are compared.
    rounds, book_labels, single = [], [], []
    for r in range(args.rounds):
        part = sample[r::args.rounds]
        labels, book_seconds = timed(lambda: book_predict_loop(book_net, vocab, part))
        results, single_seconds = timed(lambda: [predictor.predict(*pair, tokenized=True) for pair in part])
        batched, batched_seconds = timed(lambda: predictor.predict_pairs(pairs, tokenized=True))
        book_labels += labels
        single += results
        rounds.append({"book_one_pair_at_a_time": len(part) / book_seconds,
                       "nli_one_pair_at_a_time": len(part) / single_seconds,
                       "nli_batched": len(pairs) / batched_seconds, "load_average_1min": os.getloadavg()[0]})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()), flush=True)
    raw, raw_seconds = timed(lambda: predictor.predict_pairs(pairs))
    median = {k: float(onp.median([r[k] for r in rounds])) for k in rounds[0] if k != "load_average_1min"}
    ratio = median["nli_batched"] / median["book_one_pair_at_a_time"]
    print(f"medians, pairs/s: book one pair at a time (padded to {MAX_LEN}) "
          f"{median['book_one_pair_at_a_time']:.1f}, nli one pair at a time {median['nli_one_pair_at_a_time']:.1f}, "
          f"nli batched {median['nli_batched']:.1f}; with raw-text tokenization {len(pairs) / raw_seconds:.1f}")

    sample_order = [pair for r in range(args.rounds) for pair in sample[r::args.rounds]]
    index = {pair: i for i, pair in enumerate(pairs)}
    agree = sum(b == batched[index[pair]]["label"] for b, pair in zip(book_labels, sample_order))
    same_as_single = sum(s["label"] == batched[index[pair]]["label"] for s, pair in zip(single, sample_order))
    raw_same = sum(r["label"] == b["label"] for r, b in zip(raw, batched))
    per_round = [r["nli_batched"] / r["book_one_pair_at_a_time"] for r in rounds]
    print(f"batched / book: {ratio:.1f}x (per round: {', '.join(f'{x:.1f}' for x in per_round)}); "
          f"labels agree with the book's loop on {agree}/{len(sample)} pairs, "
          f"raw-text labels equal tokenized ones on {raw_same}/{len(pairs)}")

    results = {
        "command": " ".join(["python bench/bench_predict.py"] + sys.argv[1:]),
        "data": "tests/data/snli_1.0_dev_pairs.tsv", "pairs": len(pairs), "book_sample": len(sample),
        "model": "bert.small shape (256 hidden, 512 ffn, 4 heads, 2 layers), random init, vocab from the data "
                 f"({len(vocab)} tokens)",
        "batch_size": args.batch_size, "max_len": MAX_LEN,
        "pairs_per_sec": median,  # medians over the rounds
        "pairs_per_sec_rounds": rounds,
        "nli_batched_first_pass": len(pairs) / cold_seconds,
        "nli_batched_raw_text": len(pairs) / raw_seconds,
        "ratio_batched_vs_book": ratio,
        "ratio_per_round": per_round,
        "labels_agree_with_book": f"{agree}/{len(sample)}",
        "labels_agree_batched_vs_one_at_a_time": f"{same_as_single}/{len(sample)}",
        "raw_text_labels_equal_tokenized": f"{raw_same}/{len(pairs)}",
        "machine": {"python": platform.python_version(), "mxnet": mx.__version__, "cpu_count": os.cpu_count(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nli": nli.__version__},
        "note": "a shared 2-core machine while other benchmarks and tests ran: noisy (see load_average_1min)",
    }
    write_results(results, args.out)


if __name__ == "__main__":
    main()
