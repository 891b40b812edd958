"""`nli soup` and `nli ensemble`: a soup is the mean of its members' weights (greedy: chosen on a dev set), an
ensemble predicts the mean of their probabilities, both are runs every command takes, and runs that cannot be
combined, or a bad --run or --out, are refused in one sentence, leaving nothing half-written."""
import json
import os
import shutil

import mxnet as mx
import numpy as onp
import pytest

from conftest import DEV_PAIRS, run_cli, save_book_bert
from test_runs import assert_refused, snapshot

from nli import bert, combine, fileio, model, predict, runner, snli

MAX_LEN = 48
DEV = 120  # dev pairs the greedy soup is chosen on


def weights_of(run_dir):
    """A run's model.params as {Gluon name: NumPy array}."""
    return {name: array.asnumpy() for name, array in bert.read_params_file(os.path.join(run_dir, "model.params")).items()}


def fine_tune(model_dir, out, seed, pairs=64):
    """A run of seconds: the tiny BERT fine-tuned one epoch on `pairs` real pairs, seeded."""
    runner.run("tuned", model=model_dir, train=DEV_PAIRS, test=DEV_PAIRS, limit_train=pairs, limit_test=16, epochs=1,
               batch_size=16, lr=1e-3, max_len=MAX_LEN, devices="cpu", seed=seed, out=str(out), quiet=True)
    return str(out)


def untrained_run(model_dir, out, pooling="cls"):
    """A run dir of the classifier `model.from_pretrained` builds on `model_dir`, its head random, untrained."""
    mx.random.seed(0)
    net, vocab = model.from_pretrained(model_dir, [mx.cpu()], dropout=0.0, pooling=pooling)
    model.save_run(str(out), net, vocab, {"max_len": MAX_LEN, "truncation": "longest_first"})
    return str(out)


@pytest.fixture(scope="module")
def runs(training_bert_dir, tmp_path_factory):
    """Three runs fine-tuned from the tiny BERT with other seeds and data: a soup's members."""
    root = tmp_path_factory.mktemp("members")
    return [fine_tune(training_bert_dir, root / f"run{seed}", seed, pairs) for seed, pairs in ((1, 64), (2, 96), (3, 48))]


@pytest.fixture(scope="module")
def dev_file(tmp_path_factory):
    """The first DEV real dev pairs as a labelled .tsv."""
    premises, hypotheses, labels = snli.read_pairs(DEV_PAIRS)
    path = tmp_path_factory.mktemp("dev") / "dev.tsv"
    path.write_text("premise\thypothesis\tlabel\n" + "".join(f"{p}\t{h}\t{snli.LABELS[y]}\n"
                            for p, h, y in zip(premises[DEV:2 * DEV], hypotheses[DEV:2 * DEV], labels[DEV:2 * DEV])))
    return str(path)


def dev_pairs(n=30):
    premises, hypotheses, _ = snli.read_pairs(DEV_PAIRS)
    return list(zip(premises[:n], hypotheses[:n]))


def probabilities(run_dir, pairs):
    """Each pair's probabilities (pairs x labels) as `load_predictor(run_dir)` predicts them."""
    return onp.array([[p["probabilities"][label] for label in snli.LABELS]
                      for p in predict.load_predictor(run_dir).predict_pairs(pairs)])


# Soups

def test_a_soup_of_one_run_is_that_run(runs, tmp_path):
    combine.soup(runs[:1], str(tmp_path / "soup"))
    run_params, soup_params = weights_of(runs[0]), weights_of(str(tmp_path / "soup"))
    assert run_params.keys() == soup_params.keys()
    for name, array in run_params.items():
        assert onp.array_equal(soup_params[name], array), name
    assert onp.array_equal(probabilities(str(tmp_path / "soup"), dev_pairs()), probabilities(runs[0], dev_pairs()))
    config = json.load(open(tmp_path / "soup" / "config.json"))
    assert config["soup"] == {"method": "uniform", "members": [
        {"path": os.path.abspath(runs[0]), "sha1": fileio.sha1_of(os.path.join(runs[0], "model.params"))}]}


def test_a_soup_of_two_runs_is_the_mean_of_their_weights_and_every_command_takes_it(runs, tmp_path):
    out = tmp_path / "soup"
    result = run_cli("soup", "--run", runs[0], "--run", runs[1], "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}: the mean of the weights of 2 of 2 runs\n"
    a, b, soup = (weights_of(str(path)) for path in (runs[0], runs[1], out))
    for name in a:
        onp.testing.assert_allclose(soup[name], (a[name] + b[name]) / 2, rtol=1e-6, atol=1e-9, err_msg=name)
    assert max(onp.abs(a[name] - b[name]).max() for name in a) > 1e-3  # the runs differ: the mean is not either
    config = json.load(open(out / "config.json"))
    assert [m["path"] for m in config["soup"]["members"]] == [os.path.abspath(r) for r in runs[:2]]
    assert config["pretrained"] == json.load(open(os.path.join(runs[0], "config.json")))["pretrained"]
    evaluated = run_cli("evaluate", "--run", out, "--test", DEV_PAIRS, "--limit-test", 40, "--devices", "cpu",
                        "--quiet")
    assert evaluated.returncode == 0 and "on 40 pairs" in evaluated.stdout, evaluated.stderr
    page = tmp_path / "a.html"
    predicted = run_cli("predict", "--run", out, "A man sleeps .", "A man is awake .", "--attention", page)
    assert predicted.returncode == 0 and page.exists(), predicted.stderr
    assert json.loads(predicted.stdout)["label"] in snli.LABELS


def refused_soup(*run_dirs, out):
    """`nli soup` of `run_dirs`, which must be refused, leaving no --out."""
    result = run_cli("soup", *(arg for run_dir in run_dirs for arg in ("--run", run_dir)), "--out", out)
    assert not os.path.exists(out) and not os.path.exists(f"{out}.new")
    return result


def test_a_soup_of_runs_from_different_checkpoints_is_refused_naming_them(runs, training_bert_dir, tmp_path):
    other = shutil.copytree(training_bert_dir, tmp_path / "other_bert")
    params = mx.nd.load(str(other / "pretrained.params"))  # the same shapes, other weights
    mx.nd.save(str(other / "pretrained.params"), {name: array + 0.01 for name, array in params.items()})
    run_dir = untrained_run(str(other), tmp_path / "other_run")
    result = refused_soup(runs[0], run_dir, out=tmp_path / "soup")
    sha1s = [fileio.sha1_of(os.path.join(folder, "pretrained.params")) for folder in (training_bert_dir, other)]
    assert_refused(result, f"Cannot average the weights of these runs: {runs[0]} was fine-tuned from "
                           f"{training_bert_dir} (weights SHA-1 {sha1s[0]}) and {run_dir} from {other} (weights "
                           f"SHA-1 {sha1s[1]}): different pretrained checkpoints.")


def test_a_soup_refuses_another_head_or_bert_shape_naming_it(runs, training_bert_dir, tmp_path):
    mean_pooled = untrained_run(training_bert_dir, tmp_path / "mean", pooling="mean")
    assert_refused(refused_soup(runs[0], mean_pooled, out=tmp_path / "soup"),
                   f"{runs[0]} has pooling cls and {mean_pooled} mean.")
    narrow = save_book_bert(str(tmp_path / "narrow_bert"), num_hiddens=16, ffn_num_hiddens=64, num_heads=2,
                            num_blks=1, max_len=64)
    with open(os.path.join(narrow, "config.json"), "w") as f:
        json.dump(dict(num_hiddens=16, ffn_num_hiddens=64, num_heads=2, num_blks=1, max_len=64), f)
    narrow_run = untrained_run(narrow, tmp_path / "narrow")
    assert_refused(refused_soup(runs[0], narrow_run, out=tmp_path / "soup"),
                   f"{runs[0]}'s BERT has num_hiddens 32 and {narrow_run}'s 16.")


def test_a_soup_names_a_member_whose_weights_are_damaged(runs, tmp_path):
    damaged = shutil.copytree(runs[1], tmp_path / "damaged")
    params = mx.nd.load(str(damaged / "model.params"))
    mx.nd.save(str(damaged / "model.params"), {name: array[:1] for name, array in params.items()})  # cut short
    assert_refused(refused_soup(runs[0], damaged, out=tmp_path / "soup"), f"{damaged / 'model.params'}: parameter",
                   "expected")
    (damaged / "model.params").write_bytes(b"not weights")
    assert_refused(refused_soup(runs[0], damaged, out=tmp_path / "soup"),
                   f"{damaged / 'model.params'} is not an MXNet parameter file (Check failed: ", "Invalid NDArray file")


def test_runs_older_than_the_weights_sha1_are_matched_by_name_and_runs_without_a_record_refused(runs, tmp_path):
    old = shutil.copytree(runs[1], tmp_path / "old")
    config = json.load(open(old / "config.json"))
    del config["pretrained"]["weights_sha1"]
    (old / "config.json").write_text(json.dumps(config))
    result = run_cli("soup", "--run", runs[0], "--run", old, "--out", tmp_path / "soup")
    assert result.returncode == 0, result.stderr
    assert f"warning: {old} records only the name of its pretrained checkpoint" in result.stderr
    for key in ("pretrained", "recipe"):
        del config[key]
    (old / "config.json").write_text(json.dumps(config))
    assert_refused(refused_soup(runs[0], old, out=tmp_path / "soup2"),
                   f"{old} does not record the pretrained checkpoint it was fine-tuned from")


def test_a_greedy_soup_adds_the_best_run_first_and_records_the_dev_accuracies(runs, training_bert_dir, dev_file,
                                                                             tmp_path):
    candidates = runs + [untrained_run(training_bert_dir, tmp_path / "untrained")]
    out = tmp_path / "greedy"
    result = run_cli("soup", *(a for r in candidates for a in ("--run", r)), "--greedy", "--dev", dev_file,
                     "--out", out, "--devices", "cpu")
    assert result.returncode == 0, result.stderr
    record = json.load(open(out / "config.json"))["soup"]
    premises, hypotheses, labels = snli.read_pairs(dev_file)
    own = {os.path.abspath(r): predict.load_predictor(r).predict_pairs(list(zip(premises, hypotheses))) for r in
           candidates}
    accuracies = {r: onp.mean([p["label"] == snli.LABELS[y] for p, y in zip(found, labels)]) for r, found in own.items()}
    tried = record["tried"]
    assert sorted(step["path"] for step in tried) == sorted(accuracies)
    for step in tried:
        assert step["dev_accuracy"] == pytest.approx(accuracies[step["path"]], abs=1e-9), step["path"]
    assert [s["dev_accuracy"] for s in tried] == sorted((s["dev_accuracy"] for s in tried), reverse=True)
    assert tried[0]["kept"] and tried[0]["dev_accuracy"] == max(accuracies.values())
    assert tried[0]["soup_dev_accuracy"] == tried[0]["dev_accuracy"]
    best = tried[0]["soup_dev_accuracy"]
    for step in tried[1:]:  # a run joins only if the soup's accuracy does not drop
        assert step["kept"] == (step["soup_dev_accuracy"] >= best)
        best = max(best, step["soup_dev_accuracy"]) if step["kept"] else best
    assert record["dev_accuracy"] == best and record["dev"]["pairs"] == len(labels) == DEV
    kept = [s["path"] for s in tried if s["kept"]]
    assert [m["path"] for m in record["members"]] == kept
    kept_params = [weights_of(r) for r in kept]
    soup = weights_of(str(out))
    for name in soup:
        onp.testing.assert_allclose(soup[name], onp.mean([p[name] for p in kept_params], axis=0), rtol=1e-6,
                                    atol=1e-9)
    scored = run_cli("predict", "--run", out, "--file", dev_file, "--quiet")
    assert f"accuracy {best:.4f} on the {DEV} lines" in scored.stderr


# Ensembles

def test_an_ensemble_of_one_run_predicts_what_the_run_predicts(runs, tmp_path):
    combine.ensemble(runs[:1], str(tmp_path / "ensemble"))
    assert onp.abs(probabilities(str(tmp_path / "ensemble"), dev_pairs()) -
                   probabilities(runs[0], dev_pairs())).max() < 1e-6


@pytest.fixture(scope="module")
def mixed_ensemble(runs, tiny_hf_bert, tmp_path_factory):
    """An ensemble of a book-BERT run and a run on a Hugging Face checkpoint: other vocabularies and tokenizers."""
    root = tmp_path_factory.mktemp("ensemble")
    hf_run = fine_tune("hf:" + tiny_hf_bert, root / "hf_run", 4)
    members = [runs[0], hf_run]
    result = run_cli("ensemble", "--run", runs[0], "--run", hf_run, "--out", root / "ensemble")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {root / 'ensemble'}: the mean of the probabilities of 2 runs, copied into " \
                            f"{root / 'ensemble'}/members/\n"
    return members, str(root / "ensemble")


def test_an_ensemble_predicts_the_mean_of_its_members_probabilities_each_with_its_own_tokenizer(mixed_ensemble):
    members, ensemble = mixed_ensemble
    expected = onp.mean([probabilities(m, dev_pairs()) for m in members], axis=0)
    assert onp.abs(probabilities(ensemble, dev_pairs()) - expected).max() < 1e-6
    assert onp.abs(probabilities(members[0], dev_pairs()) - probabilities(members[1], dev_pairs())).max() > 1e-3
    config = json.load(open(os.path.join(ensemble, "config.json")))
    assert config["ensemble"]["members"] == [
        {"dir": f"members/{i}", "path": os.path.abspath(m), "sha1": fileio.sha1_of(os.path.join(m, "model.params"))}
        for i, m in enumerate(members)]
    assert sorted(os.listdir(os.path.join(ensemble, "members", "1"))) == ["config.json", "model.params", "vocab.txt"]


def test_an_ensemble_stands_alone_evaluates_and_predicts_files_and_pairs(mixed_ensemble, tmp_path):
    members, ensemble = mixed_ensemble
    alone = shutil.copytree(ensemble, tmp_path / "moved")  # the members' own directories are no longer needed
    premises, hypotheses, labels = snli.read_pairs(DEV_PAIRS)
    expected = onp.mean([probabilities(m, list(zip(premises[:50], hypotheses[:50]))) for m in members], axis=0)
    result = run_cli("evaluate", "--run", alone, "--test", DEV_PAIRS, "--limit-test", 50, "--devices", "cpu",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    accuracy = json.load(open(alone / "eval.json"))["accuracy"]
    assert accuracy == pytest.approx(float((expected.argmax(axis=1) == labels[:50]).mean()))
    pairs_file = tmp_path / "pairs.tsv"
    pairs_file.write_text("".join(f"{p}\t{h}\n" for p, h in zip(premises[:50], hypotheses[:50])))
    result = run_cli("predict", "--run", alone, "--file", pairs_file, "--quiet")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    found = onp.array([[r["probabilities"][label] for label in snli.LABELS] for r in records])
    assert onp.abs(found - expected).max() < 1e-5
    result = run_cli("predict", "--run", alone, premises[0], hypotheses[0])
    assert json.loads(result.stdout)["probabilities"] == pytest.approx(dict(zip(snli.LABELS, expected[0])), abs=1e-5)


def test_an_ensembles_attention_is_its_members_mean_when_they_tokenize_alike(runs, tmp_path):
    ensemble = str(tmp_path / "ensemble")
    combine.ensemble(runs[:2], ensemble)
    pair = ("A man sleeps on a bench .", "A person is awake .")
    views = [predict.load_predictor(r).attention(*pair) for r in runs[:2]]
    predictor = predict.load_predictor(ensemble)
    view = predictor.attention(*pair)
    assert view.tokens == views[0].tokens
    onp.testing.assert_allclose(view.weights, (views[0].weights + views[1].weights) / 2, atol=1e-6)
    assert view.probabilities == predictor.predict(*pair)["probabilities"]
    result = run_cli("predict", "--run", ensemble, *pair, "--attention", tmp_path / "a.png", "--heads", "mean")
    assert result.returncode == 0 and (tmp_path / "a.png").exists(), result.stderr


def test_attention_of_members_that_tokenize_otherwise_is_refused_naming_a_member(mixed_ensemble, tmp_path):
    _, ensemble = mixed_ensemble
    result = run_cli("predict", "--run", ensemble, "A man sleeps .", "A man is awake .", "--attention",
                     tmp_path / "a.html")
    assert_refused(result, "split this pair into different tokens", f"--run {ensemble}/members/0")
    assert result.stdout == "" and not (tmp_path / "a.html").exists()


def test_an_exported_ensemble_predicts_the_same_with_onnx_runtime(mixed_ensemble, tmp_path):
    pytest.importorskip("onnx", reason="`nli export` needs onnx, which needs numpy>=2.1 on Python 3.13")
    _, ensemble = mixed_ensemble
    out = tmp_path / "onnx"
    result = run_cli("export", "--run", ensemble, "--out", out)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"wrote {out}/members/*/model.onnx (opset 17, fp32)")
    exported = predict.load_predictor(str(out))
    assert all(isinstance(member, predict.OnnxPredictor) for member in exported.members)
    premises, hypotheses, _ = snli.read_pairs(DEV_PAIRS)
    pairs = list(zip(premises[:200], hypotheses[:200]))
    assert onp.abs(probabilities(str(out), pairs) - probabilities(ensemble, pairs)).max() < 1e-5
    result = run_cli("predict", "--run", out, "A man sleeps .", "A man is awake .", "--attention", tmp_path / "a.html")
    assert_refused(result, "is an ONNX export", os.path.abspath(ensemble))
    again = run_cli("export", "--run", out, "--out", tmp_path / "again")
    assert_refused(again, "is already an ONNX export")


def test_an_ensemble_is_served_as_a_run_is(mixed_ensemble, tmp_path):
    pytest.importorskip("starlette", reason="`nli serve` needs starlette and uvicorn (requirements-serve.txt)")
    from test_serve import assert_same_predictions, call, predict_file, serving, stop
    _, ensemble = mixed_ensemble
    premises, hypotheses, _ = snli.read_pairs(DEV_PAIRS)
    pairs = list(zip(premises[:20], hypotheses[:20]))
    path = tmp_path / "pairs.tsv"
    path.write_text("".join(f"{p}\t{h}\n" for p, h in pairs))
    expected = predict_file(ensemble, str(path))
    with serving(ensemble, tmp_path) as (process, url, out, err):
        status, answer = call(url, "/api/predict", {"pairs": [list(pair) for pair in pairs]})
        assert status == 200
        assert_same_predictions(answer["predictions"], expected)
        status, answer = call(url, "/api/attention", {"premise": pairs[0][0], "hypothesis": pairs[0][1]})
        assert status == 422 and "split this pair into different tokens" in answer["error"]
        status, answer = call(url, "/api/health")
        assert status == 200 and answer["model"] == "MXNet, an ensemble of 2 runs"
        status, stdout, stderr = stop(process, out, err)
    assert status == 0 and "Traceback" not in stderr, stderr


def test_an_ensemble_refuses_runs_with_other_labels(runs, tmp_path):
    other = shutil.copytree(runs[1], tmp_path / "relabelled")
    config = json.load(open(other / "config.json"))
    config["labels"] = ["entailment", "neutral", "contradiction"]
    (other / "config.json").write_text(json.dumps(config))
    result = run_cli("ensemble", "--run", runs[0], "--run", other, "--out", tmp_path / "ensemble")
    assert_refused(result, f"Cannot make an ensemble of these runs: {runs[0]} has the labels entailment, "
                           f"contradiction, neutral and {other} entailment, neutral, contradiction.")
    assert not (tmp_path / "ensemble").exists()


# Bad --run and --out, for both commands

@pytest.mark.parametrize("command", ["soup", "ensemble"])
def test_a_bad_run_is_refused_in_one_sentence(command, runs, tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("not a run")
    combine.ensemble(runs[:2], str(tmp_path / "ensemble"))
    for bad, phrase in ((tmp_path / "missing", "there is no such directory"),
                        (tmp_path / "notes", "is not a finished run"),
                        (tmp_path / "ensemble", "is an ensemble: give the runs it was made of")):
        result = run_cli(command, "--run", runs[0], "--run", bad, "--out", tmp_path / "out")
        assert_refused(result, f"--run {bad}", phrase)
        assert not (tmp_path / "out").exists()
    assert_refused(run_cli(command, "--run", runs[0], "--run", runs[0] + "/", "--out", tmp_path / "out"),
                   f"--run {runs[0]}/ is given twice")
    result = run_cli(command, "--out", tmp_path / "out")  # argparse's own sentence, after the usage
    assert result.returncode == 2 and result.stderr.endswith("error: the following arguments are required: --run\n")


@pytest.mark.parametrize("command", ["soup", "ensemble"])
def test_an_out_holding_a_run_is_kept_unless_overwrite_and_other_files_are_never_lost(command, runs, tmp_path):
    out = shutil.copytree(runs[2], tmp_path / "out")
    before = snapshot(out)
    assert_refused(run_cli(command, "--run", runs[0], "--out", out),
                   f"{out} holds a finished run: choose another --out, or replace it with --overwrite.")
    assert snapshot(out) == before
    result = run_cli(command, "--run", runs[0], "--out", out, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert "--overwrite: replaced the earlier run's" in result.stdout
    assert not (out / "metrics.jsonl").exists() and not os.path.exists(f"{out}.old")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    assert_refused(run_cli(command, "--run", runs[0], "--out", tmp_path / "notes", "--overwrite"),
                   "holds files that are not a run's (a.txt)")
    assert_refused(run_cli(command, "--run", runs[0], "--out", runs[0], "--overwrite"),
                   "is one of the runs it is made from")


def test_greedy_and_dev_go_together(runs, dev_file, tmp_path):
    assert_refused(run_cli("soup", "--run", runs[0], "--greedy", "--out", tmp_path / "s"), "--greedy and --dev FILE")
    assert_refused(run_cli("soup", "--run", runs[0], "--dev", dev_file, "--out", tmp_path / "s"), "go together")


@pytest.mark.parametrize("command", ["soup", "ensemble"])
def test_a_crash_while_writing_leaves_the_earlier_run_whole_and_no_half_written_one(command, runs, tmp_path,
                                                                                  monkeypatch):
    out = shutil.copytree(runs[2], tmp_path / "out")
    before = snapshot(out)
    written = fileio.write_json

    def crash_at_config(path, obj, indent=1):  # the config is the last file each writes
        if path.endswith(os.path.join(".new", "config.json")):
            raise OSError(28, "No space left on device")
        written(path, obj, indent)
    monkeypatch.setattr(fileio, "write_json", crash_at_config)
    with pytest.raises(OSError):
        getattr(combine, command)(runs[:2], str(out), overwrite=True)
    assert snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no out.new, no out.old
