"""What running on Python 3.12+ costs: bench_train.py's nli section under two interpreters, in turns.

Python 3.12+ runs mxnet 1.9.1 with numpy 1.26.4 and nli/compat.py's repair instead of the book's numpy
1.23.5; this measures whether fine-tuning is any slower for it. Each interpreter is a virtualenv with
requirements.txt installed; they take turns over `--rounds` rounds, so a load on the machine hits both.

    python bench/bench_pythons.py --python .venv-3.11/bin/python --other .venv-3.12/bin/python
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from results_file import write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def nli_throughput(python):
    """(Python version, examples/sec) of bench_train.py's nli section run by `python`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench_train.json")
        subprocess.run([python, os.path.join(ROOT, "bench", "bench_train.py"), "--sections", "nli", "--out", out],
                       check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            figures = json.load(f)
    return figures["machine"]["python"], figures["nli"]["examples_per_sec"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", required=True, help="the baseline interpreter (Python 3.11)")
    parser.add_argument("--other", required=True, help="the interpreter compared with it (Python 3.12 or 3.13)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_pythons.json"))
    args = parser.parse_args()
    runs = {"baseline": [], "other": []}
    versions = {}
    for round_ in range(args.rounds):
        for side, python in (("baseline", args.python), ("other", args.other)):
            versions[side], speed = nli_throughput(python)
            runs[side].append(speed)
            print(f"round {round_ + 1}: Python {versions[side]}: {speed:.1f} examples/sec", flush=True)
    medians = {side: statistics.median(speeds) for side, speeds in runs.items()}
    results = {"command": " ".join([os.path.basename(sys.executable)] + sys.argv),
               "what": "bench_train.py --sections nli (bert.small shape, batch 512, real SNLI pairs), examples/sec",
               "baseline": {"python": versions["baseline"], "examples_per_sec": runs["baseline"],
                            "median": medians["baseline"]},
               "other": {"python": versions["other"], "examples_per_sec": runs["other"], "median": medians["other"]},
               "other_over_baseline": medians["other"] / medians["baseline"],
               "load_average": os.getloadavg()[0]}
    write_results(results, args.out)
    print(f"Python {versions['other']} / {versions['baseline']}: {results['other_over_baseline']:.2f}x")


if __name__ == "__main__":
    main()
