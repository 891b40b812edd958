"""Importing Hugging Face BERT checkpoints (config.json, vocab.txt, model.safetensors) into the Gluon BERT,
from a directory or, by name, from the Hugging Face Hub through the cache transformers shares."""
import hashlib
import json
import os
import re
import shutil
import sys

import mxnet as mx
import numpy as onp
import safetensors
import safetensors.numpy
import tokenizers

from .bert import ACTIVATIONS, BERTConfig, BERTModel
from .errors import UserError, first_line
from .snli import ragged

PREFIX = "hf:"  # `--model hf:DIR` names a Hugging Face checkpoint directory, `hf:ORG/NAME` a model on the Hub
WEIGHTS = "model.safetensors"
NEEDED_FILES = ("config.json", "vocab.txt", WEIGHTS)
HUB_FILES = NEEDED_FILES + ("tokenizer_config.json",)  # all nli reads of a Hub model; the lower-casing is optional
# A Hub model: [ORG/]NAME as the Hub spells repo ids, then @REVISION (a branch, tag or commit) if pinned.
HUB_NAME = re.compile(r"(?P<repo>(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[^@\s]+))?")
# Tensors a classifier does not use: a position-id buffer, the pretraining heads, a previous task's head.
IGNORED_PREFIXES = ("embeddings.position_ids", "cls.", "classifier.")
BOOK_NAMES = {"<pad>": "[PAD]", "<unk>": "[UNK]", "<cls>": "[CLS]", "<sep>": "[SEP]", "<mask>": "[MASK]"}
POSITIONS = "embeddings.position_embeddings.weight"
INITIALIZER_RANGE = 0.02  # the std of new weights, as Hugging Face initializes BERT's


def locate(name, quiet=False):
    """The checkpoint directory `hf:NAME` names, and what a run records of it: (directory, source).

    An existing directory wins. Otherwise NAME is a model on the Hugging Face Hub, [ORG/]NAME[@REVISION], taken
    from the Hugging Face cache and downloaded into it first when it is not there (see `from_hub`).
    """
    if os.path.isdir(name):
        return name, {"model": PREFIX + name}
    match = HUB_NAME.fullmatch(name)
    if match is None or "--" in match["repo"] or ".." in match["repo"]:  # the Hub allows neither in a name
        raise UserError(f"{PREFIX}{name}: there is no such directory, and it is not the name of a Hugging Face "
                        f"model either (ORG/NAME or ORG/NAME@REVISION, as hf:sentence-transformers/all-MiniLM-L6-v2).")
    directory = from_hub(match["repo"], match["revision"], quiet)
    return directory, {"model": PREFIX + name, "repo": match["repo"], "revision": match["revision"] or "main",
                       "commit": os.path.basename(directory)}  # the cache names a snapshot by its commit


def pinned(name, record):
    """The model to load for a run that started from `name` and recorded `record` (`locate`'s source): for a Hub
    model, the commit it resolved to then, since its branch may have moved on."""
    return f"{PREFIX}{record['repo']}@{record['commit']}" if record and "commit" in record else name


def from_hub(repo, revision=None, quiet=False):
    """The snapshot directory of Hub model `repo` at `revision` (default: main) in the Hugging Face cache, with
    the files nli reads downloaded into it unless they are there (`quiet`: without progress bars).

    huggingface_hub reads HF_ENDPOINT, HF_HOME / HF_HUB_CACHE and HF_HUB_OFFLINE when it is first imported, and
    HF_TOKEN on each request; it is imported here, on first use, so a notebook may set them before.
    """
    import huggingface_hub
    from huggingface_hub import constants, errors
    from huggingface_hub import utils as hf_utils
    name = PREFIX + repo + (f"@{revision}" if revision else "")
    offline = huggingface_hub.is_offline_mode()
    cache = f"the Hugging Face cache (HF_HUB_CACHE={constants.HF_HUB_CACHE})"
    silenced = quiet and not hf_utils.are_progress_bars_disabled()
    try:
        if silenced:
            hf_utils.disable_progress_bars()
        directory = huggingface_hub.snapshot_download(repo, revision=revision, allow_patterns=list(HUB_FILES),
                                                      local_files_only=offline)
    except errors.IncompleteSnapshotError as e:
        why = "HF_HUB_OFFLINE=1 forbids downloading" if offline else f"{constants.ENDPOINT} could not be reached for"
        raise UserError(f"The copy of {name} in {e.snapshot_path} lacks files and {why} the rest: run once online "
                        f"to complete it.") from None
    except errors.LocalEntryNotFoundError as e:
        if offline:
            raise UserError(f"{name} is not a directory here, nor in {cache}, and HF_HUB_OFFLINE=1 forbids "
                            f"downloading it: run once online, set HF_HUB_CACHE to a cache that holds it, or give "
                            f"its files as hf:DIR.") from None
        cause = e.__cause__ or e
        problem = (f"{constants.ENDPOINT} answered {_http_answer(cause)}" if isinstance(cause, errors.HfHubHTTPError)
                   else f"{constants.ENDPOINT} could not be reached ({first_line(cause)})")
        raise UserError(f"Could not download {name}: {problem}, and the model is not in {cache}; check the "
                        f"connection and HF_ENDPOINT, or give its files as hf:DIR.") from None
    except errors.GatedRepoError:
        raise UserError(f"{name} is gated on {constants.ENDPOINT}: accept its conditions on the model's page, then "
                        f"set HF_TOKEN to a token of that account.") from None
    except errors.RepositoryNotFoundError as e:
        raise UserError(f"{name} is not a directory here, and {constants.ENDPOINT} has no model {repo} this machine "
                        f"may see (HTTP {e.response.status_code}): check the name, or for a private model set "
                        f"HF_TOKEN to a token with access.") from None
    except errors.RevisionNotFoundError:
        raise UserError(f"{constants.ENDPOINT} has the model {repo} but no revision {revision!r}: name a branch, "
                        f"tag or commit it has.") from None
    except errors.HfHubHTTPError as e:
        if e.response is not None and e.response.status_code == 401:
            raise UserError(f"{constants.ENDPOINT} refused the token for {name} (HTTP 401): set HF_TOKEN to a valid "
                            f"token, or unset it (and `hf auth logout`) for a public model.") from None
        raise UserError(f"Could not download {name}: {constants.ENDPOINT} answered {_http_answer(e)}.") from None
    except errors.HFValidationError as e:
        raise UserError(f"{name} is not a Hugging Face model name: {first_line(e)}") from None
    finally:
        if silenced:
            hf_utils.enable_progress_bars()
    missing = [f for f in NEEDED_FILES if not os.path.exists(os.path.join(directory, f))]
    if missing:
        where = (f"its copy in {directory}, and HF_HUB_OFFLINE=1 forbids fetching them" if offline
                 else f"commit {os.path.basename(directory)}")
        raise UserError(f"{name} has no {', '.join(missing)} at {where}; nli reads a BERT's config.json, vocab.txt "
                        f"and {WEIGHTS} (no PyTorch): choose a revision that has them, or convert the model and "
                        f"give it as hf:DIR.")
    return directory


def _http_answer(error):
    """"HTTP 500 Internal Server Error", say, of an error of huggingface_hub's that holds the server's answer."""
    response = getattr(error, "response", None)
    return f"HTTP {response.status_code} {response.reason_phrase}" if response is not None else first_line(error)


def read_config(directory):
    """The `BERTConfig` of a checkpoint's `config.json`, failing on what the Gluon BERT cannot build."""
    path = os.path.join(directory, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{directory} is not a Hugging Face checkpoint: config.json is missing.") from None
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno}).") from None
    checks = [("model_type", "bert"), ("position_embedding_type", "absolute"), ("type_vocab_size", 2)]
    for key, supported in checks:
        if hf.get(key, supported) != supported:
            raise UserError(f"{path}: {key} {hf[key]!r} is not supported (only {supported!r}).")
    if hf.get("hidden_act", "gelu") not in ACTIVATIONS:
        raise UserError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported "
                        f"(supported: {', '.join(ACTIVATIONS)}).")
    try:
        return BERTConfig(vocab_size=hf["vocab_size"], num_hiddens=hf["hidden_size"],
                          ffn_num_hiddens=hf["intermediate_size"], num_heads=hf["num_attention_heads"],
                          num_blks=hf["num_hidden_layers"], dropout=hf.get("hidden_dropout_prob", 0.1),
                          max_len=hf.get("max_position_embeddings", 512),
                          activation=hf.get("hidden_act", "gelu"), embedding_norm=True,
                          norm_eps=hf.get("layer_norm_eps", 1e-12), pretraining_heads=False)
    except KeyError as e:
        raise UserError(f"{path} lacks {e.args[0]!r}, which fixes the model's shapes.") from None


def tensor_names(num_blks):
    """Hugging Face tensor name -> Gluon parameter name, for every parameter of the encoder and pooler."""
    names = {"embeddings.word_embeddings.weight": "encoder.token_embedding.weight",
             "embeddings.token_type_embeddings.weight": "encoder.segment_embedding.weight",
             POSITIONS: "encoder.pos_embedding",
             "embeddings.LayerNorm.weight": "encoder.embedding_norm.gamma",
             "embeddings.LayerNorm.bias": "encoder.embedding_norm.beta",
             "pooler.dense.weight": "hidden.weight", "pooler.dense.bias": "hidden.bias"}
    layer = {"attention.self.query": "attention.W_q", "attention.self.key": "attention.W_k",
             "attention.self.value": "attention.W_v", "attention.output.dense": "attention.W_o",
             "intermediate.dense": "ffn.dense1", "output.dense": "ffn.dense2"}
    norms = {"attention.output.LayerNorm": "addnorm1.ln", "output.LayerNorm": "addnorm2.ln"}
    for i in range(num_blks):
        for hf, gluon in layer.items():  # Linear and Dense both store weights as (out, in)
            names[f"encoder.layer.{i}.{hf}.weight"] = f"encoder.blks.{i}.{gluon}.weight"
            names[f"encoder.layer.{i}.{hf}.bias"] = f"encoder.blks.{i}.{gluon}.bias"
        for hf, gluon in norms.items():
            names[f"encoder.layer.{i}.{hf}.weight"] = f"encoder.blks.{i}.{gluon}.gamma"
            names[f"encoder.layer.{i}.{hf}.bias"] = f"encoder.blks.{i}.{gluon}.beta"
    return names


def read_tensors(directory):
    """The checkpoint's tensors as float32 NumPy arrays, named as `BertModel` names them."""
    path = os.path.join(directory, WEIGHTS)
    if not os.path.exists(path):
        if os.path.exists(os.path.join(directory, "pytorch_model.bin")):
            raise UserError(
                f"{directory} has pytorch_model.bin but no {WEIGHTS}; nli reads safetensors only (no "
                f"PyTorch at run time). Convert it once where torch and transformers are installed: "
                f"python -c \"from transformers import AutoModel; "
                f"AutoModel.from_pretrained('{directory}').save_pretrained('{directory}')\"")
        raise UserError(f"{directory} has no {WEIGHTS}.")
    try:
        tensors = safetensors.numpy.load_file(path)
    except (safetensors.SafetensorError, OSError, ValueError, TypeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}).") from None
    renamed = {}
    for name, array in tensors.items():
        # BertFor* models nest the encoder under 'bert.'; checkpoints converted from TensorFlow
        # name LayerNorm's parameters gamma and beta.
        name = name.removeprefix("bert.").replace("LayerNorm.gamma", "LayerNorm.weight")
        name = name.replace("LayerNorm.beta", "LayerNorm.bias")
        if not name.startswith(IGNORED_PREFIXES):
            renamed[name] = array.astype(onp.float32, copy=False)
    return renamed


def extend_positions(table, max_len, std):
    """A position table of `max_len` rows: the checkpoint's rows unchanged, the rest drawn from N(0, std)."""
    extra = onp.random.normal(0.0, std, (max_len - len(table), table.shape[1])).astype(onp.float32)
    return onp.concatenate([table, extra])


def load(directory, devices=(mx.cpu(),), dropout=None, max_len=None):
    """Load a Hugging Face BERT checkpoint onto `devices`: (bert, WordPiece tokenizer).

    `max_len` above the checkpoint's position table grows it: the first rows are the checkpoint's,
    the others newly initialized, as practitioners do to lift BERT's 512-token limit.
    """
    config = read_config(directory)
    tokenizer = WordPieceTokenizer.from_checkpoint(directory)
    if len(tokenizer) > config.vocab_size:
        raise UserError(f"{directory}: vocab.txt has {len(tokenizer)} tokens but config.json's "
                        f"vocab_size is {config.vocab_size}.")
    tensors = read_tensors(directory)
    checkpoint_len = config.max_len
    config.max_len = max(checkpoint_len, max_len or 0)
    if dropout is not None:
        config.dropout = dropout
    bert = BERTModel(**vars(config))
    params = bert._collect_params_with_prefix()
    names = tensor_names(config.num_blks)
    shapes = {hf_name: params[gluon_name].shape for hf_name, gluon_name in names.items()}
    shapes[POSITIONS] = (checkpoint_len, config.num_hiddens)  # Gluon's table is (1, max_len, hiddens)
    _check_tensors(os.path.join(directory, WEIGHTS), tensors, shapes)
    if config.max_len > checkpoint_len:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            std = json.load(f).get("initializer_range", INITIALIZER_RANGE)
        tensors[POSITIONS] = extend_positions(tensors[POSITIONS], config.max_len, std)
        print(f"warning: --max-len {config.max_len} grows {directory}'s position table from {checkpoint_len} to "
              f"{config.max_len} positions: the new {config.max_len - checkpoint_len} rows are untrained "
              f"({(config.max_len - checkpoint_len) * config.num_hiddens * 4 / 2**20:.1f} MB more weights).",
              file=sys.stderr, flush=True)
    for hf_name, gluon_name in names.items():
        param = params[gluon_name]
        param.initialize(init=mx.init.Zero(), ctx=list(devices))
        param.set_data(mx.np.array(tensors[hf_name].reshape(param.shape)))
    return bert, tokenizer


def _check_tensors(path, tensors, shapes):
    """Fail naming the tensor when one is missing, unexpected, or shaped unlike config.json says."""
    for name, shape in shapes.items():
        if name not in tensors:
            raise UserError(f"{path} has no tensor {name!r}, which config.json's model needs.")
        if tuple(tensors[name].shape) != tuple(shape):
            raise UserError(f"{path}: tensor {name!r} has shape {tuple(tensors[name].shape)}, "
                            f"but config.json gives {tuple(shape)}.")
    unexpected = sorted(set(tensors) - set(shapes))
    if unexpected:
        raise UserError(f"{path} has tensors a BERT with this config.json does not: "
                        f"{', '.join(unexpected[:5])}{' ...' if len(unexpected) > 5 else ''}.")


class WordPieceTokenizer:
    """BERT's WordPiece tokenizer, built by the `tokenizers` library from a checkpoint's `vocab.txt`.

    It answers as the book's `d2l.Vocab` does (`vocab[token]`, `vocab.unk`, `token_to_idx`, `len`), with the
    book's names of the special tokens ('<pad>', '<cls>', ...) as aliases of BERT's ('[PAD]', '[CLS]', ...),
    so code written for the book's vocabulary runs unchanged; `sentence_ids` does the tokenizing.
    """

    kind = "wordpiece"
    vocab_file = "vocab.txt"

    def __init__(self, vocab_path, lowercase=True):
        self.vocab_path, self.lowercase = vocab_path, lowercase
        try:
            with open(vocab_path, encoding="utf-8") as f:
                self.idx_to_token = f.read().splitlines()
        except FileNotFoundError:
            raise UserError(f"Missing vocabulary file {vocab_path}.") from None
        self.token_to_idx = {token: idx for idx, token in enumerate(self.idx_to_token)}
        missing = [t for t in BOOK_NAMES.values() if t not in self.token_to_idx]
        if missing:
            raise UserError(f"{vocab_path} lacks BERT's special token(s) {', '.join(missing)}.")
        self.token_to_idx.update({book: self.token_to_idx[bert] for book, bert in BOOK_NAMES.items()})
        self._tokenizer = tokenizers.BertWordPieceTokenizer(vocab_path, lowercase=lowercase)
        with open(vocab_path, "rb") as f:
            digest = hashlib.sha1(f.read()).hexdigest()[:16]
        # Identifies the tokenization (vocabulary and lower-casing), e.g. for cache keys.
        self.fingerprint = f"wordpiece:{digest}:{'uncased' if lowercase else 'cased'}"

    @classmethod
    def from_checkpoint(cls, directory):
        """The tokenizer of a checkpoint: its `vocab.txt`, lower-casing as `tokenizer_config.json` says."""
        lowercase = True  # BertTokenizer's default, for checkpoints without a tokenizer_config.json
        path = os.path.join(directory, "tokenizer_config.json")
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                lowercase = json.load(f).get("do_lower_case", lowercase)
        return cls(os.path.join(directory, cls.vocab_file), lowercase)

    def __len__(self):
        return len(self.idx_to_token)

    def __getitem__(self, token):
        return self.token_to_idx.get(token, self.unk)

    @property
    def unk(self):
        return self.token_to_idx["[UNK]"]

    def sentence_ids(self, sentences):
        """(flat ids, lengths) of the WordPiece ids of `sentences`, without special tokens (see `snli.ragged`)."""
        return ragged([e.ids for e in self._tokenizer.encode_batch(list(sentences), add_special_tokens=False)])

    def tokens(self, sentence):
        """The word pieces of one sentence, as strings."""
        return self._tokenizer.encode(sentence, add_special_tokens=False).tokens

    def describe(self):
        """What a run's config.json records to rebuild this tokenizer."""
        return {"kind": self.kind, "vocab": self.vocab_file, "lowercase": self.lowercase}

    def save(self, path):
        """Write the vocabulary (`vocab.txt`) to `path`."""
        shutil.copyfile(self.vocab_path, path)
