"""A run directory written by the code before the training engine was rebuilt (issue 17) still works:
its finished model evaluates and predicts as it did then, and its checkpoint resumes to the uninterrupted run
(bit for bit on the CPU that wrote it; within the rounding of another CPU's kernels elsewhere)."""
import json
import os
import shutil
import sys

import numpy as onp
import pytest
from mxnet import npx

from conftest import DATA, DEV_PAIRS, run_cli

sys.path.insert(0, DATA)
import make_legacy_run  # noqa: E402  (the script that wrote tests/data/legacy_run, and its command)

npx.set_np()
LEGACY_RUN = os.path.join(DATA, "legacy_run", "run")
# What the old code answered for this pair with the legacy run's best/ (`python -m nli predict`), on an AMD EPYC
# (AVX2). Compared within rel 1e-5: on an Intel Xeon (AVX-512, VNNI, AMX) other kernels move them by 1.8e-7 relative.
PAIR = ["A man plays a guitar on stage.", "A person makes music."]
OLD_PROBABILITIES = {"entailment": 0.33827725052833557, "contradiction": 0.44666001200675964,
                     "neutral": 0.2150627225637436}
# How far the resumed weights may lie from the uninterrupted run's. Bit equality is a same-machine promise (kept in
# tests/test_train.py); the checkpoint's first 12 steps were computed on an AMD EPYC (AVX2 only), and oneDNN picks
# its kernels (vector width, blocking by cache size) per CPU, so its floats differ elsewhere in the last bits, and
# 6 more steps carry that on. Measured on an Intel Xeon (AVX-512, VNNI, AMX): 7.3e-6 to 1.0e-5 in W_k.bias, whose
# gradient is zero in exact arithmetic (a bias on every key shifts all of a query's scores alike, which softmax
# ignores), so AdamW's normalised steps make rounding noise its whole value; at most 1.4e-6 in every other weight
# (scales 0.005 to 1). A faulty resume lands 6e-4 to 8e-4 away (measured: another seed for the dropout and shuffle
# after step 12, 6.2e-4; one batch skipped, 7.7e-4), as AdamW moves a weight by about the learning rate (1e-3,
# decaying to 0 over 18 steps) each step. 1e-4 lies 10x above the one and 6x below the other.
CROSS_CPU_ATOL = 1e-4


@pytest.fixture
def legacy_copy(tmp_path):
    """A copy of the legacy run directory, so the tests can write into it."""
    return shutil.copytree(LEGACY_RUN, tmp_path / "run")


def cli_env(tmp_path):
    return {**os.environ, "NLI_DATA_DIR": str(tmp_path / "data")}


def test_a_legacy_run_predicts_and_evaluates_as_it_did(legacy_copy, tmp_path):
    predicted = run_cli("predict", "--run", legacy_copy / "best", "--devices", "cpu", *PAIR, env=cli_env(tmp_path))
    assert predicted.returncode == 0, predicted.stderr
    result = json.loads(predicted.stdout)
    assert result["label"] == "contradiction"
    assert result["probabilities"] == pytest.approx(OLD_PROBABILITIES, rel=1e-5)

    evaluated = run_cli("evaluate", "--run", legacy_copy / "best", "--test", DEV_PAIRS, "--devices", "cpu",
                        "--out", tmp_path / "eval", "--quiet", env=cli_env(tmp_path))
    assert evaluated.returncode == 0, evaluated.stderr
    scores = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert scores["n"] == 9842 and scores["confusion"] == [[0, 3329, 0], [0, 3278, 0], [0, 3235, 0]]  # as then


def params_of(path):
    return {name: array.asnumpy() for name, array in npx.load(str(path)).items()}


def test_a_legacy_checkpoint_resumes_to_the_uninterrupted_run(legacy_copy, tmp_path):
    resumed = run_cli("finetune", "--resume", legacy_copy, env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert "at step 12 (epoch 2, batch 3)" in resumed.stdout  # where Ctrl-C stopped the old code
    assert "was written before runs recorded their data" in resumed.stdout  # resumed without the check
    # The run uninterrupted, with what the old code trained with and later versions changed (recipe.LEGACY)
    uninterrupted = run_cli(*make_legacy_run.FINETUNE, tmp_path / "uninterrupted", "--bucket-width", "8",
                            env=cli_env(tmp_path))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    reference, got = params_of(tmp_path / "uninterrupted" / "model.params"), params_of(legacy_copy / "model.params")
    assert reference.keys() == got.keys()
    distance = {k: float(onp.abs(reference[k] - got[k]).max()) for k in reference}
    assert max(distance.values()) <= CROSS_CPU_ATOL, sorted(distance.items(), key=lambda kv: -kv[1])[:3]
    config = json.loads((legacy_copy / "config.json").read_text())
    assert config["recipe"]["optimizer"] == "adamw" and config["recipe"]["dev_fraction"] == 0.25
    assert config["recipe"]["bucket_width"] == 8  # the old code's, which the resumed run kept and now records
    assert os.path.exists(legacy_copy / "best" / "model.params")
