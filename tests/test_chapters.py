"""Every chapter script runs in --quick mode, offline, and leaves its outputs."""
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, closed_port
from nli import rundir
from nli.recipe import Recipe

CHAPTER_OUTPUTS = {  # script -> files it must leave under --out
    "natural_language_inference_and_dataset.py": ["lengths.png"],
    "natural_language_inference_bert.py": ["config.json", "model.params", "metrics.jsonl", "curves.png",
                                           "results.json", "attention_before.png", "attention_after.png"],
    "exercise_bert_base.py": ["config.json", "model.params", "metrics.jsonl", "curves.png", "results.json"],
    "exercise_truncation.py": ["tokens_cut.png", "truncation.json", "ratio/metrics.jsonl"],
}
# bert.base's real shape weighs 400 MB: the test runs the exercise's recipe on the served bert.small.
EXTRA_ARGS = {"exercise_bert_base.py": ["--model", "bert.small"]}


@pytest.mark.parametrize("script", sorted(CHAPTER_OUTPUTS))
def test_chapter_runs_quick(script, hub_env, tmp_path):
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chapters", script), "--quick", "--devices", "cpu",
                             "--out", str(out), *EXTRA_ARGS.get(script, [])], capture_output=True, text=True, env=hub_env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for name in CHAPTER_OUTPUTS[script]:
        assert os.path.getsize(out / name) > 0, name
    if "results.json" in CHAPTER_OUTPUTS[script]:  # what the README's table reads: the run's own last test accuracy
        results = json.loads((out / "results.json").read_text())
        with open(out / "metrics.jsonl") as f:
            epochs = [m for m in map(json.loads, f) if m["kind"] == "epoch"]
        assert results["quick"] is True and results["test_accuracy"] == epochs[-1]["test_acc"]
        assert results["train_pairs"] == epochs[-1]["examples"]
        assert 0 < results["train_seconds"] < results["wall_seconds"]
        assert results["examples_per_sec"] == pytest.approx(results["train_pairs"] / results["train_seconds"])
        assert results["command"].endswith(f"{script} --quick --devices cpu --out {out}" + "".join(
            " " + a for a in EXTRA_ARGS.get(script, [])))
        # The checkpoint names the model and data, so `nli finetune --resume OUT` can continue the run alone
        recipe = Recipe.from_checkpoint(rundir.read_checkpoint(str(out))[1])
        assert (recipe.model, recipe.data, recipe.devices, recipe.out) == ("bert.small", "SNLI", "cpu", str(out))
        assert (recipe.limit_train, recipe.limit_test) == (512, 256)  # --quick's


def test_every_chapter_is_tested():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "chapters")) if f.endswith(".py")}
    assert scripts == set(CHAPTER_OUTPUTS)


@pytest.mark.parametrize("script", sorted(CHAPTER_OUTPUTS))
def test_chapter_reports_a_user_error_in_one_line(script, tmp_path):
    port = closed_port()
    manifest = {name: {"url": f"http://127.0.0.1:{port}/{name}.zip", "sha1": "0" * 40}
                for name in ("bert.small", "bert.base", "SNLI")}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    env = {**os.environ, "NLI_HUB_MANIFEST": str(tmp_path / "manifest.json"), "NLI_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, os.path.join(ROOT, "chapters", script), "--quick", "--devices", "cpu",
                             "--out", str(tmp_path / "out")], capture_output=True, text=True, env=env, cwd=tmp_path,
                            timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [message] = result.stderr.strip().splitlines()
    assert message.startswith("error: Could not download ") and f"127.0.0.1:{port}" in message


@pytest.mark.parametrize("data_dir", ["under-a-file/data", "/proc/nli-data", "/proc"])
def test_a_data_folder_that_cannot_be_written_is_one_sentence(data_dir, tmp_path):
    """Read-only without chmod (root writes anyway): a path through a regular file, and /proc, where nothing can be
    created (there filelock took the lock file it could not create for one held elsewhere, and waited for ever)."""
    (tmp_path / "under-a-file").write_text("a file, not a folder")
    env = {**os.environ, "NLI_DATA_DIR": data_dir}
    env.pop("NLI_HUB_MANIFEST", None)
    script = os.path.join(ROOT, "chapters", "natural_language_inference_and_dataset.py")
    result = subprocess.run([sys.executable, script, "--quick", "--out", str(tmp_path / "out")], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    [message] = result.stderr.strip().splitlines()  # was: OSError's traceback, or no end at all under /proc
    folder = os.path.join(tmp_path, data_dir)
    reason = "Not a directory" if "file" in data_dir else "No such file or directory"
    assert message == (f"error: Cannot write to the data folder {folder} ({reason}): set NLI_DATA_DIR to a folder "
                       f"this user can write (the default is data/ in the working directory).")
