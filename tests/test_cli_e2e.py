"""The chapter's flow through `python -m nli`, offline: download -> finetune -> evaluate -> predict."""
import json
import os

import pytest

from conftest import DEV_PAIRS, run_cli
from nli.snli import LABELS

EPOCH_KEYS = {"epoch", "loss", "train_acc", "test_acc", "examples_per_sec"}


@pytest.fixture(scope="module")
def book_run(tmp_path_factory, served_dir, http_server):
    """A run fine-tuned through the CLI on the loopback server's bert.small and SNLI zips."""
    from conftest import sha1
    root = tmp_path_factory.mktemp("e2e")
    manifest = {name: {"url": f"{http_server}/{file}", "sha1": sha1(served_dir / file)}
                for name, file in (("bert.small", "bert.small.zip"), ("SNLI", "snli_1.0.zip"))}
    (root / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "NLI_HUB_MANIFEST": str(root / "manifest.json"), "NLI_DATA_DIR": str(root / "data")}
    env.pop("NLI_MIRROR", None)
    download = run_cli("download", "bert.small", env=env)
    assert download.returncode == 0, download.stderr
    assert os.path.exists(root / "data" / "bert.small" / "pretrained.params")
    run_dir = root / "run"
    result = run_cli("finetune", "--model", "bert.small", "--data", "SNLI", "--epochs", "1",
                     "--batch-size", "4", "--devices", "cpu", "--seed", "1", "--quiet", "--out", run_dir,
                     env=env)
    assert result.returncode == 0, result.stderr
    return run_dir, env


def test_finetune_writes_a_complete_run_dir(book_run):
    run_dir, _ = book_run
    for name in ("config.json", "vocab.json", "model.params", "metrics.jsonl", "curves.png"):
        assert os.path.getsize(run_dir / name) > 0, name
    epochs = [json.loads(line) for line in open(run_dir / "metrics.jsonl")]
    per_epoch = [e for e in epochs if EPOCH_KEYS <= e.keys()]
    assert [e["epoch"] for e in per_epoch] == [1]
    assert per_epoch[0]["examples_per_sec"] > 0  # its test_acc is checked against `evaluate` below
    config = json.load(open(run_dir / "config.json"))
    assert config["bert"]["num_hiddens"] == 256 and config["max_len"] == 128
    with open(run_dir / "curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_evaluate_writes_accuracy_and_confusion(book_run):
    run_dir, env = book_run
    result = run_cli("evaluate", "--run", run_dir, "--data", "SNLI", "--devices", "cpu", env=env)
    assert result.returncode == 0, result.stderr
    report = json.load(open(run_dir / "eval.json"))
    confusion = report["confusion"]
    assert len(confusion) == 3 and all(len(row) == 3 for row in confusion)
    assert sum(map(sum, confusion)) == report["n"] > 0
    assert report["accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / report["n"])
    epoch = [m for m in map(json.loads, open(run_dir / "metrics.jsonl")) if m["kind"] == "epoch"][-1]
    assert epoch["test_acc"] == pytest.approx(report["accuracy"], abs=1e-9)  # the loop scores as evaluate does
    assert f"{report['accuracy']:.4f}" in result.stdout


def test_predict_prints_label_and_probabilities(book_run):
    run_dir, env = book_run
    result = run_cli("predict", "--run", run_dir, "--devices", "cpu",
                     "Two women are embracing while holding to go packages .", "Two woman are holding packages .",
                     env=env)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    assert answer["label"] in LABELS
    assert set(answer["probabilities"]) == set(LABELS)
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert answer["label"] == max(answer["probabilities"], key=answer["probabilities"].get)


@pytest.mark.parametrize("args, phrase", [
    (["finetune", "--model", "bert.enormous", "--train", DEV_PAIRS, "--test", DEV_PAIRS, "--out", "x"],
     "bert.enormous"),
    (["evaluate", "--run", "/nonexistent/run", "--test", DEV_PAIRS], "/nonexistent/run"),
    (["finetune", "--model", "bert.small", "--train", "/nonexistent/train.tsv", "--test", DEV_PAIRS,
      "--out", "x"], "/nonexistent/train.tsv"),
])
def test_user_mistakes_print_one_sentence_without_traceback(args, phrase, hub_env):
    result = run_cli(*args, env=hub_env)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert phrase in result.stderr


def test_bad_data_line_names_file_and_line(tmp_path, hub_env):
    bad = tmp_path / "train.tsv"
    bad.write_text("premise\thypothesis\tlabel\nA man .\tA person .\tentailment\nA dog .\tonly two fields\n")
    result = run_cli("finetune", "--model", "bert.small", "--train", bad, "--test", bad, "--out",
                     tmp_path / "run", env=hub_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "train.tsv, line 3" in result.stderr


def test_finetunes_on_the_real_pairs(book_run, tmp_path):
    _, env = book_run
    model_dir = os.path.join(env["NLI_DATA_DIR"], "bert.small")
    result = run_cli("finetune", "--model", model_dir, "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                     "--limit-train", 256, "--limit-test", 128, "--epochs", 1, "--batch-size", 64,
                     "--devices", "cpu", "--quiet", "--out", tmp_path / "real", env=env)
    assert result.returncode == 0, result.stderr
    assert "256 training pairs, 128 test pairs" in result.stdout
    epochs = [m for m in map(json.loads, open(tmp_path / "real" / "metrics.jsonl")) if m["kind"] == "epoch"]
    assert len(epochs) == 1 and EPOCH_KEYS <= epochs[0].keys()
    assert (epochs[0]["examples"], epochs[0]["step"]) == (256, 4)  # every pair, in 4 batches of 64


@pytest.mark.parametrize("files", [("config.json", "vocab.txt", "model.safetensors"), ("config.json", "vocab.txt"),
                                   ("model.safetensors",)], ids=["full", "no-weights", "weights-only"])
def test_a_hugging_face_directory_without_hf_prefix_gets_a_hint(files, tmp_path, hub_env):
    checkpoint = tmp_path / "minilm"
    checkpoint.mkdir()
    for name in files:
        (checkpoint / name).write_text("{}")
    result = run_cli("finetune", "--model", checkpoint, "--train", DEV_PAIRS, "--test", DEV_PAIRS,
                     "--out", tmp_path / "run", env=hub_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    [message] = result.stderr.strip().splitlines()
    assert f"--model hf:{checkpoint}" in message and "Missing vocabulary file" not in message
    assert not (tmp_path / "run").exists()
