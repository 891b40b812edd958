"""Exporting a fine-tuned run to ONNX, optionally int8, for `predict.OnnxPredictor` (ONNX Runtime) to run.

The graph is written directly from the Gluon parameters with ONNX operators (opset 17's
LayerNormalization and the rest) and ONNX Runtime's fused multi-head `Attention`, so ONNX Runtime, in
any of its languages, runs the classifier without MXNet. It computes what `model.BERTClassifier` does,
dropout aside (inference): embeddings, Transformer blocks whose attention ignores keys at or past each
pair's valid length (the Attention operator's mask index; it adds -1e9 to those keys' scores, which
leaves them a weight of exactly 0, as MXNet's length-aware softmax does), then the `<cls>` hidden layer
and the output layer. `--int8` quantizes the matrix products, the Attention operator's included.
"""
import logging
import math
import os
import shutil

import numpy as onp

from . import __version__, fileio, rundir
from . import model as model_lib
from .errors import UserError
from .predict import INPUTS, MODEL_FILE, OUTPUT, is_ensemble, is_exported, read_run_config

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
except ImportError:  # predicting needs only onnxruntime; see `require_onnx`
    onnx = None

OPSET = 17  # the first opset with LayerNormalization
CONTRIB_DOMAIN = "com.microsoft"  # ONNX Runtime's own operators: Attention, and QAttention once quantized
QUANTIZED_OPS = ["MatMul", "Attention"]  # Attention becomes QAttention
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


def attention(g, params, prefix, X, mask_index, shapes, num_heads):
    """`bert.MultiHeadAttention` on rows (batch * steps, hiddens) as ONNX Runtime's fused Attention: one matrix
    product gives every head's queries, keys and values; keys at or past each pair's valid length are masked."""
    weight, bias = (onp.concatenate([params[f"{prefix}.W_{name}.{part}"] for name in "qkv"])
                    for part in ("weight", "bias"))
    weighted = g.op("Attention", g.op("Reshape", X, shapes["batch_steps"]),
                    g.constant(f"{prefix}.W_qkv.weight", weight.T.copy()), g.constant(f"{prefix}.W_qkv.bias", bias),
                    mask_index, domain=CONTRIB_DOMAIN, num_heads=num_heads, mask_filter_value=MASKED_SCORE)
    return dense(g, params, f"{prefix}.W_o", g.op("Reshape", weighted, shapes["rows"]))


def activation(g, X, name):
    """The feed-forward network's activation: the book's ReLU, or BERT's exact GELU, x * (1 + erf(x / √2)) / 2."""
    if name == "relu":
        return g.op("Relu", X)
    half = g.constant("gelu.half", onp.array(0.5, dtype=onp.float32))
    one = g.constant("gelu.one", onp.array(1.0, dtype=onp.float32))
    root2 = g.constant("gelu.sqrt2", onp.array(math.sqrt(2), dtype=onp.float32))
    erf = g.op("Erf", g.op("Div", X, root2))
    return g.op("Mul", g.op("Mul", X, half), g.op("Add", erf, one))


def encoder_block(g, params, prefix, X, mask_index, shapes, bert):
    """`bert.TransformerEncoderBlock`: attention and feed-forward, each followed by residual + LayerNorm."""
    attended = attention(g, params, f"{prefix}.attention", X, mask_index, shapes, bert["num_heads"])
    Y = layer_norm(g, params, f"{prefix}.addnorm1.ln", g.op("Add", X, attended), bert["norm_eps"])
    hidden = activation(g, dense(g, params, f"{prefix}.ffn.dense1", Y), bert["activation"])
    return layer_norm(g, params, f"{prefix}.addnorm2.ln",
                      g.op("Add", Y, dense(g, params, f"{prefix}.ffn.dense2", hidden)), bert["norm_eps"])


def pooled(g, X, positions, valid_lens, pooling):
    """`BERTClassifier.pool`: (batch, hiddens) from X (batch, steps, hiddens), `<cls>`'s or the valid steps' mean."""
    if pooling == "cls":
        return g.op("Gather", X, g.constant("cls_position", onp.array(0, dtype=onp.int64)), axis=1)
    valid = g.op("Less", g.op("Unsqueeze", positions, g.constant("axes0", onp.array([0], dtype=onp.int64))),
                 g.op("Unsqueeze", valid_lens, g.constant("axes1", onp.array([1], dtype=onp.int64))))
    steps_axis = g.constant("steps_axis", onp.array([1], dtype=onp.int64))
    weights = g.op("Unsqueeze", g.op("Cast", valid, to=TensorProto.FLOAT),
                   g.constant("axes2", onp.array([2], dtype=onp.int64)))  # (batch, steps, 1): 1 on valid steps
    total = g.op("ReduceSum", g.op("Mul", X, weights), steps_axis, keepdims=0)
    return g.op("Div", total, g.op("ReduceSum", weights, steps_axis, keepdims=0))


def classifier_graph(params, bert, opset=OPSET, pooling="cls"):
    """The ONNX model of `model.BERTClassifier` from its parameters (Gluon name -> array), BERT config and pooling."""
    g = GraphBuilder()
    tokens, segments, valid_lens = INPUTS
    batch_steps = g.op("Shape", tokens)
    steps = g.op("Gather", batch_steps, g.constant("axis1", onp.array(1, dtype=onp.int64)))
    positions = g.op("Range", g.constant("zero", onp.array(0, dtype=onp.int64)), steps,
                     g.constant("one", onp.array(1, dtype=onp.int64)))
    embedding = "encoder.token_embedding.weight", "encoder.segment_embedding.weight"
    X = g.op("Add", g.op("Gather", g.constant(embedding[0], params[embedding[0]]), tokens),
             g.op("Gather", g.constant(embedding[1], params[embedding[1]]), segments))
    position_table = g.constant("encoder.pos_embedding", params["encoder.pos_embedding"][0])
    X = g.op("Add", X, g.op("Gather", position_table, positions))
    if bert["embedding_norm"]:
        X = layer_norm(g, params, "encoder.embedding_norm", X, bert["norm_eps"])
    # The blocks work on rows, (batch * steps, hiddens), so that each dense layer is one 2-D matrix product and
    # ONNX Runtime keeps LayerNormalization as it is: on 3-D inputs it fuses the residual Add into a
    # SkipLayerNormalization that ran 3-4x slower than Add + LayerNormalization here.
    hiddens = onp.array([bert["num_hiddens"]], dtype=onp.int64)
    shapes = {"rows": g.constant("rows_shape", onp.concatenate([[-1], hiddens])),
              "batch_steps": g.op("Concat", batch_steps, g.constant("hiddens", hiddens), axis=0)}
    X = g.op("Reshape", X, shapes["rows"])
    # The book's masked softmax by valid length is the Attention operator's mask index: int32 valid lengths.
    mask_index = g.op("Cast", valid_lens, to=TensorProto.INT32)
    for i in range(bert["num_blks"]):
        X = encoder_block(g, params, f"encoder.blks.{i}", X, mask_index, shapes, bert)
    X = pooled(g, g.op("Reshape", X, shapes["batch_steps"]), positions, valid_lens, pooling)
    logits = dense(g, params, "output", g.op("Tanh", dense(g, params, "hidden", X)), output=OUTPUT)

    graph = helper.make_graph(
        g.nodes, "nli_bert_classifier",
        [helper.make_tensor_value_info(tokens, TensorProto.INT64, ["batch", "steps"]),
         helper.make_tensor_value_info(segments, TensorProto.INT64, ["batch", "steps"]),
         helper.make_tensor_value_info(valid_lens, TensorProto.INT64, ["batch"])],
        [helper.make_tensor_value_info(logits, TensorProto.FLOAT, ["batch", len(params["output.bias"])])],
        g.initializers)
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset),
                                                         helper.make_opsetid(CONTRIB_DOMAIN, 1)],
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
    # quantize_dynamic logs "Please consider pre-processing before quantization" for any graph not passed through
    # its quant_pre_process first. On this graph, written with its shapes and the fused Attention, pre-processing
    # changes nothing (tried, ONNX Runtime 1.32 with skip_symbolic_shape: the same int8 nodes, the same logits to the
    # bit on 200 SNLI pairs), so the advice, which users cannot act on, is dropped.
    root = logging.getLogger()  # where logging.warning() logs it

    def no_preprocessing_advice(record):
        return "pre-processing" not in record.getMessage()
    root.addFilter(no_preprocessing_advice)
    try:
        # ONNX's shape inference does not know ONNX Runtime's Attention: its output is float, as everything quantized.
        quantize_dynamic(fp32_path, int8_path, per_channel=True, op_types_to_quantize=QUANTIZED_OPS,
                         weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": TensorProto.FLOAT})
    finally:
        root.removeFilter(no_preprocessing_advice)


def export_run(run_dir, out_dir, int8=False, opset=OPSET, overwrite=False):
    """Write `out_dir`: a run dir whose model is `model.onnx` built from `run_dir`'s parameters; its config.
    An ensemble's export holds one exported run per member, in members/ as the ensemble holds them (written whole).
    A run or export already in `out_dir` is refused, or with `overwrite` replaced."""
    require_onnx()
    check_opset(opset)
    if is_exported(run_dir):
        raise UserError(f"{run_dir} is already an ONNX export; export the run it came from "
                        f"({read_run_config(run_dir)['onnx']['source_run']}).")
    if os.path.abspath(run_dir) == os.path.abspath(out_dir):
        raise UserError("--out must be a new directory, not the run itself.")
    config = read_run_config(run_dir)
    if is_ensemble(config):
        return export_ensemble(run_dir, config, out_dir, int8, opset, overwrite)
    earlier = rundir.check_new_run_dir(out_dir, overwrite)
    onnx_model, config = classifier_of_run(run_dir, opset)
    rundir.remove_run_files(out_dir, earlier)
    os.makedirs(out_dir, exist_ok=True)
    return save_export(onnx_model, config, run_dir, out_dir, int8, opset)


def classifier_of_run(run_dir, opset):
    """(the ONNX model of a fine-tuned run's classifier, the run's config)."""
    import mxnet as mx
    net, _, config = model_lib.load_run(run_dir, [mx.cpu()])
    params = {name: p.data().asnumpy() for name, p in net._collect_params_with_prefix().items()}
    return classifier_graph(params, config["bert"], opset, net.pooling), config  # pooling as load_run read it


def onnx_record(source_run, opset, int8, file=MODEL_FILE):
    """What an export's config.json says of it under "onnx"."""
    return {"file": file, "opset": opset, "int8": int8,
            "quantization": "onnxruntime quantize_dynamic, per-channel int8 MatMul and Attention "
                            "weights, embeddings fp32" if int8 else None,
            "inputs": list(INPUTS), "output": OUTPUT, "source_run": os.path.abspath(source_run),
            "onnx_version": onnx.__version__}


def save_export(onnx_model, config, run_dir, out_dir, int8, opset):
    """Write an exported run into `out_dir`: model.onnx (quantized with `int8`), `run_dir`'s vocabulary, and its
    `config` with what was exported; the config, which it returns."""
    path = os.path.join(out_dir, MODEL_FILE)
    fp32_path = path + ".fp32.tmp"
    onnx.save(onnx_model, fp32_path)
    if int8:
        fileio.write_atomically(path, lambda tmp: quantize_int8(fp32_path, tmp))
        os.remove(fp32_path)
    else:
        os.replace(fp32_path, path)
    vocab = model_lib.vocab_file(config)
    shutil.copyfile(os.path.join(run_dir, vocab), os.path.join(out_dir, vocab))
    config["onnx"] = onnx_record(run_dir, opset, int8)
    # Written last: a directory with a config.json naming ONNX is a finished export.
    fileio.write_json(os.path.join(out_dir, "config.json"), config)
    return config


def export_ensemble(run_dir, config, out_dir, int8, opset, overwrite):
    """`export_run` of an ensemble: each member exported into out_dir/members/I, and the ensemble's config."""
    earlier = rundir.check_whole_run_out(out_dir, [run_dir], overwrite)
    config["onnx"] = onnx_record(run_dir, opset, int8, file="members/*/" + MODEL_FILE)

    def write(folder):  # a member that fails leaves nothing written (see `rundir.replace_run_dir`)
        for member in config["ensemble"]["members"]:
            source, target = os.path.join(run_dir, member["dir"]), os.path.join(folder, member["dir"])
            os.makedirs(target)
            save_export(*classifier_of_run(source, opset), source, target, int8, opset)
        fileio.write_json(os.path.join(folder, "config.json"), config)
    rundir.replace_run_dir(out_dir, write, earlier)
    return config
