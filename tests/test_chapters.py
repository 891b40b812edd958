"""Every chapter script runs in --quick mode, offline, and leaves its outputs."""
import os
import subprocess
import sys

import pytest

from conftest import ROOT

CHAPTER_OUTPUTS = {  # script -> files it must leave under --out
    "natural_language_inference_and_dataset.py": ["lengths.png"],
    "natural_language_inference_bert.py": ["config.json", "model.params", "metrics.jsonl", "curves.png"],
    "exercise_bert_base.py": ["config.json", "model.params", "metrics.jsonl", "curves.png"],
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


def test_every_chapter_is_tested():
    scripts = {f for f in os.listdir(os.path.join(ROOT, "chapters")) if f.endswith(".py")}
    assert scripts == set(CHAPTER_OUTPUTS)
