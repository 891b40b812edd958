"""Where a training step's time goes: MXNet's profiler over the engine's own step, operators grouped by kind.

A step is what `train.finetune` does per update with the `tuned` recipe (AdamW, clipping at 1.0): the batch's
dropout seed, `train.write_gradients` (with `train.looked_up_rows`), `train.train_batch` on each micro-batch of
the memory plan, `train.apply_update` with a Trainer from `train.make_trainer`, the figures read on the host every
`log_every` updates. Two workloads, on real SNLI dev pairs (tests/data/snli_1.0_dev_pairs.tsv) in the
length-bucketed batches of epoch 1:
- minilm: the all-MiniLM-L6-v2 shape (6 layers, 384 hidden, 12 heads, 1536 ffn, GELU), batch 32; random weights
  and the book's word vocabulary, or with `--model-dir` the real checkpoint and its WordPiece tokenizer;
- bert_small: the book's bert.small shape (2 layers, 256 hidden, 4 heads, 512 ffn, relu), batch 512, random weights.

Each workload first runs a pass over its batches (the hybridized graph plans every shape: a run's slow start), then
a timed pass without the profiler, then the profiled pass: MXNet's aggregate statistics (`profile_all`). Operators
are summed by kind (KINDS); the time outside operators is the profiled pass's wall time less the operators' summed
time (Python, the engine's dispatch, the host waiting for results). Every side runs in a child process with the
`nli` under test first on PYTHONPATH: `--before REV` runs REV's `nli` (taken with `git archive`) too, the sides
taking turns for `--rounds` rounds per workload, whose figures are added up.

    python bench/bench_profile.py --model-dir DIR --before 8f7eb64   # ~13 min on 2 busy cores
"""
import os
import sys

if __name__ == "__main__" and os.environ.get("NLI_PROFILE_CODE"):  # a child: the nli under test, never this one's
    sys.path.insert(0, os.environ["NLI_PROFILE_CODE"])

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from results_file import checkout, cpu_description, write_results  # noqa: E402
from results_table import portable  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEV_PAIRS = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
MAX_LEN = 128
WORKLOADS = {
    "minilm": {"what": "all-MiniLM-L6-v2 shape (6 layers, 384 hidden, 12 heads, 1536 ffn, GELU), batch 32",
               "label": "all-MiniLM-L6-v2, batch 32", "checkpoint": True, "batch_size": 32, "steps": 40, "lr": 5e-5,
               "head_dropout": 0.1, "vocab_size": 30522,  # the checkpoint's WordPiece vocabulary
               "config": dict(num_hiddens=384, ffn_num_hiddens=1536, num_heads=12, num_blks=6, dropout=0.1,
                              max_len=512, activation="gelu", embedding_norm=True, norm_eps=1e-12,
                              pretraining_heads=False)},
    "bert_small": {"what": "bert.small shape (2 layers, 256 hidden, 4 heads, 512 ffn, relu), batch 512",
                   "label": "bert.small shape, batch 512", "checkpoint": False, "batch_size": 512, "steps": 10,
                   "lr": 2e-4, "head_dropout": 0.0, "vocab_size": None,  # None: the book's vocabulary of the pairs
                   "config": dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, dropout=0.1,
                                  max_len=512)},
}
# Operator kinds, first match wins, by the operator's name without `_backward_` and MXNet's `_npi_`/`_np_`/`_npx_`/
# `_contrib_` prefixes. batch_dot, transpose and softmax are attention's alone in this BERT: its batched products, the
# head split and merge, the masked softmax with its 1/sqrt(d) scaling; the loss has its own log-softmax.
KINDS = [
    ("matrix products (dense layers)", {"FullyConnected", "dot", "matmul", "einsum", "tensordot"}),
    ("attention: batched products", {"batch_dot", "interleaved_matmul_selfatt_qk", "interleaved_matmul_selfatt_valatt",
                                     "interleaved_matmul_encdec_qk", "interleaved_matmul_encdec_valatt"}),
    ("attention: head split/merge transposes", {"transpose"}),
    ("attention: masked softmax and scaling", {"softmax", "masked_softmax", "true_divide_scalar", "div_scalar",
                                               "less", "subtract_scalar"}),  # and the mask (`bert.attention_bias`)
    ("softmax of the loss (log-softmax, pick)", {"log_softmax", "pick", "mean"}),
    # In training, `bert.LayerNorm` is products (counted above) and these elementwise steps, which nothing else runs
    ("layer norm", {"LayerNorm", "elemwise_sub", "sub", "elemwise_mul", "mul", "square", "power_scalar", "add_scalar",
                    "full", "ones"}),
    ("GELU / activation", {"Activation", "LeakyReLU", "gelu", "relu"}),
    ("dropout (masks, and seeding them per batch)",
     {"Dropout", "ResourceRandomSetSeed", "ResourceNativeRandomSetSeed"}),
    ("embeddings (lookups, and slices: positions, <cls>)", {"Embedding", "take", "slice", "slice_axis", "slice_like"}),
    ("adds (residuals, broadcasts, gradient sums)",
     {"add", "broadcast_add", "elemwise_add", "add_n", "ElementWiseSum"}),
    ("optimizer (Adam updates, weight decay, gradient norm, zeroing)",
     {"adamw_update", "adam_update", "multi_sum_sq", "reset_arrays", "multi_adamw_update", "multi_lamb_update",
      "multi_sgd_update", "multi_mp_adamw_update", "sgd_update",
      # the word embeddings' rows looked up, whose gradient the update measures and zeroes (numpy's indexing)
      "gather_nd", "scatter_set_nd", "stack", "broadcast_to"}),
]
OPTIMIZER = KINDS[-1][0]
# The update's own legacy-ndarray operators, by their exact names: the gradient norm (the dot of each gradient with
# itself, its root, divided by the examples), the clipping factor and the rescaling it multiplies, and (before)
# AdamW's weight decay. The model runs numpy-interface operators (`_np_dot`, `_npi_multiply_scalar`, `_npi_full`).
OPTIMIZER_LEGACY_OPS = {"dot", "sqrt", "_div_scalar", "_plus_scalar", "_rdiv_scalar", "_minimum_scalar", "_full",
                        "broadcast_mul", "_mul_scalar"}
OTHER, OUTSIDE = "copies and other operators", "outside operators (Python, dispatch, waiting)"


def base_name(op):
    """An operator's name without `_backward_` and the numpy/contrib prefixes: what KINDS lists."""
    return re.sub(r"^_?(npi_|np_|npx_|contrib_)?", "", op.removeprefix("_backward_"))


def kind_of(op):
    """The kind (KINDS) an operator's time counts under."""
    if op in OPTIMIZER_LEGACY_OPS:
        return OPTIMIZER
    name = base_name(op)
    return next((kind for kind, names in KINDS if name in names), OTHER)


def encoded_pairs(workload, model_dir):
    """(net, encoded pairs) of a workload: the model built in this process (from `model_dir` if it is the workload's
    checkpoint), the real pairs encoded for it."""
    import mxnet as mx
    from mxnet import init
    from nli import bert, model, snli
    premises, hypotheses, labels = snli.read_pairs(DEV_PAIRS)
    mx.random.seed(0)
    if model_dir and workload["checkpoint"]:
        net, vocab = model.from_pretrained("hf:" + model_dir, [mx.cpu()])[:2]  # before: (net, vocab, config)
    else:
        vocab = bert.Vocab([t for s in premises + hypotheses for t in snli.tokenize(s)],
                           reserved_tokens=["<pad>", "<mask>", "<cls>", "<sep>"])
        encoder = bert.BERTModel(workload["vocab_size"] or len(vocab), **workload["config"])
        encoder.initialize(init.Xavier())
        net = model.BERTClassifier(encoder, dropout=workload["head_dropout"])
        net.output.initialize(init.Xavier())
        net.hybridize(static_alloc=True)
    return net, snli.encode_pairs(premises, hypotheses, labels, vocab, MAX_LEN)


def host_figures(figures):
    """A `train_batch` result read on the host: its device arrays (since the loop's rewrite) or host numbers."""
    pairs = [figures] if isinstance(figures, tuple) else figures  # before: one (loss, correct) of host numbers
    return [float(x.item()) if hasattr(x, "item") else x for pair in pairs for x in pair]


def profile_side(workload, steps, model_dir=None):
    """Profile `steps` training steps of `workload` with the nli on sys.path: timings and operator totals."""
    import nli
    import mxnet as mx
    from mxnet import gluon, npx
    from nli import data, memory, train
    from nli.recipe import TUNED
    net, encoded = encoded_pairs(workload, model_dir)
    devices = [mx.cpu()]
    recipe = train.with_memory_budget(dataclasses.replace(TUNED, batch_size=workload["batch_size"], lr=workload["lr"],
                                                          max_len=MAX_LEN, devices="cpu"), devices)
    plan = memory.plan(net, recipe.max_memory, recipe.max_len, devices)
    train.set_trainable(net, recipe, 1)
    trainer = train.make_trainer(net, recipe, "device", 3 * steps)  # the passes below
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    loss.hybridize()
    # The recipe's length buckets; code from before the setting (--before) buckets by 8 and takes no width
    width = {"bucket_width": recipe.bucket_width} if hasattr(recipe, "bucket_width") else {}
    order = list(data.LengthBucketSampler(encoded.valid_lens, recipe.batch_size, seed=recipe.seed, epoch=1,
                                          **width))[:steps]
    micro_batches = [[data.make_batch(encoded, part, *width.values())
                      for part in plan.split(indices, encoded.valid_lens, *width.values())] for indices in order]

    def run_steps():
        """The steps, as `finetune` runs them; the wall seconds until the engine has finished them."""
        started, pending = time.perf_counter(), []
        for step, (indices, batch) in enumerate(zip(order, micro_batches), start=1):
            mx.random.seed(train.batch_seed(recipe.seed, 0, 1, step), ctx="all")
            rows = {}
            if hasattr(train, "write_gradients"):  # code from before it (--before) adds to zeroed gradients
                rows = train.looked_up_rows(net.encoder.token_embedding.weight, batch)
                train.write_gradients(net.collect_params(), [micro_batch[-1] for micro_batch in batch], devices, rows)
            pending += [train.train_batch(net, micro_batch, loss, devices) for micro_batch in batch]
            train.apply_update(trainer, net.collect_params(), devices, len(indices), recipe.max_grad_norm,
                               **({"rows": rows} if rows else {}))
            if step % recipe.log_every == 0 or step == len(order):
                [host_figures(figures) for figures in pending]
                pending = []
        npx.waitall()
        return time.perf_counter() - started

    first = run_steps()  # every shape planned, the optimizer's state made: the slow start of a run
    unprofiled = run_steps()
    # MXNet's profiler may still be writing its trace file there when the folder is removed: not an error here
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as tmp:
        mx.profiler.set_config(profile_all=True, aggregate_stats=True, filename=os.path.join(tmp, "profile.json"))
        mx.profiler.set_state("run")
        profiled = run_steps()
        mx.profiler.set_state("stop")
        stats = json.loads(mx.profiler.dumps(format="json", reset=True))["Time"]
    features = [f.name for f in mx.runtime.Features().values() if f.enabled]
    return {"nli": os.path.dirname(os.path.abspath(nli.__file__)), "mxnet": f"{mx.__version__} ({' '.join(features)})",
            "steps": len(order), "examples": sum(map(len, order)), "micro_batches": sum(map(len, micro_batches)),
            "padded_tokens": sum(b[0].size for batch in micro_batches for b in batch),
            "first_pass_seconds": first, "unprofiled_seconds": unprofiled, "profiled_seconds": profiled,
            "operators_ms": {op: figures["Total"] for op, figures in stats["operator"].items()},
            "operators_longest_call_ms": {op: figures["Max"] for op, figures in stats["operator"].items()},
            "operator_calls": {op: figures["Count"] for op, figures in stats["operator"].items()},
            "c_api_ms": {call: figures["Total"] for call, figures in stats.get("MXNET_C_API", {}).items()}}


def summarize(rounds):
    """One side's rounds (`profile_side`'s figures) as one profile: totals added up, figures per step."""
    total = {key: sum(r[key] for r in rounds) for key in ("steps", "examples", "micro_batches", "padded_tokens")}
    for key in ("operators_ms", "operator_calls", "c_api_ms"):
        total[key] = {name: sum(r[key].get(name, 0) for r in rounds) for name in set().union(*(r[key] for r in rounds))}
    total["operators_longest_call_ms"] = {op: max(r["operators_longest_call_ms"].get(op, 0) for r in rounds)
                                          for op in total["operators_ms"]}
    steps = total["steps"]
    for what in ("first_pass", "unprofiled", "profiled"):
        total[f"{what}_ms_per_step"] = 1000 * sum(r[f"{what}_seconds"] for r in rounds) / steps
        total[f"{what}_ms_per_step_per_round"] = [1000 * r[f"{what}_seconds"] / r["steps"] for r in rounds]
    total["unprofiled_examples_per_sec"] = total["examples"] / sum(r["unprofiled_seconds"] for r in rounds)
    total["padded_tokens_per_step"], total["micro_batches_per_step"] = (total.pop("padded_tokens") / steps,
                                                                        total.pop("micro_batches") / steps)
    return {"mxnet": rounds[0]["mxnet"], "rounds": len(rounds), **total}


def by_kind(side):
    """A side's profiled step by kind: ms per step and share of the step, the time outside operators last."""
    steps, step_ms = side["steps"], side["profiled_ms_per_step"]
    kinds = dict.fromkeys([kind for kind, _ in KINDS] + [OTHER], 0.0)
    for op, total in side["operators_ms"].items():
        kinds[kind_of(op)] += total / steps
    kinds[OUTSIDE] = step_ms - sum(kinds.values())
    return {kind: {"ms_per_step": ms, "share": ms / step_ms} for kind, ms in kinds.items()}


def top_operators(side, n=15):
    """The `n` operators that took the most time, ms per step and calls per step."""
    ranked = sorted(side["operators_ms"].items(), key=lambda item: -item[1])[:n]
    return [{"operator": op, "kind": kind_of(op), "ms_per_step": total / side["steps"],
             "calls_per_step": side["operator_calls"][op] / side["steps"],
             "longest_call_ms": side["operators_longest_call_ms"][op]} for op, total in ranked]


def run_child(code, name, args, out):
    """Profile workload `name` in a child process whose `nli` is the one in `code`."""
    steps = args.steps or WORKLOADS[name]["steps"]
    command = [sys.executable, os.path.abspath(__file__), "--workloads", name, "--steps", str(steps), "--side-out", out]
    command += ["--model-dir", args.model_dir] if args.model_dir else []
    subprocess.run(command, env={**os.environ, "NLI_PROFILE_CODE": code}, check=True)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def print_table(name, sides):
    """A workload's kinds, ms per step and share, side by side."""
    print(f"\n{WORKLOADS[name]['what']}")
    print(f"{'kind':<55}" + "".join(f"{side + ' ms':>12}{'%':>7}" for side in sides))
    for kind in sides["after"]["by_kind"]:
        cells = [s["by_kind"][kind] for s in sides.values()]
        print(f"{kind:<55}" + "".join(f"{c['ms_per_step']:>12.1f}{100 * c['share']:>7.1f}" for c in cells))
    for what, key in (("step, profiled", "profiled_ms_per_step"), ("step, not profiled", "unprofiled_ms_per_step")):
        print(f"{what:<55}" + "".join(f"{s[key]:>12.1f}{'':>7}" for s in sides.values()))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    parser.add_argument("--steps", type=int, help="steps profiled per workload (default: minilm 40, bert_small 10)")
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR"),
                        help="the real all-MiniLM-L6-v2 checkpoint (Hugging Face layout); default: random weights")
    parser.add_argument("--before", help="a git revision: profile its nli too, in turns with this checkout's")
    parser.add_argument("--rounds", type=int, default=2, help="profiles of each side, in turns, added up")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_profile.json"))
    parser.add_argument("--side-out", help=argparse.SUPPRESS)  # a child: one side's raw figures, written here
    args = parser.parse_args()
    names = args.workloads.split(",")
    if unknown := sorted(set(names) - set(WORKLOADS)):
        parser.error(f"--workloads {','.join(unknown)}: expected some of {', '.join(WORKLOADS)}")
    if args.side_out:
        with open(args.side_out, "w", encoding="utf-8") as f:
            json.dump(profile_side(WORKLOADS[names[0]], args.steps or WORKLOADS[names[0]]["steps"], args.model_dir), f)
        return
    load_before, threads, niceness = os.getloadavg()[0], os.environ.get("OMP_NUM_THREADS"), os.nice(0)
    options = " ".join(sys.argv[1:])
    options = re.sub(r"--out(=| )\S+ ?", "", options)  # where the figures went is no part of how they were made
    command = ([f"OMP_NUM_THREADS={threads}"] * bool(threads) + ["nice", "-n", str(niceness)] * bool(niceness)
               + ["python", os.path.relpath(os.path.abspath(__file__), ROOT), options])
    results = {"benchmark": "bench_profile", "command": portable(" ".join(command)),
               "data": "tests/data/snli_1.0_dev_pairs.tsv", "recipe": "tuned (AdamW, clipping at 1.0)",
               "kinds": {kind: sorted(names) for kind, names in KINDS}, "workloads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        codes = {"after": ROOT}
        if args.before:
            os.makedirs(os.path.join(tmp, "before"))
            results["before_commit"] = checkout(args.before, os.path.join(tmp, "before"))
            codes = {"before": os.path.join(tmp, "before"), **codes}
        for name in names:  # the sides in turns, round by round, so the machine's load falls on both
            rounds = {side: [] for side in codes}
            for round_number in range(1, args.rounds + 1):
                for side, code in codes.items():
                    print(f"[{name}] round {round_number}: profiling the {side} code ({code})", flush=True)
                    figures = run_child(code, name, args, os.path.join(tmp, f"{name}-{side}.json"))
                    if os.path.dirname(figures["nli"]) != os.path.abspath(code):
                        raise SystemExit(f"the {side} side imported {figures['nli']}, not the nli of {code}")
                    rounds[side].append(figures)
            sides = {side: summarize(figures) for side, figures in rounds.items()}
            for side in sides.values():
                side.update(by_kind=by_kind(side), top_operators=top_operators(side))
            results["workloads"][name] = {"what": WORKLOADS[name]["what"], "label": WORKLOADS[name]["label"], **sides}
            print_table(name, sides)
    results["machine"] = {"cpu": cpu_description(), "cpu_count": os.cpu_count(), "OMP_NUM_THREADS": threads,
                          "niceness": niceness, "python": platform.python_version(), "mxnet": sides["after"]["mxnet"],
                          "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
                          "note": "a shared 2-core machine: other engineers' jobs ran at the same time (see the load "
                                  "averages); the profiler itself adds time (profiled against not profiled)"}
    write_results(results, args.out)


if __name__ == "__main__":
    main()
