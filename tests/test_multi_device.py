"""Several devices, on CPU contexts: a run resumes on more devices than it started on, every device's copy of the
weights stays the same after every update, and no operator is handed the arrays of two devices (across GPUs that
would be a cross-device call)."""
import json
import shutil

import mxnet as mx
import numpy as onp
import pytest
from mxnet import npx
from mxnet.ndarray import register

import nli
from conftest import DEV_PAIRS
from nli import train

npx.set_np()
RUN = dict(train=DEV_PAIRS, test=DEV_PAIRS, limit_train=96, limit_test=16, epochs=2, batch_size=16, max_len=48,
           lr=1e-3, dropout=0.0, max_grad_norm=1.0, log_every=1, max_memory=8 * 2 ** 30, quiet=True)


@pytest.fixture
def copies_checked(monkeypatch):
    """After every update, each parameter's copies (one per device) are compared; the updates are counted."""
    updates = []
    apply_update = train.apply_update

    def checked(trainer, params, devices, *args, **kwargs):
        norm = apply_update(trainer, params, devices, *args, **kwargs)
        for name, p in params.items():
            first, *others = (arr.asnumpy() for arr in p.list_data())
            assert all(onp.array_equal(first, other) for other in others), f"update {len(updates) + 1}: {name}"
        updates.append(len(devices))
        return norm
    monkeypatch.setattr(train, "apply_update", checked)
    return updates


def stopped_after(monkeypatch, step):
    """Make the next run stop (as Ctrl-C does: a checkpoint, then KeyboardInterrupt) once it has made `step` updates."""
    stop_if_requested = train.stop_if_requested

    def stop_at_step(stop, checkpoint, run, state):
        if state.step == step:
            stop.set()
        return stop_if_requested(stop, checkpoint, run, state)
    monkeypatch.setattr(train, "stop_if_requested", stop_at_step)


def params_of(path):
    return {name: array.asnumpy() for name, array in npx.load(str(path)).items()}


def test_a_run_started_on_one_device_resumes_on_two(training_bert_dir, tmp_path, monkeypatch, copies_checked):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    with monkeypatch.context() as stopping:
        stopped_after(stopping, 3)
        with pytest.raises(KeyboardInterrupt):
            nli.run("tuned", model=training_bert_dir, devices="cpu", out=str(tmp_path / "one"), **RUN)
    shutil.copytree(tmp_path / "one", tmp_path / "two")
    nli.run(resume=str(tmp_path / "one"), quiet=True)
    assert copies_checked[3:] == [1] * 9  # 12 updates in all, 9 after the checkpoint
    del copies_checked[:]
    nli.run(resume=str(tmp_path / "two"), devices="cpu:2", quiet=True)
    assert copies_checked == [2] * 9  # each checked: both copies equal after every update
    one, two = params_of(tmp_path / "one" / "model.params"), params_of(tmp_path / "two" / "model.params")
    # The same updates, their gradients summed in another order (half the batch on each device): within rounding.
    # Had the second device restarted Adam's step count, its copy would differ from the first after one update.
    assert max(float(onp.abs(one[k] - two[k]).max()) for k in one) < 1e-4
    # The memory budget was a share of where the run was: the same devices keep it, others choose it again.
    budgets = [json.load(open(tmp_path / run / "config.json"))["recipe"]["max_memory"] for run in ("one", "two")]
    assert budgets[0] == RUN["max_memory"] != budgets[1]


def test_no_operator_is_given_the_arrays_of_two_devices(training_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    mixed, invoked = [], []
    imperative_invoke = register._imperative_invoke  # every operator of mx.nd (updates, norms, zeroing) goes here

    def one_device_only(handle, ndargs, *args):
        contexts = {a.context for a in ndargs if isinstance(a, mx.nd.NDArray)}
        invoked.append(handle)
        if len(contexts) > 1:
            mixed.append(contexts)
        return imperative_invoke(handle, ndargs, *args)
    monkeypatch.setattr(register, "_imperative_invoke", one_device_only)
    nli.run("tuned", model=training_bert_dir, devices="cpu:2", out=str(tmp_path / "run"), **dict(RUN, epochs=1))
    assert invoked and not mixed, mixed[:3]
