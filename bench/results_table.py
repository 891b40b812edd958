"""Render the README's results table from the files the benchmarks and runs wrote (`--write` updates it).

Every figure in the table is read from a results file here, never typed: a row names its file, the
JSON paths of its figures and how to print them; the file's own `command` says how it was made.
"""
import argparse
import json
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# what, results file, (peer figure path, nli figure path, ratio path), format, peer's name
ROWS = [
    ("Encoding 550,152 SNLI-train-sized pairs (the real dev pairs repeated) to the book's arrays, seconds",
     "bench/results/bench_preprocess.json",
     ("book.seconds", "nli_encode.seconds", "ratios.encode_speedup_over_book"), "{:.2f}", "d2l SNLIBERTDataset"),
    ("  same, CPU seconds of all the processes at work", "bench/results/bench_preprocess.json",
     ("book.cpu_seconds", "nli_encode.cpu_seconds", "ratios.encode_cpu_ratio_over_book"), "{:.2f}",
     "d2l SNLIBERTDataset"),
    ("  reloading those pairs from the cache, seconds", "bench/results/bench_preprocess.json",
     (None, "nli_reload.seconds", None), "{:.2f}", ""),
    ("  peak memory of the encoding, MiB above the process's size before it", "bench/results/bench_preprocess.json",
     ("book.peak_mib_above_start", "nli_encode.peak_mib_above_start", None), "{:.0f}", "d2l SNLIBERTDataset"),
    ("Fine-tuning throughput, bert.small shape, batch 512, examples/sec", "bench/results/bench_train.json",
     ("book.examples_per_sec", "nli.examples_per_sec", "ratios.nli_over_book"), "{:.1f}",
     "d2l train_ch13, OMP threads unset"),
    ("  same, the book's loop given both cores (OMP_NUM_THREADS=2)", "bench/results/bench_train.json",
     ("book_all_cores.examples_per_sec", "nli.examples_per_sec", "ratios.nli_over_book_all_cores"), "{:.1f}",
     "d2l train_ch13"),
    ("  hybridized against imperative nli, examples/sec", "bench/results/bench_train.json",
     ("nli_imperative.examples_per_sec", "nli.examples_per_sec", "ratios.nli_over_nli_imperative"), "{:.1f}",
     "nli, not hybridized"),
    ("  feature extraction (head on cached `<cls>` features) against full fine-tuning, seconds per epoch",
     "bench/results/bench_train.json",
     ("features.full_epoch_seconds", "features.features_epoch_seconds.-1", "ratios.features_over_full_per_epoch"),
     "{:.2f}", "nli, full fine-tuning"),
    ("  OpenMP threads that sleep while waiting (nli's OMP_WAIT_POLICY=PASSIVE) against spinning ones, "
     "examples/sec", "bench/results/bench_train.json",
     ("nli_spinning_threads.examples_per_sec", "nli.examples_per_sec", "ratios.nli_over_nli_spinning_threads"),
     "{:.1f}", "nli, OMP_WAIT_POLICY=ACTIVE"),
    ("  share of the padded tokens that are real (length buckets, padding to a multiple of 8)",
     "bench/results/bench_train.json", ("book.padding_efficiency", "nli.epochs.-1.padding_efficiency", None),
     "{:.2f}", "d2l, every pair padded to 128"),
    ("Batch prediction, bert.small shape, pairs/sec", "bench/results/bench_predict.json",
     ("pairs_per_sec.book_one_pair_at_a_time", "pairs_per_sec.nli_batched", "ratio_batched_vs_book"), "{:.1f}",
     "d2l predict_snli, one pair at a time"),
    ("all-MiniLM-L6-v2 fine-tuned on 80% of the real SNLI dev pairs: test accuracy on the other 20%",
     "bench/results/bench_accuracy.json", ("peer.accuracy", "nli.accuracy", None), "{:.4f}",
     "HF transformers + PyTorch"),
    ("  same run: training throughput, examples/sec", "bench/results/bench_accuracy.json",
     ("peer.train_examples_per_sec", "nli.train_examples_per_sec", "ratios.throughput_nli_over_peer"), "{:.1f}",
     "HF transformers + PyTorch"),
    ("Exercise 2, all-MiniLM-L6-v2 at max_len 24: test accuracy, longest_first (book) / ratio",
     "bench/results/exercise_truncation/truncation.json",
     ("test_accuracy.longest_first", "test_accuracy.ratio", None), "{:.4f}", "the book's rule"),
]


def lookup(obj, path):
    """The value at a dotted `path` in nested dicts and lists (`epochs.-1`: the last), or None when missing."""
    for key in path.split("."):
        if isinstance(obj, list) and key.lstrip("-").isdigit() and -len(obj) <= int(key) < len(obj):
            obj = obj[int(key)]
        elif isinstance(obj, dict) and key in obj:
            obj = obj[key]
        else:
            return None
    return obj


def render():
    """The results table as Markdown, one row per figure."""
    lines = ["| what | peer | peer's figure | nli | ratio | source (file: command) |",
             "|---|---|---|---|---|---|"]
    for what, source, (peer_path, nli_path, ratio_path), fmt, peer in ROWS:
        path = os.path.join(ROOT, source)
        if not os.path.exists(path):  # a benchmark mid-run has removed it: never drop its rows silently
            raise FileNotFoundError(f"{source} is missing: run the benchmark that writes it, then --write")
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
        figures = [lookup(results, p) if p else None for p in (peer_path, nli_path, ratio_path)]
        cells = [fmt.format(v) if isinstance(v, (int, float)) else "–" for v in figures[:2]]
        ratio = f"{figures[2]:.1f}x" if isinstance(figures[2], (int, float)) else "–"
        command = results.get("command", "").replace("|", "\\|")
        lines.append(f"| {what} | {peer or '–'} | {cells[0]} | {cells[1]} | {ratio} | `{source}`: `{command}` |")
    return "\n".join(lines)


def readme_table(text):
    """The table between the README's results markers."""
    match = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), text, re.S)
    return match.group(1) if match else None


def cited_files(text):
    """Results files the README's table cites."""
    return re.findall(r"`(bench/results/[^`]+)`", readme_table(text) or "")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="replace the table in README.md")
    args = parser.parse_args()
    table = render()
    if args.write:
        with open(README, encoding="utf-8") as f:
            text = f.read()
        if readme_table(text) is None:
            raise SystemExit(f"README.md has no {BEGIN} ... {END} block")
        block = re.compile(re.escape(BEGIN) + r"\n.*?\n" + re.escape(END), re.S)
        text = block.sub(lambda _: f"{BEGIN}\n{table}\n{END}", text)
        with open(README, "w", encoding="utf-8") as f:
            f.write(text)
    print(table)


if __name__ == "__main__":
    main()
