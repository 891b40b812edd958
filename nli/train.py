"""Fine-tuning: the book's `train_ch13` loop, grown into an engine that resumes exactly and scales out.

One step reads like the book's `train_batch_ch13`: a batch is split over the devices, each device's
loss is backpropagated, and the Trainer's kvstore adds the gradients up. Around it: AdamW with warmup
and decay, clipping and accumulation of gradients, a frozen or cached encoder, atomic checkpoints that
resume bit for bit, and MXNet's distributed kvstore.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time

import matplotlib
import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, npx
from mxnet.gluon import nn
from tqdm import tqdm

from . import data
from .errors import UserError
from .evaluate import accuracy
from .model import _dump_json, _write_atomically

matplotlib.use("Agg")  # scripts and servers have no display; curves are saved as PNG

from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

# Everything that decides how the optimizer sees the data. `book` is the chapter's: plain Adam at a
# constant 1e-4. `tuned` is how BERT is usually fine-tuned (Devlin et al., 2019): decoupled weight
# decay, a linear warmup over the first 10% of updates then a linear decay to 0, gradients clipped.
RECIPES = {
    "book": dict(epochs=5, batch_size=512, max_len=128, optimizer="adam", lr=1e-4, weight_decay=0.0,
                 warmup_ratio=0.0, schedule="constant", max_grad_norm=0.0, accumulate=1),
    "tuned": dict(epochs=5, batch_size=512, max_len=128, optimizer="adamw", lr=2e-4, weight_decay=0.01,
                  warmup_ratio=0.1, schedule="linear", max_grad_norm=1.0, accumulate=1),
}
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
MODES = ("full", "freeze-encoder", "features")  # everything trains; the head; the head on cached features
KVSTORES = ("device", "local", "dist_sync", "dist_device_sync")
NO_DECAY = ".*bias|.*gamma|.*beta"  # biases and LayerNorm scales/shifts are not decayed, as in BERT
CHECKPOINT = "checkpoint"


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN or infinite: the run stops before the update."""


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


def check_dtype(dtype, devices):
    """Fail clearly unless `dtype` can be trained on `devices` (float16 is mixed precision, for GPUs)."""
    if dtype == "float32":
        return
    if dtype != "float16":
        raise UserError(f"--dtype {dtype}: expected float32 or float16.")
    if any(d.device_type != "gpu" for d in devices):
        raise UserError(f"--dtype float16 is mixed precision for GPUs (mxnet.contrib.amp, float16 kernels); "
                        f"this run's devices are {devices}. Train in float32 here, or use --devices gpu.")
    raise UserError("--dtype float16: MXNet 1.9.1's AMP converts only legacy ndarray/symbol operators, and "
                    "this BERT uses MXNet's numpy interface, so AMP would leave it in float32. Use float32.")


def resolve_recipe(name, **overrides):
    """The recipe `name` with every option that is not None in `overrides` replacing its value."""
    if name not in RECIPES:
        raise UserError(f"--recipe {name}: expected one of {', '.join(RECIPES)}.")
    return dict(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


def recipe_options(recipe):
    """`finetune`'s keyword arguments for a recipe (all of it but `max_len`, which encoding uses)."""
    options = {k: v for k, v in recipe.items() if k not in ("epochs", "max_len")}
    return dict(options, num_epochs=recipe["epochs"])


def seed_everything(seed):
    """Seed Python, NumPy and MXNet so a run can be repeated."""
    random.seed(seed)
    onp.random.seed(seed)
    mx.random.seed(seed)


def batch_seed(seed, rank, epoch, batch):
    """The MXNet seed for one batch (dropout masks): a function of where the run is, so a resumed run
    draws what the uninterrupted one drew, and MXNet's generator state never needs saving."""
    return int(onp.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1)[0])


def forward_backward(net, batch, loss, devices):
    """Forward and backward of a batch split over `devices` (gradients are written, or added with
    grad_req 'add'): (summed loss, correct predictions). The last array of `batch` is the labels."""
    shards = data.split_batch(batch, devices[:len(batch[-1])])
    with autograd.record():
        preds = [net(*shard[:-1]) for shard in shards]
        losses = [loss(pred, shard[-1]) for pred, shard in zip(preds, shards)]
    for l in losses:
        l.backward()
    loss_sum = sum(float(l.sum()) for l in losses)
    correct = sum(int((pred.argmax(axis=1).astype("int32") == shard[-1]).sum())
                  for pred, shard in zip(preds, shards))
    return loss_sum, correct


def train_batch(net, batch, loss, trainer, devices):
    """The book's step: gradients of one batch, then an update with the Trainer: (summed loss, correct)."""
    loss_sum, correct = forward_backward(net, batch, loss, devices)
    # The book's flag: parameters that got no gradient this step are left alone.
    trainer.step(len(batch[-1]), ignore_stale_grad=True)
    net.collect_params().zero_grad()  # so a device left idle by a short batch adds nothing next time
    return loss_sum, correct


def apply_update(trainer, params, devices, num_examples, max_grad_norm=None):
    """Sum the gradients over devices (and workers), clip their global norm, update, zero them.

    The gradients are sums over `num_examples` examples (of all workers): the update is that of their
    mean, and a `max_grad_norm` (0 or None: no clipping) bounds the norm of that mean, which is returned.
    Clipping scales the optimizer's gradient rescaling instead of every gradient: the same update,
    without a pass over the weights' worth of gradients."""
    trainer.allreduce_grads()
    trainable = [p for p in params.values() if p.grad_req != "null"]
    grads = [g.as_nd_ndarray() for p in trainable for g in p.list_grad()]
    norm, scale = None, 1.0
    if max_grad_norm:
        # After the all-reduce every device holds the same sums: the first device's give the norm.
        first = [p.grad(devices[0]).as_nd_ndarray() for p in trainable]
        norm = math.sqrt(float(mx.nd.multi_sum_sq(*first, num_arrays=len(first)).sum().asscalar())) / num_examples
        if not math.isfinite(norm):
            return norm
        scale = min(1.0, max_grad_norm / (norm + 1e-6))  # as torch.nn.utils.clip_grad_norm_
    for p in trainable:  # a device that saw no example still applies the all-reduced update
        for arr in p.list_data():
            arr._fresh_grad = True
    trainer.update(num_examples / scale)  # the optimizer rescales gradients by scale / num_examples
    mx.nd.reset_arrays(*grads, num_arrays=len(grads))  # one operator for all, not one per gradient
    return norm


def make_optimizer(name, lr, weight_decay, schedule, warmup_ratio, num_updates):
    """The optimizer; its rate warms up over a `warmup_ratio` share of `num_updates`, then `schedule`."""
    if name not in OPTIMIZERS:
        raise UserError(f"optimizer {name!r}: expected one of {', '.join(OPTIMIZERS)}.")
    if schedule not in SCHEDULES:
        raise UserError(f"schedule {schedule!r}: expected one of {', '.join(SCHEDULES)}.")
    if not 0 <= warmup_ratio < 1:
        raise UserError(f"--warmup-ratio {warmup_ratio}: expected a fraction of the updates in [0, 1).")
    warmup_steps = min(int(warmup_ratio * num_updates), num_updates - 1)
    scheduler = None
    if schedule == "cosine":
        scheduler = mx.lr_scheduler.CosineScheduler(num_updates, lr, 0.0, warmup_steps)
    elif schedule == "linear" or warmup_steps:  # a power of 0 keeps the rate constant after the warmup
        power = int(schedule == "linear")
        scheduler = mx.lr_scheduler.PolyScheduler(num_updates, lr, power, 0.0, warmup_steps)
    return mx.optimizer.create(name, learning_rate=lr, wd=weight_decay, lr_scheduler=scheduler)


@mx.optimizer.register
class AdamW(mx.optimizer.Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter, 2019), as BERT is fine-tuned: the decay
    shrinks the weights directly instead of passing through the gradient's moments."""

    def update(self, index, weight, grad, state):
        self._update_count(index)
        t = self._index_update_count[index]
        bias_correction = math.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t)  # as mx.optimizer.Adam
        mean, var = state
        mx.nd.contrib.adamw_update(weight, grad, mean, var, rescale_grad=self.rescale_grad,
                                   lr=bias_correction, eta=self._get_lr(index), wd=self._get_wd(index),
                                   beta1=self.beta1, beta2=self.beta2, epsilon=self.epsilon,
                                   clip_gradient=self.clip_gradient or -1, out=weight)


def set_trainable(net, encoder_frozen):
    """Accumulate gradients (grad_req 'add') for the head, and for the encoder unless it is frozen."""
    net.encoder.collect_params().setattr("grad_req", "null" if encoder_frozen else "add")
    for block in (net.hidden, net.output):
        block.collect_params().setattr("grad_req", "add")


def head_of(net):
    """The classifier's layers above the encoder (hidden, output), sharing its parameters."""
    head = nn.HybridSequential()
    head.add(net.hidden, net.output)
    head.hybridize(static_alloc=True)
    return head


def cls_features(net, encoded, indices, devices, batch_size, pad_id, max_len, progress=False):
    """The encoder's `<cls>` vectors of pairs `indices`, in that order (no dropout: inference mode)."""
    features = onp.zeros((len(indices), net.hidden.weight.shape[1]), dtype=onp.float32)
    by_length = onp.argsort(encoded.valid_lens[indices], kind="stable")  # little padding per batch
    for start in tqdm(range(0, len(indices), batch_size), desc="<cls> features", unit="batch",
                      disable=not progress, leave=False):
        positions = by_length[start:start + batch_size]
        tokens, segments, valid_lens, _ = data.make_batch(encoded, indices[positions], pad_id, max_len)
        shards = data.split_batch((tokens, segments, valid_lens), devices[:len(positions)])
        outputs = [net.encoder(*shard)[:, 0] for shard in shards]
        features[positions] = onp.concatenate([out.asnumpy() for out in outputs])
    return features


def cached_features(run_dir, net, encoded, indices, devices, batch_size, pad_id, max_len, progress):
    """`cls_features`, kept in RUN_DIR/features/ under a hash of the encoder's weights and the pairs."""
    if not run_dir:
        return cls_features(net, encoded, indices, devices, batch_size, pad_id, max_len, progress)
    key = hashlib.sha1(str(max_len).encode())
    for p in net.encoder.collect_params().values():
        key.update(p.data(devices[0]).asnumpy().tobytes())
    for array in (indices, encoded.token_ids, encoded.offsets, encoded.segment_a_lens):
        key.update(onp.ascontiguousarray(array).tobytes())
    path = os.path.join(run_dir, "features", key.hexdigest() + ".npy")
    if os.path.exists(path):
        return onp.load(path)
    features = cls_features(net, encoded, indices, devices, batch_size, pad_id, max_len, progress)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "wb") as f:
        onp.save(f, features)
    os.replace(path + ".tmp", path)
    return features


def features_accuracy(head, features, labels, devices, batch_size):
    """Share of pairs, given as cached `<cls>` features, whose predicted label is the gold one."""
    if not len(labels):
        return float("nan")
    predicted = []
    for start in range(0, len(labels), batch_size):
        chunk = features[start:start + batch_size]
        shards = data.split_batch((chunk,), devices[:len(chunk)])
        predicted += [head(*shard).asnumpy().argmax(axis=1) for shard in shards]
    return float((onp.concatenate(predicted) == labels).mean())


def hold_out(encoded, fraction):
    """(train, dev): the last `fraction` of the pairs held out to choose the best epoch on."""
    if not 0 < fraction < 1:
        raise UserError(f"--dev-fraction {fraction}: expected a fraction in (0, 1).")
    n_dev = max(1, int(len(encoded) * fraction))
    cut = len(encoded) - n_dev
    return encoded.take(onp.arange(cut)), encoded.take(onp.arange(cut, len(encoded)))


@dataclasses.dataclass
class Progress:
    """Where a run is: what a checkpoint holds, besides weights and optimizer state, to resume exactly."""
    epoch: int = 1  # the epoch in progress
    batch: int = 0  # batches of that epoch already trained on: the sampler's position
    step: int = 0  # optimizer updates so far
    epoch_sums: dict = dataclasses.field(default_factory=dict)  # loss, correct, seen, seconds this epoch
    log_sums: dict = dataclasses.field(default_factory=dict)  # the same since the last step entry
    metrics: list = dataclasses.field(default_factory=list)  # every metrics.jsonl entry so far
    best_dev_acc: float = -1.0


def add_sums(sums, loss, correct, seen, seconds):
    """Add one batch's figures to running sums."""
    for key, value in (("loss", loss), ("correct", correct), ("seen", seen), ("seconds", seconds)):
        sums[key] = sums.get(key, 0) + value


def rng_states():
    """Python's and NumPy's generator states, as JSON."""
    version, state, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = onp.random.get_state()
    return {"python": [version, list(state), gauss], "numpy": [name, keys.tolist(), pos, has_gauss, cached]}


def set_rng_states(states):
    """Restore what `rng_states` saved."""
    version, state, gauss = states["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    onp.random.set_state((name, onp.asarray(keys, dtype=onp.uint32), pos, has_gauss, cached))


def replace_dir(path, write):
    """Fill `path`.new with `write(dir)` and swap it in for `path`: a crash at any moment leaves a
    complete `path`, `path`.new or `path`.old (see `find_checkpoint`)."""
    new, old = path + ".new", path + ".old"
    shutil.rmtree(new, ignore_errors=True)
    os.makedirs(new)
    write(new)
    for name in os.listdir(new):  # on disk before the rename makes them the current files
        with open(os.path.join(new, name), "rb") as f:
            os.fsync(f.fileno())
    if os.path.exists(path):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
    os.replace(new, path)
    shutil.rmtree(old, ignore_errors=True)


def save_checkpoint(run_dir, net, trainer, progress, settings):
    """Write weights, optimizer state, progress, RNG states and settings to RUN_DIR/checkpoint."""
    def write(folder):
        net.save_parameters(os.path.join(folder, "model.params"))
        trainer.save_states(os.path.join(folder, "trainer.states"))
        state = {**dataclasses.asdict(progress), "rng": rng_states(), "settings": settings}
        with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:  # last: marks it complete
            json.dump(state, f)
    replace_dir(os.path.join(run_dir, CHECKPOINT), write)


def find_checkpoint(run_dir):
    """The complete checkpoint directory of a run, or None: the current one, else a swap's survivor."""
    for suffix in ("", ".new", ".old"):
        folder = os.path.join(run_dir, CHECKPOINT + suffix)
        if os.path.exists(os.path.join(folder, "state.json")):
            return folder
    return None


def read_checkpoint(run_dir):
    """(directory, state) of the run's checkpoint; a clear error when there is none."""
    folder = find_checkpoint(run_dir)
    if folder is None:
        raise UserError(f"{run_dir} has no checkpoint to resume from ({CHECKPOINT}/state.json is missing).")
    canonical = os.path.join(run_dir, CHECKPOINT)
    if folder != canonical:  # a swap cut short: its survivor becomes the checkpoint
        shutil.rmtree(canonical, ignore_errors=True)
        os.replace(folder, canonical)
        folder = canonical
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        return folder, json.load(f)


@contextlib.contextmanager
def stop_requested():
    """An event set by the first Ctrl-C (SIGINT) or SIGTERM, so the loop saves before it stops; a
    second Ctrl-C interrupts at once. Outside the main thread signals cannot be caught: never set."""
    event = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield event
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def request_stop(signum, frame):
        event.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    for sig in previous:
        signal.signal(sig, request_stop)
    try:
        yield event
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def plot_curves(metrics, path):
    """Save the loss (per logged step and per epoch) and the accuracies per epoch as a PNG."""
    epochs = [m for m in metrics if m.get("kind", "epoch") == "epoch"]
    steps = [m for m in metrics if m.get("kind") == "step"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    if steps:
        ax_loss.plot([m["epochs"] for m in steps], [m["loss"] for m in steps], "-", lw=0.8, alpha=0.6,
                     label="train loss (steps)")
    ax_loss.plot([m["epoch"] for m in epochs], [m["loss"] for m in epochs], "o-", label="train loss")
    ax_acc.plot([m["epoch"] for m in epochs], [m["train_acc"] for m in epochs], "o-", label="train acc")
    ax_acc.plot([m["epoch"] for m in epochs], [m["test_acc"] for m in epochs], "s--", label="test acc")
    if any("dev_acc" in m for m in epochs):
        ax_acc.plot([m["epoch"] for m in epochs], [m.get("dev_acc") for m in epochs], "^:", label="dev acc")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True)
        ax.legend()
    ax_acc.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(path + ".tmp.png")
    plt.close(fig)
    os.replace(path + ".tmp.png", path)


def write_metrics(run_dir, metrics):
    """Rewrite RUN_DIR/metrics.jsonl (atomically) with `metrics`, one JSON object per line."""
    path = os.path.join(run_dir, "metrics.jsonl")
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(m) + "\n" for m in metrics)
    os.replace(path + ".tmp", path)


def append_metrics(run_dir, entry):
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def training_speed(epochs):
    """Seconds spent in training steps over `epochs` (finetune's epoch metrics), and examples/sec over them all."""
    seconds = sum(m["examples"] / m["examples_per_sec"] for m in epochs)
    return seconds, sum(m["examples"] for m in epochs) / seconds


def save_results(path, epochs, wall_seconds, **about):
    """A finished run's accuracy, time and speed as JSON with the command that made it: what results tables read."""
    seconds, speed = training_speed(epochs)
    results = {"command": " ".join([sys.executable] + sys.argv), **about, "test_accuracy": epochs[-1]["test_acc"],
               "accuracy_per_epoch": [m["test_acc"] for m in epochs], "wall_seconds": wall_seconds,
               "train_seconds": seconds, "examples_per_sec": speed}
    _write_atomically(path, lambda tmp: _dump_json(results, tmp))


def training_block(net, mode, train_set, shard, eval_sets, devices, batch_size, pad_id, max_len, cache_dir,
                   progress):
    """What `mode` trains, on what: (block, batch from the shard's local indices, score of an eval set).

    With `features` the block is the head, the encoder's `<cls>` features of every pair are computed
    once (and cached in `cache_dir`), and eval sets are scored on their features too."""
    if mode != "features":
        return (net, lambda indices: data.make_batch(train_set, shard[indices], pad_id, max_len),
                lambda encoded: accuracy(net, encoded, devices, batch_size, pad_id, max_len))
    head = head_of(net)

    def features(encoded, indices):
        return cached_features(cache_dir, net, encoded, indices, devices, batch_size, pad_id, max_len,
                               progress)
    train_features = features(train_set, shard)
    eval_features = {id(s): features(s, onp.arange(len(s))) for s in eval_sets if s is not None}

    def score(encoded):
        return features_accuracy(head, eval_features[id(encoded)], encoded.labels, devices, batch_size)
    return head, lambda indices: (train_features[indices], train_set.labels[shard[indices]]), score


def step_entry(state, epoch, epoch_fraction, trainer, norm):
    """The metrics.jsonl entry of an update: figures since the previous entry."""
    sums = state.log_sums
    entry = {"kind": "step", "step": state.step, "epoch": epoch, "epochs": epoch - 1 + epoch_fraction,
             "loss": sums["loss"] / sums["seen"], "acc": sums["correct"] / sums["seen"],
             "lr": trainer.learning_rate, "ex_per_s": sums["seen"] / sums["seconds"]}
    if norm is not None:
        entry["grad_norm"] = norm
    return entry


def finetune(net, train_set, test_set, devices, pad_id, max_len, num_epochs=5, batch_size=512, lr=1e-4,
             seed=0, run_dir=None, progress=True, *, optimizer="adam", weight_decay=0.0, schedule="constant",
             warmup_ratio=0.0, max_grad_norm=None, accumulate=1, mode="full", freeze_epochs=0, dev_set=None,
             save_every=None, log_every=10, resume=False, kvstore="device", loss=None, save_model=None,
             settings=None):
    """Fine-tune `net` (by default as the book does: Adam at lr 1e-4); returns the per-epoch metrics.

    `batch_size` is per update of each worker, times `accumulate`. `mode` is what trains: `full`, the
    head with the encoder frozen (`freeze-encoder`), or the head on `<cls>` features computed once
    (`features`); `freeze_epochs` trains only the head for that many epochs first. With `run_dir`,
    metrics.jsonl, curves.png and checkpoints (every `save_every` updates and epoch) are written there,
    `resume` continues from its checkpoint, `save_model(dir)` writes the final model to it and the best
    epoch on `dev_set` to its best/. `settings` (JSON) are kept in checkpoints for the caller.
    """
    if accumulate < 1 or (save_every is not None and save_every < 1) or log_every < 1:
        raise UserError("--accumulate, --save-every and --log-every must be positive.")
    if max_grad_norm and max_grad_norm < 0:
        raise UserError(f"--max-grad-norm {max_grad_norm}: expected a positive norm (or 0: no clipping).")
    if mode not in MODES:
        raise UserError(f"mode {mode!r}: expected one of {', '.join(MODES)}.")
    if freeze_epochs and mode != "full":
        raise UserError(f"--freeze-epochs unfreezes the encoder later: it needs full fine-tuning, not {mode}.")
    if kvstore not in KVSTORES:
        raise UserError(f"--kvstore {kvstore}: expected one of {', '.join(KVSTORES)}.")
    if resume and not run_dir:
        raise UserError("resuming needs the run directory that holds the checkpoint.")
    distributed = kvstore.startswith("dist")
    kv = mx.kv.create(kvstore) if distributed else kvstore
    rank, num_workers = (kv.rank, kv.num_workers) if distributed else (0, 1)
    writer = run_dir if rank == 0 else None  # one worker writes the run; all of them train

    # Each worker trains on its own shard, all shards the same size; every worker's epoch stops at the
    # fewest batches any shard has, so the synchronous kvstore always hears from everyone.
    def shard(r):
        return onp.arange(r, len(train_set) - len(train_set) % num_workers, num_workers)

    def epoch_orders(epoch):
        """Every worker's batches of `epoch` (index arrays into its shard), as many for each."""
        orders = [list(data.LengthBucketSampler(train_set.valid_lens[shard(r)], batch_size, shuffle=True,
                                                seed=seed, epoch=epoch)) for r in range(num_workers)]
        return [order[:min(map(len, orders))] for order in orders]

    num_updates = max(1, sum(-(-len(epoch_orders(e)[0]) // accumulate) for e in range(1, num_epochs + 1)))

    set_trainable(net, encoder_frozen=mode != "full" or freeze_epochs > 0)
    block, batch_at, score = training_block(net, mode, train_set, shard(rank), (test_set, dev_set), devices,
                                            batch_size, pad_id, max_len, writer, progress)
    loss = loss or gluon.loss.SoftmaxCrossEntropyLoss()
    loss.hybridize()
    params = block.collect_params()
    for p in block.collect_params(NO_DECAY).values():
        p.wd_mult = 0.0
    optimizer = make_optimizer(optimizer, lr, weight_decay, schedule, warmup_ratio, num_updates)
    # Updates happen in this process (not on the kvstore), so the summed gradients can be clipped first.
    trainer = gluon.Trainer(params, optimizer, kvstore=kv, update_on_kvstore=False)

    state = Progress()
    if resume:
        folder, saved = read_checkpoint(run_dir)
        net.load_parameters(os.path.join(folder, "model.params"), ctx=devices)
        trainer.load_states(os.path.join(folder, "trainer.states"))
        set_rng_states(saved.pop("rng"))
        saved.pop("settings", None)
        state = Progress(**saved)
        print(f"resuming {run_dir} at step {state.step} (epoch {state.epoch}, batch {state.batch})",
              flush=True)

    def checkpoint():
        if writer:
            save_checkpoint(writer, net, trainer, state, settings)

    if writer:
        os.makedirs(writer, exist_ok=True)
        write_metrics(writer, state.metrics)  # a resumed run drops what was logged after its checkpoint
        if not resume:
            checkpoint()  # resumable from the very start
    with stop_requested() as stop:
        for epoch in range(state.epoch, num_epochs + 1):
            set_trainable(net, encoder_frozen=mode != "full" or epoch <= freeze_epochs)
            if freeze_epochs and epoch == freeze_epochs + 1:
                print(f"epoch {epoch}: the encoder is unfrozen", flush=True)
            orders = epoch_orders(epoch)
            order = orders[rank]
            examples = [sum(len(o[b]) for o in orders) for b in range(len(order))]  # over all workers
            bar = tqdm(total=len(order), initial=state.batch, desc=f"epoch {epoch}/{num_epochs}",
                       unit="batch", disable=not progress, leave=False)
            pending = 0  # examples whose gradients are summed but not applied yet
            for b in range(state.batch, len(order)):
                start = time.perf_counter()
                mx.random.seed(batch_seed(seed, rank, epoch, b), ctx="all")
                loss_sum, correct = forward_backward(block, batch_at(order[b]), loss, devices)
                if not math.isfinite(loss_sum):
                    raise diverged("loss", loss_sum, state.step + 1, epoch, b, writer)
                pending += examples[b]
                update_now = (b + 1) % accumulate == 0 or b + 1 == len(order)
                norm = apply_update(trainer, params, devices, pending, max_grad_norm) if update_now else None
                if norm is not None and not math.isfinite(norm):
                    raise diverged("gradient norm", norm, state.step + 1, epoch, b, writer)
                for sums in (state.epoch_sums, state.log_sums):
                    add_sums(sums, loss_sum, correct, len(order[b]), time.perf_counter() - start)
                if not update_now:
                    continue
                state.step, state.batch, pending = state.step + 1, b + 1, 0
                sums = state.epoch_sums
                bar.update(b + 1 - bar.n)
                bar.set_postfix(loss=f"{sums['loss'] / sums['seen']:.3f}",
                                acc=f"{sums['correct'] / sums['seen']:.3f}",
                                ex_per_s=f"{sums['seen'] / sums['seconds']:.1f}")
                if state.step % log_every == 0:
                    state.metrics.append(step_entry(state, epoch, (b + 1) / len(order), trainer, norm))
                    state.log_sums = {}
                    if writer:
                        append_metrics(writer, state.metrics[-1])
                if stop.is_set():
                    checkpoint()
                    print(f"\nstopped at step {state.step} (epoch {epoch}, batch {b + 1}); "
                          + (f"checkpoint saved in {writer}: continue with `python -m nli finetune "
                             f"--resume {writer}`" if writer else "nothing saved (no run dir)"), flush=True)
                    raise KeyboardInterrupt
                if save_every and state.step % save_every == 0 and b + 1 < len(order):
                    checkpoint()
            bar.close()
            sums = state.epoch_sums
            entry = {"kind": "epoch", "epoch": epoch, "step": state.step, "loss": sums["loss"] / sums["seen"],
                     "train_acc": sums["correct"] / sums["seen"], "examples": sums["seen"],
                     "examples_per_sec": sums["seen"] / sums["seconds"], "lr": trainer.learning_rate}
            if rank == 0:  # the other workers go on to the next epoch and wait for it in the kvstore
                entry["test_acc"] = score(test_set)
                if dev_set is not None:
                    entry["dev_acc"] = score(dev_set)
                print(f"epoch {epoch}: loss {entry['loss']:.3f}, train acc {entry['train_acc']:.3f}, "
                      f"test acc {entry['test_acc']:.3f}"
                      + (f", dev acc {entry['dev_acc']:.3f}" if dev_set is not None else "")
                      + f", {entry['examples_per_sec']:.1f} examples/sec on {devices}", flush=True)
            state.metrics.append(entry)
            state.epoch, state.batch, state.epoch_sums = epoch + 1, 0, {}
            if writer:
                append_metrics(writer, entry)
                plot_curves(state.metrics, os.path.join(writer, "curves.png"))
                if save_model and entry.get("dev_acc", -1) > state.best_dev_acc:
                    state.best_dev_acc = entry["dev_acc"]
                    replace_dir(os.path.join(writer, "best"), save_model)
                    print(f"epoch {epoch} is the best on the dev set so far: saved in {writer}/best",
                          flush=True)
                checkpoint()
    npx.waitall()
    if save_model and writer:
        save_model(writer)
        print(f"saved the run in {writer}", flush=True)
    elif run_dir and distributed:  # every worker's copy, to check that they agree
        net.save_parameters(os.path.join(run_dir, f"worker-{rank}.params"))
    return [m for m in state.metrics if m["kind"] == "epoch"]


def diverged(what, value, step, epoch, batch, run_dir):
    """The error that stops a run whose loss or gradient is no longer a number."""
    kept = find_checkpoint(run_dir) if run_dir else None
    where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"
    return TrainingDiverged(f"the {what} is {value} at step {step} (epoch {epoch}, batch {batch + 1}); "
                            f"stopped before updating the weights, {where}. Lower --lr, clip gradients "
                            f"(--max-grad-norm) or check the data.")
