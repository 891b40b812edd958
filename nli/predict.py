"""Prediction: the book's `predict_snli`, generalised to a loaded run, many pairs and files.

Siblings behind one loader (`load_predictor`): `Predictor` runs a fine-tuned run's MXNet classifier on the
devices given, `OnnxPredictor` an exported run's model.onnx with ONNX Runtime on the CPU, `EnsemblePredictor` the
members of an ensemble (either kind) and averages their probabilities. Each encodes text as its run's config.json
says and gives labels, probabilities and unknown-token shares.
"""
import contextlib
import dataclasses
import functools
import itertools
import json
import os
import sys

import numpy as onp
from tqdm import tqdm

from . import attention, data, fileio, memory, model, snli
from .errors import UserError, first_line
from .snli import LABELS

HIGH_UNKNOWN_SHARE = 0.05  # above this share of unknown tokens, predictions deserve a warning
# An exported run's graph: what `export` writes and `OnnxPredictor` runs
MODEL_FILE = "model.onnx"
INPUTS = ("tokens", "segments", "valid_lens")  # int64, as the book names them; shapes (batch, steps), (batch,)
OUTPUT = "logits"


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


def pair_encoder(config, vocab):
    """How the run encodes pairs, from its config: (premises, hypotheses, labels) -> `snli.EncodedPairs`."""
    return functools.partial(snli.encode_pairs, vocab=vocab, max_len=config["max_len"],
                             truncation=config.get("truncation", "longest_first"))


class PairPredictor:
    """What both predictors share: text in, encoded as the run was trained, labels and probabilities out; the
    classifier itself is a sibling's (`logits`)."""

    def __init__(self, vocab, config, batch_size):
        self.vocab, self.config, self.batch_size = vocab, config, batch_size
        self.encode = pair_encoder(config, vocab)

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
        probs = self.probabilities(encoded, progress)
        return [{"label": LABELS[int(p.argmax())], "probabilities": dict(zip(LABELS, map(float, p))),
                 "unknown_share": round(float(u), 4), "tokens": int(n)}
                for p, u, n in zip(probs, self.unknown_shares(encoded), encoded.valid_lens)]

    def predict(self, premise, hypothesis, tokenized=False):
        """Label and label -> probability of one pair of sentences."""
        return self.predict_pairs([(premise, hypothesis)], tokenized)[0]

    def probabilities(self, encoded, progress=False):
        """Each encoded pair's probability of each label, in order."""
        return softmax(self.logits(encoded, progress))


class Predictor(PairPredictor):
    """A fine-tuned run's MXNet classifier, loaded once onto `devices` to label many pairs; its batches are cut into
    micro-batches that fit `max_memory` (default: a share of what is available)."""

    def __init__(self, net, vocab, config, devices, batch_size=256, max_memory=None):
        super().__init__(vocab, config, batch_size)
        self.net, self.devices = net, devices
        self.split = memory.plan(net, max_memory, config["max_len"], devices).split

    def logits(self, encoded, progress=False):
        """Logits of encoded pairs, in order (see `predict_logits`)."""
        return predict_logits(self.net, encoded, self.devices, self.batch_size, progress, self.split)

    def attention(self, premise, hypothesis, tokenized=False):
        """One pair's tokens, their segments, label, probabilities and attention weights (layers, heads, T, T),
        all from one forward pass: an `attention.PairAttention`."""
        encoded = self.encode_text([(premise, hypothesis)], tokenized)
        return attention.pair_attention(self.net, self.vocab, encoded, self.devices[0], premise, hypothesis)


def read_run_config(run_dir):
    """A run dir's config.json, or None when there is none."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None


def is_exported(run_dir):
    """Whether `run_dir` holds an ONNX export (its config.json says so), rather than MXNet parameters."""
    config = read_run_config(run_dir)
    return isinstance(config, dict) and "onnx" in config


def inference_session(path, threads=None):
    """An ONNX Runtime session on the CPU for `path`, failing in one sentence if it is not a usable model."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; export the run again with `nli export`.")
    options = ort.SessionOptions()
    # The thread count chosen for MXNet (nli sets OMP_NUM_THREADS to the core count unless the user did).
    options.intra_op_num_threads = threads or int(os.environ.get("OMP_NUM_THREADS", 0) or 0)
    # Threads wait as OMP_WAIT_POLICY says MXNet's do (nli's default: PASSIVE, sleeping): on the busy 2-core
    # machine here, spinning made ONNX Runtime 10-25% slower; on a quiet one, it was faster.
    spin = os.environ.get("OMP_WAIT_POLICY", "PASSIVE").upper() == "ACTIVE"
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    try:
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except (Fail, InvalidGraph, InvalidProtobuf, NoSuchFile) as e:
        reason = first_line(e)[:200]
        raise UserError(f"{path} is not a readable ONNX model ({reason}); export the run again "
                        f"with `nli export`.") from None
    names = tuple(i.name for i in session.get_inputs())
    if sorted(names) != sorted(INPUTS) or [o.name for o in session.get_outputs()] != [OUTPUT]:
        raise UserError(f"{path} takes {', '.join(names)}, not the {', '.join(INPUTS)} -> {OUTPUT} "
                        f"that `nli export` writes.")
    return session


class OnnxPredictor(PairPredictor):
    """An exported run's model.onnx, run by ONNX Runtime on the CPU: predictions without MXNet."""

    def __init__(self, session, vocab, config, batch_size=256, run_dir="this run"):
        super().__init__(vocab, config, batch_size)
        self.session, self.run_dir = session, run_dir

    @classmethod
    def from_export(cls, run_dir, batch_size=256, threads=None):
        """Load the run dir written by `export.export_run`: its tokenizer and an ONNX Runtime session."""
        config = read_run_config(run_dir)
        session = inference_session(os.path.join(run_dir, config["onnx"]["file"]), threads)
        return cls(session, model.load_tokenizer(run_dir, config), config, batch_size, run_dir)

    def run_batch(self, tokens, segments, valid_lens):
        """Logits of one padded batch (NumPy arrays)."""
        feed = dict(zip(INPUTS, (a.astype(onp.int64) for a in (tokens, segments, valid_lens))))
        return self.session.run([OUTPUT], feed)[0]

    def logits(self, encoded, progress=False):
        """Logits of encoded pairs, in order, batched as `Predictor.logits` batches them."""
        return predict_batches(self.run_batch, data.inference_batches(encoded, self.batch_size), None,
                               (len(encoded), len(LABELS)), progress)

    def attention(self, premise, hypothesis, tokenized=False):
        """Refused: the ONNX graph gives the logits only (its fused Attention keeps the weights inside)."""
        raise export_refusal(self.run_dir, self.config)


def export_refusal(run_dir, config):
    """The error that an exported run (or ensemble) cannot give attention weights, naming the run to draw them with."""
    return UserError(f"--attention needs MXNet's model, and {run_dir} is an ONNX export, whose graph gives only "
                     f"the logits: draw it with --run {config['onnx']['source_run']}.")


@dataclasses.dataclass
class MemberEncodings:
    """The same pairs as each member of an ensemble encodes them (`snli.EncodedPairs`, one a member)."""
    members: list

    def __len__(self):
        return len(self.members[0])

    @property
    def labels(self):
        return self.members[0].labels

    @property
    def valid_lens(self):
        """Each pair's longest encoding among the members: a pair fills max_len if any member cut it."""
        return onp.max([encoded.valid_lens for encoded in self.members], axis=0)


class EnsemblePredictor(PairPredictor):
    """The runs of an ensemble (`combine.ensemble`) as one predictor: each member encodes the pairs its own way,
    and the ensemble's probabilities are the mean of the members'."""

    def __init__(self, members, config, batch_size=256, run_dir="this ensemble"):  # no vocabulary of its own
        self.members, self.config, self.batch_size, self.run_dir = members, config, batch_size, run_dir

    @classmethod
    def from_dir(cls, run_dir, devices=None, batch_size=256, max_memory=None):
        """Load the ensemble in `run_dir`: each of its members/ with `load_predictor`."""
        config = read_run_config(run_dir)
        members = [load_predictor(os.path.join(run_dir, member["dir"]), devices, batch_size, max_memory)
                   for member in config["ensemble"]["members"]]
        return cls(members, config, batch_size, run_dir)

    def encode(self, premises, hypotheses, labels):
        """The pairs as every member encodes them: `MemberEncodings`."""
        return MemberEncodings([member.encode(premises, hypotheses, labels) for member in self.members])

    def probabilities(self, encoded, progress=False):
        """The mean of the members' probabilities of each pair."""
        return onp.mean([member.probabilities(own, progress) for member, own in zip(self.members, encoded.members)],
                        axis=0)

    def unknown_shares(self, encoded):
        """The mean over the members of each pair's share of unknown tokens."""
        return onp.mean([member.unknown_shares(own) for member, own in zip(self.members, encoded.members)], axis=0)

    def attention(self, premise, hypothesis, tokenized=False):
        """The members' attention weights averaged, with the ensemble's label and probabilities: members that
        tokenize the pair alike into the same layers and heads only (else draw a member's: members/I is a run)."""
        if "onnx" in self.config:
            raise export_refusal(self.run_dir, self.config)
        views = [member.attention(premise, hypothesis, tokenized) for member in self.members]
        if any(view.tokens != views[0].tokens or view.weights.shape != views[0].weights.shape for view in views):
            raise UserError(f"The members of {self.run_dir} split this pair into different tokens or have different "
                            f"layers and heads, so their attention cannot be averaged: draw one member's with "
                            f"--run {os.path.join(self.run_dir, self.config['ensemble']['members'][0]['dir'])}.")
        result = self.predict(premise, hypothesis, tokenized)
        return dataclasses.replace(views[0], weights=onp.mean([view.weights for view in views], axis=0),
                                   label=result["label"], probabilities=result["probabilities"])


def is_ensemble(config):
    """Whether a run's config.json is an ensemble's (`combine.ensemble`, or its export)."""
    return isinstance(config, dict) and "ensemble" in config


def load_predictor(run_dir, devices=None, batch_size=256, max_memory=None):
    """The predictor of a run dir: an ensemble's `EnsemblePredictor` (its members exported or not), an exported
    run's `OnnxPredictor`, else the fine-tuned run's `Predictor` on `devices` (default: one device, the first GPU
    or the CPU), its batches within `max_memory`."""
    if is_ensemble(read_run_config(run_dir)):
        return EnsemblePredictor.from_dir(run_dir, devices, batch_size, max_memory)
    if is_exported(run_dir):
        return OnnxPredictor.from_export(run_dir, batch_size)
    devices = devices or data.scoring_devices()
    net, vocab, config = model.load_run(run_dir, devices)
    return Predictor(net, vocab, config, devices, batch_size, max_memory)


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


# Prediction on files: every input line gives one output line, in order.

def predict_lines(predictor, lines, write, tokenized=False, chunk_size=4096):
    """Call `write(record)` for every `snli.PairLine`, in order: its prediction, or its error; return a summary."""
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
    fmt = snli.input_format(path)
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
        lines = snli.pair_lines(f, source, fmt)

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
            fileio.write_atomically(output, write_output)
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
