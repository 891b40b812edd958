"""Make tests/data/book_bert_tiny/: a tiny `d2l.BERTModel` saved as the book saves it, and its outputs.

Run on Python 3.11 with the book's set (d2l 1.0.3, mxnet 1.9.1, numpy 1.23.5), from the repository root:

    python tests/data/make_book_bert_tiny.py

The tests load these files on every Python, d2l installed or not, and compare nli's BERT with the
outputs d2l's own model gave (expected.npz), so "files saved by d2l.BERTModel load, with the same
outputs" is checked on 3.12 and 3.13 too, where d2l cannot be installed.
"""
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]  # nli, and conftest

import nli  # noqa: E402,F401  (first: it repairs numpy for mxnet)
import numpy as onp  # noqa: E402
import mxnet as mx  # noqa: E402
from mxnet import init, np, npx  # noqa: E402
from d2l import mxnet as d2l  # noqa: E402

from conftest import RESERVED, SAMPLE_DIR  # noqa: E402
from nli import snli  # noqa: E402,I100

TINY = dict(num_hiddens=32, ffn_num_hiddens=64, num_heads=4, num_blks=2, max_len=64)


def main():
    npx.set_np()
    mx.random.seed(0)
    folder = os.path.join(HERE, "book_bert_tiny")
    os.makedirs(folder, exist_ok=True)
    premises, hypotheses, _ = snli.read_pairs(os.path.join(SAMPLE_DIR, "snli_1.0_dev.jsonl"))
    vocab = d2l.Vocab([t for s in premises + hypotheses for t in snli.tokenize(s)], reserved_tokens=RESERVED)
    model = d2l.BERTModel(len(vocab), dropout=0.0, **TINY)
    model.initialize(init.Xavier())
    tokens = np.array(onp.random.RandomState(0).randint(0, len(vocab), (3, 20)), dtype="int32")
    segments = np.array(onp.repeat([[0] * 8 + [1] * 12], 3, axis=0), dtype="int32")
    valid_lens = np.array([20.0, 9.0, 14.0])
    encoded, _, nsp = model(tokens, segments, valid_lens, np.array([[1, 2]] * 3))  # runs every head
    model.save_parameters(os.path.join(folder, "pretrained.params"))
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump(vocab.idx_to_token, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(dict(TINY, dropout=0.0), f)
    onp.savez(os.path.join(folder, "expected.npz"), tokens=tokens.asnumpy(), segments=segments.asnumpy(),
              valid_lens=valid_lens.asnumpy(), encoded=encoded.asnumpy(), nsp=nsp.asnumpy())


if __name__ == "__main__":
    main()
