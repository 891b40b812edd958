"""`nli doctor --test`: a tiny BERT fine-tuned for a few steps on every device of this machine, all together and
one by one, and on the CPU. The losses must agree across device sets, and every device must hold the same weights
after every update. Like Hugging Face's `accelerate test`: a small known workload on the user's own hardware.

The BERT has random weights and is built here (nothing is downloaded); dropout is off, so every device set
computes the same thing and only the order of float sums differs. Run here (and in CI) on `cpu` and `cpu:2`
only: the GPU device sets have not run on a GPU.
"""
import contextlib
import dataclasses
import io
import sys
import time
import traceback

import mxnet as mx
import numpy as onp
from mxnet import gluon, init

from . import bert, memory, model, snli, train
from .errors import first_line
from .recipe import Recipe

SIZES = dict(vocab_size=64, num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_blks=2, max_len=32)
PAIRS, TEST_PAIRS, BATCH_SIZE = 64, 16, 16  # 4 updates
# The same float32 computation split over devices sums in another order: about 1e-6 apart here (CPU contexts).
# 1e-3 leaves room for GPU kernels (cuBLAS picks its own algorithms), and still catches a device that trains
# something else (a lost gradient, a stale copy), which moves the loss by far more.
LOSS_RTOL = 1e-3
RECIPE = Recipe(epochs=1, batch_size=BATCH_SIZE, max_len=SIZES["max_len"], lr=1e-3, log_every=1, seed=0,
                max_memory=2 ** 30, dropout=0.0)


def device_sets(num_gpus):
    """The device sets to test, by name: the CPU; and each GPU alone and all together, or without a GPU two CPU
    contexts (how the multi-device path runs on a CPU)."""
    sets = {"cpu": [mx.cpu()]}
    if num_gpus == 0:
        sets["cpu:2"] = [mx.cpu(0), mx.cpu(1)]
    else:
        sets.update({f"gpu:{i}": [mx.gpu(i)] for i in range(num_gpus)})
        if num_gpus > 1:
            sets["gpu:" + ",".join(map(str, range(num_gpus)))] = [mx.gpu(i) for i in range(num_gpus)]
    return sets


def synthetic_pairs(n, seed):
    """`n` encoded pairs of random tokens and lengths, labelled by their first premise token: a rule a few updates
    start to learn, so the weights and the loss move."""
    rng = onp.random.RandomState(seed)
    cls, sep, pad = 2, 3, 0
    sequences, segment_a_lens, labels = [], [], []
    for _ in range(n):
        premise, hypothesis = (rng.randint(4, SIZES["vocab_size"], size=rng.randint(2, 14)) for _ in range(2))
        sequences.append([cls, *premise, sep, *hypothesis, sep])
        segment_a_lens.append(len(premise) + 2)
        labels.append(premise[0] % 3)
    token_ids, lengths = snli.ragged(sequences)
    return snli.EncodedPairs(token_ids, onp.concatenate([[0], onp.cumsum(lengths)]), onp.array(segment_a_lens),
                             onp.array(labels, dtype=onp.int32), pad, SIZES["max_len"])


def tiny_classifier(devices):
    """A `BERTClassifier` of random weights, the same on every device set (seeded, made on the CPU, copied)."""
    train.seed_everything(RECIPE.seed)
    net = model.BERTClassifier(bert.BERTModel(**SIZES, dropout=0.0, pretraining_heads=False))
    net.initialize(init.Xavier(), ctx=devices)
    net.hybridize(static_alloc=True)
    return net


class WatchedLoss(gluon.Block):
    """The training loss, which first checks that every device holds the same weights: it runs before each
    forward pass, so after every update. It also sums the loss of each update (the weights change at each)."""

    def __init__(self, params):
        super().__init__()
        self.loss = gluon.loss.SoftmaxCrossEntropyLoss()
        self.watched = list(params.values())
        self.first = self.last = None  # every parameter's copies at the start, and the latest seen
        self.step_losses, self.step_pairs, self.mismatches = [], [], []  # summed loss and pairs of each update

    def copies(self):
        """Each parameter's copies, one per device, as NumPy arrays."""
        return [[arr.asnumpy() for arr in p.list_data()] for p in self.watched]

    def check(self, copies):
        """Record each parameter whose copies differ, after as many updates as have been seen."""
        for p, arrays in zip(self.watched, copies):
            if any(not onp.array_equal(arrays[0], other) for other in arrays[1:]):
                diff = max(float(onp.abs(arrays[0] - other).max()) for other in arrays[1:])
                self.mismatches.append(f"after update {len(self.step_losses)}: {p.name} differs between devices by "
                                       f"up to {diff:.3g}")

    def forward(self, pred, label):
        copies = self.copies()
        if self.last is None or any(not onp.array_equal(a, b) for new, old in zip(copies, self.last)
                                    for a, b in zip(new, old)):  # the first pass, or an update since the last
            self.check(copies)
            self.step_losses.append(0.0)
            self.step_pairs.append(0)
        self.first, self.last = self.first or copies, copies
        loss = self.loss(pred, label)
        self.step_losses[-1] += float(loss.sum())
        self.step_pairs[-1] += len(label)
        return loss

    def final_weights(self):
        """Every parameter's copies after the last update, which no forward pass followed; checked too."""
        copies = self.copies()
        self.check(copies)
        return copies


def fine_tune(net, train_set, test_set, devices_name, loss):
    """The one call into the training engine: a short run on the devices named, without a run directory, its printed
    lines left out. Returns the epoch's metrics entry."""
    with contextlib.redirect_stdout(io.StringIO()):
        [entry] = train.finetune(net, train_set, test_set, dataclasses.replace(RECIPE, devices=devices_name),
                                 loss=loss, progress=False)
    return entry


@dataclasses.dataclass
class Result:
    """What fine-tuning on one device set gave."""
    name: str
    step_losses: list = dataclasses.field(default_factory=list)  # each update's mean loss
    examples_per_sec: float = None
    seconds: float = None
    memory: dict = dataclasses.field(default_factory=dict)  # the metrics entry's peak memory
    problems: list = dataclasses.field(default_factory=list)


def run_on(name, devices, train_set, test_set):
    """Fine-tune the tiny BERT on `devices`; a failure is a problem of the result, not an exception."""
    result = Result(name)
    started = time.perf_counter()
    try:
        net = tiny_classifier(devices)
        loss = WatchedLoss(net.collect_params())
        entry = fine_tune(net, train_set, test_set, name, loss)
        final = loss.final_weights()
    except Exception as e:  # a CUDA error, out of memory: what the test is for; the traceback is for a bug report
        traceback.print_exc(file=sys.stderr)
        result.problems.append(f"{name}: fine-tuning failed: {type(e).__name__}: {first_line(e)}")
        return result
    result.seconds = time.perf_counter() - started
    result.step_losses = [total / pairs for total, pairs in zip(loss.step_losses, loss.step_pairs)]
    result.examples_per_sec = entry["examples_per_sec"]
    result.memory = {k: v for k, v in entry.items() if k in ("peak_rss_bytes", "peak_gpu_memory_bytes")}
    result.problems += [f"{name}: {m}" for m in loss.mismatches]
    if all(onp.array_equal(a[0], b[0]) for a, b in zip(loss.first, final)):
        result.problems.append(f"{name}: the weights did not change in {len(result.step_losses)} updates")
    return result


def largest_difference(results):
    """The largest relative difference between an update's loss on a device set and on the first (the CPU)."""
    reference = results[0].step_losses
    return max((abs(a - b) / abs(b) for r in results[1:] if len(r.step_losses) == len(reference)
                for a, b in zip(r.step_losses, reference)), default=0.0)


def compare(results):
    """Problems of the results against the first (the CPU's): the number of updates, and each update's loss."""
    reference, problems = results[0], []
    for result in results[1:]:
        if not result.step_losses or not reference.step_losses:
            continue
        if len(result.step_losses) != len(reference.step_losses):
            problems.append(f"{result.name}: {len(result.step_losses)} updates, {reference.name}: "
                            f"{len(reference.step_losses)}")
            continue
        for step, (a, b) in enumerate(zip(result.step_losses, reference.step_losses), start=1):
            if not abs(a - b) <= LOSS_RTOL * abs(b):
                problems.append(f"{result.name}: update {step}'s loss {a:.6f} differs from {reference.name}'s "
                                f"{b:.6f} by more than {LOSS_RTOL:g} of it")
    return problems


def describe(result):
    """One line of the report: the device set, its losses, throughput and peak memory."""
    if result.examples_per_sec is None:
        return f"{result.name:<12} failed"
    peak = result.memory.get("peak_gpu_memory_bytes")
    peak = (", ".join(memory.format_size(b) for b in peak) + " peak in use per GPU" if peak
            else memory.format_size(result.memory.get("peak_rss_bytes", 0)) + " peak RSS (the process)")
    losses = " ".join(f"{loss:.5f}" for loss in result.step_losses)
    return (f"{result.name:<12} losses {losses}; {result.examples_per_sec:,.0f} examples/sec "
            f"({result.seconds:.1f} s with compiling); {peak}")


def main():
    """Run the test on every device set of this machine; print what each gave; exit status 1 on any problem."""
    sets = device_sets(mx.context.num_gpus())
    train_set, test_set = synthetic_pairs(PAIRS, seed=1), synthetic_pairs(TEST_PAIRS, seed=2)
    print(f"test: a BERT of {SIZES['num_blks']} layers x {SIZES['num_hiddens']} (random weights, dropout off), "
          f"{PAIRS // BATCH_SIZE} updates of {BATCH_SIZE} pairs on {', '.join(sets)}", flush=True)
    results = []
    for name, devices in sets.items():
        results.append(run_on(name, devices, train_set, test_set))
        print(describe(results[-1]), flush=True)
    problems = [p for r in results for p in r.problems] + compare(results)
    for problem in problems:
        print(f"problem: {problem}")
    if not problems:
        print(f"test passed: the losses agree within {LOSS_RTOL:g} (relative; the largest difference "
              f"{largest_difference(results):.2g}) and every device held the same weights after every update.")
    return 1 if problems else 0
