"""Accuracy, confusion matrix and prediction for a fine-tuned classifier."""
import numpy as onp

from . import data
from .snli import LABELS, encode_pairs


def predict_logits(net, encoded, devices, batch_size, pad_id, max_len):
    """Logits of every pair in `encoded`, in order, batched over `devices`."""
    out = []
    for batch in data.batches(encoded, batch_size, pad_id, max_len):
        shards = data.split_batch(batch[:3], devices[:len(batch[0])])
        out.extend(net(*shard).asnumpy() for shard in shards)
    return onp.concatenate(out) if out else onp.zeros((0, len(LABELS)), onp.float32)


def accuracy(net, encoded, devices, batch_size, pad_id, max_len):
    """Share of pairs whose predicted label is the gold one."""
    logits = predict_logits(net, encoded, devices, batch_size, pad_id, max_len)
    return float((logits.argmax(axis=1) == encoded.labels).mean()) if len(encoded) else float("nan")


def confusion_matrix(gold, predicted, num_classes=len(LABELS)):
    """Counts of (gold, predicted) label pairs: rows are gold labels, columns predictions."""
    matrix = onp.zeros((num_classes, num_classes), dtype=onp.int64)
    onp.add.at(matrix, (onp.asarray(gold), onp.asarray(predicted)), 1)
    return matrix


def evaluate(net, encoded, devices, batch_size, pad_id, max_len):
    """Accuracy, size and confusion matrix of `net` on encoded pairs, as a JSON-ready dict."""
    predicted = predict_logits(net, encoded, devices, batch_size, pad_id, max_len).argmax(axis=1)
    return {"accuracy": float((predicted == encoded.labels).mean()), "n": len(encoded),
            "labels": list(LABELS), "confusion": confusion_matrix(encoded.labels, predicted).tolist()}


def softmax(logits):
    """Probabilities from logits along the last axis, computed stably."""
    z = onp.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def predict_snli(net, vocab, premise, hypothesis, devices, max_len):
    """Label and label -> probability for one pair of sentences (the book's `predict_snli`)."""
    encoded = encode_pairs([premise], [hypothesis], [0], vocab, max_len)
    probs = softmax(predict_logits(net, encoded, devices, 1, vocab["<pad>"], max_len))[0]
    return {"label": LABELS[int(probs.argmax())],
            "probabilities": {label: float(p) for label, p in zip(LABELS, probs)}}
