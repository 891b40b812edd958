"""Every chapter script runs in --quick mode, offline, and leaves its outputs."""
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, closed_port
from nli import chapter
from nli.recipe import Recipe

CHAPTER_OUTPUTS = {  # script -> files it must leave under --out
    "natural_language_inference_and_dataset.py": ["lengths.png"],
    "natural_language_inference_bert.py": ["config.json", "model.params", "metrics.jsonl", "curves.png",
                                           "results.json", "attention_before.png", "attention_after.png"],
    "exercise_bert_base.py": ["config.json", "model.params", "metrics.jsonl", "curves.png", "results.json"],
    "exercise_truncation.py": ["tokens_cut.png", "truncation.json", "ratio/metrics.jsonl"],
}
# The chapters that fine-tune run on the CPU. bert.base's real shape weighs 400 MB: the test runs the exercise's
# recipe on the served bert.small.
EXTRA_ARGS = {"natural_language_inference_bert.py": ["--devices", "cpu"],
              "exercise_bert_base.py": ["--devices", "cpu", "--model", "bert.small"],
              "exercise_truncation.py": ["--devices", "cpu"]}


@pytest.mark.parametrize("script", sorted(CHAPTER_OUTPUTS))
def test_chapter_runs_quick(script, hub_env, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chapters", script), "--quick", "--out", str(out),
                             *EXTRA_ARGS.get(script, [])], capture_output=True, text=True,
                            env={**hub_env, "PYTHONPATH": ROOT}, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in CHAPTER_OUTPUTS[script]:
        assert os.path.getsize(out / name) > 0, name
    if "results.json" in CHAPTER_OUTPUTS[script]:  # what the README's table reads: the run's own last test accuracy
        results = json.loads((out / "results.json").read_text())
        with open(out / "metrics.jsonl") as f:
            epochs = [m for m in map(json.loads, f) if m["kind"] == "epoch"]
        assert results["test_accuracy"] == epochs[-1]["test_acc"]
        assert results["train_pairs"] == epochs[-1]["examples"]
        assert 0 < results["train_seconds"] < results["wall_seconds"]
        assert results["examples_per_sec"] == pytest.approx(results["train_pairs"] / results["train_seconds"])
        assert results["command"].endswith(" ".join([script, "--quick", "--out", str(out), *EXTRA_ARGS[script]]))
        # The run records the model, data and --quick's settings it ran with
        recipe = Recipe(**json.loads((out / "config.json").read_text())["recipe"])
        assert (recipe.model, recipe.data, recipe.devices, recipe.out) == ("bert.small", "SNLI", "cpu", str(out))
        assert {name: getattr(recipe, name) for name in chapter.QUICK} == chapter.QUICK
        assert results["recipe"] == dataclasses.asdict(recipe)
    if script == "exercise_truncation.py":  # one run per rule; the summary (a results table's source) holds theirs
        summary = json.loads((out / "truncation.json").read_text())
        for rule in ("longest_first", "ratio"):
            run = json.loads((out / rule / "results.json").read_text())
            assert json.loads((out / rule / "config.json").read_text())["truncation"] == rule
            assert summary["test_accuracy"][rule] == run["test_accuracy"]
            assert summary["training"][rule]["examples_per_sec"] == run["examples_per_sec"]


def test_every_chapter_is_tested():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "chapters")) if f.endswith(".py")}
    assert scripts == set(CHAPTER_OUTPUTS)


def refusing_hub_env(tmp_path):
    """An environment whose every download is refused at once (the hub's files on a closed loopback port)."""
    port = closed_port()
    manifest = {name: {"url": f"http://127.0.0.1:{port}/{name}.zip", "sha1": "0" * 40}
                for name in ("bert.small", "bert.base", "SNLI")}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return {**os.environ, "NLI_HUB_MANIFEST": str(tmp_path / "manifest.json"), "NLI_DATA_DIR": str(tmp_path / "data"),
            "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT}, port


@pytest.mark.parametrize("script", sorted(CHAPTER_OUTPUTS))
def test_chapter_reports_a_user_error_in_one_line(script, tmp_path):
    env, port = refusing_hub_env(tmp_path)
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chapters", script), "--quick",
                             "--out", str(tmp_path / "out"), *EXTRA_ARGS.get(script, [])], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [message] = result.stderr.strip().splitlines()
    assert message.startswith("error: Could not download ") and f"127.0.0.1:{port}" in message


def in_a_checkout(tmp_path):
    """`tmp_path` laid out as the checkout for the README's commands (chapters/, tests/data/), written into alone."""
    for folder in ("chapters", "tests"):
        os.symlink(os.path.join(ROOT, folder), tmp_path / folder)
    return tmp_path


def test_main_chapter_runs_offline_on_a_hugging_face_bert_and_the_in_repo_pairs(tiny_hf_bert, tmp_path):
    env, _ = refusing_hub_env(tmp_path)
    command = ["chapters/natural_language_inference_bert.py", "--model", f"hf:{tiny_hf_bert}",
               "--pairs", "tests/data/snli_1.0_dev_pairs.tsv", "--quick"]  # the README's, with DIR a tiny BERT
    result = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env,
                            cwd=in_a_checkout(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "runs" / "chapter_bert"
    for name in CHAPTER_OUTPUTS["natural_language_inference_bert.py"]:
        assert os.path.getsize(out / name) > 0, name
    recipe = json.loads((out / "config.json").read_text())["recipe"]
    assert (recipe["model"], recipe["train"], recipe["test"], recipe["test_fraction"]) == (
        f"hf:{tiny_hf_bert}", command[4], None, 0.2)  # --pairs split by the default --test-fraction
    assert {name: recipe[name] for name in chapter.QUICK} == chapter.QUICK
    results = json.loads((out / "results.json").read_text())
    assert results["command"].endswith(" ".join(command))
    assert (results["train_pairs"], results["test_pairs"]) == (512, 256)  # of 7,874 and 1,968 after the split
    assert "before fine-tuning: predicted" in result.stdout and "after: predicted" in result.stdout


def test_dataset_chapter_reads_a_pair_file_offline(tmp_path):
    env, _ = refusing_hub_env(tmp_path)
    result = subprocess.run([sys.executable, "chapters/natural_language_inference_and_dataset.py",
                             "--pairs", "tests/data/snli_1.0_dev_pairs.tsv"], capture_output=True, text=True, env=env,
                            cwd=in_a_checkout(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # SNLI's dev split: 9,842 gold-labelled pairs (tests/data/README.md)
    assert "snli_1.0_dev_pairs.tsv:    9842 pairs  entailment 3329  contradiction 3278  neutral 3235" in result.stdout
    assert os.path.getsize(tmp_path / "runs" / "chapter_dataset" / "lengths.png") > 0



@pytest.mark.parametrize("data_dir", ["under-a-file/data", "/proc/nli-data", "/proc"])
def test_a_data_folder_that_cannot_be_written_is_one_sentence(data_dir, tmp_path):
    """Read-only without chmod (root writes anyway): a path through a regular file, and /proc, where nothing can be
    created (there filelock took the lock file it could not create for one held elsewhere, and waited for ever)."""
    (tmp_path / "under-a-file").write_text("a file, not a folder")
    env = {**os.environ, "NLI_DATA_DIR": data_dir, "PYTHONPATH": ROOT}
    env.pop("NLI_HUB_MANIFEST", None)
    script = os.path.join(ROOT, "chapters", "natural_language_inference_and_dataset.py")
    result = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [message] = result.stderr.strip().splitlines()  # was: OSError's traceback, or no end at all under /proc
    folder = os.path.join(tmp_path, data_dir)
    reason = "Not a directory" if "file" in data_dir else "No such file or directory"
    assert message == (f"error: Cannot write to the data folder {folder} ({reason}): set NLI_DATA_DIR to a folder "
                       f"this user can write (the default is the checkout's data/, else ~/.cache/nli).")
