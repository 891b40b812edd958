"""Exporting a fine-tuned run to ONNX, optionally int8, and predicting with it through ONNX Runtime.

The graph is written directly from the Gluon parameters with standard ONNX operators (opset 17's
LayerNormalization and the rest), so ONNX Runtime, in any of its languages, runs the classifier
without MXNet. It computes what `model.BERTClassifier` does, dropout aside (inference): embeddings,
Transformer blocks whose attention ignores keys at or past each pair's valid length (here an
additive mask of -1e9 before the softmax, which leaves those keys a weight of exactly 0, as MXNet's
length-aware softmax does), then the `<cls>` hidden layer and the output layer.
"""
import json
import math
import os
import shutil

import numpy as onp

from . import __version__, data, evaluate, rundir
from . import model as model_lib
from .errors import UserError
from .snli import LABELS

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # predicting needs only onnxruntime; see `require_onnx`
    onnx = None

MODEL_FILE = "model.onnx"
OPSET = 17  # the first opset with LayerNormalization
INPUTS = ("tokens", "segments", "valid_lens")  # int64, as the book names them; shapes (batch, steps), (batch,)
OUTPUT = "logits"
MASKED_SCORE = -1e9  # added to the scores of padded keys: exp() of it is exactly 0 in float32


class GraphBuilder:
    """The nodes and weights of an ONNX graph under construction; each op returns its output's name."""

    def __init__(self):
        self.nodes, self.initializers, self.names = [], [], set()

    def constant(self, name, array):
        """Add `array` as a named initializer (a weight or a constant) unless the name is there; its name."""
        if name not in self.names:
            self.names.add(name)
            self.initializers.append(numpy_helper.from_array(onp.asarray(array), name))
        return name

    def op(self, op_type, *inputs, output=None, **attributes):
        """Add one node; its output is `output`, or named after the op and its position."""
        output = output or f"{op_type.lower()}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op_type, list(inputs), [output], **attributes))
        return output


def dense(g, params, prefix, X, output=None):
    """Gluon's `Dense` (weight stored (out, in)) as MatMul by the transposed weight, then the bias."""
    weight = g.constant(f"{prefix}.weight", params[f"{prefix}.weight"].T.copy())
    return g.op("Add", g.op("MatMul", X, weight), g.constant(f"{prefix}.bias", params[f"{prefix}.bias"]),
                output=output)


def layer_norm(g, params, prefix, X, eps):
    """Gluon's `LayerNorm` over the last axis."""
    return g.op("LayerNormalization", X, g.constant(f"{prefix}.gamma", params[f"{prefix}.gamma"]),
                g.constant(f"{prefix}.beta", params[f"{prefix}.beta"]), axis=-1, epsilon=eps)


def attention(g, params, prefix, X, mask, num_heads):
    """`bert.MultiHeadAttention`: heads as a (batch, heads, steps, head size) axis, `mask` added to the scores."""
    head_shape = g.constant(f"{prefix}.head_shape", onp.array([0, 0, num_heads, -1], dtype=onp.int64))

    def heads(name, perm):  # (batch, steps, hiddens) -> (batch, heads, steps, head size), or perm's order
        return g.op("Transpose", g.op("Reshape", dense(g, params, f"{prefix}.{name}", X), head_shape), perm=perm)

    queries, keys, values = heads("W_q", [0, 2, 1, 3]), heads("W_k", [0, 2, 3, 1]), heads("W_v", [0, 2, 1, 3])
    head_size = params[f"{prefix}.W_q.weight"].shape[0] // num_heads
    scale = g.constant(f"{prefix}.scale", onp.array(1 / math.sqrt(head_size), dtype=onp.float32))
    scores = g.op("Add", g.op("Mul", g.op("MatMul", queries, keys), scale), mask)
    weighted = g.op("MatMul", g.op("Softmax", scores, axis=-1), values)
    merged_shape = g.constant(f"{prefix}.merged_shape", onp.array([0, 0, -1], dtype=onp.int64))
    merged = g.op("Reshape", g.op("Transpose", weighted, perm=[0, 2, 1, 3]), merged_shape)
    return dense(g, params, f"{prefix}.W_o", merged)


def activation(g, X, name):
    """The feed-forward network's activation: the book's ReLU, or BERT's exact GELU, x * (1 + erf(x / √2)) / 2."""
    if name == "relu":
        return g.op("Relu", X)
    half = g.constant("gelu.half", onp.array(0.5, dtype=onp.float32))
    one = g.constant("gelu.one", onp.array(1.0, dtype=onp.float32))
    root2 = g.constant("gelu.sqrt2", onp.array(math.sqrt(2), dtype=onp.float32))
    erf = g.op("Erf", g.op("Div", X, root2))
    return g.op("Mul", g.op("Mul", X, half), g.op("Add", erf, one))


def encoder_block(g, params, prefix, X, mask, bert):
    """`bert.TransformerEncoderBlock`: attention and feed-forward, each followed by residual + LayerNorm."""
    Y = layer_norm(g, params, f"{prefix}.addnorm1.ln",
                   g.op("Add", X, attention(g, params, f"{prefix}.attention", X, mask, bert["num_heads"])),
                   bert["norm_eps"])
    hidden = activation(g, dense(g, params, f"{prefix}.ffn.dense1", Y), bert["activation"])
    return layer_norm(g, params, f"{prefix}.addnorm2.ln",
                      g.op("Add", Y, dense(g, params, f"{prefix}.ffn.dense2", hidden)), bert["norm_eps"])


def pooled(g, X, valid, pooling):
    """`BERTClassifier.pool`: (batch, hiddens) from X (batch, steps, hiddens), `<cls>`'s or the `valid` steps' mean."""
    if pooling == "cls":
        return g.op("Gather", X, g.constant("cls_position", onp.array(0, dtype=onp.int64)), axis=1)
    steps_axis = g.constant("steps_axis", onp.array([1], dtype=onp.int64))
    weights = g.op("Unsqueeze", g.op("Cast", valid, to=TensorProto.FLOAT),
                   g.constant("axes2", onp.array([2], dtype=onp.int64)))  # (batch, steps, 1): 1 on valid steps
    total = g.op("ReduceSum", g.op("Mul", X, weights), steps_axis, keepdims=0)
    return g.op("Div", total, g.op("ReduceSum", weights, steps_axis, keepdims=0))


def classifier_graph(params, bert, opset=OPSET, pooling="cls"):
    """The ONNX model of `model.BERTClassifier` from its parameters (Gluon name -> array), BERT config and pooling."""
    g = GraphBuilder()
    tokens, segments, valid_lens = INPUTS
    steps = g.op("Gather", g.op("Shape", tokens), g.constant("axis1", onp.array(1, dtype=onp.int64)))
    positions = g.op("Range", g.constant("zero", onp.array(0, dtype=onp.int64)), steps,
                     g.constant("one", onp.array(1, dtype=onp.int64)))
    # The book's masked softmax by valid length, as an additive mask: (batch, 1, 1, steps).
    valid = g.op("Less", g.op("Unsqueeze", positions, g.constant("axes0", onp.array([0], dtype=onp.int64))),
                 g.op("Unsqueeze", valid_lens, g.constant("axes1", onp.array([1], dtype=onp.int64))))
    additive = g.op("Where", valid, g.constant("unmasked", onp.array(0.0, dtype=onp.float32)),
                    g.constant("masked", onp.array(MASKED_SCORE, dtype=onp.float32)))
    mask = g.op("Unsqueeze", additive, g.constant("axes12", onp.array([1, 2], dtype=onp.int64)))

    embedding = "encoder.token_embedding.weight", "encoder.segment_embedding.weight"
    X = g.op("Add", g.op("Gather", g.constant(embedding[0], params[embedding[0]]), tokens),
             g.op("Gather", g.constant(embedding[1], params[embedding[1]]), segments))
    position_table = g.constant("encoder.pos_embedding", params["encoder.pos_embedding"][0])
    X = g.op("Add", X, g.op("Gather", position_table, positions))
    if bert["embedding_norm"]:
        X = layer_norm(g, params, "encoder.embedding_norm", X, bert["norm_eps"])
    for i in range(bert["num_blks"]):
        X = encoder_block(g, params, f"encoder.blks.{i}", X, mask, bert)
    logits = dense(g, params, "output", g.op("Tanh", dense(g, params, "hidden", pooled(g, X, valid, pooling))),
                   output=OUTPUT)

    graph = helper.make_graph(
        g.nodes, "nli_bert_classifier",
        [helper.make_tensor_value_info(tokens, TensorProto.INT64, ["batch", "steps"]),
         helper.make_tensor_value_info(segments, TensorProto.INT64, ["batch", "steps"]),
         helper.make_tensor_value_info(valid_lens, TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", len(params["output.bias"])])],
        g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                   producer_name="nli", producer_version=__version__)
    onnx.checker.check_model(onnx_model, full_check=True)
    return onnx_model


def require_onnx():
    """Fail in one sentence when the `onnx` package, which building the graph needs, is not installed."""
    if onnx is None:
        raise UserError("Exporting needs the onnx package (pip install onnx==1.23.2). On Python 3.13 it needs "
                        "numpy>=2.1, which MXNet 1.9.1 cannot import: export on Python 3.11 or 3.12; "
                        "the exported run predicts anywhere onnxruntime installs.")


def check_opset(opset):
    """Fail unless `opset` has every operator the graph uses and the installed onnx knows it."""
    newest = onnx.defs.onnx_opset_version()
    if not OPSET <= opset <= newest:
        raise UserError(f"--opset {opset}: the graph needs opset {OPSET} or later (LayerNormalization) "
                        f"and the installed onnx {onnx.__version__} knows up to {newest}.")


def quantize_int8(fp32_path, int8_path):
    """Dynamic int8 quantization of the matrix products (weights per output channel); embeddings stay fp32."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantize_dynamic(fp32_path, int8_path, per_channel=True, op_types_to_quantize=["MatMul"],
                     weight_type=QuantType.QInt8)


def export_run(run_dir, out_dir, int8=False, opset=OPSET):
    """Write `out_dir`: a run dir whose model is `model.onnx` built from `run_dir`'s parameters; its config."""
    import mxnet as mx
    require_onnx()
    check_opset(opset)
    if is_exported(run_dir):
        raise UserError(f"{run_dir} is already an ONNX export; export the run it came from "
                        f"({read_config(run_dir)['onnx']['source_run']}).")
    if os.path.abspath(run_dir) == os.path.abspath(out_dir):
        raise UserError("--out must be a new directory, not the run itself.")
    net, _, config = model_lib.load_run(run_dir, [mx.cpu()])
    params = {name: p.data().asnumpy() for name, p in net._collect_params_with_prefix().items()}
    onnx_model = classifier_graph(params, config["bert"], opset, config.get("pooling", "cls"))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, MODEL_FILE)
    fp32_path = path + ".fp32.tmp"
    onnx.save(onnx_model, fp32_path)
    if int8:
        rundir.write_atomically(path, lambda tmp: quantize_int8(fp32_path, tmp))
        os.remove(fp32_path)
    else:
        os.replace(fp32_path, path)
    vocab = config.get("tokenizer", model_lib.BOOK_TOKENIZER)["vocab"]
    shutil.copyfile(os.path.join(run_dir, vocab), os.path.join(out_dir, vocab))
    config["onnx"] = {"file": MODEL_FILE, "opset": opset, "int8": int8,
                      "quantization": "onnxruntime quantize_dynamic, per-channel int8 MatMul weights, "
                                      "embeddings fp32" if int8 else None,
                      "inputs": list(INPUTS), "output": OUTPUT, "source_run": os.path.abspath(run_dir),
                      "onnx_version": onnx.__version__}
    # Written last: a directory with a config.json naming ONNX is a finished export.
    rundir.write_json(os.path.join(out_dir, "config.json"), config)
    return config


def read_config(run_dir):
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
    config = read_config(run_dir)
    return isinstance(config, dict) and "onnx" in config


def inference_session(path, threads=None):
    """An ONNX Runtime session on the CPU for `path`, failing in one sentence if it is not a usable model."""
    import onnxruntime as ort
    from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf, NoSuchFile
    if not os.path.exists(path):
        raise UserError(f"{path} is missing; export the run again with `python -m nli export`.")
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
        reason = str(e).splitlines()[0][:200]
        raise UserError(f"{path} is not a readable ONNX model ({reason}); export the run again "
                        f"with `python -m nli export`.") from None
    names = tuple(i.name for i in session.get_inputs())
    if sorted(names) != sorted(INPUTS) or [o.name for o in session.get_outputs()] != [OUTPUT]:
        raise UserError(f"{path} takes {', '.join(names)}, not the {', '.join(INPUTS)} -> {OUTPUT} "
                        f"that `python -m nli export` writes.")
    return session


class OnnxPredictor(evaluate.Predictor):
    """A `Predictor` whose classifier is an exported run's model.onnx, run by ONNX Runtime on the CPU."""

    @classmethod
    def from_export(cls, run_dir, batch_size=256, threads=None):
        """Load the run dir written by `export_run`: its tokenizer and an ONNX Runtime session."""
        config = read_config(run_dir)
        session = inference_session(os.path.join(run_dir, config["onnx"]["file"]), threads)
        return cls(session, model_lib.load_tokenizer(run_dir, config), config, devices=[], batch_size=batch_size)

    def run_batch(self, tokens, segments, valid_lens):
        """Logits of one padded batch (NumPy arrays)."""
        feed = dict(zip(INPUTS, (a.astype(onp.int64) for a in (tokens, segments, valid_lens))))
        return self.net.run([OUTPUT], feed)[0]

    def logits(self, encoded, progress=False):
        """Logits of encoded pairs, in order, batched as `Predictor.logits` batches them."""
        return evaluate.predict_batches(self.run_batch, data.inference_batches(encoded, self.batch_size), None,
                                        (len(encoded), len(LABELS)), progress)
