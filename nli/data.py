"""Devices, and batching encoded pairs: length buckets, dynamic padding, splitting each batch over the devices."""
import sys

import mxnet as mx
import numpy as onp
from mxnet import gluon

from .errors import UserError, first_line

PAD_MULTIPLE = 8  # inference pads its batches to a multiple of 8 tokens, so hybridized graphs see few shapes


def parse_devices(spec):
    """Devices from `auto`, `cpu`, `cpu:N`, `gpu` or `gpu:0,1`; `auto` is every GPU, else the CPU.

    Book: `try_all_gpus` (which gives no device at all on a machine without a GPU)."""
    kind, _, rest = spec.partition(":")
    if spec == "auto":
        num_gpus = gpu_count()
        if not num_gpus and mx.runtime.Features().is_enabled("CUDA"):  # e.g. no driver, or CUDA_VISIBLE_DEVICES=
            print("note: this mxnet is a CUDA build but sees no GPU, so it runs on the CPU; `nli doctor` says why.",
                  file=sys.stderr, flush=True)
        return [mx.gpu(i) for i in range(num_gpus)] or [mx.cpu()]
    if kind == "cpu":
        if not rest:
            return [mx.cpu()]
        if rest.isdigit() and int(rest) > 0:
            return [mx.cpu(i) for i in range(int(rest))]
        if "," in rest:
            raise UserError(f"--devices {spec}: cpu:N takes a number of CPU contexts (cpu:2), not a list of ids.")
    if kind == "gpu":
        ids = [int(i) for i in rest.split(",") if i.isdigit()]
        if rest and len(ids) != len(rest.split(",")):
            raise UserError(f"--devices {spec}: expected gpu:0,1,... with GPU numbers.")
        if len(set(ids)) != len(ids):  # one GPU twice would hold two copies and count its batches twice
            raise UserError(f"--devices {spec}: each GPU may be named once.")
        num_gpus = gpu_count()
        ids = ids if rest else list(range(num_gpus))
        missing = [i for i in ids if i >= num_gpus]
        if not ids or missing:
            build = "" if mx.runtime.Features().is_enabled("CUDA") else " (this mxnet is built for CPUs only)"
            raise UserError(f"--devices {spec}: this machine has {num_gpus} GPU(s) visible to MXNet{build}; "
                            f"`nli doctor` tells why, and which mxnet to install for a GPU.")
        return [mx.gpu(i) for i in ids]
    raise UserError(f"--devices {spec!r}: expected auto, cpu, cpu:N, gpu or gpu:0,1.")


def gpu_count():
    """The GPUs MXNet sees. Some MXNet versions fail to count them under a driver too old for the build (others
    count 0): that is said in one sentence, not a C++ stack trace."""
    try:
        return mx.context.num_gpus()
    except mx.MXNetError as e:
        raise UserError(f"MXNet cannot count the GPUs ({first_line(e)}); `nli doctor` says why, and --devices cpu "
                        f"runs without them.") from None


def scoring_devices(spec=None):
    """The devices to score on: those `spec` names, else one (the first GPU, else the CPU), which keeps scoring busy
    without loading the model onto every GPU."""
    return parse_devices(spec) if spec else parse_devices("auto")[:1]


class LengthBucketSampler(gluon.data.Sampler):
    """Batches (index arrays) of pairs of similar length, so each batch carries little padding.

    Pairs are bucketed by their length rounded up to `bucket_width`; the buckets are laid end to end in
    order of length and cut into batches, so only the last batch is short. With `shuffle`, pairs are
    shuffled within their bucket and batches across buckets, anew for each (seed, epoch); without it
    the batches come shortest first, for inference.
    """

    def __init__(self, lengths, batch_size, shuffle=True, seed=0, epoch=0, bucket_width=PAD_MULTIPLE):
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.buckets = -(-onp.asarray(lengths) // bucket_width)
        self.batch_size, self.shuffle, self.seed, self.epoch = batch_size, shuffle, seed, epoch

    def __iter__(self):
        rng = onp.random.RandomState([self.seed, self.epoch])
        order = rng.permutation(len(self.buckets)) if self.shuffle else onp.arange(len(self.buckets))
        order = order[onp.argsort(self.buckets[order], kind="stable")]
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return iter(batches)

    def __len__(self):
        return -(-len(self.buckets) // self.batch_size)


def batch_order(n, batch_size, shuffle=False, seed=0, epoch=0):
    """Index arrays of the batches of one epoch regardless of length: shuffled from (seed, epoch), or in order."""
    order = onp.random.RandomState([seed, epoch]).permutation(n) if shuffle else onp.arange(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def padded_length(longest, max_len, multiple=PAD_MULTIPLE):
    """The batch length: the longest pair rounded up to `multiple`, never past `max_len`."""
    return min(-(-longest // multiple) * multiple, max_len)


def make_batch(encoded, indices, multiple=PAD_MULTIPLE):
    """Arrays for the pairs at `indices`, padded to their longest pair rounded up to `multiple`: tokens, segments,
    valid lens, labels."""
    length = padded_length(int(encoded.valid_lens[indices].max()), encoded.max_len, multiple)
    tokens, segments, valid_lens = encoded.padded(indices, length)
    return tokens, segments, valid_lens.astype(onp.float32), encoded.labels[indices]


def batches(encoded, batch_size, shuffle=False, seed=0, epoch=0, bucket=True):
    """Yield the batches of one epoch (see `make_batch`): length-bucketed when shuffled, else in order.

    `bucket=False` shuffles pairs regardless of length, as the book's DataLoader does.
    """
    if shuffle and bucket:
        order = LengthBucketSampler(encoded.valid_lens, batch_size, shuffle=True, seed=seed, epoch=epoch)
    else:
        order = batch_order(len(encoded), batch_size, shuffle, seed, epoch)
    for indices in order:
        yield make_batch(encoded, indices)


def inference_batches(encoded, batch_size, indices=None, split=None):
    """(positions, (tokens, segments, valid lens)) of the pairs at `indices` (default: all), shortest first
    so each batch pads little; `positions` index `indices`. `split(positions, lengths)` cuts each batch into
    the micro-batches that fit the memory budget (`memory.MemoryPlan.split`)."""
    indices = onp.arange(len(encoded)) if indices is None else indices
    lengths = encoded.valid_lens[indices]
    for positions in LengthBucketSampler(lengths, batch_size, shuffle=False, bucket_width=1):
        for part in (split(positions, lengths) if split else [positions]):
            yield part, make_batch(encoded, indices[part])[:3]


def split_batch(arrays, devices):
    """Split each array of a batch over `devices`: one tuple of arrays per device (uneven splits allowed).

    Book: `split_batch_multi_inputs`."""
    shards = [gluon.utils.split_and_load(host_array(a), devices, even_split=False) for a in arrays]
    return list(zip(*shards))


def host_array(a):
    """An MXNet array on the CPU holding a copy of NumPy array `a`, made without waiting for the engine. `mx.np.array`
    copies through an engine operation, which waits for the engine's CPU worker to finish what it runs: in training,
    the last update, before the host could push the next batch."""
    return mx.nd.from_numpy(onp.array(a, order="C"), zero_copy=True).as_np_ndarray()
