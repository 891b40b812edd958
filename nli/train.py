"""Fine-tuning over several devices: the book's `train_ch13` loop, with metrics, curves and progress."""
import json
import os
import random
import time

import matplotlib
import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, npx
from tqdm import tqdm

from . import data
from .evaluate import accuracy
from .errors import UserError

matplotlib.use("Agg")  # scripts and servers have no display; curves are saved as PNG

from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)


def parse_devices(spec):
    """Devices from `auto`, `cpu`, `cpu:N`, `gpu` or `gpu:0,1`; `auto` is every GPU, else the CPU."""
    num_gpus = mx.context.num_gpus()
    kind, _, rest = spec.partition(":")
    if spec == "auto":
        return [mx.gpu(i) for i in range(num_gpus)] or [mx.cpu()]
    if kind == "cpu":
        if not rest:
            return [mx.cpu()]
        if rest.isdigit() and int(rest) > 0:
            return [mx.cpu(i) for i in range(int(rest))]
    if kind == "gpu":
        ids = list(range(num_gpus)) if not rest else [int(i) for i in rest.split(",") if i.isdigit()]
        if rest and len(ids) != len(rest.split(",")):
            raise UserError(f"--devices {spec}: expected gpu:0,1,... with GPU numbers.")
        missing = [i for i in ids if i >= num_gpus]
        if not ids or missing:
            raise UserError(f"--devices {spec}: this machine has {num_gpus} GPU(s) visible to MXNet.")
        return [mx.gpu(i) for i in ids]
    raise UserError(f"--devices {spec!r}: expected auto, cpu, cpu:N, gpu or gpu:0,1.")


def seed_everything(seed):
    """Seed Python, NumPy and MXNet so a run can be repeated."""
    random.seed(seed)
    onp.random.seed(seed)
    mx.random.seed(seed)


def train_batch(net, batch, loss, trainer, devices):
    """One step on a batch split over `devices`: (summed loss, correct predictions)."""
    used = devices[:len(batch[-1])]
    shards = data.split_batch(batch, used)
    with autograd.record():
        preds = [net(*shard[:3]) for shard in shards]
        losses = [loss(pred, shard[3]) for pred, shard in zip(preds, shards)]
    for l in losses:
        l.backward()
    if len(used) < len(devices):  # a last batch smaller than the device count: idle grads are zero
        for p in net.collect_params().values():
            if p.grad_req != "null":
                for ctx in devices[len(used):]:
                    p.grad(ctx)[:] = 0
    # The book's flag: parameters that got no gradient this step are left alone.
    trainer.step(len(batch[-1]), ignore_stale_grad=True)
    loss_sum = sum(float(l.sum()) for l in losses)
    correct = sum(int((pred.argmax(axis=1).astype("int32") == shard[3]).sum()) for pred, shard in zip(preds, shards))
    return loss_sum, correct


def plot_curves(metrics, path):
    """Save loss, train accuracy and test accuracy per epoch as a PNG."""
    epochs = [m["epoch"] for m in metrics]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    ax_loss.plot(epochs, [m["loss"] for m in metrics], "o-", label="train loss")
    ax_acc.plot(epochs, [m["train_acc"] for m in metrics], "o-", label="train acc")
    ax_acc.plot(epochs, [m["test_acc"] for m in metrics], "s--", label="test acc")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True)
        ax.legend()
    ax_acc.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def finetune(net, train_set, test_set, devices, pad_id, max_len, num_epochs=5, batch_size=512,
             lr=1e-4, seed=0, run_dir=None, progress=True):
    """Fine-tune `net` with Adam as the book does; per epoch log loss, accuracies and examples/sec."""
    seed_everything(seed)
    loss = gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(net.collect_params(), "adam", {"learning_rate": lr})
    metrics = []
    if run_dir:
        os.makedirs(run_dir, exist_ok=True)
        open(os.path.join(run_dir, "metrics.jsonl"), "w").close()
    for epoch in range(1, num_epochs + 1):
        loss_sum = correct = seen = 0
        train_seconds = 0.0
        bar = tqdm(data.batches(train_set, batch_size, pad_id, max_len, shuffle=True, seed=seed, epoch=epoch),
                   total=-(-len(train_set) // batch_size), desc=f"epoch {epoch}/{num_epochs}",
                   unit="batch", disable=not progress, leave=False)
        for batch in bar:
            start = time.perf_counter()
            l, c = train_batch(net, batch, loss, trainer, devices)
            train_seconds += time.perf_counter() - start
            loss_sum, correct, seen = loss_sum + l, correct + c, seen + len(batch[-1])
            bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{correct / seen:.3f}",
                            ex_per_s=f"{seen / train_seconds:.1f}")
        test_acc = accuracy(net, test_set, devices, batch_size, pad_id, max_len)
        metrics.append({"epoch": epoch, "loss": loss_sum / seen, "train_acc": correct / seen,
                        "test_acc": test_acc, "examples_per_sec": seen / train_seconds})
        print(f"epoch {epoch}: loss {loss_sum / seen:.3f}, train acc {correct / seen:.3f}, "
              f"test acc {test_acc:.3f}, {seen / train_seconds:.1f} examples/sec on {devices}", flush=True)
        if run_dir:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics[-1]) + "\n")
            plot_curves(metrics, os.path.join(run_dir, "curves.png"))
    npx.waitall()
    return metrics
