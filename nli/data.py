"""Batching encoded pairs: order, dynamic padding, and splitting each batch over the devices."""
import numpy as onp
from mxnet import gluon, np

PAD_MULTIPLE = 8  # batches are padded to a multiple of 8 tokens so hybridized graphs see few shapes


def batch_order(n, batch_size, shuffle=False, seed=0, epoch=0):
    """Index arrays of the batches of one epoch: shuffled from (seed, epoch), or in order."""
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


def batches(encoded, batch_size, pad_id, max_len, shuffle=False, seed=0, epoch=0):
    """Yield the batches of one epoch (see `make_batch`)."""
    for indices in batch_order(len(encoded), batch_size, shuffle, seed, epoch):
        yield make_batch(encoded, indices, pad_id, max_len)


def split_batch(arrays, devices):
    """Split each array of a batch over `devices`: one tuple of arrays per device (uneven splits allowed)."""
    shards = [gluon.utils.split_and_load(np.array(a, dtype=a.dtype), devices, even_split=False)
              for a in arrays]
    return list(zip(*shards))
