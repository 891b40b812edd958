"""Evaluation figures on hand-checked cases, errors.tsv, and prediction on raw text, files and stdin."""
import io
import json
import os
import sys

import numpy as onp
import pytest

from conftest import DEV_PAIRS, RESERVED, SAMPLE_DIR, build_vocab_tokens, run_cli

from nli import cli, evaluate, predict, snli

MAX_LEN = 32  # the run's max_len; the tiny model's position table has 64 rows


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run dir holding a small, randomly initialized classifier over the real data's vocabulary."""
    import mxnet as mx
    from mxnet import init, np
    from nli import bert, model
    mx.random.seed(1)
    vocab = bert.Vocab(build_vocab_tokens(), reserved_tokens=RESERVED)
    encoder = bert.BERTModel(len(vocab), num_hiddens=32, ffn_num_hiddens=64, num_heads=2, num_blks=1,
                             dropout=0.0, max_len=64)
    net = model.BERTClassifier(encoder)
    net.initialize(init.Normal(0.5))  # large weights: predictions differ between pairs and labels
    tokens = np.array([[1, 2, 3]], dtype="int32")
    net(tokens, np.zeros_like(tokens), np.array([3.0]))
    run_dir = str(tmp_path_factory.mktemp("run"))
    model.save_run(run_dir, net, vocab, {"max_len": MAX_LEN, "truncation": "longest_first"})
    return run_dir


@pytest.fixture(scope="module")
def predictor(tiny_run):
    return predict.load_predictor(tiny_run, batch_size=16)


def dev_pairs(n):
    premises, hypotheses, labels = snli.read_pairs(DEV_PAIRS)
    return premises[:n], hypotheses[:n], labels[:n]


def test_scores_match_a_hand_computed_case():
    gold = [0, 0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 0, 1, 2, 1, 1, 0, 1]
    lengths = [10, 16, 17, 30, 33, 70, 70, 64]
    result = evaluate.scores(gold, predicted, lengths)
    assert result["confusion"] == [[2, 1, 1], [0, 2, 0], [1, 1, 0]]  # rows gold, columns predicted
    assert result["accuracy"] == 0.5 and result["n"] == 8
    entailment, contradiction, neutral = (result["per_class"][label] for label in snli.LABELS)
    assert entailment["precision"] == pytest.approx(2 / 3) and entailment["recall"] == pytest.approx(1 / 2)
    assert entailment["f1"] == pytest.approx(4 / 7)
    assert contradiction["precision"] == pytest.approx(1 / 2) and contradiction["recall"] == 1.0
    assert contradiction["f1"] == pytest.approx(2 / 3)
    assert neutral == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert result["macro_f1"] == pytest.approx(26 / 63)
    assert result["accuracy_by_length"] == [
        {"tokens": "1-16", "n": 2, "accuracy": 1.0}, {"tokens": "17-24", "n": 1, "accuracy": 0.0},
        {"tokens": "25-32", "n": 1, "accuracy": 0.0}, {"tokens": "33-48", "n": 1, "accuracy": 1.0},
        {"tokens": "49-64", "n": 1, "accuracy": 0.0}, {"tokens": "65+", "n": 2, "accuracy": 0.5}]


def test_most_confident_errors_are_the_surest_mistakes_first():
    probs = onp.array([[0.9, 0.05, 0.05],   # right
                       [0.2, 0.7, 0.1],     # wrong, 0.7
                       [0.1, 0.1, 0.8],     # wrong, 0.8
                       [0.4, 0.35, 0.25],   # wrong, 0.4
                       [0.1, 0.6, 0.3]])    # right
    gold = [0, 0, 1, 2, 1]
    assert evaluate.most_confident_errors(gold, probs, 2).tolist() == [2, 1]
    assert evaluate.most_confident_errors(gold, probs, 10).tolist() == [2, 1, 3]  # all there are


def test_tokenize_raw_splits_like_snli(tmp_path):
    assert snli.tokenize_raw("A dog's toy.") == "A dog 's toy ."
    assert snli.tokenize_raw('He said "stop," then left!') == "He said `` stop , '' then left !"
    # The raw sentences of the real SNLI files give exactly the tokens of their parses.
    for split in ("train", "dev", "test"):
        with open(os.path.join(SAMPLE_DIR, f"snli_1.0_{split}.jsonl"), encoding="utf-8") as f:
            for obj in map(json.loads, f):
                for side in ("1", "2"):
                    assert snli.tokenize_raw(obj[f"sentence{side}"]) == \
                        snli.extract_text(obj[f"sentence{side}_binary_parse"])


def test_batched_prediction_equals_one_pair_at_a_time(tiny_run, predictor):
    premises, hypotheses, _ = dev_pairs(40)
    pairs = list(zip(premises, hypotheses))
    batched = predictor.predict_pairs(pairs, tokenized=True)
    for pair, result in zip(pairs, batched):
        single = predictor.predict(*pair, tokenized=True)
        assert single["label"] == result["label"]
        onp.testing.assert_allclose(list(single["probabilities"].values()),
                                    list(result["probabilities"].values()), atol=1e-5)
    assert len({r["label"] for r in batched}) > 1  # the model is not constant, so order matters
    # The book-named function answers as the API does, on raw text.
    net, vocab = predictor.net, predictor.vocab
    book = predict.predict_snli(net, vocab, "A dog's toy.", "A toy.", predictor.devices, MAX_LEN)
    assert book == predictor.predict("A dog's toy.", "A toy.")
    assert predictor.predict("A dog's toy.", "A toy.")["unknown_share"] == 0.0
    assert predictor.predict("A dog 's toy .", "A toy .", tokenized=True) == predictor.predict("A dog's toy.",
                                                                                               "A toy.")


def test_evaluate_cli_writes_figures_plot_and_sorted_errors(tiny_run, tmp_path):
    premises, hypotheses, labels = dev_pairs(300)
    test_file = tmp_path / "test.tsv"
    test_file.write_text("premise\thypothesis\tlabel\n" + "".join(
        f"{p}\t{h}\t{snli.LABELS[l]}\n" for p, h, l in zip(premises, hypotheses, labels)), encoding="utf-8")
    out = tmp_path / "eval"
    done = run_cli("evaluate", "--run", tiny_run, "--test", test_file, "--errors", 20, "--out", out, "--quiet")
    assert done.returncode == 0, done.stderr
    result = json.loads((out / "eval.json").read_text())
    confusion = onp.array(result["confusion"])
    assert result["n"] == 300 == confusion.sum()
    assert onp.array_equal(confusion.sum(axis=1), onp.bincount(labels, minlength=3))
    assert result["accuracy"] == pytest.approx(onp.trace(confusion) / 300)
    assert sum(b["n"] for b in result["accuracy_by_length"]) == 300
    assert (out / "confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line.split("\t") for line in (out / "errors.tsv").read_text(encoding="utf-8").splitlines()]
    header, rows = rows[0], rows[1:]
    assert header[:5] == ["premise", "hypothesis", "gold", "predicted", "confidence"]
    assert len(rows) == min(20, 300 - onp.trace(confusion))
    confidences = [float(r[4]) for r in rows]
    assert confidences == sorted(confidences, reverse=True)
    pairs = set(zip(premises, hypotheses, (snli.LABELS[l] for l in labels)))
    for premise, hypothesis, gold, predicted, confidence, *probs in rows:
        assert gold != predicted and (premise, hypothesis, gold) in pairs
        assert float(confidence) == max(map(float, probs)) == float(probs[snli.LABELS.index(predicted)])


def test_a_write_the_system_refuses_is_one_sentence_and_leaves_no_partial_file(tiny_run, tmp_path):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("A man sleeps .\tA person rests .\n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for command in (["evaluate", "--run", tiny_run, "--test", DEV_PAIRS, "--out", blocker / "eval"],
                    ["predict", "--run", tiny_run, "--file", pairs, "--output", blocker / "out.jsonl"]):
        done = run_cli(*command, "--quiet")
        assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
        [line] = done.stderr.strip().splitlines()
        assert line.startswith(f"error: {blocker}{os.sep}") and line.endswith(": Not a directory"), line
    assert sorted(os.listdir(tmp_path)) == ["a-file", "pairs.tsv"] and blocker.read_text() == "not a folder"


def test_evaluate_reports_file_and_line_of_a_bad_label(tiny_run, tmp_path, capsys):
    bad = tmp_path / "bad.tsv"
    bad.write_text("premise\thypothesis\tlabel\nA man .\tA person .\tentailment\nA man .\tA cat .\tmaybe\n")
    assert cli.main(["evaluate", "--run", tiny_run, "--test", str(bad), "--quiet"]) == 2
    assert f"{bad}, line 3" in capsys.readouterr().err


def test_predict_file_gives_one_line_per_input_line_in_order(tiny_run, tmp_path, capsys):
    long_sentence = " ".join(["the big dog runs in the park ."] * 400)
    lines = [json.dumps({"premise": "Ein Mädchen isst 寿司 🍣 .", "hypothesis": "A girl eats ."}),
             '{"premise": "A man\twith a hat .", "hypothesis": "A man .", "label": "neutral"}',  # raw tab
             json.dumps({"sentence1": "Two dogs\tplay .", "sentence2": long_sentence}),
             json.dumps({"premise": "", "hypothesis": "A man ."}),
             "{not json",
             "",
             json.dumps({"premise": "A man .", "hypothesis": "A man .", "label": "maybe"}),
             json.dumps({"premise": long_sentence, "hypothesis": "Dogs run .", "label": "-"})]
    source = tmp_path / "in.jsonl"
    source.write_bytes(("\n".join(lines[:4]) + "\n").encode() + b"\xff\xfe bad bytes\n"
                       + ("\n".join(lines[4:]) + "\n").encode())
    output = tmp_path / "out.jsonl"
    assert cli.main(["predict", "--run", tiny_run, "--file", str(source), "--output", str(output)]) == 0
    records = [json.loads(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == list(range(1, 10))
    assert records[0]["premise"] == "Ein Mädchen isst 寿司 🍣 ." and records[0]["label"] in snli.LABELS
    assert records[1]["premise"] == "A man\twith a hat ." and records[1]["gold"] == "neutral"
    assert records[2]["tokens"] == MAX_LEN and records[8]["tokens"] == MAX_LEN  # truncated, not crashing
    assert "gold" not in records[8]  # '-' means no gold label
    errors = {r["line"]: r["error"] for r in records if "error" in r}
    assert errors.keys() == {4, 5, 6, 7, 8}
    assert errors[4] == "empty premise" and errors[5].startswith("not UTF-8")
    assert errors[6].startswith("not valid JSON") and "maybe" in errors[8]
    summary = capsys.readouterr().err
    assert f"{source}: 9 lines, 4 predicted, 5 with errors (first: line 4: empty premise)" in summary
    assert "2 pairs filled max_len" in summary


def test_predict_tsv_matches_evaluate_and_stdin_and_one_pair(tiny_run, predictor, tmp_path, monkeypatch, capsys):
    premises, hypotheses, labels = dev_pairs(50)
    body = "".join(f"{p}\t{h}\t{snli.LABELS[l]}\n" for p, h, l in zip(premises, hypotheses, labels))
    (tmp_path / "in.tsv").write_text("premise\thypothesis\tlabel\n" + body, encoding="utf-8")
    assert cli.main(["predict", "--run", tiny_run, "--file", str(tmp_path / "in.tsv"), "--tokenized",
                     "--output", str(tmp_path / "out.jsonl"), "--quiet"]) == 0
    from_file = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    encoded = predictor.encode(premises, hypotheses, labels)
    expected = predictor.logits(encoded).argmax(axis=1)
    assert [r["label"] for r in from_file] == [snli.LABELS[k] for k in expected]
    assert [r["line"] for r in from_file] == list(range(2, 52))  # line 1 is the header
    # stdin: headerless premise<TAB>hypothesis lines, answers on stdout.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(body.encode())))
    capsys.readouterr()
    assert cli.main(["predict", "--run", tiny_run, "--stdin", "--tokenized", "--quiet"]) == 0
    captured = capsys.readouterr()
    assert [json.loads(line)["label"] for line in captured.out.splitlines()] == [r["label"] for r in from_file]
    assert "<stdin>: 50 lines, 50 predicted, 0 with errors" in captured.err
    # One pair from argv; unknown words are reported when they are many.
    assert cli.main(["predict", "--run", tiny_run, "A qwzx's blorft.", "A toy."]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["unknown_share"] == 0.25  # qwzx, blorft of A qwzx 's blorft . A toy .
    assert "25.0% of the input tokens are not in the model's vocabulary" in captured.err


def test_predict_input_mistakes_say_what_is_wrong(tiny_run, tmp_path, capsys):
    assert cli.main(["predict", "--run", tiny_run]) == 2
    assert "Give one pair" in capsys.readouterr().err
    headed = tmp_path / "headed.tsv"
    headed.write_text("premise\ttext\tlabel\nA man .\tA person .\tentailment\n")
    assert cli.main(["predict", "--run", tiny_run, "--file", str(headed)]) == 2
    assert f"{headed}, line 1: the header names no premise/hypothesis" in capsys.readouterr().err
