"""Training that fits in memory by itself: --max-memory, micro-batches with the whole batch's update, the estimate."""
import dataclasses
import json
import subprocess
import sys

import mxnet as mx
import numpy as onp
import pytest
from mxnet import npx

from conftest import DEV_PAIRS, ROOT, SMALL, budget_for
from nli import cli, memory, model, predict, runner, snli, train
from nli.recipe import TUNED, Recipe

npx.set_np()
CPU = [mx.cpu()]
TRAIN_BATCH = train.train_batch


@pytest.fixture(scope="module")
def pairs():
    return snli.read_pairs(DEV_PAIRS)


def test_max_memory_takes_sizes_and_names_itself_when_it_cannot(capsys):
    parse = cli.build_parser().parse_args
    for text, size in (("6G", 6 * 2 ** 30), ("512M", 512 * 2 ** 20), ("1.5G", 3 * 2 ** 29), ("8GiB", 8 * 2 ** 30)):
        assert runner.recipe_of(*cli.finetune_settings(parse(["finetune", "--max-memory", text]))).max_memory \
            == size
    for bad in ("6Q", "0G", "lots"):
        with pytest.raises(SystemExit):
            parse(["finetune", "--max-memory", bad])
        assert f"argument --max-memory: '{bad}': expected a size such as 6G" in capsys.readouterr().err
    assert parse(["predict", "--run", "r", "--max-memory", "2G", "a", "b"]).max_memory == 2 * 2 ** 30


def test_a_recipe_saved_before_max_memory_loads_without_it():
    saved = {k: v for k, v in dataclasses.asdict(TUNED).items() if k != "max_memory"}
    assert Recipe.from_checkpoint({"recipe": saved}) == TUNED


def one_update(model_dir, pairs, max_memory, monkeypatch, run_dir=None):
    """One AdamW update (clipped) on 16 pairs, dropout off: (weights after it, train_batch calls it made)."""
    calls = []
    monkeypatch.setattr(train, "train_batch", lambda *args: calls.append(len(args[1][-1])) or TRAIN_BATCH(*args))
    train.seed_everything(0)
    net, vocab = model.from_pretrained(model_dir, CPU, dropout=0.0)
    train_set = snli.encode_pairs(*(c[:16] for c in pairs), vocab, 64)
    test_set = snli.encode_pairs(*(c[-8:] for c in pairs), vocab, 64)
    recipe = dataclasses.replace(TUNED, epochs=1, batch_size=16, lr=1e-3, max_len=64, warmup_ratio=0.0,
                                 max_memory=max_memory(net) if callable(max_memory) else max_memory)
    train.finetune(net, train_set, test_set, dataclasses.replace(recipe, out=run_dir), progress=False)
    return {name: p.data().asnumpy().copy() for name, p in net._collect_params_with_prefix().items()}, calls


def test_micro_batches_update_as_the_whole_batch(training_bert_dir, pairs, monkeypatch, tmp_path, capsys):
    whole, whole_calls = one_update(training_bert_dir, pairs, 2 ** 40, monkeypatch)
    split, split_calls = one_update(training_bert_dir, pairs, lambda net: budget_for(net, 5, 64), monkeypatch,
                                    run_dir=str(tmp_path / "run"))
    # 5 pairs of 64 tokens fit, more of the batch's padded length (its longest pair is shorter)
    assert whole_calls == [16] and len(split_calls) >= 3 and sum(split_calls) == 16
    assert max(float(onp.abs(whole[k] - split[k]).max()) for k in whole) < 1e-5
    printed = capsys.readouterr().out
    assert "batches of 16 pairs at 64 tokens train in micro-batches of 4 (at most 5 fit)" in printed
    epoch = [m for m in map(json.loads, open(tmp_path / "run" / "metrics.jsonl")) if m["kind"] == "epoch"][0]
    assert 100 * 2 ** 20 < epoch["peak_rss_bytes"] < 64 * 2 ** 30  # the process's peak, in bytes


def test_a_budget_that_cannot_hold_one_pair_stops_before_training(training_bert_dir, tmp_path, capsys):
    status = cli.main(["finetune", "--model", training_bert_dir, "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                       "--limit-train", "16", "--limit-test", "8", "--max-len", "64", "--devices", "cpu",
                       "--batch-size", "8", "--max-memory", "100M", "--quiet", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "error: --max-memory 100.0M cannot hold even one pair" in err
    assert not (tmp_path / "run" / "checkpoint").exists()  # nothing started


def test_prediction_in_micro_batches_gives_the_same_logits(training_bert_dir, pairs):
    net, vocab = model.from_pretrained(training_bert_dir, CPU, dropout=0.0)
    encoded = snli.encode_pairs(*(c[:40] for c in pairs), vocab, 64)
    whole = predict.Predictor(net, vocab, {"max_len": 64}, CPU, batch_size=40, max_memory=2 ** 40)
    split = predict.Predictor(net, vocab, {"max_len": 64}, CPU, batch_size=40, max_memory=budget_for(net, 3, 64))
    assert onp.abs(whole.logits(encoded) - split.logits(encoded)).max() < 1e-5


def test_the_split_fits_each_batch_and_leaves_a_batch_that_fits_as_it_is(training_bert_dir):
    net, _ = model.from_pretrained(training_bert_dir, CPU)
    plan = memory.MemoryPlan(budget_for(net, 10, 64), memory.Shape.of(net), 64)
    lengths = onp.array([60, 10, 12, 64, 9, 11, 30, 31, 62, 63, 58, 61, 12, 13])
    order = onp.arange(len(lengths))[::-1]
    parts = plan.split(order, lengths)
    assert sorted(onp.concatenate(parts).tolist()) == sorted(order.tolist()) and len(parts) == 2  # 14 > 10 at 64
    few = order[:8]
    assert len(plan.split(few, lengths)) == 1 and plan.split(few, lengths)[0] is few  # whole, in its order
    short = onp.flatnonzero(lengths < 16)  # 7 pairs padded to 16 tokens: fit where 10 of 64 do
    assert len(plan.split(short, lengths)) == 1
    assert plan.pairs_per_micro_batch(16) > 4 * plan.pairs_per_micro_batch(64)


PEAK_OF_STEPS = """
import resource, sys
sys.path.insert(0, {root!r})
from nli import bert, memory, model, train  # first: nli makes mxnet importable on Python 3.12+
import mxnet as mx, numpy as onp
from mxnet import gluon, init, npx
from nli.recipe import TUNED
npx.set_np()
pairs, length = {pairs}, {length}
net = model.BERTClassifier(bert.BERTModel(2000, **{small}, dropout=0.1))
net.initialize(init.Xavier())
net.hybridize(static_alloc=True)
train.set_trainable(net, TUNED, 1)
loss, trainer = gluon.loss.SoftmaxCrossEntropyLoss(), train.make_trainer(net, TUNED, "device", 10)
rng = onp.random.RandomState(0)
batch = (rng.randint(5, 2000, (pairs, length)).astype("int32"), onp.zeros((pairs, length), "int32"),
         onp.full(pairs, length, "float32"), rng.randint(0, 3, pairs).astype("int32"))
for _ in range(2):
    train.train_batch(net, batch, loss, [mx.cpu()])
    train.apply_update(trainer, net.collect_params(), [mx.cpu()], pairs, 1.0)
npx.waitall()
plan = memory.MemoryPlan(1, memory.Shape.of(net), length)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
      plan.fixed_bytes + plan.activation_bytes(pairs, length) // memory.RETAINED)
"""


def peak_of_steps(pairs, length):
    """(peak RSS, the estimate for one shape) of training steps of the bert.small shape, in a child process."""
    code = PEAK_OF_STEPS.format(root=ROOT, pairs=pairs, length=length, small=SMALL)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return map(int, result.stdout.split())


@pytest.mark.parametrize("pairs", [64, 128])
def test_the_estimate_covers_training_steps_without_wasting_half(pairs):
    # Steps of one shape: the estimate without the room for other shapes must hold them, and not be twice too much.
    peak, estimate = peak_of_steps(pairs, 128)
    assert 0.5 * estimate < peak <= estimate, (peak, estimate)


def test_the_plan_counts_reduce_buffers_over_devices_a_workspace_on_each_gpu_and_the_average(training_bert_dir):
    net, _ = model.from_pretrained(training_bert_dir, CPU)
    shape = memory.Shape.of(net)
    gradients = memory.FLOAT_BYTES * shape.trainable
    one = memory.MemoryPlan(2 ** 32, shape, 64)
    state = one.parameter_bytes + one.optimizer_bytes  # weights, gradients and moments of one copy
    assert one.reduce_bytes == 0 and one.fixed_bytes == memory.RUNTIME_BYTES + state
    cpus = memory.plan(net, 2 ** 32, 64, [mx.cpu(0), mx.cpu(1)])  # one memory: both copies and their buffers
    assert cpus.shared and cpus.fixed_bytes == memory.RUNTIME_BYTES + 2 * (state + gradients)
    gpus = memory.plan(net, 2 ** 32, 64, [mx.gpu(0), mx.gpu(1)])  # a budget per GPU: no GPU is touched to plan
    assert not gpus.shared
    assert gpus.fixed_bytes == memory.RUNTIME_BYTES + memory.GPU_WORKSPACE_BYTES + state + gradients
    head_only = memory.plan(net, 2 ** 32, 64, [mx.cpu(0), mx.cpu(1)], trains_encoder=False)
    assert head_only.reduce_bytes == memory.FLOAT_BYTES * head_only.shape.trainable < gradients
    assert "reduce buffers" in cpus.describe(32) and "workspaces 512.0M" in gpus.describe(32)
    assert "reduce buffers" not in one.describe(32) and "workspaces" not in cpus.describe(32)
    # --average: one more copy of what trains, once, on the first device
    averaged = memory.plan(net, 2 ** 32, 64, [mx.cpu(0), mx.cpu(1)], averaged=True)
    assert averaged.fixed_bytes == cpus.fixed_bytes + gradients and "the weights' average" in averaged.describe(32)
    head_averaged = memory.plan(net, 2 ** 32, 64, CPU, trains_encoder=False, averaged=True)
    assert head_averaged.average_bytes == memory.FLOAT_BYTES * head_only.shape.trainable
    assert "average" not in cpus.describe(32)


def resident_bytes():
    """This process's resident set size now (Linux)."""
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def test_peak_memory_is_the_process_peak_on_cpu_contexts_and_each_gpu_peak_on_gpus(monkeypatch):
    for devices in (CPU, [mx.cpu(0), mx.cpu(1)]):
        now = resident_bytes()
        [(key, peak)] = memory.peak_memory(devices).items()
        # at least the RSS now, but for what the kernel's per-thread counters have not summed yet (a few pages)
        assert key == "peak_rss_bytes" and peak >= 0.99 * now > 50 * 2 ** 20
    # gpu_memory_info as MXNet gives it, (free, total), fed: the pool released memory between the two readings
    readings = {0: [(6, 16), (10, 16)], 1: [(12, 16), (2, 16)]}
    monkeypatch.setattr(mx.context, "gpu_memory_info", lambda device_id: readings[device_id].pop(0))
    monkeypatch.setattr(memory, "GPU_PEAKS", {})
    gpus = [mx.gpu(0), mx.gpu(1)]
    assert memory.peak_memory(gpus) == {"peak_gpu_memory_bytes": [10, 4]}
    assert memory.peak_memory(gpus) == {"peak_gpu_memory_bytes": [10, 14]}  # gpu 0 keeps its peak, as RSS does
