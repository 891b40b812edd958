"""The book's BERT (parameter layout of `d2l.BERTModel`), hybridizable, and loading pretrained files."""
import collections
import dataclasses
import difflib
import json
import math
import os

import mxnet as mx
from mxnet import autograd, np, npx
from mxnet.gluon import nn

from . import hub
from .errors import UserError, first_line

npx.set_np()

PRESETS = {  # the book's pretrained models, as the chapter builds them
    "bert.small": dict(num_hiddens=256, ffn_num_hiddens=512, num_heads=4, num_blks=2, dropout=0.1,
                       max_len=512),
    "bert.base": dict(num_hiddens=768, ffn_num_hiddens=3072, num_heads=12, num_blks=12, dropout=0.1,
                      max_len=512),
}
HF_FILES = ("config.json", "vocab.txt", "model.safetensors")  # a Hugging Face checkpoint (nli/hf.py)


@dataclasses.dataclass
class BERTConfig:
    """The sizes that fix a BERT's parameter shapes, and its dropout."""
    vocab_size: int
    num_hiddens: int
    ffn_num_hiddens: int
    num_heads: int
    num_blks: int
    dropout: float = 0.1
    max_len: int = 512
    # What Google's BERT (and so every Hugging Face checkpoint) has and the book's model lacks;
    # the defaults are the book's, so `d2l.BERTModel` files keep their exact parameter layout.
    activation: str = "relu"  # of the feed-forward network: the book's relu, or BERT's gelu
    embedding_norm: bool = False  # LayerNorm and dropout on the summed embeddings
    norm_eps: float = 1e-5  # every LayerNorm's epsilon: MXNet's default, 1e-12 in BERT
    pretraining_heads: bool = True  # the book's MaskLM and NextSentencePred blocks


class MultiHeadAttention(nn.HybridBlock):
    """Scaled dot-product attention over `num_heads` heads, masked beyond each sequence's valid length."""

    def __init__(self, num_hiddens, num_heads, dropout, use_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.scale = math.sqrt(num_hiddens // num_heads)
        self.attention_dropout = nn.Dropout(dropout)
        dense = dict(use_bias=use_bias, flatten=False, in_units=num_hiddens)
        self.W_q = nn.Dense(num_hiddens, **dense)
        self.W_k = nn.Dense(num_hiddens, **dense)
        self.W_v = nn.Dense(num_hiddens, **dense)
        self.W_o = nn.Dense(num_hiddens, **dense)
        # A list while `nli.attention` traces a graph that also returns the weights; None otherwise, so the
        # graph that predicts and trains is built without them and costs nothing more.
        self.weights_sink = None

    def _split_heads(self, F, X):
        # (batch, steps, hiddens) -> (batch * heads, steps, hiddens / heads)
        X = legacy(F, "transpose", F.npx.reshape(X, (-2, -2, self.num_heads, -1)), axes=(0, 2, 1, 3))
        return F.npx.reshape(X, (-5, -2, -2))

    def _merge_heads(self, F, X):
        # (batch * heads, steps, hiddens / heads) -> (batch, steps, hiddens)
        X = legacy(F, "transpose", F.npx.reshape(X, (-6, -1, self.num_heads, -2, -2)), axes=(0, 2, 1, 3))
        return F.npx.reshape(X, (-2, -2, -1))

    def hybrid_forward(self, F, X, key_bias):
        """Attention of `X`'s positions to each other; `key_bias` (`attention_bias`) masks the padding."""
        queries = self._split_heads(F, self.W_q(X))
        keys = self._split_heads(F, self.W_k(X))
        values = self._split_heads(F, self.W_v(X))
        scores = legacy(F, "elemwise_add", F.npx.batch_dot(queries, keys, transpose_b=True) / self.scale, key_bias)
        weights = F.npx.softmax(scores, axis=-1)
        if self.weights_sink is not None:
            self.weights_sink.append(weights)
        weights = self.attention_dropout(weights)
        return self.W_o(self._merge_heads(F, F.npx.batch_dot(weights, values)))


def attention_bias(F, tokens, valid_lens, num_heads):
    """What attention adds to its scores, (batch * heads, steps, steps): 0, and -1e30 for the keys at or past each
    sequence's valid length, whose weights the softmax then makes exactly 0 (the book's masked_softmax). Built once
    for all layers, it lets them run MXNet's plain softmax, 6x faster on the CPU than its softmax over lengths."""
    keys = F.npx.arange_like(tokens, axis=1).astype("float32")
    lens = F.np.repeat(valid_lens, num_heads, axis=0).reshape(-1, 1, 1)
    bias = (F.np.less(keys.reshape(1, 1, -1), lens).astype("float32") - 1) * 1e30  # (batch * heads, 1, steps)
    return bias + F.np.zeros_like(keys).reshape(1, -1, 1)  # the same for every query


def legacy(F, operator, *arrays, **options):
    """MXNet's legacy `operator` (of mx.nd or mx.sym) on numpy arrays, where it is the faster kernel on the CPU
    (bench/bench_profile.py): an elementwise operator's backward is elementwise, where numpy's takes the broadcasting
    backward, a reduction, whatever the shapes; a slice's backward copies, where `take`'s scatters; its transpose
    runs 3-4x faster than numpy's, forward and backward."""
    module = mx.sym if F is mx.sym else mx.nd
    return getattr(module, operator)(*(a.as_nd_ndarray() for a in arrays), **options).as_np_ndarray()


class GraphPerMode(nn.HybridBlock):
    """A hybridized block that keeps one cached graph for training and one for inference, since blocks inside it
    (`LayerNorm`) are built differently for each, as `autograd.is_training()` says when the graph is traced."""

    CACHE = ("_cached_graph", "_cached_op", "_cached_op_args", "_in_format", "_out_format")

    def _call_cached_op(self, *args):
        training, cached = autograd.is_training(), self.__dict__.setdefault("_graphs_by_mode", {})
        if self.__dict__.get("_graph_mode", training) != training:  # put the other mode's graph aside
            cached[not training] = tuple(getattr(self, name) for name in self.CACHE)
            for name, value in zip(self.CACHE, cached.pop(training, ((), None, [], None, None))):
                setattr(self, name, value)
        self._graph_mode = training
        return super()._call_cached_op(*args)

    def _clear_cached_op(self):
        super()._clear_cached_op()
        self.__dict__.get("_graphs_by_mode", {}).clear()


class LayerNorm(nn.HybridBlock):
    """Layer normalization over the last axis, with `nn.LayerNorm`'s parameters (gamma, beta). Inference runs
    MXNet's LayerNorm. Training computes the same from matrix products instead: the means over the hidden axis and
    their spreading back over it, through oneDNN; MXNet 1.9.1's LayerNorm backward takes those reductions through
    its generic kernels, about twice as slowly (bench/bench_profile.py). Its blocks must be `GraphPerMode`."""

    def __init__(self, num_hiddens, epsilon=1e-5):
        super().__init__()
        self.num_hiddens, self.epsilon = num_hiddens, epsilon
        self.gamma = self.params.get("gamma", shape=(num_hiddens,), init="ones")
        self.beta = self.params.get("beta", shape=(num_hiddens,), init="zeros")

    def hybrid_forward(self, F, X, gamma, beta):
        if not autograd.is_training():
            return F.npx.layer_norm(X, gamma, beta, axis=-1, eps=self.epsilon)
        hiddens, device = self.num_hiddens, {} if F is mx.sym else {"ctx": X.ctx}

        def product(A, weight, units):  # A @ weight.T over the last axis
            return F.npx.fully_connected(A, weight, None, num_hidden=units, no_bias=True, flatten=False)

        mean_weights = F.np.full((1, hiddens), 1 / hiddens, **device)  # (..., hiddens) -> its mean, (..., 1)
        spread = F.np.ones((hiddens, 1), **device)  # (..., 1) -> the same value at each hidden unit
        centered = legacy(F, "elemwise_sub", X, product(product(X, mean_weights, 1), spread, hiddens))
        inverse_std = (product(F.np.square(centered), mean_weights, 1) + self.epsilon) ** -0.5
        scaled = legacy(F, "elemwise_mul", centered, product(inverse_std, gamma.reshape(hiddens, 1), hiddens))
        shift = product(F.np.ones_like(inverse_std), beta.reshape(hiddens, 1), hiddens)
        return legacy(F, "elemwise_add", scaled, shift)


class AddNorm(nn.HybridBlock):
    """Residual connection followed by layer normalization."""

    def __init__(self, num_hiddens, dropout, norm_eps=1e-5):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.ln = LayerNorm(num_hiddens, norm_eps)

    def hybrid_forward(self, F, X, Y):
        return self.ln(legacy(F, "elemwise_add", self.dropout(Y), X))


ACTIVATIONS = {"relu": lambda: nn.Activation("relu"), "gelu": nn.GELU}  # GELU: the exact (erf) form


class PositionWiseFFN(nn.HybridBlock):
    """The two-layer feed-forward network applied at every position."""

    def __init__(self, ffn_num_hiddens, num_hiddens, activation="relu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"Feed-forward activation {activation!r} is not supported "
                            f"(supported: {', '.join(ACTIVATIONS)}).")
        self.dense1 = nn.Dense(ffn_num_hiddens, flatten=False, in_units=num_hiddens)
        self.activation = ACTIVATIONS[activation]()
        self.dense2 = nn.Dense(num_hiddens, flatten=False, in_units=ffn_num_hiddens)

    def hybrid_forward(self, F, X):
        return self.dense2(self.activation(self.dense1(X)))


class TransformerEncoderBlock(nn.HybridBlock):
    """Self-attention and feed-forward, each wrapped in AddNorm."""

    def __init__(self, num_hiddens, ffn_num_hiddens, num_heads, dropout, activation="relu",
                 norm_eps=1e-5):
        super().__init__()
        self.attention = MultiHeadAttention(num_hiddens, num_heads, dropout)
        self.addnorm1 = AddNorm(num_hiddens, dropout, norm_eps)
        self.ffn = PositionWiseFFN(ffn_num_hiddens, num_hiddens, activation)
        self.addnorm2 = AddNorm(num_hiddens, dropout, norm_eps)

    def hybrid_forward(self, F, X, key_bias):
        Y = self.addnorm1(X, self.attention(X, key_bias))
        return self.addnorm2(Y, self.ffn(Y))


class BERTEncoder(GraphPerMode):
    """Token + segment + learned position embeddings, then a stack of Transformer encoder blocks."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=512, activation="relu", embedding_norm=False, norm_eps=1e-5):
        super().__init__()
        self.num_hiddens, self.num_heads = num_hiddens, num_heads
        self.token_embedding = nn.Embedding(vocab_size, num_hiddens)
        self.segment_embedding = nn.Embedding(2, num_hiddens)
        self.embedding_norm = None
        if embedding_norm:
            self.embedding_norm = LayerNorm(num_hiddens, norm_eps)
            self.embedding_dropout = nn.Dropout(dropout)
        self.blks = nn.HybridSequential()
        for _ in range(num_blks):
            self.blks.add(TransformerEncoderBlock(num_hiddens, ffn_num_hiddens, num_heads, dropout,
                                                  activation, norm_eps))
        self.pos_embedding = self.params.get("pos_embedding", shape=(1, max_len, num_hiddens))

    def hybrid_forward(self, F, tokens, segments, valid_lens, pos_embedding):
        X = legacy(F, "elemwise_add", self.token_embedding(tokens), self.segment_embedding(segments))
        positions = legacy(F, "slice_like", pos_embedding, tokens, axes=(1,))  # the first `steps` of them
        # The positions' rows repeated over the batch as a product with a column of ones: their gradient, the sum
        # over the batch, is then a matrix product too rather than MXNet's reduction (2x faster at bert.small's).
        ones = F.npx.reshape(F.np.ones_like(X[:, :1, :1]), (-2, -1))  # (batch, 1), of X's type
        repeated = F.npx.reshape(F.np.dot(ones, F.npx.reshape(positions, (1, -1))), (-2, -1, self.num_hiddens))
        X = legacy(F, "elemwise_add", X, repeated)
        if self.embedding_norm is not None:
            X = self.embedding_dropout(self.embedding_norm(X))
        key_bias = attention_bias(F, tokens, valid_lens, self.num_heads)
        for blk in self.blks:
            X = blk(X, key_bias)
        return X


class MaskLM(nn.Block):
    """The masked language model head (kept so pretrained files load unchanged)."""

    def __init__(self, vocab_size, num_hiddens):
        super().__init__()
        self.mlp = nn.Sequential()
        self.mlp.add(nn.Dense(num_hiddens, flatten=False, activation="relu", in_units=num_hiddens))
        self.mlp.add(nn.LayerNorm(in_channels=num_hiddens))
        self.mlp.add(nn.Dense(vocab_size, flatten=False, in_units=num_hiddens))

    def forward(self, X, pred_positions):
        batch_size, num_pred = pred_positions.shape
        batch_idx = np.repeat(np.arange(0, batch_size), num_pred)
        masked_X = X[batch_idx, pred_positions.reshape(-1)].reshape((batch_size, num_pred, -1))
        return self.mlp(masked_X)


class NextSentencePred(nn.Block):
    """The next sentence prediction head (kept so pretrained files load unchanged)."""

    def __init__(self, num_hiddens):
        super().__init__()
        self.output = nn.Dense(2, in_units=num_hiddens)

    def forward(self, X):
        return self.output(X)


class BERTModel(nn.Block):
    """BERT as `d2l.BERTModel` builds it: encoder, `<cls>` hidden layer (BERT's pooler), MLM and NSP heads."""

    def __init__(self, vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks, dropout,
                 max_len=512, activation="relu", embedding_norm=False, norm_eps=1e-5,
                 pretraining_heads=True):
        super().__init__()
        self.config = BERTConfig(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks,
                                 dropout, max_len, activation, embedding_norm, norm_eps, pretraining_heads)
        self.encoder = BERTEncoder(vocab_size, num_hiddens, ffn_num_hiddens, num_heads, num_blks,
                                   dropout, max_len, activation, embedding_norm, norm_eps)
        self.hidden = nn.Dense(num_hiddens, activation="tanh", in_units=num_hiddens)
        self.mlm = self.nsp = None
        if pretraining_heads:
            self.mlm = MaskLM(vocab_size, num_hiddens)
            self.nsp = NextSentencePred(num_hiddens)

    def forward(self, tokens, segments, valid_lens=None, pred_positions=None):
        """(encodings, MLM logits or None, NSP logits or None when the model has no pretraining heads)."""
        if valid_lens is None:
            valid_lens = np.full((tokens.shape[0],), tokens.shape[1], ctx=tokens.ctx)
        encoded_X = self.encoder(tokens, segments, valid_lens)
        if self.nsp is None:
            return encoded_X, None, None
        mlm_Y_hat = None if pred_positions is None else self.mlm(encoded_X, pred_positions)
        nsp_Y_hat = self.nsp(self.hidden(encoded_X[:, 0, :]))
        return encoded_X, mlm_Y_hat, nsp_Y_hat


class Vocab:
    """The book's vocabulary (`d2l.Vocab`, d2l 1.0.3): tokens sorted, `<unk>` for unknown ones.

    Written here so the package runs where d2l cannot be installed (Python 3.12+, whose numpy d2l's
    pins refuse); the ids are the book's, so the book's `vocab.json` files load to the same ids.
    """

    def __init__(self, tokens=(), min_freq=0, reserved_tokens=()):
        counts = collections.Counter(tokens)
        kept = {token for token, count in counts.items() if count >= min_freq}
        self.idx_to_token = sorted(kept | {"<unk>", *reserved_tokens})
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, tokens):
        """The id of a token, or the ids of a list or tuple of tokens; unknown tokens get `unk`."""
        if isinstance(tokens, (list, tuple)):
            return [self.token_to_idx.get(token, self.unk) for token in tokens]
        return self.token_to_idx.get(tokens, self.unk)

    def to_tokens(self, indices):
        """The tokens of a list of ids, or the token of one id."""
        if hasattr(indices, "__len__"):
            return [self.idx_to_token[int(i)] for i in indices]
        return self.idx_to_token[int(indices)]

    @property
    def unk(self):
        return self.token_to_idx["<unk>"]


def load_vocab(path):
    """The vocabulary stored in a `vocab.json` (a list of tokens, index = position), as the book loads it."""
    try:
        with open(path, encoding="utf-8") as f:
            idx_to_token = json.load(f)
    except FileNotFoundError:
        raise UserError(f"Missing vocabulary file {path}.") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not a JSON list of tokens ({e}).") from None
    if not isinstance(idx_to_token, list) or not all(isinstance(t, str) for t in idx_to_token):
        raise UserError(f"{path} must hold a JSON list of token strings.")
    if "<unk>" not in idx_to_token:
        raise UserError(f"{path} has no '<unk>' token, which every d2l vocabulary has.")
    vocab = Vocab()
    vocab.idx_to_token = idx_to_token
    vocab.token_to_idx = {token: idx for idx, token in enumerate(idx_to_token)}
    return vocab


def save_vocab(vocab, path):
    """Write `vocab` as the book's `vocab.json`."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(vocab.idx_to_token, f, ensure_ascii=False)


def read_params_file(path):
    """The arrays of MXNet parameter file `path`, by name without Gluon's "arg:"/"aux:" prefix."""
    try:
        return {name.split(":", 1)[-1]: array for name, array in mx.nd.load(path).items()}
    except mx.MXNetError as e:
        raise UserError(f"{path} is not an MXNet parameter file ({first_line(e)}).") from None


def check_params_file(block, path, loaded=None):
    """Fail naming the parameter when the file's names or shapes (its arrays `loaded`, if read already) differ from
    `block`'s."""
    expected = {name: p.shape for name, p in block._collect_params_with_prefix().items()}
    found = {name: array.shape for name, array in (loaded or read_params_file(path)).items()}
    for name, shape in expected.items():
        if name not in found:
            raise UserError(f"{path} has no parameter {name!r} (expected shape {shape}).")
        if tuple(found[name]) != tuple(shape):
            raise UserError(f"{path}: parameter {name!r} has shape {tuple(found[name])}, "
                            f"expected {tuple(shape)} from the model's config.")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise UserError(f"{path} has parameters the model does not: {', '.join(extra[:5])}.")


def model_dir(name_or_dir, quiet=False):
    """The directory of a pretrained model: `name_or_dir` itself, or a registry entry downloaded (`quiet`: without
    a progress bar)."""
    if os.path.isdir(name_or_dir):
        hf_files = [f for f in HF_FILES if os.path.exists(os.path.join(name_or_dir, f))]
        if not os.path.exists(os.path.join(name_or_dir, "vocab.json")) and (
                "model.safetensors" in hf_files or {"config.json", "vocab.txt"} <= set(hf_files)):
            raise UserError(f"{name_or_dir} holds a Hugging Face checkpoint ({', '.join(hf_files)}), not the "
                            f"book's vocab.json and pretrained.params: name it hf:{name_or_dir} "
                            f"(--model hf:{name_or_dir}).")
        return name_or_dir
    if name_or_dir in hub.registry():
        return hub.download_extract(name_or_dir, quiet=quiet)
    close = difflib.get_close_matches(name_or_dir, hub.registry(), n=1)
    raise UserError(f"{name_or_dir!r} is neither a model directory nor a known model name "
                    f"(known: {', '.join(sorted(PRESETS))})" + (f"; did you mean {close[0]}?" if close else
                                                                 "; a Hugging Face BERT is named hf:DIR, or hf:ORG/NAME "
                                                                 "to take it from the Hub (as in "
                                                                 "hf:sentence-transformers/all-MiniLM-L6-v2)."))


def read_config(directory, vocab_size):
    """The model's config: `config.json` in `directory`, else the preset its name gives."""
    path = os.path.join(directory, "config.json")
    name = os.path.basename(os.path.normpath(directory))
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            fields = json.load(f)
        fields = {k: fields[k] for k in BERTConfig.__dataclass_fields__ if k in fields}
    elif name in PRESETS:
        fields = dict(PRESETS[name])
    else:
        raise UserError(f"{directory} has no config.json and {name!r} is not a preset "
                        f"({', '.join(sorted(PRESETS))}); add a config.json with the model's sizes.")
    if fields.setdefault("vocab_size", vocab_size) != vocab_size:
        raise UserError(f"{path} says vocab_size {fields['vocab_size']} but vocab.json has "
                        f"{vocab_size} tokens.")
    try:
        return BERTConfig(**fields)
    except TypeError as e:
        raise UserError(f"{path} lacks a field the model needs ({e}).") from None


def load_pretrained(name_or_dir, devices, dropout=None):
    """Load `vocab.json` + `pretrained.params` (book's name or a directory) onto `devices`: (bert, vocab).

    Book: `load_pretrained_model`."""
    directory = model_dir(name_or_dir)
    vocab = load_vocab(os.path.join(directory, "vocab.json"))
    config = read_config(directory, len(vocab))
    if dropout is not None:
        config.dropout = dropout
    bert = BERTModel(**dataclasses.asdict(config))
    params = os.path.join(directory, "pretrained.params")
    if not os.path.exists(params):
        raise UserError(f"Missing parameter file {params}.")
    check_params_file(bert, params)
    bert.load_parameters(params, ctx=devices)
    return bert, vocab
