"""Encoding speed: `nli`'s vectorized encoder and its cache against the book's `SNLIBERTDataset`.

The corpus has the size of SNLI's train split, 550,152 pairs, made by repeating the real SNLI dev
pairs (tests/data/snli_1.0_dev_pairs.tsv); the vocabulary is the book's over them (`nli.bert.Vocab`, the
same ids as `d2l.Vocab`);
max_len 128. Each measurement runs in its own fresh process, which builds the corpus, then resets
its peak-memory mark, then is timed, so the peak memory reported is that of the measured step.
Wall-clock seconds give the ratio; CPU seconds (all processes of the step) are given beside them, as
they hardly change when other jobs share the machine:

  book          SNLIBERTDataset(corpus, 128, vocab) from tests/book_reference.py (it needs d2l): the
                book's code as printed, Pool(4) and all. Its arrays are then checked equal to nli's.
  nli_encode    snli.encode_pairs(*corpus, vocab, 128): the same inputs to the same arrays.
  nli_build     snli.load_encoded(tsv, vocab, 128) with no cache: read the file, encode, write the cache.
  nli_reload    snli.load_encoded(tsv, vocab, 128) again: the checksummed cache read back.

    python bench/bench_preprocess.py    # ~3 min; writes bench/results/bench_preprocess.json
"""
import argparse
import importlib
import json
import multiprocessing
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # nli, and the book's code (tests/book_reference.py)

import nli  # noqa: E402,F401  (first: it sets OMP_NUM_THREADS before MXNet loads)
import mxnet as mx  # noqa: E402
import numpy as onp  # noqa: E402

from nli import bert, snli  # noqa: E402
from results_file import write_results  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
SNLI_TRAIN_PAIRS = 550152
MAX_LEN = 128
FIELDS = ("token_ids", "offsets", "segment_a_lens", "labels")


def corpus_and_vocab(pairs):
    """The real dev pairs repeated to `pairs` pairs, and the book's vocabulary over them."""
    dev = snli.read_pairs(DATA)
    copies = -(-pairs // len(dev[0]))
    corpus = tuple((column * copies)[:pairs] for column in dev)
    vocab = bert.Vocab([t for s in dev[0] + dev[1] for t in snli.tokenize(s)],
                       reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    return corpus, vocab


def memory_mib(field):
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def cpu_seconds():
    """CPU seconds used so far by this process, its reaped children and its live ones (the book's Pool
    workers are never closed, so they are still alive when the step ends)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    ticks = 0
    for child in multiprocessing.active_children():
        with open(f"/proc/{child.pid}/stat") as f:
            ticks += sum(map(int, f.read().rsplit(")", 1)[1].split()[11:13]))  # utime, stime
    return time.process_time() + children.ru_utime + children.ru_stime + ticks / os.sysconf("SC_CLK_TCK")


def measure_one(name, pairs, tsv):
    """Child process: build the inputs, time step `name` with its peak memory, then check its arrays."""
    corpus, vocab = corpus_and_vocab(pairs)
    book = importlib.import_module("book_reference") if name == "book" else None  # d2l loads before the clock
    steps = {"book": lambda: book.SNLIBERTDataset(corpus, MAX_LEN, vocab),
             "nli_encode": lambda: snli.encode_pairs(*corpus, vocab, MAX_LEN),
             "nli_load": lambda: snli.load_encoded(tsv, vocab, MAX_LEN, progress=False)}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident set (VmHWM) to the current size
    start_mib, cpu_start, started = memory_mib("VmRSS"), cpu_seconds(), time.perf_counter()
    result = steps[name]()
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu_start
    figures = {"seconds": seconds, "cpu_seconds": cpu, "peak_mib_above_start": memory_mib("VmHWM") - start_mib,
               "load_average_1min": os.getloadavg()[0]}
    reference = snli.encode_pairs(*corpus, vocab, MAX_LEN)
    if name == "book":
        arrays = reference.padded(onp.arange(len(reference)), MAX_LEN) + (reference.labels,)
        book = (result.all_token_ids, result.all_segments, result.valid_lens, result.labels)
        figures["arrays_equal_nli"] = all(onp.array_equal(b.asnumpy(), a) for a, b in zip(arrays, book))
    else:
        figures["arrays_equal_encode_pairs"] = all(onp.array_equal(getattr(result, k), getattr(reference, k))
                                                   for k in FIELDS)
    print(json.dumps(figures))


def run_child(name, args, tsv, env):
    """Run `measure_one` in a fresh process: its figures."""
    command = [sys.executable, os.path.abspath(__file__), "--measure", name, "--pairs", str(args.pairs),
               "--tsv", tsv]
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.PIPE, text=True)
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"[{name}] {figures['seconds']:.2f} s ({figures['cpu_seconds']:.2f} s of CPU), "
          f"peak +{figures['peak_mib_above_start']:.0f} MiB", flush=True)
    return figures


def measure(args, work):
    """Every figure of the benchmark, with the corpus file and the data dir under the folder `work`."""
    corpus, vocab = corpus_and_vocab(args.pairs)
    tsv = os.path.join(work, "corpus.tsv")
    with open(tsv, "w", encoding="utf-8") as f:
        f.write("premise\thypothesis\tlabel\n")
        f.writelines(f"{p}\t{h}\t{snli.LABELS[l]}\n" for p, h, l in zip(*corpus))
    cache_dir = os.path.join(work, "data", "encoded")
    env = {**os.environ, "NLI_DATA_DIR": os.path.join(work, "data")}

    def remove_cache():
        for name in os.listdir(cache_dir) if os.path.isdir(cache_dir) else []:
            os.remove(os.path.join(cache_dir, name))

    def median_run(name, before=lambda: None):
        runs = []
        for _ in range(args.repeats):
            before()
            runs.append(run_child(name, args, tsv, env))
        middle = statistics.median(r["seconds"] for r in runs)
        return {**next(r for r in runs if r["seconds"] == middle), "all_seconds": [r["seconds"] for r in runs]}

    results = {"pairs": args.pairs, "max_len": MAX_LEN, "vocab_size": len(vocab),
               "corpus": f"the real SNLI dev pairs repeated to {args.pairs}"}
    results["nli_encode"] = median_run("nli_encode")
    results["nli_build"] = median_run("nli_load", before=remove_cache)
    results["nli_reload"] = median_run("nli_load")
    results["cache_file_mib"] = sum(os.path.getsize(os.path.join(cache_dir, name))
                                    for name in os.listdir(cache_dir)) / 2**20
    results["book"] = run_child("book", args, tsv, env)
    for name in ("book", "nli_encode", "nli_build", "nli_reload"):
        results[name]["pairs_per_sec"] = args.pairs / results[name]["seconds"]
    results["ratios"] = {"encode_speedup_over_book": results["book"]["seconds"] / results["nli_encode"]["seconds"],
                         "encode_cpu_ratio_over_book":
                             results["book"]["cpu_seconds"] / results["nli_encode"]["cpu_seconds"],
                         "build_from_file_speedup_over_book":
                             results["book"]["seconds"] / results["nli_build"]["seconds"]}
    results["targets"] = {"encode_speedup_at_least_20x": results["ratios"]["encode_speedup_over_book"] >= 20,
                          "cached_reload_under_2s": results["nli_reload"]["seconds"] < 2}
    return results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=SNLI_TRAIN_PAIRS)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each nli measurement (median kept)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_preprocess.json"))
    parser.add_argument("--measure", choices=["book", "nli_encode", "nli_load"], help=argparse.SUPPRESS)
    parser.add_argument("--tsv", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure_one(args.measure, args.pairs, args.tsv)
    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as work:
        results = measure(args, work)
    results["note"] = ("each figure from a fresh process; peak memory is its peak resident set above its "
                       "size before the step (the book's 4 pool workers are separate processes, not "
                       "counted); shared 2-core machine, other jobs may have run")
    results["machine"] = {"cpu_count": os.cpu_count(), "python": platform.python_version(), "mxnet": mx.__version__,
                          "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    results["command"] = " ".join(["python", os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
    write_results(results, args.out)

    print(f"\n{args.pairs:,} pairs, max_len {MAX_LEN}")
    for name, what in (("book", "book SNLIBERTDataset"), ("nli_encode", "nli encode_pairs"),
                       ("nli_build", "nli load_encoded, no cache"), ("nli_reload", "nli load_encoded, cached")):
        r = results[name]
        print(f"{what:>28}: {r['seconds']:7.2f} s  {r['pairs_per_sec']:>10,.0f} pairs/s  "
              f"{r['cpu_seconds']:7.2f} s of CPU  peak +{r['peak_mib_above_start']:,.0f} MiB")
    print(f"encode speed-up over the book: {results['ratios']['encode_speedup_over_book']:.1f}x "
          f"(target 20x; in CPU time {results['ratios']['encode_cpu_ratio_over_book']:.1f}x); "
          f"cached reload {results['nli_reload']['seconds']:.2f} s (target < 2 s); "
          f"book arrays equal nli's: {results['book']['arrays_equal_nli']}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
