"""A user's slip gets one sentence saying what to do, before any work: a misspelt model name, GPUs that a CPU build
cannot see, float16; and a batch larger than the training set gets a warning, as the run goes on."""
import json

import mxnet as mx
import pytest

from conftest import DEV_PAIRS
from nli import cli, train
from nli.errors import UserError


@pytest.fixture(autouse=True)
def data_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("NLI_HUB_MANIFEST", raising=False)


def finetune(tmp_path, *options):
    return cli.main(["finetune", "--train", DEV_PAIRS, "--test", DEV_PAIRS, "--devices", "cpu", "--quiet",
                     "--out", str(tmp_path / "run"), *options])


def test_a_misspelt_model_name_gets_the_name_it_is_close_to(tmp_path, capsys):
    assert finetune(tmp_path, "--model", "bert.smal") == 2
    assert capsys.readouterr().err == ("error: 'bert.smal' is neither a model directory nor a known model name "
                                       "(known: bert.base, bert.small); did you mean bert.small?\n")
    assert finetune(tmp_path, "--model", "bert.enormous") == 2  # nothing close: no guess
    assert capsys.readouterr().err.endswith("(known: bert.base, bert.small); a Hugging Face BERT is named hf:DIR, "
                                            "or hf:ORG/NAME to take it from the Hub (as in "
                                            "hf:sentence-transformers/all-MiniLM-L6-v2).\n")


@pytest.mark.skipif(mx.context.num_gpus() > 0, reason="a machine with a GPU has one to give")
def test_gpus_that_mxnet_cannot_see_point_to_the_doctor(capsys):
    cpu_build = "" if mx.runtime.Features().is_enabled("CUDA") else " (this mxnet is built for CPUs only)"
    for command in (["predict", "--run", "RUN", "--devices", "gpu", "A man .", "A person ."],
                    ["evaluate", "--run", "RUN", "--test", DEV_PAIRS, "--devices", "gpu:0"]):
        assert cli.main(command) == 2
        spec = command[command.index("--devices") + 1]
        assert capsys.readouterr().err == (f"error: --devices {spec}: this machine has 0 GPU(s) visible to MXNet"
                                           f"{cpu_build}; `nli doctor` tells why, and which mxnet to install "
                                           f"for a GPU.\n")


def test_float16_is_refused_on_every_device_without_sending_the_user_to_a_gpu(tmp_path, capsys):
    assert finetune(tmp_path, "--model", "bert.small", "--dtype", "float16") == 2
    err = capsys.readouterr().err
    with pytest.raises(UserError) as on_a_gpu:
        train.check_dtype("float16", [mx.gpu(0)])  # a GPU context object: nothing runs on it
    assert err == f"error: {on_a_gpu.value}\n"
    assert err.startswith("error: --dtype float16 is refused on every device in this version: MXNet 1.9.1's mixed "
                          "precision (AMP) converts only legacy ndarray/symbol operators")
    assert err.endswith("Train in float32.\n") and "--devices gpu" not in err  # was: "or use --devices gpu"


def test_a_batch_larger_than_the_training_set_is_warned_of(training_bert_dir, tmp_path, capsys):
    assert finetune(tmp_path, "--model", training_bert_dir, "--limit-train", "16", "--limit-test", "8", "--epochs", "1",
                    "--batch-size", "100000", "--max-len", "32") == 0
    err = capsys.readouterr().err
    assert ("warning: batches of 100000 pairs hold more than the 16 training pairs, so each epoch is one update; "
            "a smaller --batch-size gives more.\n") in err
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [m["step"] for m in map(json.loads, f) if m["kind"] == "epoch"] == [1]  # one epoch, one update
