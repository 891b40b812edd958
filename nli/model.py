"""`BERTClassifier`: BERT's encoder and `<cls>` hidden layer with a 3-way output layer; saving and loading it."""
import dataclasses
import json
import os

from mxnet import init
from mxnet.gluon import nn

from . import bert as bert_lib
from . import fileio, hf
from .errors import UserError
from .recipe import MIN_MAX_LEN
from .snli import LABELS

# How a run's config.json says to rebuild its tokenizer; runs that do not say are the book's.
BOOK_TOKENIZER = {"kind": "words", "vocab": "vocab.json", "lowercase": True}


class BERTClassifier(bert_lib.GraphPerMode):
    """The book's classifier: an MLP (BERT's hidden layer + Dense(3)) on the encoding of `<cls>`.

    `dropout` on the hidden layer's output is what Hugging Face's BertForSequenceClassification adds;
    the book has none (0). `pooling` "mean" feeds the MLP the mean of the valid tokens' encodings instead,
    as sentence-embedding checkpoints (all-MiniLM-L6-v2) were trained to be read.
    """

    def __init__(self, bert, dropout=0.0, pooling="cls"):
        super().__init__()
        self.pooling, self.bert_config = pooling, bert.config
        self.pretrained = None  # {"model": the name it was built from, ...}, when `from_pretrained` built it
        self.encoder = bert.encoder
        self.hidden = bert.hidden
        self.dropout = nn.Dropout(dropout)
        self.output = nn.Dense(len(LABELS), in_units=bert.config.num_hiddens)

    def pool(self, F, encoded_X, valid_lens):
        """One vector per pair from the encoder's (batch, steps, hiddens): `<cls>`'s, or the valid tokens' mean."""
        if self.pooling == "mean":
            valid = F.npx.sequence_mask(encoded_X, valid_lens, use_sequence_length=True, axis=1, value=0)
            return valid.sum(axis=1) / F.np.expand_dims(valid_lens, 1)
        return F.npx.reshape(bert_lib.legacy(F, "slice_axis", encoded_X, axis=1, begin=0, end=1), (-2, -3, -2))

    def hybrid_forward(self, F, tokens, segments, valid_lens):
        pooled = self.pool(F, self.encoder(tokens, segments, valid_lens), valid_lens)
        return self.output(self.dropout(self.hidden(pooled)))


def from_pretrained(name_or_dir, devices, dropout=None, max_len=None, pooling="cls", quiet=False):
    """A classifier on a pretrained BERT, its output layer freshly initialized: (net, vocab); `net.bert_config` is
    the BERT's sizes.

    `name_or_dir` is the book's model (bert.small, bert.base, a directory) or a Hugging Face checkpoint:
    `hf:DIR`, or `hf:ORG/NAME[@REVISION]` from the Hub (see `hf.locate`), whose position table `max_len`
    may grow (see `hf.load`); the book's position table cannot. `net.pretrained` says where it came from and the
    SHA-1 of the weights file read. `quiet`: a download shows no progress bar.
    """
    if name_or_dir.startswith(hf.PREFIX):  # as BertForSequenceClassification builds its head
        directory, source = hf.locate(name_or_dir[len(hf.PREFIX):], quiet)
        bert, vocab = hf.load(directory, devices, dropout, max_len)
        net = BERTClassifier(bert, dropout=bert.config.dropout, pooling=pooling)
        net.output.initialize(init.Normal(hf.INITIALIZER_RANGE), ctx=devices)
        weights = os.path.join(directory, hf.WEIGHTS)
    else:
        directory, source = bert_lib.model_dir(name_or_dir, quiet), {"model": name_or_dir}
        bert, vocab = bert_lib.load_pretrained(directory, devices, dropout)
        weights = os.path.join(directory, "pretrained.params")
        if max_len is not None and max_len > bert.config.max_len:
            raise UserError(f"--max-len {max_len}: {name_or_dir}'s position table has {bert.config.max_len} "
                            f"positions; expected {MIN_MAX_LEN} to {bert.config.max_len}.")
        net = BERTClassifier(bert, pooling=pooling)
        net.output.initialize(init.Xavier(), ctx=devices)
    # The weights' SHA-1 says which checkpoint it is, whatever path or name led to it: what `nli soup` compares
    net.pretrained = {**source, "weights_sha1": fileio.sha1_of(weights)}
    net.hybridize(static_alloc=True)
    return net, vocab


def save_run(run_dir, net, vocab, settings):
    """Write what rebuilds the classifier into `run_dir`: config.json (the network's BERT and pooling, what it was
    fine-tuned from, `settings`), the vocabulary, model.params."""
    os.makedirs(run_dir, exist_ok=True)
    wordpiece = isinstance(vocab, hf.WordPieceTokenizer)
    tokenizer = vocab.describe() if wordpiece else BOOK_TOKENIZER
    config = {"bert": dataclasses.asdict(net.bert_config), "tokenizer": tokenizer, "labels": list(LABELS),
              **settings, "pooling": net.pooling}
    if net.pretrained:  # the model as named, for a Hub model the commit it resolved to, and the weights' SHA-1
        config["pretrained"] = net.pretrained
    fileio.write_json(os.path.join(run_dir, "config.json"), config)
    fileio.write_atomically(os.path.join(run_dir, tokenizer["vocab"]),
                            vocab.save if wordpiece else lambda path: bert_lib.save_vocab(vocab, path))
    fileio.write_atomically(os.path.join(run_dir, "model.params"), net.save_parameters)


def load_run(run_dir, devices):
    """The fine-tuned classifier of a run dir and its tokenizer's vocabulary: (net, vocab, config)."""
    for name in ("config.json", "model.params"):
        if not os.path.exists(os.path.join(run_dir, name)):
            raise UserError(f"{run_dir} is not a finished run: {name} is missing.")
    with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    vocab = load_tokenizer(run_dir, config)
    bert = bert_lib.BERTModel(**{**config["bert"], "dropout": 0.0})
    net = BERTClassifier(bert, pooling=config.get("pooling", "cls"))  # runs older than --pooling: cls
    params = os.path.join(run_dir, "model.params")
    bert_lib.check_params_file(net, params)
    net.load_parameters(params, ctx=devices)
    net.hybridize(static_alloc=True)
    return net, vocab, config


def vocab_file(config):
    """The name of a run's vocabulary file in its directory, as its config.json says (runs that do not: the book's)."""
    return config.get("tokenizer", BOOK_TOKENIZER)["vocab"]


def load_tokenizer(run_dir, config):
    """The tokenizer's vocabulary of a run dir, as its config.json describes it."""
    tokenizer = config.get("tokenizer", BOOK_TOKENIZER)
    vocab_path = os.path.join(run_dir, tokenizer["vocab"])
    if not os.path.exists(vocab_path):
        raise UserError(f"{run_dir} is not a finished run: {tokenizer['vocab']} is missing.")
    if tokenizer["kind"] == "wordpiece":
        return hf.WordPieceTokenizer(vocab_path, tokenizer["lowercase"])
    if tokenizer["kind"] == BOOK_TOKENIZER["kind"]:
        return bert_lib.load_vocab(vocab_path)
    raise UserError(f"{run_dir}/config.json: tokenizer kind {tokenizer['kind']!r} is not known.")

