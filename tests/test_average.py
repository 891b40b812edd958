"""Weight averaging (--average ema|swa): the average is the one computed by hand from the weights after each update,
it leaves the training as it was, it is what the run saves, scores and keeps in best/, and it resumes bit for bit."""
import dataclasses
import json
import re
import shutil
import signal

import mxnet as mx
import numpy as onp
import pytest
from mxnet import npx

import nli
from conftest import DEV_PAIRS, run_cli
from nli import cli, model, predict, rundir, snli, train
from nli.errors import UserError
from nli.recipe import BOOK
from test_multi_device import stopped_after
from test_train import checkpoint_state, cli_env, finetune_args, start_cli, wait_for

npx.set_np()
CPU = [mx.cpu()]
RUN = dict(train=DEV_PAIRS, test=DEV_PAIRS, limit_train=96, limit_test=16, epochs=2, batch_size=16, max_len=48,
           lr=1e-3, log_every=1, max_memory=8 * 2 ** 30, quiet=True)


def weights(net):
    return {name: p.data().asnumpy().copy() for name, p in net._collect_params_with_prefix().items()}


def recorded_run(model_dir, monkeypatch, **options):
    """Fine-tune a fresh classifier (seed 0, dropout on, 64 pairs in batches of 16, 2 epochs) in this process:
    (its weights at the end, its weights after each update, the steps at the end of each epoch)."""
    train.seed_everything(0)
    net, vocab = model.from_pretrained(model_dir, CPU, dropout=0.1)
    pairs = snli.read_pairs(DEV_PAIRS)
    train_set = snli.encode_pairs(*(c[:64] for c in pairs), vocab, 64)
    test_set = snli.encode_pairs(*(c[-16:] for c in pairs), vocab, 64)
    after_updates, apply_update = [], train.apply_update

    def recorded(*args, **kwargs):
        norm = apply_update(*args, **kwargs)
        after_updates.append(weights(net))
        return norm
    monkeypatch.setattr(train, "apply_update", recorded)
    recipe = dataclasses.replace(BOOK, **{"epochs": 2, "batch_size": 16, "lr": 1e-3, "max_len": 64,
                                          "max_memory": 8 * 2 ** 30, **options})
    epochs = train.finetune(net, train_set, test_set, recipe, progress=False)
    return weights(net), after_updates, [m["step"] for m in epochs]


@pytest.fixture(scope="module")
def plain(training_bert_dir):
    """The run without averaging."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        return recorded_run(training_bert_dir, monkeypatch)


def ema_by_hand(after_updates, decay):
    """EMA as documented: the first update copied, then each update's share max(1 - decay, 10 / (n + 9))."""
    average = {k: v.astype("float64") for k, v in after_updates[0].items()}
    for n, update in enumerate(after_updates[1:], start=2):
        share = max(1 - decay, 10 / (n + 9))
        average = {k: (1 - share) * average[k] + share * update[k] for k in average}
    return average


def swa_by_hand(after_updates, first):
    """SWA: the plain mean of the weights after the updates from number `first` (from 0) on."""
    return {k: onp.mean([update[k] for update in after_updates[first:]], axis=0, dtype="float64")
            for k in after_updates[0]}


@pytest.mark.parametrize("average", ["ema:0.0", "ema:0.9", "swa:1", "swa:2"])
def test_the_average_is_the_one_computed_by_hand_and_leaves_the_training_as_it_was(
        average, plain, training_bert_dir, monkeypatch):
    averaged, after_updates, epoch_steps = recorded_run(training_bert_dir, monkeypatch, average=average)
    # The same seed draws the same dropout and batches: every update's weights are the same, bit for bit
    assert len(after_updates) == len(plain[1]) == epoch_steps[-1] > 4
    assert all(onp.array_equal(got[k], expected[k]) for got, expected in zip(after_updates, plain[1]) for k in got)
    kind, number = average.split(":")
    if average == "ema:0.0":  # each update's share is all of it: the last weights, exactly
        expected = after_updates[-1]
        assert all(onp.array_equal(averaged[k], expected[k]) for k in expected)
    elif kind == "ema":
        expected = ema_by_hand(after_updates, float(number))
    else:  # the updates of the last epoch (of 2), or of both
        expected = swa_by_hand(after_updates, epoch_steps[0] if number == "1" else 0)
    for k in expected:
        onp.testing.assert_allclose(averaged[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
    moved = max(float(onp.abs(averaged[k] - after_updates[-1][k]).max()) for k in averaged)
    assert (moved == 0) == (average == "ema:0.0")  # an average of several updates is not the last weights


def test_cached_features_average_only_the_head_they_train(training_bert_dir, monkeypatch):
    averaged, after_updates, epoch_steps = recorded_run(training_bert_dir, monkeypatch, average="swa:1",
                                                        mode="features")
    net = model.from_pretrained(training_bert_dir, CPU)[0]
    kept = train.WeightAverage(dataclasses.replace(BOOK, average="swa", mode="features"), net, CPU[0]).averages
    assert set(kept) == {k for k in weights(net) if not k.startswith("encoder.")}  # one copy of the head alone
    start = weights(net)
    assert all(onp.array_equal(averaged[k], start[k]) for k in averaged if k.startswith("encoder."))
    expected = swa_by_hand(after_updates, epoch_steps[0])
    for k in expected:
        onp.testing.assert_allclose(averaged[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=k)


def accuracy_of(run_dir, params_file):
    """The accuracy of the run's classifier with the weights of `params_file` on the run's test pairs, scored in its
    batches."""
    net, vocab, config = model.load_run(str(run_dir), CPU)
    net.load_parameters(str(params_file), ctx=CPU)
    recipe = config["recipe"]
    encoded = snli.encode_pairs(*(c[:recipe["limit_test"]] for c in snli.read_pairs(recipe["test"])), vocab,
                                config["max_len"])
    return predict.accuracy(net, encoded, CPU, recipe["batch_size"])


def test_a_run_killed_mid_average_resumes_to_the_same_model_bytes(training_bert_dir, tmp_path):
    def args(out, *extra):  # 2 epochs of 30 updates, the second averaged
        return finetune_args(training_bert_dir, out, "--average", "swa:1", "--dev-fraction", "0.25", *extra)
    whole = run_cli(*args(tmp_path / "whole", "--keep-checkpoint"), env=cli_env(tmp_path))
    assert whole.returncode == 0, whole.stderr
    out = tmp_path / "killed"
    process = start_cli(args(out), cli_env(tmp_path))
    wait_for(lambda: (checkpoint_state(out) or {}).get("averaged_updates", 0) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = checkpoint_state(out)
    assert killed_at["epoch"] == 2 and 0 < killed_at["averaged_updates"] == killed_at["batch"] < 30
    resumed = run_cli("finetune", "--resume", out, env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    saved = [(tmp_path / run / "model.params").read_bytes() for run in ("whole", "killed")]
    assert saved[0] == saved[1]
    # The run saves the average, not its last weights (kept in the checkpoint), and results.json scores both
    raw = tmp_path / "whole" / rundir.CHECKPOINT / "model.params"
    assert raw.read_bytes() != saved[0] and (tmp_path / "whole" / rundir.CHECKPOINT / rundir.AVERAGE).exists()
    results = json.load(open(tmp_path / "whole" / "results.json"))
    assert results["recipe"]["average"] == "swa:1"
    assert results["test_accuracy"] == accuracy_of(tmp_path / "whole", tmp_path / "whole" / "model.params")
    assert results["raw_test_accuracy"] == accuracy_of(tmp_path / "whole", raw)
    epochs = [m for m in map(json.loads, open(tmp_path / "whole" / "metrics.jsonl")) if m["kind"] == "epoch"]
    assert "raw_test_acc" not in epochs[0] and {"raw_test_acc", "raw_dev_acc"} <= set(epochs[1])  # once averaged
    # best/ keeps the model the run would have saved at its best epoch: the average, once there is one
    if epochs[1]["dev_acc"] > epochs[0]["dev_acc"]:
        assert (tmp_path / "whole" / "best" / "model.params").read_bytes() == saved[0]


def test_an_averaging_run_resumes_on_two_devices_with_the_average_on_the_first(training_bert_dir, tmp_path,
                                                                                monkeypatch):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    options = dict(RUN, model=training_bert_dir, devices="cpu", average="ema:0.9", dropout=0.0)
    with monkeypatch.context() as stopping:
        stopped_after(stopping, 3)
        with pytest.raises(KeyboardInterrupt):
            nli.run("tuned", **options, out=str(tmp_path / "one"))
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    nli.run(resume=str(tmp_path / "one"), quiet=True)
    made = []
    average_init = train.WeightAverage.__init__

    def recorded(self, recipe, net, device):
        average_init(self, recipe, net, device)
        made.append(self)
    monkeypatch.setattr(train.WeightAverage, "__init__", recorded)
    nli.run(resume=str(tmp_path / "two"), devices="cpu:2", quiet=True)
    [average] = made
    assert average.device == mx.cpu(0) and {a.context for a in average.averages.values()} == {mx.cpu(0)}
    assert average.count == 12  # every update: 3 before the stop, 9 after
    one, two = (npx.load(str(tmp_path / run / "model.params")) for run in ("one", "two"))
    # The same updates, their gradients summed in another order: within rounding (test_multi_device.py)
    assert max(float(onp.abs(one[k].asnumpy() - two[k].asnumpy()).max()) for k in one) < 1e-4


@pytest.mark.parametrize("value, phrase", [
    ("mean", "expected ema[:DECAY] with DECAY in [0, 1), or swa[:EPOCHS] with EPOCHS at least 1"),
    ("ema:1", "expected ema[:DECAY]"), ("ema:x", "expected ema[:DECAY]"), ("swa:0", "expected ema[:DECAY]"),
    ("swa:1.5", "expected ema[:DECAY]")])
def test_a_value_that_is_no_average_is_refused_naming_what_is_expected(value, phrase, capsys):
    with pytest.raises(UserError, match="^" + re.escape(f"--average {value}: {phrase}")):
        nli.run(model="unused", out="unused", average=value)
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["finetune", "--average", value])
    assert f"argument --average: {value}: {phrase}" in capsys.readouterr().err


def test_averages_are_recorded_with_their_number_and_swa_needs_its_epochs():
    assert dataclasses.replace(BOOK, average="ema").average == "ema:0.999"
    assert dataclasses.replace(BOOK, average="swa").average == "swa:1"
    assert dataclasses.replace(BOOK, average="swa:5").average == "swa:5"  # the book's 5 epochs
    with pytest.raises(UserError, match=r"--average swa:3 averages the last 3 epochs, but the run has 2: give swa:N "
                                        r"with N at most --epochs\.$"):
        nli.run(model="unused", out="unused", average="swa:3", epochs=2)
