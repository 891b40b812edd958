"""ONNX export: the graph computes MXNet's logits for both BERT families, exported runs predict through the
CLI and the API, broken exports fail in one sentence, and the guide's plain-onnxruntime snippet runs."""
import ast
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import mxnet as mx
import numpy as onp
import pytest

# Building model.onnx needs the onnx package, which requirements.txt installs below Python 3.13 only
onnx = pytest.importorskip("onnx", reason="onnx 1.23 needs numpy>=2.1 on Python 3.13 (through ml_dtypes), and "
                                          "mxnet 1.9.1 needs numpy<2, so `nli export` is not available there")

from conftest import DEV_PAIRS, ROOT, run_cli
from test_hf import tiny_tensors, tiny_vocab, write_checkpoint

from nli import cli, data, export, model, predict, snli

MAX_LEN = 48  # the runs' max_len: some real pairs are cut, so batches mix full and short pairs


def save_classifier_run(folder, model_name, pooling="cls"):
    """A run dir of the classifier `model.from_pretrained` builds on `model_name`, untrained."""
    mx.random.seed(0)
    net, vocab = model.from_pretrained(model_name, [mx.cpu()], dropout=0.0, pooling=pooling)
    net.output.initialize(mx.init.Normal(1.0), force_reinit=True)  # logits far enough apart to differ in label
    model.save_run(folder, net, vocab, {"max_len": MAX_LEN, "truncation": "longest_first"})
    return folder


@pytest.fixture(scope="module", params=["book", "hf", "hf-mean"])
def runs(request, training_bert_dir, tmp_path_factory):
    """A book-family (ReLU, epsilon 1e-5) or Hugging Face-family (GELU, embedding LayerNorm) run, exported;
    hf-mean's head reads the mean of the token encodings (--pooling mean)."""
    root = tmp_path_factory.mktemp(f"export_{request.param}")
    if request.param == "book":
        source = training_bert_dir
    else:
        vocab = tiny_vocab()
        source = "hf:" + write_checkpoint(str(root / "checkpoint"), tiny_tensors(len(vocab), onp.random.RandomState(0)),
                                          vocab)
    run_dir = save_classifier_run(str(root / "run"), source, "mean" if request.param == "hf-mean" else "cls")
    export.export_run(run_dir, str(root / "onnx"))
    return run_dir, str(root / "onnx")


def dev_pairs(n, start=0):
    premises, hypotheses, labels = snli.read_pairs(DEV_PAIRS)
    return premises[start:start + n], hypotheses[start:start + n], labels[start:start + n]


def test_fp32_onnx_logits_equal_mxnet_on_batches_of_mixed_lengths(runs):
    run_dir, onnx_dir = runs
    mxnet_side = predict.load_predictor(run_dir, [mx.cpu()], batch_size=16)
    onnx_side = predict.load_predictor(onnx_dir, batch_size=16)
    assert isinstance(onnx_side, predict.OnnxPredictor) and not isinstance(mxnet_side, predict.OnnxPredictor)
    encoded = mxnet_side.encode(*dev_pairs(300))
    assert encoded.valid_lens.min() < 16 and encoded.valid_lens.max() == MAX_LEN
    expected = mxnet_side.logits(encoded)
    assert onp.abs(onnx_side.logits(encoded) - expected).max() < 1e-4
    assert onp.ptp(expected, axis=0).min() > 0.1  # the random model's logits depend on the pair
    # One batch whose pairs range from the shortest to cut ones: padding is masked, not merely short.
    order = onp.argsort(encoded.valid_lens)
    indices = order[onp.linspace(0, len(order) - 1, 12).astype(int)]
    tokens, segments, valid_lens, _ = data.make_batch(encoded, indices)
    assert valid_lens.min() < tokens.shape[1] // 2
    onnx_logits = onnx_side.run_batch(tokens, segments, valid_lens)
    assert onp.abs(onnx_logits - expected[indices]).max() < 1e-4


def test_export_records_what_was_done_and_copies_the_tokenizer(runs):
    run_dir, onnx_dir = runs
    config = json.load(open(os.path.join(onnx_dir, "config.json")))
    source = json.load(open(os.path.join(run_dir, "config.json")))
    assert config["onnx"]["opset"] == 17 and config["onnx"]["int8"] is False
    assert config["onnx"]["source_run"] == os.path.abspath(run_dir)
    assert {k: v for k, v in config.items() if k != "onnx"} == source
    vocab = source.get("tokenizer", model.BOOK_TOKENIZER)["vocab"]
    assert open(os.path.join(onnx_dir, vocab), "rb").read() == open(os.path.join(run_dir, vocab), "rb").read()
    assert sorted(os.listdir(onnx_dir)) == sorted(["config.json", vocab, "model.onnx"])
    graph = onnx.load(os.path.join(onnx_dir, "model.onnx")).graph
    ops = {node.op_type for node in graph.node}
    assert {"LayerNormalization", "Attention", "Tanh"} <= ops
    assert ("Erf" in ops) == (config["bert"]["activation"] == "gelu") and ("Relu" in ops) != ("Erf" in ops)


def test_exported_run_predicts_the_same_labels_through_the_cli_and_the_api(runs, tmp_path):
    run_dir, onnx_dir = runs
    premises, hypotheses, labels = dev_pairs(40, start=500)
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("premise\thypothesis\tlabel\n" + "".join(
        f"{p}\t{h}\t{snli.LABELS[y]}\n" for p, h, y in zip(premises, hypotheses, labels)))
    expected = [r["label"] for r in predict.load_predictor(run_dir, [mx.cpu()]).predict_pairs(
        zip(premises, hypotheses), tokenized=True)]
    api = [r["label"] for r in predict.load_predictor(onnx_dir).predict_pairs(zip(premises, hypotheses),
                                                                                    tokenized=True)]
    result = run_cli("predict", "--run", onnx_dir, "--file", pairs_file, "--tokenized", "--output",
                     tmp_path / "out.jsonl", "--quiet")
    assert result.returncode == 0, result.stderr
    cli = [json.loads(line)["label"] for line in open(tmp_path / "out.jsonl")]
    assert cli == api == expected
    result = run_cli("evaluate", "--run", onnx_dir, "--test", pairs_file, "--out", tmp_path / "eval", "--quiet")
    assert result.returncode == 0, result.stderr
    accuracy = json.load(open(tmp_path / "eval" / "eval.json"))["accuracy"]
    assert accuracy == pytest.approx(onp.mean([snli.LABELS[y] == e for y, e in zip(labels, expected)]))


def test_int8_export_quantizes_the_matrix_products_and_keeps_embeddings_fp32(runs, tmp_path):
    run_dir, onnx_dir = runs
    result = run_cli("export", "--run", run_dir, "--out", tmp_path / "int8", "--int8")
    assert result.returncode == 0, result.stderr
    config = json.load(open(tmp_path / "int8" / "config.json"))
    assert config["onnx"]["int8"] is True
    fp32, int8 = (onnx.load(os.path.join(d, "model.onnx")) for d in (onnx_dir, tmp_path / "int8"))
    int8_weights = {w.name for w in int8.graph.initializer
                    if w.data_type == onnx.TensorProto.INT8 and w.name.endswith("_quantized")}
    matmul_weights = {node.input[1] for node in fp32.graph.node if node.op_type in ("MatMul", "Attention")
                      and node.input[1].endswith(".weight")}
    assert len(matmul_weights) > 4 and int8_weights == {name + "_quantized" for name in matmul_weights}
    assert {"QAttention", "MatMulInteger"} <= {node.op_type for node in int8.graph.node}
    tables = {w.name: w.data_type for w in int8.graph.initializer if "embedding" in w.name}
    assert tables and set(tables.values()) == {onnx.TensorProto.FLOAT}
    pairs = list(zip(*dev_pairs(20)[:2]))
    predictions = predict.load_predictor(str(tmp_path / "int8")).predict_pairs(pairs, tokenized=True)
    assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-5) for p in predictions)


def test_int8_export_logs_no_advice_users_cannot_act_on(runs, tmp_path, caplog, capsys):
    caplog.set_level(logging.WARNING)
    assert cli.main(["export", "--run", runs[0], "--out", str(tmp_path / "int8"), "--int8"]) == 0
    assert [r.getMessage() for r in caplog.records] == []  # was: "Please consider pre-processing ..."
    assert "pre-processing" not in capsys.readouterr().err


def test_export_refuses_to_replace_an_export_unless_told(runs, tmp_path, capsys):
    run_dir, _ = runs
    out = tmp_path / "export"
    assert cli.main(["export", "--run", run_dir, "--out", str(out), "--int8"]) == 0
    int8_model = (out / "model.onnx").read_bytes()
    capsys.readouterr()
    assert cli.main(["export", "--run", run_dir, "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {out} holds a finished run: choose another --out, or replace it with " \
                                      f"--overwrite.\n"
    assert (out / "model.onnx").read_bytes() == int8_model and json.load(open(out / "config.json"))["onnx"]["int8"]
    assert cli.main(["export", "--run", run_dir, "--out", str(out), "--overwrite"]) == 0
    assert json.load(open(out / "config.json"))["onnx"]["int8"] is False
    assert (out / "model.onnx").read_bytes() != int8_model


def test_attention_of_an_export_is_refused_before_any_prediction(runs, tmp_path, capsys):
    run_dir, onnx_dir = runs
    page = tmp_path / "a.html"
    assert cli.main(["predict", "--run", onnx_dir, "A man sleeps .", "A man is awake .", "--attention", str(page)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and not page.exists()  # was: the prediction, then an IndexError
    assert err == f"error: --attention needs MXNet's model, and {onnx_dir} is an ONNX export, whose graph gives only " \
                  f"the logits: draw it with --run {run_dir}.\n"


@pytest.mark.parametrize("damage, message", [
    ("missing", "model.onnx is missing; export the run again"),
    ("garbage", "model.onnx is not a readable ONNX model"),
    ("truncated", "model.onnx is not a readable ONNX model"),
])
def test_a_missing_or_corrupt_model_onnx_fails_in_one_sentence(runs, tmp_path, damage, message):
    broken = tmp_path / "broken"
    shutil.copytree(runs[1], broken)
    path = broken / "model.onnx"
    if damage == "missing":
        path.unlink()
    elif damage == "garbage":
        path.write_bytes(b"this is not an ONNX model\n" * 10)
    else:
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    result = run_cli("predict", "--run", broken, "A man sleeps .", "A man is awake .")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_opsets_without_layer_normalization_are_refused_and_newer_ones_run(runs, tmp_path):
    run_dir, onnx_dir = runs
    result = run_cli("export", "--run", run_dir, "--out", tmp_path / "old", "--opset", "16")
    assert result.returncode == 2 and "needs opset 17 or later" in result.stderr
    result = run_cli("export", "--run", onnx_dir, "--out", tmp_path / "again")
    assert result.returncode == 2 and "already an ONNX export" in result.stderr
    export.export_run(run_dir, str(tmp_path / "opset18"), opset=18)
    encoded = predict.load_predictor(onnx_dir).encode(*dev_pairs(30))
    assert onp.abs(predict.load_predictor(str(tmp_path / "opset18")).logits(encoded)
                   - predict.load_predictor(onnx_dir).logits(encoded)).max() < 1e-5


def readme_snippet():
    """The guide's Python block that runs model.onnx with onnxruntime alone."""
    with open(os.path.join(ROOT, "docs", "guide.md"), encoding="utf-8") as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    return next(block for block in blocks if "import onnxruntime" in block)


def test_the_readmes_snippet_runs_the_export_without_nli_or_mxnet(runs, tmp_path):
    _, onnx_dir = runs
    snippet = readme_snippet()
    assert "nli" not in re.findall(r"^(?:import|from) (\w+)", snippet, re.M)
    script = tmp_path / "snippet.py"
    script.write_text(re.sub(r'^run = ".*?"', f"run = {onnx_dir!r}", snippet, count=1, flags=re.M))
    block = "import sys; sys.modules.update(mxnet=None, nli=None, d2l=None); "  # importing them would fail
    result = subprocess.run([sys.executable, "-c", block + f"exec(open({str(script)!r}).read())"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    pairs = ast.literal_eval(re.search(r"^pairs = (.*)$", snippet, re.M).group(1))
    expected = [r["label"] for r in predict.load_predictor(onnx_dir).predict_pairs(pairs, tokenized=True)]
    assert ast.literal_eval(result.stdout.strip()) == expected
