"""Reading SNLI and pair files, and encoding premise/hypothesis pairs as BERT inputs."""
import csv
import dataclasses
import json
import os
import re

import numpy as onp

from .errors import UserError

LABELS = ("entailment", "contradiction", "neutral")  # ids 0, 1, 2, as d2l.read_snli numbers them
LABEL_IDS = {label: i for i, label in enumerate(LABELS)}
NO_GOLD_LABEL = "-"  # SNLI's mark for pairs the annotators did not agree on; the book drops them


def extract_text(s):
    """A binary parse's tokens: brackets removed, whitespace collapsed (d2l.read_snli's `extract_text`)."""
    s = re.sub(r"\(", "", s)
    s = re.sub(r"\)", "", s)
    s = re.sub(r"\s{2,}", " ", s)
    return s.strip()


def read_snli(data_dir, is_train):
    """Premises, hypotheses and labels of SNLI's train or test split, as `d2l.read_snli` returns them."""
    split = "train" if is_train else "test"
    return read_pairs(os.path.join(data_dir, f"snli_1.0_{split}.txt"))


def read_pairs(path):
    """Read (premises, hypotheses, labels) from an SNLI `.txt`/`.jsonl` file or a `.tsv`/`.jsonl` pair file."""
    if not os.path.exists(path):
        raise UserError(f"Missing data file {path}.")
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".txt", ".tsv", ".jsonl"):
        raise UserError(f"{path}: expected a .txt (SNLI), .tsv or .jsonl file of pairs.")
    premises, hypotheses, labels = [], [], []
    try:
        rows = _read_jsonl(path) if ext == ".jsonl" else _read_tsv(path)
        for line_no, premise, hypothesis, label in rows:
            if label == NO_GOLD_LABEL:
                continue
            if label not in LABEL_IDS:
                raise UserError(f"{path}, line {line_no}: label {label!r} is not one of "
                                f"{', '.join(LABELS)} (or '-', which is skipped).")
            if not premise or not hypothesis:
                raise UserError(f"{path}, line {line_no}: empty premise or hypothesis.")
            premises.append(premise)
            hypotheses.append(hypothesis)
            labels.append(LABEL_IDS[label])
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}).") from None
    return premises, hypotheses, labels


def _columns(path, names):
    """Where the premise, hypothesis and label are among `names`, whichever naming the file uses."""
    for premise, hypothesis, label in (("sentence1_binary_parse", "sentence2_binary_parse", "gold_label"),
                                       ("premise", "hypothesis", "label"),
                                       ("sentence1", "sentence2", "gold_label")):
        if {premise, hypothesis, label} <= set(names):
            return premise, hypothesis, label
    raise UserError(f"{path}: expected columns premise/hypothesis/label or sentence1/sentence2/gold_label, "
                    f"found {', '.join(map(str, names))}.")


def _read_tsv(path):
    """Yield (line number, premise, hypothesis, label) from a tab-separated file with a header."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = next(reader, None)
        if header is None:
            raise UserError(f"{path} is empty; expected a header line.")
        p, h, l = (header.index(c) for c in _columns(path, header))
        parse = extract_text if header[p].endswith("_binary_parse") else str.strip
        for row in reader:
            if not row:
                continue
            if len(row) != len(header):
                raise UserError(f"{path}, line {reader.line_num}: {len(row)} tab-separated fields, "
                                f"expected {len(header)} as in the header.")
            yield reader.line_num, parse(row[p]), parse(row[h]), row[l].strip()


def _read_jsonl(path):
    """Yield (line number, premise, hypothesis, label) from a file of one JSON object per line."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path}, line {line_no}: not valid JSON ({e.msg}).") from None
            if not isinstance(obj, dict):
                raise UserError(f"{path}, line {line_no}: expected a JSON object.")
            p, h, l = _columns(f"{path}, line {line_no}", obj)
            parse = extract_text if p.endswith("_binary_parse") else str.strip
            values = [obj[p], obj[h], obj[l]]
            if not all(isinstance(v, str) for v in values):
                raise UserError(f"{path}, line {line_no}: premise, hypothesis and label must be strings.")
            yield line_no, parse(values[0]), parse(values[1]), values[2].strip()


def tokenize(sentence):
    """Word tokens of a sentence as the book's SNLIBERTDataset makes them: lower-cased, split on spaces."""
    return sentence.lower().split()


def tokenize_raw(sentence):
    """Raw text split as SNLI's text is (Penn Treebank rules): "A dog's toy." -> "A dog 's toy ."."""
    # SNLI was tokenized by Stanford's PTB tokenizer; nltk's Treebank tokenizer follows the same rules
    # and needs no data download. Imported here: nltk takes 0.7 s to import and only raw text needs it.
    from nltk.tokenize.treebank import TreebankWordTokenizer
    return " ".join(TreebankWordTokenizer().tokenize(sentence))


def truncate_pair(p_tokens, h_tokens, max_len):
    """Cut the longer of the two token lists, one token at a time, until the pair fits `max_len`."""
    # Three slots are reserved for '<cls>' and the two '<sep>' tokens.
    while len(p_tokens) + len(h_tokens) > max_len - 3:
        if len(p_tokens) > len(h_tokens):
            p_tokens.pop()
        else:
            h_tokens.pop()


@dataclasses.dataclass
class EncodedPairs:
    """Token ids of `<cls> p <sep> h <sep>` for many pairs, stored ragged (no padding) as int32."""
    token_ids: onp.ndarray  # all pairs' ids, one after another
    offsets: onp.ndarray  # pair i is token_ids[offsets[i]:offsets[i + 1]]
    segment_a_lens: onp.ndarray  # tokens in segment 0 ('<cls>' p '<sep>'); the rest are segment 1
    labels: onp.ndarray

    def __len__(self):
        return len(self.labels)

    @property
    def valid_lens(self):
        return onp.diff(self.offsets).astype(onp.int32)

    def padded(self, indices, length, pad_id):
        """Book-style arrays for pairs `indices` padded to `length`: (token ids, segments, valid lens)."""
        lens = self.valid_lens[indices]
        tokens = onp.full((len(indices), length), pad_id, dtype=onp.int32)
        positions = onp.arange(length)
        mask = positions < lens[:, None]
        starts = self.offsets[:-1][indices]
        tokens[mask] = self.token_ids[(starts[:, None] + positions)[mask]]
        segments = ((positions >= self.segment_a_lens[indices][:, None]) & mask).astype(onp.int32)
        return tokens, segments, lens


def encode_pairs(premises, hypotheses, labels, vocab, max_len):
    """Encode pairs as the book's SNLIBERTDataset does (tokenize, truncate, `<cls> p <sep> h <sep>`)."""
    lookup = vocab.token_to_idx
    unk, cls, sep = vocab.unk, lookup["<cls>"], lookup["<sep>"]
    ids, offsets, seg_a = [], [0], []
    for premise, hypothesis in zip(premises, hypotheses):
        p_tokens, h_tokens = tokenize(premise), tokenize(hypothesis)
        truncate_pair(p_tokens, h_tokens, max_len)
        ids.append(cls)
        ids.extend(lookup.get(t, unk) for t in p_tokens)
        ids.append(sep)
        ids.extend(lookup.get(t, unk) for t in h_tokens)
        ids.append(sep)
        offsets.append(len(ids))
        seg_a.append(len(p_tokens) + 2)
    return EncodedPairs(onp.asarray(ids, dtype=onp.int32), onp.asarray(offsets, dtype=onp.int64),
                        onp.asarray(seg_a, dtype=onp.int32), onp.asarray(labels, dtype=onp.int32))
