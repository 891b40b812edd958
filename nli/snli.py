"""Reading SNLI and pair files, and encoding premise/hypothesis pairs as BERT inputs."""
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import operator
import os
import re
import sys
import zipfile

import numpy as onp
from tqdm import tqdm

from . import fileio, hub
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
    return read_pairs(snli_file(data_dir, is_train))


def snli_file(data_dir, is_train):
    """The path of SNLI's train or test split in the extracted dataset."""
    return os.path.join(data_dir, f"snli_1.0_{'train' if is_train else 'test'}.txt")


def read_pairs(path):
    """Read (premises, hypotheses, labels) from an SNLI `.txt`/`.jsonl` file or a `.tsv`/`.jsonl` pair file, strictly:
    the first line that is not a labelled pair stops with its file, line and what was expected."""
    if not os.path.exists(path):
        raise UserError(f"Missing data file {path}.")
    premises, hypotheses, labels = [], [], []
    no_gold = 0
    with open(path, "rb") as f:
        lines = (line for raw in f for line in raw.splitlines())  # a lone \r ends a line too, as editors may save
        for line in pair_lines(lines, path, input_format(path, (".txt", ".tsv", ".jsonl")), strict=True):
            if line.error:
                raise UserError(f"{path}, line {line.line}: {line.error}.")
            if line.label == NO_GOLD_LABEL:
                no_gold += 1
                continue
            premises.append(line.premise)
            hypotheses.append(line.hypothesis)
            labels.append(LABEL_IDS[line.label])
    if no_gold:
        logging.getLogger(__name__).warning("%s: skipped %d pairs without a gold label ('-'), as the book does.",
                                            path, no_gold)
    return premises, hypotheses, labels


# Column (or key) names of premise, hypothesis and label in pair files: ours, and SNLI's own.
PAIR_COLUMNS = (("premise", "hypothesis", "label"), ("sentence1", "sentence2", "gold_label"))
# SNLI's tokenized sentences, which the book trains on (`extract_text` of the binary parses)
PARSE_COLUMNS = ("sentence1_binary_parse", "sentence2_binary_parse", "gold_label")


@dataclasses.dataclass
class PairLine:
    """One line of a pair file: its pair and label as written ('' for none, '-' for no gold label), or why it is not
    a pair."""
    line: int
    premise: str = ""
    hypothesis: str = ""
    label: str = ""
    error: str = None

    @property
    def gold(self):
        """The gold label, or None."""
        return self.label if self.label in LABEL_IDS else None


def input_format(path, extensions=(".tsv", ".txt", ".jsonl")):
    """`jsonl` or `tsv` from a file name (None, stdin, is tsv), refused unless it has one of `extensions`."""
    ext = os.path.splitext(path)[1].lower() if path else ".tsv"
    if ext not in extensions:
        raise UserError(f"{path}: expected a .tsv (premise<TAB>hypothesis<TAB>label, with a header), SNLI .txt or "
                        f".jsonl file of pairs.")
    return "jsonl" if ext == ".jsonl" else "tsv"


def pair_lines(byte_lines, source, fmt, strict=False):
    """A `PairLine` for every line of a .jsonl or tab-separated input (`fmt`), in order.

    `strict` is for training and scoring: a header line names the columns, the label is required, SNLI's
    binary parses are read as the book reads them, blank lines are skipped. Otherwise (prediction) the header
    is optional, without it the columns are premise, hypothesis and an optional label, and every line, a blank
    one too, gives a `PairLine`, so that output lines match input lines."""
    columns, width, parse = (0, 1, 2), None, str  # without a header: premise, hypothesis and an optional label
    names = (PARSE_COLUMNS, *PAIR_COLUMNS) if strict else PAIR_COLUMNS
    for line_no, raw in enumerate(byte_lines, 1):
        try:
            text = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            yield PairLine(line_no, error=f"not UTF-8 text ({e.reason} at byte {e.start})")
            continue
        text = text.lstrip("\ufeff") if line_no == 1 else text  # a byte-order mark some editors write
        if strict and not text.strip():  # a blank line, or one of spaces and tabs
            continue
        if "\r" in text:  # lines ended by \r alone (old Macs) would be read as one, the header swallowing the rest
            yield PairLine(line_no, error="a carriage return (\\r) inside the line: end lines with \\n or \\r\\n")
        elif fmt == "jsonl":
            yield _json_line(line_no, text, names, strict)
        elif line_no == 1 and (header := _tsv_header(text.split("\t"), source, names, strict)):
            columns, width = header, len(text.split("\t"))
            parse = extract_text if text.split("\t")[columns[0]].endswith("_binary_parse") else str
        elif strict and width is None:
            raise UserError(f"{source}, line 1: expected a header naming the columns premise, hypothesis, label (or "
                            f"SNLI's sentence1, sentence2, gold_label).")
        else:
            yield _tsv_line(line_no, text.split("\t"), columns, width, strict, parse)


def _tsv_header(fields, source, names, strict):
    """Column positions (premise, hypothesis, label or None) if `fields` is a header line, else None."""
    known = {name for triple in names for name in triple}
    if not known & set(fields):
        return None
    for premise, hypothesis, label in names:
        if premise in fields and hypothesis in fields and (label in fields or not strict):
            return fields.index(premise), fields.index(hypothesis), fields.index(label) if label in fields else None
    raise UserError(f"{source}, line 1: the header names no premise/hypothesis/label (or sentence1/sentence2/"
                    f"gold_label) columns: {', '.join(fields)}.")


def _tsv_line(line_no, fields, columns, width, strict, parse):
    """A `PairLine` from one line's tab-separated `fields`, laid out as `columns` of a header `width` wide; `parse`
    turns a column into text (SNLI's binary parses into tokens)."""
    if width is None and len(fields) not in (2, 3):
        return PairLine(line_no, error=f"{len(fields)} tab-separated fields, expected premise<TAB>hypothesis and "
                                       f"optionally <TAB>label")
    if width is not None and len(fields) != width:
        return PairLine(line_no, error=f"{len(fields)} tab-separated fields, expected {width} as in the header")
    label = fields[columns[2]].strip() if columns[2] is not None and columns[2] < len(fields) else ""
    return _pair_line(line_no, parse(fields[columns[0]]), parse(fields[columns[1]]), label, strict)


def _json_line(line_no, text, names, strict):
    """A `PairLine` from one JSON object with premise/hypothesis (or SNLI's) keys."""
    try:
        obj = json.loads(text, strict=False)  # strict=False: a raw tab inside a string is kept, not refused
    except json.JSONDecodeError as e:
        return PairLine(line_no, error=f"not valid JSON ({e.msg})")
    if not isinstance(obj, dict):
        return PairLine(line_no, error="expected a JSON object")
    for premise, hypothesis, label in names:
        if premise in obj and hypothesis in obj and (label in obj or not strict):
            values = obj[premise], obj[hypothesis], obj.get(label, "")
            if not all(isinstance(v, str) for v in values):
                return PairLine(line_no, error=f"{premise}, {hypothesis} and {label} must be strings")
            if not is_text("".join(values)):
                return PairLine(line_no, error="a \\u escape of half a surrogate pair, which is not text")
            if premise.endswith("_binary_parse"):
                values = extract_text(values[0]), extract_text(values[1]), values[2]
            return _pair_line(line_no, *values, strict)
    expected = " and ".join(PAIR_COLUMNS[0][:2 + strict]) + " (or " + " and ".join(PAIR_COLUMNS[1][:2 + strict]) + ")"
    return PairLine(line_no, error=f"expected {expected} keys")


def is_text(text):
    """Whether `text` holds no surrogate: a JSON \\ud800 escape decodes to half a surrogate pair, which no UTF-8
    file can hold."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _pair_line(line_no, premise, hypothesis, label, strict):
    """A `PairLine`, or the error if a sentence is empty or the label is not one of the three (or '-')."""
    for name, text in (("premise", premise), ("hypothesis", hypothesis)):
        if not text.strip():
            return PairLine(line_no, error=f"empty {name}")
    label = label.strip()
    if (label or strict) and label != NO_GOLD_LABEL and label not in LABEL_IDS:
        return PairLine(line_no, error=f"label {label!r} is not one of {', '.join(LABELS)} (or '-', which is skipped)")
    return PairLine(line_no, premise.strip(), hypothesis.strip(), label)


def tokenize(sentence):
    """Word tokens of a sentence as the book's SNLIBERTDataset makes them: lower-cased, split on spaces."""
    return sentence.lower().split()


def tokenize_raw(sentence):
    """Raw text split as SNLI's text is (Penn Treebank rules): "A dog's toy." -> "A dog 's toy ."."""
    # SNLI was tokenized by Stanford's PTB tokenizer; nltk's Treebank tokenizer follows the same rules
    # and needs no data download. Imported here: nltk takes 0.7 s to import and only raw text needs it.
    from nltk.tokenize.treebank import TreebankWordTokenizer
    return " ".join(TreebankWordTokenizer().tokenize(sentence))


TRUNCATION_RULES = ("longest_first", "ratio")  # the book's rule, and its exercise 2
RESERVED_SLOTS = 3  # '<cls>' and the two '<sep>' tokens of every pair
CHUNK_PAIRS = 1 << 16  # pairs encoded at a time: bounds memory and paces the progress bar


def truncated_lengths(p_lens, h_lens, max_len, truncation="longest_first"):
    """How many leading tokens of each premise and hypothesis are kept so the pair fits `max_len`.

    `longest_first` is the book's loop (pop a token from the longer side, the hypothesis on ties, until
    the pair fits) in closed form: the longer side is cut down to the shorter, then both alternately, the
    premise keeping the odd token. `ratio` keeps each side in proportion to its length (rounded, and at
    least one token of each non-empty side).
    """
    if truncation not in TRUNCATION_RULES:
        raise UserError(f"truncation {truncation!r}: expected one of {', '.join(TRUNCATION_RULES)}.")
    if max_len < RESERVED_SLOTS:
        raise UserError(f"max_len {max_len} leaves no room for '<cls>' and two '<sep>' tokens.")
    p_lens, h_lens = onp.asarray(p_lens, onp.int64), onp.asarray(h_lens, onp.int64)
    budget = max_len - RESERVED_SLOTS
    total = p_lens + h_lens
    if truncation == "longest_first":
        h_kept = onp.minimum(h_lens, onp.maximum(budget // 2, budget - p_lens))
    else:
        p_share = (2 * budget * p_lens + total) // onp.maximum(2 * total, 1)  # rounded half up
        at_least, at_most = onp.minimum(p_lens, 1), onp.maximum(budget - onp.minimum(h_lens, 1), 0)
        h_kept = onp.where(total > budget, budget - onp.minimum(onp.maximum(p_share, at_least), at_most), h_lens)
    return onp.minimum(p_lens, budget - h_kept), h_kept


@dataclasses.dataclass
class EncodedPairs:
    """Token ids of `<cls> p <sep> h <sep>` for many pairs, stored ragged (no padding) as int32, with what
    batching them needs: the padding id and `max_len` (GluonNLP binds these once, in its batchify)."""
    token_ids: onp.ndarray  # all pairs' ids, one after another
    offsets: onp.ndarray  # pair i is token_ids[offsets[i]:offsets[i + 1]]
    segment_a_lens: onp.ndarray  # tokens in segment 0 ('<cls>' p '<sep>'); the rest are segment 1
    labels: onp.ndarray
    pad_id: int  # the vocabulary's '<pad>' ('[PAD]' in WordPiece)
    max_len: int  # pairs were truncated to fit it; batches are never padded past it
    truncation: str = "longest_first"  # the rule that cut pairs over max_len (`truncated_lengths`)

    def __len__(self):
        return len(self.labels)

    @property
    def valid_lens(self):
        return onp.diff(self.offsets).astype(onp.int32)

    def head(self, n):
        """The first `n` pairs (all of them when n is None)."""
        if n is None or n >= len(self):
            return self
        return dataclasses.replace(self, token_ids=self.token_ids[:self.offsets[n]], offsets=self.offsets[:n + 1],
                                   segment_a_lens=self.segment_a_lens[:n], labels=self.labels[:n])

    def take(self, indices):
        """The pairs at `indices`, in that order (a held-out split, a worker's shard)."""
        lens = self.valid_lens[indices].astype(onp.int64)
        positions = onp.repeat(self.offsets[:-1][indices], lens) + _positions_within(lens)
        return dataclasses.replace(self, token_ids=self.token_ids[positions],
                                   offsets=onp.concatenate([[0], onp.cumsum(lens)]).astype(onp.int64),
                                   segment_a_lens=self.segment_a_lens[indices], labels=self.labels[indices])

    def padded(self, indices, length):
        """Book-style arrays for pairs `indices` padded to `length`: (token ids, segments, valid lens)."""
        lens = self.valid_lens[indices]
        tokens = onp.full((len(indices), length), self.pad_id, dtype=onp.int32)
        positions = onp.arange(length)
        mask = positions < lens[:, None]
        starts = self.offsets[:-1][indices]
        tokens[mask] = self.token_ids[(starts[:, None] + positions)[mask]]
        segments = ((positions >= self.segment_a_lens[indices][:, None]) & mask).astype(onp.int32)
        return tokens, segments, lens

    @staticmethod
    def concatenate(parts):
        """One EncodedPairs holding `parts` (encoded alike) one after another."""
        starts = onp.cumsum([0] + [len(p.token_ids) for p in parts[:-1]])
        return EncodedPairs(
            onp.concatenate([p.token_ids for p in parts], dtype=onp.int32),
            onp.concatenate([[0]] + [p.offsets[1:] + s for p, s in zip(parts, starts)], dtype=onp.int64),
            onp.concatenate([p.segment_a_lens for p in parts], dtype=onp.int32),
            onp.concatenate([p.labels for p in parts], dtype=onp.int32), parts[0].pad_id, parts[0].max_len,
            parts[0].truncation)


def ragged(sequences):
    """(flat ids, lengths) of a list of id sequences: the form `assemble_pairs` takes sentences in."""
    lengths = onp.fromiter(map(len, sequences), onp.int64, len(sequences))
    flat = onp.fromiter(itertools.chain.from_iterable(sequences), onp.int32, int(lengths.sum()))
    return flat, lengths


def _positions_within(lengths):
    """For a flat array of sentences with these lengths: each element's position in its sentence."""
    starts = onp.cumsum(lengths) - lengths
    return onp.arange(int(lengths.sum())) - onp.repeat(starts, lengths)


def assemble_pairs(premise_ids, hypothesis_ids, labels, cls_id, sep_id, pad_id, max_len, truncation="longest_first"):
    """Truncate each pair and lay it out as `cls p sep h sep`, for any tokenizer's ids, in a few numpy passes.

    `premise_ids` and `hypothesis_ids` are `(flat ids, lengths)` as `ragged` makes them; the book's word
    vocabulary passes `<cls>`/`<sep>`/`<pad>`, a WordPiece vocabulary `[CLS]`/`[SEP]`/`[PAD]`.
    """
    (p_flat, p_lens), (h_flat, h_lens) = premise_ids, hypothesis_ids
    if not len(p_lens) == len(h_lens) == len(labels):
        raise ValueError(f"{len(p_lens)} premises, {len(h_lens)} hypotheses and {len(labels)} labels")
    p_kept, h_kept = truncated_lengths(p_lens, h_lens, max_len, truncation)
    seg_a = p_kept + 2
    offsets = onp.concatenate([[0], onp.cumsum(seg_a + h_kept + 1)])
    starts = offsets[:-1]
    token_ids = onp.empty(offsets[-1], dtype=onp.int32)
    token_ids[starts] = cls_id
    token_ids[starts + seg_a - 1] = sep_id
    token_ids[offsets[1:] - 1] = sep_id
    for flat, lens, kept, first in ((p_flat, p_lens, p_kept, starts + 1), (h_flat, h_lens, h_kept, starts + seg_a)):
        within = _positions_within(lens)
        keep = within < onp.repeat(kept, lens)
        token_ids[onp.repeat(first, kept) + within[keep]] = onp.asarray(flat)[keep]
    return EncodedPairs(token_ids, offsets.astype(onp.int64), seg_a.astype(onp.int32),
                        onp.asarray(labels, dtype=onp.int32), pad_id, max_len, truncation)


_MARKERS = [chr(c) for c in (*range(0, 9), *range(14, 28), 127)]  # caseless, and not whitespace to split()


def word_ids(sentences, vocab):
    """(flat ids, lengths) of `sentences` under the book's tokenizer (`tokenize`) and `vocab`.

    The sentences are lower-cased and split as one text, a marker token between them, so the work is one
    `str.split` and one dictionary pass over all tokens rather than a Python loop per sentence.
    """
    if not sentences:
        return ragged([])
    for marker in _MARKERS:  # the first character that no sentence contains
        text = f" {marker} ".join(sentences)
        if text.count(marker) == len(sentences) - 1:
            break
    else:
        raise UserError("sentences contain every control character; cannot mark where each one ends.")
    lookup = {**vocab.token_to_idx, marker: -1}
    tokens = text.lower().split()
    ids = onp.fromiter(map(lookup.get, tokens, itertools.repeat(vocab.unk)), onp.int32, len(tokens))
    is_marker = ids == -1
    bounds = onp.concatenate([[-1], onp.flatnonzero(is_marker), [len(ids)]])
    return ids[~is_marker], onp.diff(bounds) - 1


def encode_in_chunks(premises, hypotheses, labels, sentence_ids, special_ids, max_len, truncation="longest_first",
                     progress=False):
    """`assemble_pairs` over `sentence_ids(sentences) -> (flat ids, lengths)`, a chunk of pairs at a time;
    `special_ids` are the ids of `<cls>`, `<sep>` and `<pad>`."""
    if not len(premises) == len(hypotheses) == len(labels):
        raise ValueError(f"{len(premises)} premises, {len(hypotheses)} hypotheses and {len(labels)} labels")
    truncated_lengths([], [], max_len, truncation)  # a bad setting fails before any work
    parts = []
    with tqdm(total=len(labels), unit="pair", desc="encoding", disable=not progress, leave=False) as bar:
        for start in range(0, len(labels), CHUNK_PAIRS):
            chunk = slice(start, start + CHUNK_PAIRS)
            premise_ids, hypothesis_ids = (tokenize_repeats_once(sentence_ids, sentences[chunk])
                                           for sentences in (premises, hypotheses))
            parts.append(assemble_pairs(premise_ids, hypothesis_ids, labels[chunk], *special_ids, max_len,
                                        truncation))
            bar.update(len(parts[-1]))
    return EncodedPairs.concatenate(parts) if parts else assemble_pairs(
        ragged([]), ragged([]), [], *special_ids, max_len, truncation)


def tokenize_repeats_once(sentence_ids, sentences):
    """`sentence_ids(sentences)`, tokenizing a sentence repeated on adjacent lines only once.

    SNLI lists each premise's hypotheses one after another, so this tokenizes about a third of its premises.
    """
    first = onp.fromiter(itertools.chain([True], map(operator.ne, sentences[1:], sentences[:-1])), bool,
                         len(sentences))
    if first.all():
        return sentence_ids(sentences)
    run_ids, run_lens = sentence_ids(list(itertools.compress(sentences, first)))
    run = onp.cumsum(first) - 1
    lengths = run_lens[run]
    run_starts = onp.cumsum(run_lens) - run_lens
    return run_ids[onp.repeat(run_starts[run], lengths) + _positions_within(lengths)], lengths


def special_id(vocab, token):
    """The id of a special token such as '<cls>', failing clearly for a vocabulary without it."""
    if token not in vocab.token_to_idx:
        raise UserError(f"the vocabulary has no {token!r} token; it is not a BERT vocabulary.")
    return vocab.token_to_idx[token]


def encode_pairs(premises, hypotheses, labels, vocab, max_len, truncation="longest_first", progress=False):
    """Encode pairs to the arrays of the book's SNLIBERTDataset (tokenize, truncate, `<cls> p <sep> h <sep>`).

    Book: `SNLIBERTDataset`, without its padding: `data.make_batch` pads each batch to its longest pair.
    `vocab` is the book's word vocabulary, or a tokenizer that splits sentences itself (`hf.WordPieceTokenizer`).
    """
    sentence_ids = getattr(vocab, "sentence_ids", None) or functools.partial(word_ids, vocab=vocab)
    special_ids = [special_id(vocab, token) for token in ("<cls>", "<sep>", "<pad>")]
    return encode_in_chunks(premises, hypotheses, labels, sentence_ids, special_ids, max_len, truncation, progress)


CACHE_FORMAT = 2  # bump when the encoding or the file layout changes, so old caches are rebuilt


def vocab_id(vocab):
    """A short hash of a vocabulary's tokens in order: encoded ids are only valid for the same vocabulary."""
    return hashlib.sha1(json.dumps(vocab.idx_to_token).encode("utf-8")).hexdigest()[:16]


def load_encoded(path, vocab, max_len, truncation="longest_first", progress=True):
    """The pairs of data file `path` encoded with `vocab` (`encode_pairs`), through the cache in the data dir."""
    encoder_id = getattr(vocab, "fingerprint", None) or f"word:{vocab_id(vocab)}"
    return cached_encoding(path, encoder_id, max_len, truncation,
                           lambda p, h, l: encode_pairs(p, h, l, vocab, max_len, truncation, progress))


def cached_encoding(path, encoder_id, max_len, truncation, encode):
    """`encode(*read_pairs(path))`, cached in `data_dir()/encoded/` and rebuilt whenever it may be stale.

    A cache file serves one (source path, encoder, max_len, truncation) and is trusted only if its recorded
    source size and mtime match the file and its checksum matches its arrays. `encoder_id` names the
    tokenizer and a hash of its vocabulary (e.g. `word:<vocab_id>`).
    """
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"Missing data file {path}.") from None
    setting = {"format": CACHE_FORMAT, "source": os.path.abspath(path), "encoder": encoder_id,
               "max_len": max_len, "truncation": truncation}
    name = hashlib.sha1(json.dumps(setting, sort_keys=True).encode("utf-8")).hexdigest()[:16]
    cache_path = os.path.join(hub.data_dir(), "encoded", f"{os.path.basename(path)}.{name}.npz")
    key = {**setting, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    encoded = _read_cache(cache_path, key)
    if encoded is None:
        encoded = encode(*read_pairs(path))
        _write_cache(cache_path, key, encoded)
    return encoded


_CACHED_ARRAYS = ["token_ids", "offsets", "segment_a_lens", "labels"]  # beside pad_id and max_len, in the header


def _checksum(arrays):
    """SHA-1 over the arrays' dtypes, shapes and bytes."""
    digest = hashlib.sha1()
    for a in arrays:
        digest.update(f"{a.dtype.str}{a.shape}".encode())
        digest.update(onp.ascontiguousarray(a).data)
    return digest.hexdigest()


def _read_cache(cache_path, key):
    """The EncodedPairs in `cache_path` if it exists, is whole and was made for `key`; else None."""
    if not os.path.exists(cache_path):
        return None
    try:
        with onp.load(cache_path, allow_pickle=False) as f:
            header = json.loads(str(f["header"]))
            arrays = [f[name] for name in _CACHED_ARRAYS]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:
        print(f"warning: unreadable cache {cache_path} ({type(e).__name__}: {e}); rebuilding it",
              file=sys.stderr)
        return None
    if header.get("key") != key:
        return None  # the source file or a setting changed: stale, not broken
    if header.get("sha1") != _checksum(arrays):
        print(f"warning: cache {cache_path} fails its checksum; rebuilding it", file=sys.stderr)
        return None
    return EncodedPairs(*arrays, header["pad_id"], header["max_len"], key["truncation"])


def _write_cache(cache_path, key, encoded):
    """Write `encoded` with its key and checksum to `cache_path`, atomically."""
    arrays = [getattr(encoded, name) for name in _CACHED_ARRAYS]
    header = json.dumps({"key": key, "sha1": _checksum(arrays), "pad_id": encoded.pad_id, "max_len": encoded.max_len})

    def write(tmp):
        with open(tmp, "wb") as f:
            onp.savez(f, header=onp.array(header), **dict(zip(_CACHED_ARRAYS, arrays)))
    try:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        fileio.write_atomically(cache_path, write)
    except OSError as e:  # a read-only or full data dir costs speed next time, not this run
        print(f"warning: could not write the cache {cache_path} ({e}); continuing without it", file=sys.stderr)
