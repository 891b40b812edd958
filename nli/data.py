"""Batching encoded pairs: length buckets, dynamic padding, and splitting each batch over the devices."""
import numpy as onp
from mxnet import gluon, np

PAD_MULTIPLE = 8  # batches are padded to a multiple of 8 tokens so hybridized graphs see few shapes


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


def make_batch(encoded, indices, pad_id, max_len):
    """Arrays for the pairs at `indices`, padded to their longest pair: tokens, segments, valid lens, labels."""
    length = padded_length(int(encoded.valid_lens[indices].max()), max_len)
    tokens, segments, valid_lens = encoded.padded(indices, length, pad_id)
    return tokens, segments, valid_lens.astype(onp.float32), encoded.labels[indices]


def batches(encoded, batch_size, pad_id, max_len, shuffle=False, seed=0, epoch=0, bucket=True):
    """Yield the batches of one epoch (see `make_batch`): length-bucketed when shuffled, else in order.

    `bucket=False` shuffles pairs regardless of length, as the book's DataLoader does.
    """
    if shuffle and bucket:
        order = LengthBucketSampler(encoded.valid_lens, batch_size, shuffle=True, seed=seed, epoch=epoch)
    else:
        order = batch_order(len(encoded), batch_size, shuffle, seed, epoch)
    for indices in order:
        yield make_batch(encoded, indices, pad_id, max_len)


def split_batch(arrays, devices):
    """Split each array of a batch over `devices`: one tuple of arrays per device (uneven splits allowed)."""
    shards = [gluon.utils.split_and_load(np.array(a, dtype=a.dtype), devices, even_split=False)
              for a in arrays]
    return list(zip(*shards))
