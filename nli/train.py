"""Fine-tuning: the book's `train_ch13` loop, grown into an engine that resumes exactly and scales out.

The loop reads like the book's: `train_batch` splits a batch over the devices and backpropagates each
device's loss (the book's `train_batch_ch13`), then `apply_update` sums the gradients over devices and
workers and updates. Around it: AdamW with warmup and decay, clipping and accumulation of gradients, a
frozen or cached encoder, checkpoints that resume bit for bit (see `rundir`), MXNet's distributed kvstore.
What a run does is one `Recipe` (see `recipe`).
"""
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import signal
import threading
import time

import mxnet as mx
import numpy as onp
from mxnet import autograd, gluon, npx
from mxnet.gluon import nn
from tqdm import tqdm

from . import data, fileio, memory, rundir
from .errors import UserError
from .predict import accuracy, predict_batches
from .recipe import BOOK, parse_average
from .snli import LABELS

NO_DECAY = ".*bias|.*gamma|.*beta"  # biases and LayerNorm scales/shifts are not decayed, as in BERT


class TrainingDiverged(UserError):
    """The loss or the gradient became NaN or infinite: the run stops before anything is saved."""


def check_dtype(dtype, devices):
    """Fail clearly unless `dtype` can be trained on `devices`: float16 cannot, on any device, in this version."""
    if dtype == "float32":
        return
    raise UserError("--dtype float16 is refused on every device in this version: MXNet 1.9.1's mixed precision "
                    "(AMP) converts only legacy ndarray/symbol operators, and this BERT uses MXNet's numpy interface, "
                    "so AMP would leave it in float32. Train in float32.")


def seed_everything(seed):
    """Seed Python, NumPy and MXNet so a run can be repeated."""
    random.seed(seed)
    onp.random.seed(seed)
    mx.random.seed(seed)


def batch_seed(seed, rank, epoch, batch):
    """The MXNet seed for one batch (dropout masks): a function of where the run is, so a resumed run
    draws what the uninterrupted one drew, and MXNet's generator state never needs saving."""
    return int(onp.random.SeedSequence([seed, rank, epoch, batch]).generate_state(1)[0])


def train_batch(net, batch, loss, devices):
    """Gradients of one batch split over `devices`: each device's summed loss and correct predictions, left on that
    device (reading them would make the host wait). The last array of `batch` is the labels; gradients are written
    or added to, as `write_gradients` set them.

    Book: `train_batch_ch13`, up to its update: `apply_update` follows, once every `accumulate` batches."""
    shards = data.split_batch(batch, devices[:len(batch[-1])])
    with autograd.record():
        preds = [net(*shard[:-1]) for shard in shards]
        losses = [loss(pred, shard[-1]) for pred, shard in zip(preds, shards)]
    for l in losses:
        l.backward()
    return [(l.sum(), (pred.argmax(axis=1).astype("int32") == shard[-1]).sum())
            for l, pred, shard in zip(losses, preds, shards)]


def write_gradients(params, passes, devices, rows=()):
    """Let the backward pass write the trainable gradients (grad_req 'write') when an update takes one pass on every
    device, so nothing zeroes them and no kernel adds to zeros; else add to them (grad_req 'add') from zero until
    `apply_update` zeroes them. `passes` holds the labels of each micro-batch of the update; the parameters of `rows`
    (`looked_up_rows`) are always added to, as only their rows looked up are zeroed. The gradient arrays are kept
    (Gluon's setter would allocate new ones, a second copy of them at the switch)."""
    mode = "write" if len(passes) == 1 and len(passes[0]) >= len(devices) else "add"
    switched = [p for p in params.values() if p.grad_req not in ("null", "add" if p in rows else mode)]
    for p in switched:
        p._grad_req = "add" if p in rows else mode
        autograd.mark_variables(p.list_data(), p.list_grad(), p.grad_req)
    zero_gradients([p for p in switched if p.grad_req == "add"], devices)  # they hold the last update's written ones


def zero_gradients(params, devices):
    """Zero the gradients of `params` (a list) on every device: one operator per device for all of them."""
    for device in devices if params else ():
        grads = [p.grad(device).as_nd_ndarray() for p in params]
        mx.nd.reset_arrays(*grads, num_arrays=len(grads))


def looked_up_rows(weight, micro_batches):
    """{`weight`: the ids of its rows that `micro_batches` (token ids first) look up}, the word embeddings' `weight`:
    the only rows of its gradient that are not zero, which `apply_update` alone measures and zeroes: a few hundred
    of tens of thousands (no rows if the weight is frozen)."""
    if weight.grad_req == "null":
        return {}
    return {weight: onp.unique(onp.concatenate([micro_batch[0].ravel() for micro_batch in micro_batches]))}


def accumulate_gradients(task, batches, loss, devices, seed_of):
    """The gradients of one update: `batches` ((number, indices) pairs, `accumulate` of them), each cut into as many
    micro-batches as fit the memory budget, with dropout drawn from `seed_of(number)`: from where the batch is in the
    run. Returns each micro-batch's device sums (`train_batch`), and the embeddings' rows looked up (`task.rows`)."""
    parts = [(b, list(task.micro_batches(indices))) for b, indices in batches]
    every = [micro_batch for _, micro_batches in parts for micro_batch in micro_batches]
    rows = task.rows(every)
    write_gradients(task.block.collect_params(), [micro_batch[-1] for micro_batch in every], devices, rows)
    device_sums = []
    for b, micro_batches in parts:
        mx.random.seed(seed_of(b), ctx="all")
        for micro_batch in micro_batches:
            device_sums += train_batch(task.block, micro_batch, loss, devices)
    return device_sums, rows


def apply_update(trainer, params, devices, num_examples, max_grad_norm=None, rows=None):
    """Sum the gradients over devices (and workers), clip their global norm, update, zero the gradients that are
    added to: of the parameters in `rows` (`looked_up_rows`), only the rows given, where the rest are zero.

    The gradients are sums over `num_examples` examples (of all workers): the update is that of their
    mean, and a `max_grad_norm` (0 or None: no clipping) bounds the norm of that mean, which is returned as an
    array on the first device (reading it waits for the engine). Clipping scales the optimizer's gradient rescaling
    instead of every gradient: the same update, without a pass over the weights' worth of gradients. `AdamW` takes
    the factor as an array, so the host pushes the next batch while the engine works, and its kernel skips an update
    whose factor is not a number; other optimizers take a number, which the host waits for. Every operator sees the
    arrays of one device."""
    trainer.allreduce_grads()
    trainable = [p for p in params.values() if p.grad_req != "null"]
    row_ids = {p: [data.host_array(ids).as_in_context(device) for device in devices]
               for p, ids in (rows or {}).items()}
    norm = clip = None
    if max_grad_norm:
        # After the all-reduce every device holds the same sums: the first device's give the norm.
        # BLAS's dot of each gradient with itself: 3x faster than multi_sum_sq on the CPU, and more exact
        first = [(p.grad(devices[0])[row_ids[p][0]] if p in row_ids else p.grad(devices[0])).as_nd_ndarray()
                 .reshape(-1) for p in trainable]
        norm = mx.nd.sqrt(mx.nd.add_n(*[mx.nd.dot(g, g) for g in first])) / num_examples
        clip = mx.nd.minimum(max_grad_norm / (norm + 1e-6), 1.0)  # as torch.nn.utils.clip_grad_norm_
    for p in trainable:  # a device that saw no example still applies the all-reduced update
        for arr in p.list_data():
            arr._fresh_grad = True
    optimizer = trainer.optimizer
    if isinstance(optimizer, AdamW):
        optimizer.clip_factor = clip
        trainer.update(num_examples)  # the optimizer rescales gradients by clip / num_examples
        optimizer.clip_factor = None
    elif clip is None:
        trainer.update(num_examples)
    elif math.isfinite(factor := float(clip.asscalar())):  # a norm that is not a number: no update
        trainer.update(num_examples / factor)
    zero_gradients([p for p in trainable if p.grad_req == "add" and p not in row_ids], devices)
    for p, ids in row_ids.items():
        for device, device_ids in zip(devices, ids):
            p.grad(device)[device_ids] = 0
    return norm


def training_loss(loss=None):
    """The loss trained on, hybridized: the book's softmax cross-entropy unless one is given."""
    loss = loss or gluon.loss.SoftmaxCrossEntropyLoss()
    loss.hybridize()
    return loss


def make_optimizer(name, lr, weight_decay, schedule, warmup_ratio, num_updates):
    """The optimizer; its rate warms up over a `warmup_ratio` share of `num_updates`, then `schedule`."""
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
    shrinks the weights directly instead of passing through the gradient's moments, in one pass over each weight
    with its moments (MXNet's multi-tensor `adamw_update`). That kernel loops over all the arrays of a call for each
    element of the largest, so a call takes one large weight, or many small ones of the same size: 1.4x faster on
    the CPU than decaying, then `adam_update` (bench/bench_profile.py)."""

    ELEMENTS_PER_CALL = 1 << 16  # weights smaller than this share calls, up to this many elements in all
    WEIGHTS_PER_CALL = 45  # the most the kernel takes
    ALL_AT_ONCE = 1 << 30  # an `aggregate_num` for MXNet's Updater to hand over every parameter; `update` groups them

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.aggregate_num = self.ALL_AT_ONCE
        self.clip_factor = None  # an array of one number that scales the gradients too, during `apply_update`

    def __setstate__(self, state):
        super().__setstate__(state)
        self.aggregate_num = self.ALL_AT_ONCE  # a checkpoint of an earlier version (one or 45 at a time) too
        self.clip_factor = None

    def update(self, index, weight, grad, state):
        if not isinstance(index, (list, tuple)):
            index, weight, grad, state = [index], [weight], [grad], [state]
        self._update_count(index)
        rescale = mx.nd.full((1,), self.rescale_grad, ctx=weight[0].context)
        if self.clip_factor is not None:  # not a number: the kernel leaves the weights and moments as they are
            rescale = rescale * self.clip_factor.as_in_context(weight[0].context)
        by_size = {}
        for i, w, g, s in zip(index, weight, grad, state):
            by_size.setdefault(w.size, []).append((i, w, g, s))
        for size, group in by_size.items():
            count = max(1, min(self.WEIGHTS_PER_CALL, self.ELEMENTS_PER_CALL // size))
            for start in range(0, len(group), count):
                self._update_together(group[start:start + count], rescale)

    def _update_together(self, group, rescale):
        """One kernel call for `group`'s (index, weight, grad, (mean, var)). The kernel moves a weight by
        eta * (lr * step + wd * weight): eta is the weight's rate, lr Adam's bias correction."""
        rates, corrections, decays, arrays = [], [], [], []
        for i, w, g, (mean, var) in group:
            t = self._index_update_count[i]
            rates.append(self._get_lr(i))
            corrections.append(math.sqrt(1 - self.beta2 ** t) / (1 - self.beta1 ** t))
            decays.append(self._get_wd(i))
            arrays += [w, g, mean, var]
        mx.nd._internal._multi_adamw_update(
            *arrays, rescale, out=[w for _, w, _, _ in group], num_weights=len(group), etas=rates,
            lrs=corrections, wds=decays, beta1=self.beta1, beta2=self.beta2, epsilon=self.epsilon,
            clip_gradient=self.clip_gradient or -1)


def set_layer_decay(net, decay):
    """Layer-wise rates (Howard & Ruder, 2018; Clark et al., 2020): encoder block l of L learns at decay^(L-l)
    of the rate, the embeddings at decay^L, the head at the full rate, so lower, more general layers move less."""
    blocks = net.encoder.blks
    for p in net.encoder.collect_params().values():
        p.lr_mult = decay ** len(blocks)
    for l, block in enumerate(blocks, start=1):
        for p in block.collect_params().values():
            p.lr_mult = decay ** (len(blocks) - l)


def make_trainer(block, recipe, kvstore, num_updates):
    """The Trainer of `block`'s parameters with the recipe's optimizer and schedule; biases and LayerNorm
    are not decayed."""
    for p in block.collect_params(NO_DECAY).values():
        p.wd_mult = 0.0
    optimizer = make_optimizer(recipe.optimizer, recipe.lr, recipe.weight_decay, recipe.schedule,
                               recipe.warmup_ratio, num_updates)
    # Updates happen in this process (not on the kvstore), so the summed gradients can be clipped first.
    return gluon.Trainer(block.collect_params(), optimizer, kvstore=kvstore, update_on_kvstore=False)


def check_kvstore(name):
    """Fail clearly when a distributed kvstore was not started by the launcher: MXNet would stop on the
    DMLC_* variables that the launcher sets and that are missing."""
    if name.startswith("dist") and "DMLC_NUM_WORKER" not in os.environ:
        raise UserError(f"--kvstore {name} sums gradients over the workers that `python -m nli.launch` starts: run "
                        f"`python -m nli.launch -n 2 -s 1 --launcher local python -m nli finetune ... --kvstore "
                        f"{name}`, or train on this machine's devices with --kvstore device.")


def kvstore_workers(name):
    """The kvstore that sums gradients (MXNet's own for a distributed one), this worker's rank, the workers."""
    if not name.startswith("dist"):
        return name, 0, 1
    check_kvstore(name)
    kv = mx.kv.create(name)
    return kv, kv.rank, kv.num_workers


class Shards:
    """Each worker trains on its own shard of the training pairs, all shards the same size; every worker's
    epoch stops at the fewest batches any shard has, so the synchronous kvstore always hears from everyone."""

    def __init__(self, lengths, recipe, num_workers):
        self.lengths, self.recipe, self.num_workers = lengths, recipe, num_workers

    def indices(self, rank):
        """The pairs of worker `rank`'s shard."""
        n = len(self.lengths)
        return onp.arange(rank, n - n % self.num_workers, self.num_workers)

    def batches(self, epoch):
        """Every worker's batches of `epoch` (index arrays into its shard), as many for each."""
        orders = [list(data.LengthBucketSampler(self.lengths[self.indices(r)], self.recipe.batch_size, shuffle=True,
                                                seed=self.recipe.seed, epoch=epoch,
                                                bucket_width=self.recipe.bucket_width))
                  for r in range(self.num_workers)]
        return [order[:min(map(len, orders))] for order in orders]

    def updates(self, epoch, rank, start=0):
        """Worker `rank`'s updates of `epoch` from its batch `start` on: for each, its `accumulate` batches (number,
        pair indices) whose gradients are summed into it, and the examples of all workers that sum covers."""
        orders = self.batches(epoch)
        for first in range(start, len(orders[rank]), self.recipe.accumulate):
            numbers = range(first, min(first + self.recipe.accumulate, len(orders[rank])))
            yield [(b, orders[rank][b]) for b in numbers], sum(len(order[b]) for order in orders for b in numbers)

    def num_batches(self, epoch):
        """The batches each worker trains on in `epoch`."""
        return len(self.batches(epoch)[0])

    def num_updates(self):
        """The updates of the whole run (at least one)."""
        return max(1, sum(-(-self.num_batches(e) // self.recipe.accumulate) for e in range(1, self.recipe.epochs + 1)))


def set_trainable(net, recipe, epoch):
    """Train the head, and the encoder unless `recipe` keeps it frozen in `epoch` (it trains only the head, or only
    the head for its first `freeze_epochs`); `write_gradients` then sets how each update fills their gradients."""
    frozen = recipe.mode != "full" or epoch <= recipe.freeze_epochs
    if recipe.freeze_epochs and epoch == recipe.freeze_epochs + 1:
        print(f"epoch {epoch}: the encoder is unfrozen", flush=True)
    net.encoder.collect_params().setattr("grad_req", "null" if frozen else "write")
    for block in (net.hidden, net.output):
        block.collect_params().setattr("grad_req", "write")


def head_of(net):
    """The classifier's layers above the encoder (hidden, output), sharing its parameters."""
    head = nn.HybridSequential()
    head.add(net.hidden, net.output)
    head.hybridize(static_alloc=True)
    return head


def pooled_features(net, encoded, indices, devices, batch_size, progress=False, split=None):
    """The pooled encodings (`<cls>`'s, or the mean) of pairs `indices`, in that order (no dropout: inference mode);
    `split` cuts batches into micro-batches that fit the memory budget."""
    return predict_batches(lambda *inputs: net.pool(mx, net.encoder(*inputs), inputs[2]),
                           data.inference_batches(encoded, batch_size, indices, split), devices,
                           (len(indices), net.hidden.weight.shape[1]), progress, f"{net.pooling} features")


def cached_features(run_dir, net, encoded, indices, devices, batch_size, progress, split=None):
    """`pooled_features`, kept in RUN_DIR/features/ under a hash of the encoder's weights and the pairs."""
    if not run_dir:
        return pooled_features(net, encoded, indices, devices, batch_size, progress, split)
    key = hashlib.sha1(f"{encoded.max_len} {net.pooling}".encode())
    for p in net.encoder.collect_params().values():
        key.update(p.data(devices[0]).asnumpy().tobytes())
    for array in (indices, encoded.token_ids, encoded.offsets, encoded.segment_a_lens):
        key.update(onp.ascontiguousarray(array).tobytes())
    path = os.path.join(run_dir, "features", key.hexdigest() + ".npy")
    if os.path.exists(path):
        return onp.load(path)
    features = pooled_features(net, encoded, indices, devices, batch_size, progress, split)
    os.makedirs(os.path.dirname(path), exist_ok=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            onp.save(f, features)
    fileio.write_atomically(path, write)
    return features


class PairsTask:
    """What full fine-tuning (or a frozen encoder) trains: the classifier, on micro-batches of encoded pairs that fit
    the memory plan."""

    def __init__(self, net, recipe, train_set, shard, eval_sets, devices, plan, cache_dir, progress):
        set_layer_decay(net, recipe.layer_decay)  # before the Trainer is made of its parameters
        self.block, self.train_set, self.shard, self.plan = net, train_set, shard, plan
        self.lengths, self.devices, self.batch_size = train_set.valid_lens[shard], devices, recipe.batch_size
        self.bucket_width = recipe.bucket_width
        self.rows_known = not recipe.kvstore.startswith("dist")  # a distributed kvstore adds other workers' rows

    def rows(self, micro_batches):
        """The word embeddings' rows `micro_batches` look up (`looked_up_rows`), if no other worker adds to them."""
        return looked_up_rows(self.block.encoder.token_embedding.weight, micro_batches) if self.rows_known else {}

    def micro_batches(self, indices):
        """The batch of the shard's pairs `indices`, cut into micro-batches that fit the memory budget, each padded to
        a multiple of the recipe's bucket width."""
        return (data.make_batch(self.train_set, self.shard[part], self.bucket_width)
                for part in self.plan.split(indices, self.lengths, self.bucket_width))

    def accuracy(self, encoded):
        """Share of `encoded`'s pairs whose predicted label is the gold one."""
        return accuracy(self.block, encoded, self.devices, self.batch_size, self.plan.split)


class FeaturesTask:
    """What `--mode features` trains: the head alone, on the encoder's pooled features of every pair, computed once
    (and cached in the run directory); eval sets are scored on their features too."""

    def __init__(self, net, recipe, train_set, shard, eval_sets, devices, plan, cache_dir, progress):
        self.block, self.devices, self.batch_size = head_of(net), devices, recipe.batch_size
        self.train_features = cached_features(cache_dir, net, train_set, shard, devices, recipe.batch_size, progress,
                                              plan.split)
        self.train_labels = train_set.labels[shard]
        self.eval_features = {id(s): cached_features(cache_dir, net, s, onp.arange(len(s)), devices, recipe.batch_size,
                                                     progress, plan.split) for s in eval_sets if s is not None}

    def rows(self, micro_batches):
        """No rows: the head has no embeddings."""
        return {}

    def micro_batches(self, indices):
        """The features and labels of the shard's pairs `indices`: one micro-batch, as features are small."""
        return [(self.train_features[indices], self.train_labels[indices])]

    def accuracy(self, encoded):
        """Share of `encoded`'s pairs (an eval set given at the start) whose predicted label is the gold one."""
        features = self.eval_features[id(encoded)]
        if not len(encoded):
            return float("nan")
        batches = ((indices, (features[indices],)) for indices in data.batch_order(len(encoded), self.batch_size))
        logits = predict_batches(self.block, batches, self.devices, (len(encoded), len(LABELS)))
        return float((logits.argmax(axis=1) == encoded.labels).mean())


def with_memory_budget(recipe, devices):
    """`recipe` with its --max-memory set, to the default share of the memory available if it has none: a run
    records the budget it chose, so that a resumed run cuts its batches (and draws dropout) as it did."""
    if recipe.max_memory is not None:
        return recipe
    return dataclasses.replace(recipe, max_memory=memory.available_bytes(devices))


def hold_out(encoded, fraction):
    """(train, dev): the last `fraction` of the pairs held out to choose the best epoch on."""
    n_dev = max(1, int(len(encoded) * fraction))
    cut = len(encoded) - n_dev
    return encoded.take(onp.arange(cut)), encoded.take(onp.arange(cut, len(encoded)))


def devices_of(net, train_set, recipe):
    """The devices `recipe` names, once `net` and `train_set` are checked to be what it says: a run records its
    recipe, so a setting that the live objects contradict would be recorded wrong."""
    devices = data.parse_devices(recipe.devices)
    held = next(iter(net.collect_params().values())).list_ctx()
    mismatches = [f"devices {recipe.devices!r} are {devices}, the network's weights are on {held}"] * (held != devices)
    mismatches += [f"pooling {recipe.pooling!r}, the network pools {net.pooling!r}"] * (net.pooling != recipe.pooling)
    mismatches += [f"max_len {recipe.max_len}, the pairs were encoded to {train_set.max_len}"] * (
        train_set.max_len != recipe.max_len)
    mismatches += [f"truncation {recipe.truncation!r}, the pairs were cut {train_set.truncation!r}"] * (
        train_set.truncation != recipe.truncation)
    mismatches += [f"dropout {recipe.dropout}, the encoder's is {net.bert_config.dropout}"] * (
        recipe.dropout is not None and recipe.dropout != net.bert_config.dropout)
    if mismatches:
        raise UserError(f"The recipe says {'; '.join(mismatches)}: build them from the recipe (as `nli.run` does), or "
                        f"change the recipe to match.")
    return devices


def run_config(net, encoded, recipe):
    """config.json's entries about training, from the objects that trained: the encoding of the pairs, the network's
    pooling, and the whole recipe."""
    return {"max_len": encoded.max_len, "truncation": encoded.truncation, "pooling": net.pooling,
            "recipe": dataclasses.asdict(recipe)}


class WeightAverage:
    """The average of the trained weights over the updates (`--average`), which the run saves as its model: EMA
    (Polyak averaging, exponential) or SWA (Izmailov et al., 2018: uniform over the last epochs). It reads the
    weights after each update and never writes them, so the training is the same with it or without it. It is kept
    on the first device, where the weights are the same as on the others after an update."""

    def __init__(self, recipe, net, device):
        kind, number = parse_average(recipe.average) if recipe.average else (None, None)
        self.kind, self.number, self.device, self.count = kind, number, device, 0  # count: updates averaged
        self.first_epoch = recipe.epochs - number + 1 if kind == "swa" else 1
        # What the recipe trains: the encoder too, or only the head (`memory.Shape.of` counts the same)
        self.params = {name: p for name, p in net._collect_params_with_prefix().items()
                       if kind and (recipe.mode == "full" or not name.startswith("encoder."))}
        self.averages = {name: p.data(device).as_nd_ndarray().copy() for name, p in self.params.items()}

    def share(self):
        """The weight of the update just averaged, the `count`-th: 1/count for SWA's uniform mean. EMA's is 1 - DECAY
        once warmed up; before, 10/(count + 9) (TensorFlow's `ExponentialMovingAverage` warm-up, shifted so the
        first update is copied): a short run's average spans about its last tenth, not mostly the pretrained weights."""
        return 1 / self.count if self.kind == "swa" else max(1 - self.number, 10 / (self.count + 9))

    def update(self, epoch):
        """Fold the weights just updated into the average, if `epoch` is averaged: one operator per weight, on the
        device. SGD's update w - lr (wd w + rescale g), with lr 1, wd s and rescale -s, is the step (1 - s) avg + s w
        towards the weights. A parameter frozen now is skipped: it equals its average."""
        if not self.params or epoch < self.first_epoch:
            return
        self.count += 1
        share = self.share()
        for name, p in self.params.items():
            if p.grad_req != "null":
                average = self.averages[name]
                mx.nd.sgd_update(average, p.data(self.device).as_nd_ndarray(), lr=1.0, wd=share, rescale_grad=-share,
                                 out=average)

    def set_weights(self, arrays):
        """Copy `arrays` (name -> array) into every device's copy of those parameters."""
        for name, array in arrays.items():
            for weights in self.params[name].list_data():
                array.copyto(weights.as_nd_ndarray())

    def replace_weights(self):
        """Put the average in place of the weights, if there is one yet: the model the run saves."""
        if self.count:
            self.set_weights(self.averages)

    @contextlib.contextmanager
    def swapped_in(self):
        """The average in place of the weights inside, if there is one yet; the raw weights back after."""
        if not self.count:
            yield
            return
        raw = {name: p.data(self.device).as_nd_ndarray().copy() for name, p in self.params.items()}
        self.set_weights(self.averages)
        try:
            yield
        finally:
            self.set_weights(raw)

    def save(self, path):
        """Write the average to `path`, if the run averages."""
        if self.averages:
            mx.nd.save(path, self.averages)

    def load(self, path, count):
        """Read the average of `count` updates written by `save` (none before the run averaged anything)."""
        if count:
            for name, array in mx.nd.load(path).items():
                array.copyto(self.averages[name])
        self.count = count


@dataclasses.dataclass
class TrainingState:
    """Where a run is: what a checkpoint holds, besides weights and optimizer state, to resume exactly."""
    epoch: int = 1  # the epoch in progress
    batch: int = 0  # batches of that epoch already trained on: the sampler's position
    step: int = 0  # optimizer updates so far
    epoch_sums: dict = dataclasses.field(default_factory=dict)  # loss, correct, seen, seconds this epoch
    log_sums: dict = dataclasses.field(default_factory=dict)  # the same since the last step entry
    metrics: list = dataclasses.field(default_factory=list)  # every metrics.jsonl entry so far
    best_dev_acc: float = -1.0

    def add(self, **figures):
        """Add figures (loss, correct, seen, seconds) to the epoch's sums and to those since the last step entry."""
        for sums in (self.epoch_sums, self.log_sums):
            for key, value in figures.items():
                sums[key] = sums.get(key, 0) + value

    def log_step(self, epoch, epoch_fraction, lr, norm):
        """The metrics entry of an update, with the figures since the previous one; it is kept."""
        sums = self.log_sums
        entry = {"kind": "step", "step": self.step, "epoch": epoch, "epochs": epoch - 1 + epoch_fraction,
                 "loss": sums["loss"] / sums["seen"], "acc": sums["correct"] / sums["seen"],
                 "lr": lr, "ex_per_s": sums["seen"] / sums["seconds"]}
        if norm is not None:
            entry["grad_norm"] = norm
        self.metrics.append(entry)
        self.log_sums = {}
        return entry

    def end_epoch(self, epoch, lr):
        """Keep the metrics entry of epoch `epoch`, just trained, and start the next; the entry is returned
        for its accuracies to be added."""
        sums = self.epoch_sums
        entry = {"kind": "epoch", "epoch": epoch, "step": self.step, "loss": sums["loss"] / sums["seen"],
                 "train_acc": sums["correct"] / sums["seen"], "examples": sums["seen"],
                 "examples_per_sec": sums["seen"] / sums["seconds"], "lr": lr}
        self.metrics.append(entry)
        self.epoch, self.batch, self.epoch_sums = epoch + 1, 0, {}
        return entry


class DeviceSums:
    """Each update's losses, correct counts and gradient norm, left on the devices that computed them: the host reads
    them only to log, checkpoint or end an epoch, so it does not wait for the engine between batches, and MXNet
    overlaps the next batch's work with this one's."""

    def __init__(self):
        self.updates, self.started = [], None

    def start(self):
        """Start the clock of the updates not yet read, unless it runs: their time is that from here to the read."""
        self.started = self.started or time.perf_counter()

    def add(self, where, seen, device_sums, norm):
        """Keep an update's (loss, correct) arrays, one per device and micro-batch, and its gradient norm (an array,
        or None), with where it is in the run."""
        self.updates.append((where, seen, device_sums, norm))

    def read_into(self, state, run):
        """Add what is kept to `state`'s sums (the host waits for it), with the time it took; the last update's
        gradient norm (None if it has none, or nothing was kept). A loss or norm that is not finite stops the run,
        naming its update, before anything is saved (the update of a norm that is not a number was skipped)."""
        norm = None
        for (step, epoch, batch), seen, device_sums, norm_array in self.updates:
            loss = sum(float(l.item()) for l, _ in device_sums)
            check_finite("loss", loss, step, epoch, batch, run)
            norm = None if norm_array is None else float(norm_array.asscalar())
            check_finite("gradient norm", norm, step, epoch, batch, run)
            state.add(loss=loss, correct=sum(int(c.item()) for _, c in device_sums), seen=seen)
        if self.started is not None:
            state.add(seconds=time.perf_counter() - self.started)
        self.updates, self.started = [], None
        return norm


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


def optimizer_parameters(net, trainer):
    """The names of the trainer's parameters in `net` (`encoder.blks.0.ln.gamma`), in the order its optimizer state
    indexes them. Gluon's Trainer sorts parameters by their global names, whose counters count every block made before
    in the process (`dense6` or `dense17`): a notebook that built another model first orders them otherwise."""
    names = {id(p): name for name, p in net._collect_params_with_prefix().items()}
    return [names[id(p)] for p in trainer._params]


def reorder_optimizer_state(trainer, saved_order, order):
    """Move the optimizer state loaded from a checkpoint, indexed in `saved_order`, to the trainer's `order` (both
    `optimizer_parameters`), so each parameter gets its own Adam moments and step count back."""
    if saved_order == order:
        return
    if sorted(saved_order) != sorted(order):
        raise UserError("the checkpoint's optimizer state is for other parameters than this model's: "
                        f"{sorted(set(saved_order) ^ set(order))[:3]} ...")
    index = {name: i for i, name in enumerate(order)}
    moved = {i: index[name] for i, name in enumerate(saved_order)}
    for updater in trainer._updaters:
        updater.states = {moved[i]: s for i, s in updater.states.items()}
        updater.states_synced = {moved[i]: synced for i, synced in updater.states_synced.items()}
    optimizer = trainer._optimizer
    optimizer._all_index_update_counts = {device: {moved[i]: count for i, count in counts.items()}
                                          for device, counts in optimizer._all_index_update_counts.items()}


def carry_step_counts(optimizer, devices):
    """Give every device in use the step counts the checkpoint saved. MXNet keeps Adam's step count per device id
    (`Optimizer._all_index_update_counts`): a device the run did not use before would start again at step 1, its
    bias correction would differ, and its copy of the weights would drift from the others."""
    saved = optimizer._all_index_update_counts
    counts = max(saved.values(), key=lambda c: sum(c.values()))  # every saved device's are the same
    optimizer._all_index_update_counts = {d.device_id: dict(counts) for d in devices}
    optimizer._index_update_count = optimizer._all_index_update_counts[devices[0].device_id]


def restore(run_dir, net, trainer, average, devices):
    """The TrainingState in the run's checkpoint, with its weights, their `average`, optimizer state and RNG states
    loaded onto `devices`, which may be other devices than those it was saved from."""
    if not run_dir:
        raise UserError("resuming needs the run directory that holds the checkpoint.")
    folder, saved = rundir.read_checkpoint(run_dir)
    net.load_parameters(os.path.join(folder, "model.params"), ctx=devices)
    average.load(os.path.join(folder, rundir.AVERAGE), saved.get("averaged_updates", 0))  # older runs: none
    trainer.load_states(os.path.join(folder, "trainer.states"))
    order = optimizer_parameters(net, trainer)  # older checkpoints: saved in the order this process gives
    reorder_optimizer_state(trainer, saved.get("optimizer_parameters", order), order)
    carry_step_counts(trainer.optimizer, devices)
    set_rng_states(saved["rng"])
    state = TrainingState(**{field.name: saved[field.name] for field in dataclasses.fields(TrainingState)})
    print(f"resuming {run_dir} at step {state.step} (epoch {state.epoch}, batch {state.batch}) on {devices}",
          flush=True)
    return state


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


def check_finite(what, value, step, epoch, batch, run):
    """Stop a run whose loss or gradient norm is no longer a number, before its weights are saved."""
    if value is not None and not math.isfinite(value):
        raise TrainingDiverged(f"the {what} is {value} at step {step} (epoch {epoch}, batch {batch + 1}); "
                               f"stopped before saving the weights, {run.last_checkpoint()}. Lower --lr, clip "
                               f"gradients (--max-grad-norm) or check the data.")


def log_step(run, state, sums, bar, epoch, lr, every):
    """Every `every` updates, read the figures since the last step entry, log them in metrics.jsonl (with the last
    update's gradient norm) and show them on the progress bar."""
    if state.step % every:
        return
    norm = sums.read_into(state, run)
    run.log(state.log_step(epoch, state.batch / bar.total, lr, norm))
    bar.set_postfix(loss=f"{state.epoch_sums['loss'] / state.epoch_sums['seen']:.3f}",
                    acc=f"{state.epoch_sums['correct'] / state.epoch_sums['seen']:.3f}",
                    ex_per_s=f"{state.epoch_sums['seen'] / state.epoch_sums['seconds']:.1f}")


def save_checkpoint(run, net, trainer, average, state, sums, recipe, data_fingerprint):
    """Checkpoint the run: weights and their average, optimizer state, where it is (its figures read first), the RNG
    states, the recipe, the devices it ran on and what data it trains on (`rundir.data_fingerprint`), for `--resume`
    to check."""
    sums.read_into(state, run)
    devices = [str(d) for d in next(iter(net.collect_params().values())).list_ctx()]
    run.save_checkpoint(net, trainer, average, {**dataclasses.asdict(state), "rng": rng_states(), "devices": devices,
                                                "averaged_updates": average.count,
                                                "optimizer_parameters": optimizer_parameters(net, trainer),
                                                "pretrained": getattr(net, "pretrained", None),
                                                "recipe": dataclasses.asdict(recipe), "data": data_fingerprint})


def epoch_bar(num_batches, done, epoch, num_epochs, progress):
    """The progress bar of an epoch's batches, `done` of them trained on already."""
    return tqdm(total=num_batches, initial=done, desc=f"epoch {epoch}/{num_epochs}", unit="batch",
                disable=not progress, leave=False)


def stop_if_requested(stop, checkpoint, run, state):
    """If `stop` is set, save a checkpoint and stop the run, saying how to continue it."""
    if not stop.is_set():
        return
    checkpoint()
    print(f"\nstopped at step {state.step} (epoch {state.epoch}, batch {state.batch}); {run.where_stopped()}",
          flush=True)
    raise KeyboardInterrupt


def memory_plan(net, recipe, devices):
    """The run's `memory.MemoryPlan`, printed after the recipe as the run starts: the memory the run takes, and the
    micro-batches that fit its budget."""
    print(f"recipe {recipe.name}: {json.dumps(dataclasses.asdict(recipe))}", flush=True)
    plan = memory.plan(net, recipe.max_memory, recipe.max_len, devices, trains_encoder=recipe.mode == "full",
                       averaged=recipe.average is not None)
    print(plan.describe(recipe.batch_size), flush=True)
    return plan


def accuracies(task, eval_sets, prefix=""):
    """The accuracy on the test set and, if there is one, on the dev set: {PREFIX}test_acc, {PREFIX}dev_acc."""
    test_set, dev_set = eval_sets
    return {prefix + name: task.accuracy(pairs) for name, pairs in (("test_acc", test_set), ("dev_acc", dev_set))
            if pairs is not None}


def end_epoch(run, state, sums, task, average, epoch, lr, eval_sets, devices, rank, save_model):
    """Log epoch `epoch`'s figures: its training sums, peak memory and (on rank 0; the other workers wait for it in
    the kvstore) its test and dev accuracy; redraw the curves and keep the model in best/ if it is the best so far.
    Once there is an `average`, it is the model: its accuracies are test_acc and dev_acc, best/ keeps it, and the
    raw weights' accuracies are raw_test_acc and raw_dev_acc."""
    sums.read_into(state, run)
    entry = state.end_epoch(epoch, lr)
    entry.update(memory.peak_memory(devices))  # the run's peak so far: the process's, or each GPU's
    if rank == 0 and average.count:
        entry.update(accuracies(task, eval_sets, "raw_"))
    with average.swapped_in():
        if rank == 0:
            entry.update(accuracies(task, eval_sets))
            print(f"epoch {epoch}: loss {entry['loss']:.3f}, train acc {entry['train_acc']:.3f}, test acc "
                  f"{entry['test_acc']:.3f}" + (f", dev acc {entry['dev_acc']:.3f}" if "dev_acc" in entry else "")
                  + (f" (raw weights: test acc {entry['raw_test_acc']:.3f})" if "raw_test_acc" in entry else "")
                  + f", {entry['examples_per_sec']:.1f} examples/sec on {devices}", flush=True)
        run.log(entry, state.metrics)
        if entry.get("dev_acc", -1) > state.best_dev_acc and run.save_model(save_model, "best"):
            state.best_dev_acc = entry["dev_acc"]
            print(f"epoch {epoch} is the best on the dev set so far: saved in {run.path}/best", flush=True)


def finetune(net, train_set, test_set, recipe=BOOK, dev_set=None, resume=False, save_model=None, loss=None,
             progress=True, data_fingerprint=None):
    """Fine-tune `net` as `recipe` says (the book's by default: Adam, lr 1e-4); its epochs' metrics. Book: `train_ch13`.
    With `recipe.out`, metrics, curves and checkpoints go there (`rundir`), `resume` continues from its checkpoint,
    `save_model(dir)` saves the final model (`recipe.average`: the average) there and the best on `dev_set` in best/."""
    devices = devices_of(net, train_set, recipe)
    recipe = with_memory_budget(recipe, devices)
    plan = memory_plan(net, recipe, devices)
    kv, rank, num_workers = kvstore_workers(recipe.kvstore)  # each worker trains on its shard; rank 0 writes the run
    shards, run = Shards(train_set.valid_lens, recipe, num_workers), rundir.RunDir(recipe.out, rank)
    task = (FeaturesTask if recipe.mode == "features" else PairsTask)(
        net, recipe, train_set, shards.indices(rank), (test_set, dev_set), devices, plan, run.path, progress)
    loss, trainer = training_loss(loss), make_trainer(task.block, recipe, kv, shards.num_updates())
    average = WeightAverage(recipe, net, devices[0])  # of the weights the recipe trains, on the first device
    state, sums = restore(recipe.out, net, trainer, average, devices) if resume else TrainingState(), DeviceSums()
    checkpoint = functools.partial(save_checkpoint, run, net, trainer, average, state, sums, recipe, data_fingerprint)
    run.start(state.metrics, None if resume else checkpoint)  # a new run is checkpointed at once
    with stop_requested() as stop:
        for epoch in range(state.epoch, recipe.epochs + 1):
            set_trainable(net, recipe, epoch)
            with epoch_bar(shards.num_batches(epoch), state.batch, epoch, recipe.epochs, progress) as bar:
                for batches, examples in shards.updates(epoch, rank, start=state.batch):
                    sums.start()  # the clock of the updates until their figures are read
                    device_sums, rows = accumulate_gradients(task, batches, loss, devices,
                                                             lambda b: batch_seed(recipe.seed, rank, epoch, b))
                    norm = apply_update(trainer, task.block.collect_params(), devices, examples, recipe.max_grad_norm,
                                        rows)
                    average.update(epoch)
                    b = batches[-1][0]  # the update's last batch
                    sums.add((state.step + 1, epoch, b), sum(len(indices) for _, indices in batches), device_sums,
                             norm)
                    state.step, state.batch = state.step + 1, b + 1
                    bar.update(state.batch - bar.n)
                    log_step(run, state, sums, bar, epoch, trainer.learning_rate, recipe.log_every)
                    stop_if_requested(stop, checkpoint, run, state)
                    if recipe.save_every and state.step % recipe.save_every == 0 and state.batch < bar.total:
                        checkpoint()
            end_epoch(run, state, sums, task, average, epoch, trainer.learning_rate, (test_set, dev_set), devices,
                      rank, save_model)
            checkpoint()
    average.replace_weights()
    npx.waitall()  # the final model (in a distributed run, the other workers' copies, to check that they agree)
    run.save_final(net, save_model, distributed=recipe.kvstore.startswith("dist"))
    return [m for m in state.metrics if m["kind"] == "epoch"]
