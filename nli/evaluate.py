"""Scores, error analysis and prediction for a fine-tuned classifier: the book's `predict_snli`, generalised."""
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys

import matplotlib
import numpy as onp
from tqdm import tqdm

from . import attention, data, memory, model, rundir, snli
from .errors import UserError
from .snli import LABEL_IDS, LABELS, NO_GOLD_LABEL

matplotlib.use("Agg")  # scripts and servers have no display; plots are saved as PNG

from matplotlib import pyplot as plt  # noqa: E402  (after choosing the backend)

LENGTH_BUCKETS = (16, 24, 32, 48, 64)  # upper bounds in tokens; SNLI pairs average 26.5, p95 41
HIGH_UNKNOWN_SHARE = 0.05  # above this share of unknown tokens, predictions deserve a warning


def predict_batches(forward, batches, devices, shape, progress=False, desc="predict"):
    """`forward`'s outputs, rows in example order, from `(positions, arrays)` batches: each batch is split
    over `devices`, every device starts before any result is read, and the results are put together.
    Without `devices` (ONNX Runtime) `forward` takes and gives whole NumPy batches."""
    outputs = onp.zeros(shape, dtype=onp.float32)
    with tqdm(total=shape[0], unit="example", desc=desc, disable=not progress, leave=False) as bar:
        for positions, arrays in batches:
            if not devices:
                outputs[positions] = forward(*arrays)
            else:
                results = [forward(*shard) for shard in data.split_batch(arrays, devices[:len(positions)])]
                outputs[positions] = onp.concatenate([result.asnumpy() for result in results])
            bar.update(len(positions))
    return outputs


def predict_logits(net, encoded, devices, batch_size, progress=False, split=None):
    """Logits of every pair in `encoded`, in input order, from length-sorted batches split over `devices` (and
    by `split` into micro-batches that fit the memory budget, see `data.inference_batches`)."""
    return predict_batches(net, data.inference_batches(encoded, batch_size, split=split), devices,
                           (len(encoded), len(LABELS)), progress)


def accuracy(net, encoded, devices, batch_size, split=None):
    """Share of pairs whose predicted label is the gold one."""
    logits = predict_logits(net, encoded, devices, batch_size, split=split)
    return float((logits.argmax(axis=1) == encoded.labels).mean()) if len(encoded) else float("nan")


def softmax(logits):
    """Probabilities from logits along the last axis, computed stably."""
    z = onp.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def confusion_matrix(gold, predicted, num_classes=len(LABELS)):
    """Counts of (gold, predicted) label pairs: rows are gold labels, columns predictions."""
    matrix = onp.zeros((num_classes, num_classes), dtype=onp.int64)
    onp.add.at(matrix, (onp.asarray(gold), onp.asarray(predicted)), 1)
    return matrix


def _ratio(numerator, denominator):
    """numerator / denominator, 0 where the denominator is 0 (as scikit-learn's zero_division=0)."""
    return onp.divide(numerator, denominator, out=onp.zeros(len(numerator)), where=denominator > 0)


def class_scores(confusion):
    """Precision, recall, F1 and support of each label, and their macro F1, from a confusion matrix."""
    hits = onp.diag(confusion).astype(onp.float64)
    precision = _ratio(hits, confusion.sum(axis=0))
    recall = _ratio(hits, confusion.sum(axis=1))
    f1 = _ratio(2 * precision * recall, precision + recall)
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


def evaluate(net, encoded, devices, batch_size, progress=False):
    """`scores` of `net` on encoded labelled pairs, as a JSON-ready dict."""
    predicted = predict_logits(net, encoded, devices, batch_size, progress).argmax(axis=1)
    return scores(encoded.labels, predicted, encoded.valid_lens)


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
    rundir.write_atomically(path, write)


def plot_confusion(confusion, path, title):
    """confusion.png: counts and the share of each gold row, rows gold, columns predicted."""
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
    rundir.write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def pair_encoder(config, vocab):
    """How the run encodes pairs, from its config: (premises, hypotheses, labels) -> `snli.EncodedPairs`."""
    return functools.partial(snli.encode_pairs, vocab=vocab, max_len=config["max_len"],
                             truncation=config.get("truncation", "longest_first"))


class Predictor:
    """A fine-tuned run loaded once, to label many pairs of sentences: the book's `predict_snli`, generalised."""

    def __init__(self, net, vocab, config, devices, batch_size=256, max_memory=None):
        self.net, self.vocab, self.config, self.devices = net, vocab, config, devices
        self.batch_size = batch_size
        self.encode = pair_encoder(config, vocab)
        # Batches cut into micro-batches that fit `max_memory` (default: a share of what is available)
        self.split = memory.plan(net, max_memory, config["max_len"], devices).split if devices else None

    @classmethod
    def from_run(cls, run_dir, devices=None, batch_size=256, max_memory=None):
        """Load the run dir written by `finetune` onto `devices` (default: every GPU, else the CPU), or
        the one written by `export`, which ONNX Runtime runs on the CPU; MXNet's batches fit `max_memory`."""
        from . import export  # it imports this module, so import it only when called
        if export.is_exported(run_dir):
            return export.OnnxPredictor.from_export(run_dir, batch_size)
        devices = devices or data.parse_devices("auto")
        net, vocab, config = model.load_run(run_dir, devices)
        return cls(net, vocab, config, devices, batch_size, max_memory)

    def logits(self, encoded, progress=False):
        """Logits of encoded pairs, in order (see `predict_logits`)."""
        return predict_logits(self.net, encoded, self.devices, self.batch_size, progress, self.split)

    def unknown_shares(self, encoded):
        """Share of each pair's tokens (all but `<cls>` and the two `<sep>`) missing from the vocabulary."""
        unknown = onp.add.reduceat((encoded.token_ids == self.vocab.unk).astype(onp.int64), encoded.offsets[:-1])
        return unknown / onp.maximum(encoded.valid_lens - 3, 1)

    def encode_text(self, pairs, tokenized=False):
        """Encoded (premise, hypothesis) pairs of text, unlabelled.

        Raw text is tokenized as SNLI's text was; `tokenized=True` takes text already split that way."""
        for i, (premise, hypothesis) in enumerate(pairs):
            if not premise.strip() or not hypothesis.strip():
                raise UserError(f"Pair {i}: empty {'premise' if not premise.strip() else 'hypothesis'}.")
        prepare = str.strip if tokenized else snli.tokenize_raw
        premises, hypotheses = ([prepare(s) for s in side] for side in zip(*pairs))
        return self.encode(premises, hypotheses, onp.zeros(len(pairs), dtype=onp.int32))

    def predict_pairs(self, pairs, tokenized=False, progress=False):
        """Label, label -> probability and unknown-token share of each (premise, hypothesis), in order (see
        `encode_text`)."""
        pairs = list(pairs)
        if not pairs:
            return []
        encoded = self.encode_text(pairs, tokenized)
        probs = softmax(self.logits(encoded, progress))
        return [{"label": LABELS[int(p.argmax())], "probabilities": dict(zip(LABELS, map(float, p))),
                 "unknown_share": round(float(u), 4), "tokens": int(n)}
                for p, u, n in zip(probs, self.unknown_shares(encoded), encoded.valid_lens)]

    def predict(self, premise, hypothesis, tokenized=False):
        """Label and label -> probability of one pair of sentences."""
        return self.predict_pairs([(premise, hypothesis)], tokenized)[0]

    def attention(self, premise, hypothesis, tokenized=False):
        """One pair's tokens, their segments, label, probabilities and attention weights (layers, heads, T, T),
        all from one forward pass: an `attention.PairAttention`."""
        encoded = self.encode_text([(premise, hypothesis)], tokenized)
        return attention.pair_attention(self.net, self.vocab, encoded, self.devices[0], premise, hypothesis)


def predict_snli(net, vocab, premise, hypothesis, devices, max_len):
    """Label and label -> probability for one pair of raw sentences.

    Book: `predict_snli`."""
    return Predictor(net, vocab, {"max_len": max_len}, devices).predict(premise, hypothesis)


def unknown_warning(share):
    """A sentence on a high share of unknown tokens, or None when it is low."""
    if share > HIGH_UNKNOWN_SHARE:
        return (f"warning: {share:.1%} of the input tokens are not in the model's vocabulary; "
                f"predictions on them are unreliable.")
    return None


def evaluate_run(predictor, premises, hypotheses, labels, out_dir, num_errors=0, source=None, progress=True):
    """Score a run on labelled pairs; write eval.json, confusion.png and the `num_errors` surest mistakes."""
    encoded = predictor.encode(premises, hypotheses, labels)
    probs = softmax(predictor.logits(encoded, progress))
    result = {"source": source, **scores(encoded.labels, probs.argmax(axis=1), encoded.valid_lens)}
    words = encoded.valid_lens - 3
    unknown = predictor.unknown_shares(encoded)
    result["unknown_share"] = float((unknown * words).sum() / max(words.sum(), 1))
    os.makedirs(out_dir, exist_ok=True)
    rundir.write_json(os.path.join(out_dir, "eval.json"), result)
    plot_confusion(result["confusion"], os.path.join(out_dir, "confusion.png"),
                   f"accuracy {result['accuracy']:.3f}, macro F1 {result['macro_f1']:.3f}, n={result['n']}")
    if num_errors > 0:
        indices = most_confident_errors(encoded.labels, probs, num_errors)
        write_errors(os.path.join(out_dir, "errors.tsv"), premises, hypotheses, encoded.labels, probs, indices)
    return result


# Prediction on files: every input line gives one output line, in order.

@dataclasses.dataclass
class InputLine:
    """One line of a prediction input: its pair and gold label, or why it cannot be predicted."""
    line: int
    premise: str = ""
    hypothesis: str = ""
    gold: str = None
    error: str = None


def _input_line(line_no, premise, hypothesis, label):
    """An `InputLine`, with the error if a sentence is empty or the label is not one of the three."""
    for name, text in (("premise", premise), ("hypothesis", hypothesis)):
        if not text.strip():
            return InputLine(line_no, error=f"empty {name}")
    if label and label != NO_GOLD_LABEL and label not in LABEL_IDS:
        return InputLine(line_no, error=f"label {label!r} is not one of {', '.join(LABELS)} (or '-')")
    return InputLine(line_no, premise, hypothesis, label if label in LABEL_IDS else None)


def _tsv_header(fields, source):
    """Column positions (premise, hypothesis, label or None) if `fields` is a header line, else None."""
    known = {name for names in snli.PAIR_COLUMNS for name in names}
    if not known & set(fields):
        return None
    for premise, hypothesis, label in snli.PAIR_COLUMNS:
        if premise in fields and hypothesis in fields:
            return fields.index(premise), fields.index(hypothesis), fields.index(label) if label in fields else None
    raise UserError(f"{source}, line 1: the header names no premise/hypothesis (or sentence1/sentence2) "
                    f"columns: {', '.join(fields)}.")


def _json_line(line_no, text):
    """An `InputLine` from one JSON object with premise/hypothesis (or sentence1/sentence2) keys."""
    try:
        obj = json.loads(text, strict=False)  # strict=False: a raw tab inside a string is kept, not refused
    except json.JSONDecodeError as e:
        return InputLine(line_no, error=f"not valid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return InputLine(line_no, error="expected a JSON object")
    for premise, hypothesis, label in snli.PAIR_COLUMNS:
        if premise in obj and hypothesis in obj:
            values = obj[premise], obj[hypothesis], obj.get(label, "")
            if not all(isinstance(v, str) for v in values):
                return InputLine(line_no, error=f"{premise}, {hypothesis} and {label} must be strings")
            if not snli.is_text("".join(values)):
                return InputLine(line_no, error="a \\u escape of half a surrogate pair, which is not text")
            return _input_line(line_no, *values)
    return InputLine(line_no, error="expected premise and hypothesis (or sentence1 and sentence2) keys")


def read_input_lines(byte_lines, source, fmt):
    """Yield an `InputLine` for every line of a .jsonl or .tsv (header optional) input, in order."""
    columns, width = (0, 1, 2), None  # without a header: premise, hypothesis and an optional label
    for line_no, raw in enumerate(byte_lines, 1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield InputLine(line_no, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        if line_no == 1:
            text = text.lstrip("\ufeff")  # a byte-order mark some editors write
        if fmt == "jsonl":
            yield _json_line(line_no, text)
            continue
        if "\r" in text:  # lines ended by \r alone (old Macs) would be read as one, the header swallowing the rest
            yield InputLine(line_no, error="a carriage return (\\r) inside the line: end lines with \\n or \\r\\n")
            continue
        fields = text.split("\t")
        if line_no == 1 and (header := _tsv_header(fields, source)):
            columns, width = header, len(fields)
            continue
        if width is None and len(fields) not in (2, 3):
            yield InputLine(line_no, error=f"{len(fields)} tab-separated fields, expected premise<TAB>hypothesis "
                                           f"and optionally <TAB>label")
        elif width is not None and len(fields) != width:
            yield InputLine(line_no, error=f"{len(fields)} tab-separated fields, expected {width} as in the header")
        else:
            label = fields[columns[2]].strip() if columns[2] is not None and columns[2] < len(fields) else ""
            yield _input_line(line_no, fields[columns[0]], fields[columns[1]], label)


def input_format(path):
    """`jsonl` or `tsv` from a file name (stdin is tsv)."""
    ext = os.path.splitext(path)[1].lower() if path else ".tsv"
    if ext not in (".jsonl", ".tsv", ".txt"):
        raise UserError(f"{path}: expected a .tsv (premise<TAB>hypothesis, header optional), "
                        f"SNLI .txt or .jsonl file of pairs.")
    return "jsonl" if ext == ".jsonl" else "tsv"


def predict_lines(predictor, lines, write, tokenized=False, chunk_size=4096):
    """Call `write(record)` for every `InputLine`, in order: its prediction, or its error; return a summary."""
    summary = {"lines": 0, "predicted": 0, "errors": 0, "first_error": None, "with_gold": 0, "correct": 0,
               "unknown_share": 0.0, "at_max_len": 0}
    lines = iter(lines)
    while chunk := list(itertools.islice(lines, chunk_size)):
        valid = [line for line in chunk if line.error is None]
        results = iter(predictor.predict_pairs([(line.premise, line.hypothesis) for line in valid], tokenized))
        for line in chunk:
            summary["lines"] += 1
            if line.error is not None:
                summary["errors"] += 1
                summary["first_error"] = summary["first_error"] or f"line {line.line}: {line.error}"
                write({"line": line.line, "error": line.error})
                continue
            result = next(results)
            summary["predicted"] += 1
            summary["unknown_share"] += result["unknown_share"]
            summary["at_max_len"] += result["tokens"] >= predictor.config["max_len"]
            record = {"line": line.line, "premise": line.premise, "hypothesis": line.hypothesis, **result}
            if line.gold is not None:
                record["gold"] = line.gold
                summary["with_gold"] += 1
                summary["correct"] += result["label"] == line.gold
            write(record)
    summary["unknown_share"] /= max(summary["predicted"], 1)
    return summary


def predict_file(predictor, path, output, tokenized=False, progress=True):
    """Predict every line of `path` (None: stdin) into JSON lines at `output` (None: stdout); the summary."""
    fmt = input_format(path)
    if path is not None and not os.path.exists(path):
        raise UserError(f"Missing input file {path}.")
    source = path or "<stdin>"
    interactive = path is None and sys.stdin.isatty()  # typed lines are answered one by one
    total = None
    if path is not None:
        with open(path, "rb") as f:
            total = sum(1 for _ in f)
    with open(path, "rb") if path else contextlib.nullcontext(sys.stdin.buffer) as f, \
            tqdm(total=total, unit="line", desc="predict", disable=not progress or interactive,
                 file=sys.stderr) as bar:
        lines = read_input_lines(f, source, fmt)

        def run(out):
            def write(record):
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                if interactive:
                    out.flush()
                bar.update(record["line"] - bar.n)  # the bar counts input lines, a header included
            return predict_lines(predictor, lines, write, tokenized, 1 if interactive else 4096)

        if output is None:
            summary = run(sys.stdout)
        else:
            summary = None

            def write_output(tmp):
                nonlocal summary
                with open(tmp, "w", encoding="utf-8") as out:
                    summary = run(out)
            rundir.write_atomically(output, write_output)
    return {"source": source, "output": output or "<stdout>", **summary}


def describe_summary(summary):
    """The summary of `predict_file` as the sentences the CLI prints."""
    s = summary
    text = [f"{s['source']}: {s['lines']} lines, {s['predicted']} predicted, {s['errors']} with errors"
            + (f" (first: {s['first_error']})" if s["first_error"] else "") + f"; wrote {s['output']}."]
    if s["with_gold"]:
        text.append(f"accuracy {s['correct'] / s['with_gold']:.4f} on the {s['with_gold']} lines with a gold label.")
    if s["at_max_len"]:
        text.append(f"{s['at_max_len']} pairs filled max_len (longer ones are cut to fit).")
    warning = unknown_warning(s["unknown_share"])
    return "\n".join(text + ([warning] if warning else []))
