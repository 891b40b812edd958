"""Scoring a fine-tuned run on labelled pairs: accuracy, per-class scores, confusion, errors, and the files and
plot (eval.json, confusion.png, errors.tsv) that `nli evaluate` writes. Predictions come from `predict`."""
import itertools
import os

import numpy as onp

from . import fileio
from .errors import UserError
from .figures import pyplot
from .snli import LABELS

LENGTH_BUCKETS = (16, 24, 32, 48, 64)  # upper bounds in tokens; SNLI pairs average 26.5, p95 41


def confusion_matrix(gold, predicted, num_classes=len(LABELS)):
    """Counts of (gold, predicted) label pairs: rows are gold labels, columns predictions."""
    matrix = onp.zeros((num_classes, num_classes), dtype=onp.int64)
    onp.add.at(matrix, (onp.asarray(gold), onp.asarray(predicted)), 1)
    return matrix


def ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0 (as scikit-learn's zero_division=0)."""
    return onp.divide(numerator, denominator, out=onp.zeros(len(numerator)), where=denominator > 0)


def class_scores(confusion):
    """Precision, recall, F1 and support of each label, and their macro F1, from a confusion matrix."""
    hits = onp.diag(confusion).astype(onp.float64)
    precision = ratio(hits, confusion.sum(axis=0))
    recall = ratio(hits, confusion.sum(axis=1))
    f1 = ratio(2 * precision * recall, precision + recall)
    per_class = {label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                 for label, p, r, f, s in zip(LABELS, precision, recall, f1, confusion.sum(axis=1))}
    return per_class, float(f1.mean())


def accuracy_by_length(lengths, correct, bounds=LENGTH_BUCKETS):
    """Accuracy of the pairs in each length bucket (tokens with `<cls>` and `<sep>`s): how longer pairs fare."""
    bucket = onp.searchsorted(bounds, lengths, side="left")  # bounds[i - 1] < length <= bounds[i]
    rows = []
    for i, low in enumerate((1,) + tuple(b + 1 for b in bounds)):
        members = bucket == i
        n = int(members.sum())
        rows.append({"tokens": f"{low}-{bounds[i]}" if i < len(bounds) else f"{low}+", "n": n,
                     "accuracy": float(correct[members].mean()) if n else None})
    return rows


def scores(gold, predicted, lengths):
    """eval.json's figures: accuracy, confusion (rows gold), per-class scores, macro F1, accuracy by length."""
    gold, predicted = onp.asarray(gold), onp.asarray(predicted)
    if not len(gold):
        raise UserError("No labelled pairs to evaluate.")
    confusion = confusion_matrix(gold, predicted)
    per_class, macro_f1 = class_scores(confusion)
    correct = gold == predicted
    return {"accuracy": float(correct.mean()), "n": len(gold), "labels": list(LABELS),
            "confusion": confusion.tolist(), "per_class": per_class, "macro_f1": macro_f1,
            "accuracy_by_length": accuracy_by_length(onp.asarray(lengths), correct)}


def most_confident_errors(gold, probs, n):
    """Indices of the `n` wrong predictions the model was surest of, surest first."""
    predicted = probs.argmax(axis=1)
    wrong = onp.flatnonzero(predicted != onp.asarray(gold))
    confidence = probs[wrong, predicted[wrong]]
    return wrong[onp.argsort(-confidence, kind="stable")][:n]


def write_errors(path, premises, hypotheses, gold, probs, indices):
    """errors.tsv: premise, hypothesis, gold and predicted label, confidence, each label's probability."""
    def one_line(text):  # a tab or newline inside a sentence would break the columns
        return " ".join(text.split())

    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\t".join(["premise", "hypothesis", "gold", "predicted", "confidence"]
                              + [f"p_{label}" for label in LABELS]) + "\n")
            for i in indices:
                k = int(probs[i].argmax())
                f.write("\t".join([one_line(premises[i]), one_line(hypotheses[i]), LABELS[gold[i]], LABELS[k],
                                   f"{probs[i, k]:.4f}"] + [f"{p:.4f}" for p in probs[i]]) + "\n")
    fileio.write_atomically(path, write)


def plot_confusion(confusion, path, title):
    """confusion.png: counts and the share of each gold row, rows gold, columns predicted."""
    plt = pyplot()
    confusion = onp.asarray(confusion)
    rates = confusion / onp.maximum(confusion.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i, j in itertools.product(range(len(LABELS)), repeat=2):
        ax.text(j, i, f"{confusion[i, j]}\n{rates[i, j]:.0%}", ha="center", va="center",
                color="white" if rates[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(LABELS)), LABELS, rotation=15)
    ax.set_yticks(range(len(LABELS)), LABELS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(title)
    fig.tight_layout()
    fileio.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def evaluate_run(predictor, premises, hypotheses, labels, out_dir, num_errors=0, source=None, progress=True):
    """Score a run on labelled pairs; write eval.json, confusion.png and the `num_errors` surest mistakes."""
    encoded = predictor.encode(premises, hypotheses, labels)
    probs = predictor.probabilities(encoded, progress)
    result = {"source": source, **scores(encoded.labels, probs.argmax(axis=1), encoded.valid_lens)}
    words = encoded.valid_lens - 3
    unknown = predictor.unknown_shares(encoded)
    result["unknown_share"] = float((unknown * words).sum() / max(words.sum(), 1))
    os.makedirs(out_dir, exist_ok=True)
    fileio.write_json(os.path.join(out_dir, "eval.json"), result)
    plot_confusion(result["confusion"], os.path.join(out_dir, "confusion.png"),
                   f"accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}, n={result['n']}")
    if num_errors > 0:
        indices = most_confident_errors(encoded.labels, probs, num_errors)
        write_errors(os.path.join(out_dir, "errors.tsv"), premises, hypotheses, encoded.labels, probs, indices)
    return result


