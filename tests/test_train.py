"""The training engine: exact resume after SIGKILL and Ctrl-C, accumulation, NaN stop, frozen and cached encoders."""
import dataclasses
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from unittest import mock

import mxnet as mx
import numpy as onp
import pytest
from mxnet import autograd, gluon, npx

from conftest import DEV_PAIRS, ROOT, budget_for, run_cli
from test_multi_device import stopped_after
from nli import bert, cli, data, fileio, model, rundir, runner, snli, train
from nli.errors import UserError
from nli.recipe import BOOK, TUNED, Recipe

npx.set_np()
CPU = [mx.cpu()]


def finetune_args(model_dir, out, *extra):
    """A small run on the real pairs: 320 of them in batches of 8, two epochs, the tuned recipe (AdamW,
    warmup, linear decay, clipping), dropout on, a checkpoint every 2 updates."""
    return ["finetune", "--model", model_dir, "--train", DEV_PAIRS, "--test", DEV_PAIRS, "--limit-train", 320,
            "--limit-test", 64, "--recipe", "tuned", "--epochs", 2, "--batch-size", 8, "--max-len", 64,
            "--lr", 1e-3, "--save-every", 2, "--log-every", 1, "--devices", "cpu", "--seed", 3, "--quiet",
            "--out", out, *extra]


def cli_env(tmp_path):
    return {**os.environ, "NLI_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": ROOT}


def start_cli(args, env):
    """`python -m nli ARGS` started in the background."""
    return subprocess.Popen([sys.executable, "-m", "nli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_for(condition, process, timeout=120):
    """Poll `condition()` until true; fail if the process ends first or the time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def checkpoint_state(run_dir):
    """The state.json of the run's checkpoint, or None while there is none."""
    try:
        with open(os.path.join(run_dir, "checkpoint", "state.json")) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def params_of(path):
    return {name: array.asnumpy() for name, array in npx.load(str(path)).items()}


def epoch_figures(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [(m["epoch"], m["loss"], m["train_acc"], m["test_acc"]) for m in map(json.loads, f)
                if m["kind"] == "epoch"]


def killed_after_two_updates(args, out, tmp_path):
    """`python -m nli ARGS` killed (SIGKILL) once its run `out` has checkpointed 2 updates: that checkpoint's state."""
    process = start_cli(args, cli_env(tmp_path))
    wait_for(lambda: (checkpoint_state(out) or {}).get("step", 0) >= 2, process)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    return checkpoint_state(out)


@pytest.fixture(scope="module")
def uninterrupted(training_bert_dir, tmp_path_factory):
    """The reference: the small run, start to end in one process."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = run_cli(*finetune_args(training_bert_dir, out), env=cli_env(out.parent))
    assert result.returncode == 0, result.stderr
    assert '"optimizer": "adamw"' in result.stdout  # the recipe is printed in full
    return out


def test_sigkill_mid_epoch_then_resume_ends_bit_identical(uninterrupted, training_bert_dir, tmp_path):
    out = tmp_path / "run"
    killed_at = killed_after_two_updates(finetune_args(training_bert_dir, out), out, tmp_path)
    assert killed_at["epoch"] == 1 and killed_at["batch"] > 0  # in the middle of the first epoch

    resumed = run_cli("finetune", "--resume", out, env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert f"at step {killed_at['step']} (epoch 1, batch {killed_at['batch']})" in resumed.stdout
    reference, got = params_of(uninterrupted / "model.params"), params_of(out / "model.params")
    assert reference.keys() == got.keys()
    assert all(onp.array_equal(reference[k], got[k]) for k in reference)  # bit for bit
    assert epoch_figures(out) == epoch_figures(uninterrupted)
    config = json.load(open(out / "config.json"))
    assert config["recipe"]["optimizer"] == "adamw" and config["recipe"]["schedule"] == "linear"


def test_a_run_killed_for_memory_resumes_in_less(training_bert_dir, tmp_path):
    no_dropout = ("--dropout", 0)  # dropout draws its masks per micro-batch: no longer the same sums
    uninterrupted = run_cli(*finetune_args(training_bert_dir, tmp_path / "reference", *no_dropout),
                            env=cli_env(tmp_path))
    assert uninterrupted.returncode == 0, uninterrupted.stderr
    out = tmp_path / "run"
    killed_after_two_updates(finetune_args(training_bert_dir, out, *no_dropout), out, tmp_path)  # as the OOM killer
    budget = budget_for(model.from_pretrained(training_bert_dir, CPU)[0], 3, 64)  # 3 of the 8 pairs fit

    resumed = run_cli("finetune", "--resume", out, "--max-memory", budget, env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert "train in micro-batches of" in resumed.stdout
    assert json.load(open(out / "config.json"))["recipe"]["max_memory"] == budget
    reference, got = params_of(tmp_path / "reference" / "model.params"), params_of(out / "model.params")
    # the same sums in another order: 4e-5 apart after 80 updates here, where dropout's masks alone give 2e-2
    assert max(float(onp.abs(reference[k] - got[k]).max()) for k in reference) < 2e-4
    assert not all(onp.array_equal(reference[k], got[k]) for k in reference)  # yet the batches were cut


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(uninterrupted, training_bert_dir, tmp_path):
    out = tmp_path / "run"
    args = [a if a != "--save-every" else "--log-every" for a in finetune_args(training_bert_dir, out)]
    process = start_cli(args, cli_env(tmp_path))  # no periodic checkpoints: the one after Ctrl-C is all

    def updates_logged():
        try:
            return sum(1 for line in open(out / "metrics.jsonl") if '"kind": "step"' in line) >= 3
        except FileNotFoundError:
            return False
    wait_for(updates_logged, process)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    stopped = checkpoint_state(out)
    assert stopped["step"] >= 3 and stopped["batch"] > 0
    assert f"stopped at step {stopped['step']} " in stdout and f"--resume {out}" in stdout

    resumed = run_cli("finetune", "--resume", out, env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    reference, got = params_of(uninterrupted / "model.params"), params_of(out / "model.params")
    assert all(onp.array_equal(reference[k], got[k]) for k in reference)


def number_next_dense_layers_from(first):
    """Make Gluon name the next Dense layers it builds `dense{first}`, `dense{first + 1}`, ... (at least)."""
    while int(gluon.nn.Dense(1).name[len("dense"):]) < first - 1:
        pass


def test_a_resume_in_a_process_that_built_other_layers_is_exact(uninterrupted, training_bert_dir, tmp_path,
                                                                monkeypatch):
    # A notebook's kernel: Gluon numbers layers across the process, and its Trainer orders parameters by those names.
    # The stopped run's Dense layers are all numbered with one digit count; the resumed run's cross to one more
    # (dense...98, dense...99, dense...100), so the Trainer orders their parameters otherwise.
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    out = tmp_path / "run"
    digits = len(str(int(gluon.nn.Dense(1).name[len("dense"):]) + 100))
    number_next_dense_layers_from(10 ** digits + 10)
    with monkeypatch.context() as stopping:
        stopped_after(stopping, 3)
        assert cli.main(list(map(str, finetune_args(training_bert_dir, out)))) == 130
    saved_order = checkpoint_state(out)["optimizer_parameters"]
    number_next_dense_layers_from(10 ** (digits + 1) - 3)
    assert cli.main(["finetune", "--resume", str(out), "--keep-checkpoint", "--quiet"]) == 0
    assert checkpoint_state(out)["optimizer_parameters"] != saved_order  # the Trainer's order did change
    reference, got = params_of(uninterrupted / "model.params"), params_of(out / "model.params")
    assert all(onp.array_equal(reference[k], got[k]) for k in reference)


def test_resume_refuses_a_dir_without_checkpoint_or_new_settings(tmp_path):
    assert cli.main(["finetune", "--resume", str(tmp_path)]) == 2
    assert cli.main(["finetune", "--resume", str(tmp_path), "--epochs", "9"]) == 2
    with pytest.raises(UserError, match="no checkpoint"):
        rundir.read_checkpoint(str(tmp_path))


def test_finetune_options_are_the_recipes_fields():
    parse = cli.build_parser().parse_args
    args = parse(["finetune", "--recipe", "tuned", "--lr", "5e-5", "--extract-features", "--limit-train", "8"])
    assert runner.recipe_of(*cli.finetune_settings(args)) == dataclasses.replace(TUNED, lr=5e-5, mode="features",
                                                                                  limit_train=8)
    every = [token for field in dataclasses.fields(Recipe)[1:] if getattr(TUNED, field.name) is not None
             for token in (f"--{field.name.replace('_', '-')}", str(getattr(TUNED, field.name)))]
    every_option = runner.recipe_of(*cli.finetune_settings(parse(["finetune", *every])))
    assert every_option == dataclasses.replace(TUNED, name="book")
    with pytest.raises(SystemExit):
        parse(["finetune", "--optimizer", "sgd"])  # the choices are the Recipe's
    with pytest.raises(UserError, match="optimizer 'sgd'"):
        dataclasses.replace(BOOK, optimizer="sgd")


def test_float16_fails_clearly_without_a_gpu(capsys):
    assert cli.main(["finetune", "--model", "bert.small", "--data", "SNLI", "--devices", "cpu",
                     "--dtype", "float16", "--out", "unused"]) == 2
    assert "--dtype float16 is refused on every device" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pairs():
    return snli.read_pairs(DEV_PAIRS)


def small_run(model_dir, pairs, n_train=64, dropout=0.0, **options):
    """Fine-tune a fresh classifier from seed 0 in this process: (net, per-epoch metrics)."""
    train.seed_everything(0)
    net, vocab = model.from_pretrained(model_dir, CPU, dropout=dropout, pooling=options.get("pooling", "cls"))
    train_set = snli.encode_pairs(*(c[:n_train] for c in pairs), vocab, 64)
    test_set = snli.encode_pairs(*(c[-32:] for c in pairs), vocab, 64)
    live = {k: options.pop(k) for k in ("loss",) if k in options}  # the rest is the recipe
    recipe = dataclasses.replace(BOOK, **{"epochs": 2, "batch_size": 16, "lr": 1e-3, "max_len": 64,
                                          "out": options.pop("run_dir", None), **options})
    return net, train.finetune(net, train_set, test_set, recipe, progress=False, **live)


def weights(net):
    return {name: p.data().asnumpy().copy() for name, p in net._collect_params_with_prefix().items()}


def test_accumulating_n_batches_updates_as_one_batch_n_times_larger(training_bert_dir, pairs, tmp_path):
    # 16 pairs: one batch of 16, or two of 8 accumulated; AdamW, warmup, decay and clipping all apply.
    recipe = dict(n_train=16, epochs=3, optimizer="adamw", weight_decay=0.01, warmup_ratio=0.3,
                  schedule="linear", max_grad_norm=0.5, log_every=1)
    large, _ = small_run(training_bert_dir, pairs, batch_size=16, run_dir=str(tmp_path / "large"), **recipe)
    accumulated, _ = small_run(training_bert_dir, pairs, batch_size=8, accumulate=2,
                               run_dir=str(tmp_path / "accumulated"), **recipe)
    a, b = weights(large), weights(accumulated)
    assert max(float(onp.abs(a[k] - b[k]).max()) for k in a) < 1e-5

    def grad_norms(run_dir):
        return [m["grad_norm"] for m in map(json.loads, open(run_dir / "metrics.jsonl")) if m["kind"] == "step"]
    norms = grad_norms(tmp_path / "large")
    assert len(norms) == 3 and onp.allclose(norms, grad_norms(tmp_path / "accumulated"), rtol=1e-5)
    start, _ = small_run(training_bert_dir, pairs, epochs=0)
    assert max(float(onp.abs(a[k] - weights(start)[k]).max()) for k in a) > 1e-3  # the updates moved it


def test_mean_pooling_averages_the_valid_tokens_and_the_run_keeps_it(training_bert_dir, pairs, tmp_path):
    net, _ = small_run(training_bert_dir, pairs, epochs=1, pooling="mean")
    vocab = model.load_tokenizer(training_bert_dir, {})
    encoded = snli.encode_pairs(*(c[:6] for c in pairs), vocab, 64)
    tokens, segments, valid_lens, _ = (mx.np.array(a) for a in data.make_batch(encoded, onp.arange(6)))
    outputs = net.encoder(tokens, segments, valid_lens).asnumpy()
    expected = [outputs[i, :int(n)].mean(axis=0) for i, n in enumerate(valid_lens.asnumpy())]
    assert valid_lens.asnumpy().min() < tokens.shape[1]  # some pairs are padded: padding must not count
    onp.testing.assert_allclose(net.pool(mx, mx.np.array(outputs), valid_lens).asnumpy(), expected, rtol=1e-5,
                                atol=1e-6)
    logits = net(tokens, segments, valid_lens).asnumpy()
    model.save_run(str(tmp_path / "run"), net, vocab, train.run_config(net, encoded, BOOK))  # the net's pooling
    loaded, _, config = model.load_run(str(tmp_path / "run"), CPU)
    assert config["pooling"] == loaded.pooling == "mean"
    onp.testing.assert_allclose(loaded(tokens, segments, valid_lens).asnumpy(), logits, rtol=1e-5, atol=1e-6)
    del config["pooling"]  # as runs from before --pooling say: then the same weights read <cls>, other logits
    fileio.write_json(str(tmp_path / "run" / "config.json"), config)
    as_cls = model.load_run(str(tmp_path / "run"), CPU)[0]
    assert as_cls.pooling == "cls" and onp.abs(as_cls(tokens, segments, valid_lens).asnumpy() - logits).max() > 1e-4


def test_layer_decay_gives_each_layer_its_rate(training_bert_dir, pairs):
    two_layers = model.BERTClassifier(model.bert_lib.BERTModel(vocab_size=20, num_hiddens=8, ffn_num_hiddens=16,
                                                               num_heads=2, num_blks=2, dropout=0.0, max_len=16))
    train.set_layer_decay(two_layers, 0.5)
    rates = {name: p.lr_mult for name, p in two_layers._collect_params_with_prefix().items()}
    assert {rates[k] for k in rates if k.startswith("encoder.blks.1.")} == {1.0}
    assert {rates[k] for k in rates if k.startswith("encoder.blks.0.")} == {0.5}
    assert {rates[k] for k in rates if k.startswith("encoder.") and ".blks." not in k} == {0.25}
    assert {rates[k] for k in rates if not k.startswith("encoder.")} == {1.0}  # the head
    # Adam's first step moves each weight by lr * its rate (m / sqrt(v) is the gradient's sign): the rates apply.
    start = weights(small_run(training_bert_dir, pairs, epochs=0)[0])
    stepped = weights(small_run(training_bert_dir, pairs, n_train=16, epochs=1, layer_decay=0.5)[0])
    # (not the keys' bias: it adds the same to every score of a query, so softmax gives it no gradient)
    moved = {k: float(onp.abs(stepped[k] - start[k]).max()) for k in start if not k.endswith("W_k.bias")}
    for name, distance in moved.items():  # one block: the block and the head at lr 1e-3, the embeddings at half
        rate = 0.5 if name.startswith("encoder.") and ".blks." not in name else 1.0
        assert distance == pytest.approx(1e-3 * rate, rel=1e-3), name


class LossTurningNaN(gluon.loss.SoftmaxCrossEntropyLoss):
    """The usual loss, except that its `bad_call`-th evaluation is NaN: a diverging run, on demand."""

    def __init__(self, bad_call):
        super().__init__()
        self.calls, self.bad_call = 0, bad_call

    def forward(self, pred, label):
        self.calls += 1
        loss = super().forward(pred, label)
        return self.spoil(loss, pred) if self.calls == self.bad_call else loss

    def spoil(self, loss, pred):
        return loss * float("nan")


class GradientTurningNaN(LossTurningNaN):
    """The usual loss, plus at its `bad_call`-th evaluation 0 * sqrt(0) of the predictions: the same number, whose
    gradient is not a number."""

    def spoil(self, loss, pred):
        return loss + 0 * mx.np.sqrt(pred - pred).sum(axis=1)


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_checkpoint(training_bert_dir, pairs, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(train.TrainingDiverged, match=r"loss is nan at step 3 \(epoch 1, batch 3\).*"
                                                     r"last good checkpoint is .*checkpoint"):
        small_run(training_bert_dir, pairs, run_dir=str(run_dir), save_every=2, loss=LossTurningNaN(3))
    folder, state = rundir.read_checkpoint(str(run_dir))
    assert state["step"] == 2 and state["batch"] == 2
    net, _ = model.from_pretrained(training_bert_dir, CPU)
    net.load_parameters(os.path.join(folder, "model.params"), ctx=CPU)
    assert all(onp.isfinite(w).all() for w in weights(net).values())


def test_cached_features_train_the_head_as_a_frozen_encoder_does(training_bert_dir, pairs, tmp_path):
    frozen, _ = small_run(training_bert_dir, pairs, mode="freeze-encoder")
    cached, _ = small_run(training_bert_dir, pairs, mode="features", run_dir=str(tmp_path / "run"))
    start, _ = small_run(training_bert_dir, pairs, epochs=0)
    a, b, initial = weights(frozen), weights(cached), weights(start)
    assert max(float(onp.abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert all(onp.array_equal(a[k], initial[k]) for k in a if k.startswith("encoder."))
    assert float(onp.abs(a["output.weight"] - initial["output.weight"]).max()) > 1e-3
    assert len(os.listdir(tmp_path / "run" / "features")) == 2  # train and test features, cached


def test_freeze_epochs_train_the_head_first_then_everything(training_bert_dir, pairs):
    start = weights(small_run(training_bert_dir, pairs, epochs=0)[0])
    first = weights(small_run(training_bert_dir, pairs, epochs=1, freeze_epochs=1)[0])
    both = weights(small_run(training_bert_dir, pairs, epochs=2, freeze_epochs=1)[0])
    encoder = [k for k in start if k.startswith("encoder.")]
    assert all(onp.array_equal(first[k], start[k]) for k in encoder)
    assert max(float(onp.abs(both[k] - first[k]).max()) for k in encoder) > 1e-4


def test_adamw_decays_weights_but_not_biases_or_layernorm():
    net = gluon.nn.HybridSequential()
    net.add(gluon.nn.Dense(4, in_units=3), gluon.nn.LayerNorm(in_channels=4))
    net.initialize(mx.init.Constant(0.5))
    trainer = train.make_trainer(net, dataclasses.replace(BOOK, optimizer="adamw", lr=0.1, weight_decay=0.01),
                                 "device", 10)
    before = {name: p.data().asnumpy() for name, p in net.collect_params().items()}
    with mx.autograd.record():
        out = net(mx.np.ones((2, 3))).sum() * 0  # zero gradients: only the decay moves weights
    out.backward()
    trainer.step(1)
    for name, p in net.collect_params().items():
        expected = before[name] * (1 - 0.1 * 0.01) if name.endswith("weight") else before[name]
        onp.testing.assert_allclose(p.data().asnumpy(), expected, rtol=1e-6)


def test_adamw_steps_as_mxnets_decoupled_adamw_kernel_and_groups_parameters_by_size():
    # Three steps on random weights and gradients, with rate multipliers and decay, all parameters in one call:
    # one large weight alone, and small ones sharing calls. Each must move as MXNet's single-weight decoupled
    # kernel, contrib.adamw_update, moves it alone with its own rate and decay.
    rng = onp.random.RandomState(0)
    shapes = [(300, 400), (7, 5), (7, 5), (5, 7), (3,)]
    weights = [mx.nd.array(rng.randn(*shape)) for shape in shapes]
    references = [w.copy() for w in weights]
    moments = [(mx.nd.zeros(shape), mx.nd.zeros(shape)) for shape in shapes]
    optimizer = train.make_optimizer("adamw", 0.01, 0.1, "constant", 0.0, 10)
    optimizer.set_lr_mult({0: 0.5, 2: 0.25})
    optimizer.set_wd_mult({3: 0.0})
    optimizer.rescale_grad = 0.25
    updater = mx.optimizer.get_updater(optimizer)
    calls = []
    kernel = mx.nd._internal._multi_adamw_update
    with mock.patch.object(mx.nd._internal, "_multi_adamw_update",
                           side_effect=lambda *a, **k: calls.append(k["num_weights"]) or kernel(*a, **k)):
        for t in range(1, 4):
            grads = [mx.nd.array(rng.randn(*shape)) for shape in shapes]
            updater(list(range(len(shapes))), grads, weights)
            correction = (1 - 0.999 ** t) ** 0.5 / (1 - 0.9 ** t)
            for i, (reference, grad, (mean, var)) in enumerate(zip(references, grads, moments)):
                lr = 0.01 * {0: 0.5, 2: 0.25}.get(i, 1.0)
                mx.nd.contrib.adamw_update(reference, grad, mean, var, rescale_grad=mx.nd.array([0.25]),
                                           lr=correction, eta=lr, wd=0.0 if i == 3 else 0.1,
                                           epsilon=optimizer.epsilon, out=reference)
    # The two kernels order the moments' arithmetic differently: a few ulps apart (7e-7 at weights of 2). A wrong
    # rate, decay or bias correction moves a weight by 1e-3 or more.
    for weight, reference in zip(weights, references):
        onp.testing.assert_allclose(weight.asnumpy(), reference.asnumpy(), rtol=1e-6, atol=2e-6)
    assert calls == [1, 3, 1] * 3  # (300, 400) alone; (7, 5), (7, 5) and (5, 7) together (35 each); (3,)
    # Earlier releases pickled AdamW updating one parameter per call (or 45): loaded, it groups them too.
    for aggregate_num in (0, 45):
        optimizer.aggregate_num = aggregate_num
        loaded = pickle.loads(pickle.dumps(optimizer))
        assert loaded.aggregate_num > 1000 and mx.optimizer.get_updater(loaded).aggregate_updates


def test_schedules_warm_up_then_hold_or_decay():
    def rates(schedule):
        optimizer = train.make_optimizer("adamw", 1.0, 0.0, schedule, 0.2, 10)
        return [optimizer.lr_scheduler(t) for t in range(11)]
    linear, cosine, constant = rates("linear"), rates("cosine"), rates("constant")
    assert linear[:3] == [0.0, 0.5, 1.0] and cosine[:3] == [0.0, 0.5, 1.0] and constant[:3] == [0.0, 0.5, 1.0]
    assert linear[6] == pytest.approx(0.5) and linear[10] == pytest.approx(0.0)
    assert cosine[6] == pytest.approx(0.5) and cosine[10] == pytest.approx(0.0) and cosine[4] > linear[4]
    assert constant[3:] == [1.0] * 8
    assert train.make_optimizer("adam", 1e-4, 0.0, "constant", 0.0, 10).lr_scheduler is None  # the book's


def test_a_checkpoint_swap_cut_short_leaves_a_complete_checkpoint(tmp_path):
    def put(folder, name, text):
        with open(os.path.join(folder, name), "w") as f:
            f.write(text)

    def checkpoint_of(step):
        return lambda folder: (put(folder, "model.params", f"weights {step}"),
                               put(folder, "state.json", json.dumps({"step": step})))

    def dies_while_writing(folder):
        put(folder, "model.params", "half")
        raise OSError("disk full")
    checkpoint = str(tmp_path / "checkpoint")
    fileio.replace_dir(checkpoint, checkpoint_of(1))
    with pytest.raises(OSError):
        fileio.replace_dir(checkpoint, dies_while_writing)
    assert rundir.read_checkpoint(str(tmp_path))[1] == {"step": 1}  # untouched
    fileio.replace_dir(checkpoint + ".new", checkpoint_of(2))
    os.replace(checkpoint, checkpoint + ".old")  # as if it died between replace_dir's two renames
    folder, state = rundir.read_checkpoint(str(tmp_path))
    assert folder == checkpoint and state == {"step": 2}  # the newer one, back in its place
    assert open(os.path.join(checkpoint, "model.params")).read() == "weights 2"


def dense_with_gradients(seed=0):
    """A Dense layer with the gradients of a loss summed over 6 examples (grad_req 'add'), and those of their mean."""
    mx.random.seed(seed)
    net = gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Normal(1.0))
    net.collect_params().setattr("grad_req", "add")
    X, y = mx.np.random.normal(size=(6, 4)), mx.np.array([0, 1, 2, 0, 1, 2])
    with mx.autograd.record():
        loss = gluon.loss.SoftmaxCrossEntropyLoss()(net(X), y).sum()
    loss.backward()
    return net, {name: p.grad().asnumpy() / 6 for name, p in net.collect_params().items()}


def test_one_pass_per_device_writes_the_gradients_and_any_other_update_adds_to_zeroed_ones():
    """An update of one micro-batch that reaches every device lets the backward write the gradients; one of several
    micro-batches, or one that leaves a device without examples, adds them to zeros (no stale gradient counts)."""
    devices = [mx.cpu(0), mx.cpu(1)]
    mx.random.seed(0)
    net = gluon.nn.Dense(3, in_units=4)
    net.initialize(mx.init.Normal(1.0), ctx=devices)
    net.hybridize()
    params, loss = net.collect_params(), gluon.loss.SoftmaxCrossEntropyLoss()
    trainer = gluon.Trainer(params, "sgd", {"learning_rate": 0.0}, update_on_kvstore=False)  # weights stay put
    X, y = onp.random.RandomState(0).normal(size=(4, 4)).astype("float32"), onp.array([0, 1, 2, 0], "int32")

    def gradients(passes):
        """Each device's weight gradient after an update of micro-batches `passes` (lists of examples), and the mode."""
        train.write_gradients(params, [y[i] for i in passes], devices)
        for i in passes:
            train.train_batch(net, (X[i], y[i]), loss, devices)
        grads, mode = [g.asnumpy().copy() for g in net.weight.list_grad()], net.weight.grad_req
        train.apply_update(trainer, params, devices, sum(map(len, passes)))
        return grads, mode

    whole, mode = gradients([[0, 1, 2, 3]])
    assert mode == "write"
    for passes in ([[0, 1], [2, 3]], [[0, 1, 2, 3]], [[2, 3], [0, 1]]):  # after a written update, and after an added
        grads, mode = gradients(passes)
        assert mode == ("write" if len(passes) == 1 else "add")
        onp.testing.assert_allclose(sum(grads), sum(whole), rtol=1e-5, atol=1e-6)  # summed in another order
    grads, mode = gradients([[0]])  # one example: the second device sees none
    assert mode == "add" and not grads[1].any()
    grads_again, _ = gradients([[0]])  # nor does it after an added update
    assert not grads_again[1].any() and onp.array_equal(grads[0], grads_again[0])


def test_the_word_embeddings_gradient_is_measured_and_zeroed_on_the_rows_looked_up_alone(training_bert_dir, pairs):
    """With `looked_up_rows`, the clipping norm takes the word embeddings' rows looked up where it took the whole
    table, and zeroing those rows leaves the whole gradient zero on every device, update after update: the same
    updates as without."""
    devices, updated = [mx.cpu(0), mx.cpu(1)], {}
    for way in ("rows", "whole table"):
        train.seed_everything(0)
        net, vocab = model.from_pretrained(training_bert_dir, devices, dropout=0.0)
        train.set_trainable(net, TUNED, 1)
        encoded = snli.encode_pairs(*(c[:24] for c in pairs), vocab, 64)
        params, weight = net.collect_params(), net.encoder.token_embedding.weight
        loss = gluon.loss.SoftmaxCrossEntropyLoss()
        trainer = train.make_trainer(net, dataclasses.replace(TUNED, lr=1e-2, warmup_ratio=0.0), "device", 10)
        norms = []
        for parts in ([onp.arange(8)], [onp.arange(8, 16), onp.arange(16, 24)], [onp.arange(4)]):  # 1 pass, 2, 1
            micro_batches = [data.make_batch(encoded, part, 1) for part in parts]
            rows = train.looked_up_rows(weight, micro_batches) if way == "rows" else {}
            train.write_gradients(params, [micro_batch[-1] for micro_batch in micro_batches], devices, rows)
            for micro_batch in micro_batches:
                train.train_batch(net, micro_batch, loss, devices)
            norms.append(float(train.apply_update(trainer, params, devices, 8 * len(parts), 1.0, rows).asscalar()))
            if way == "rows":
                assert weight.grad_req == "add" and 0 < len(rows[weight]) < weight.shape[0] / 2
                assert not any(grad.asnumpy().any() for grad in weight.list_grad())  # nothing left for the next
        updated[way] = norms, [p.data(d).asnumpy() for p in params.values() for d in devices]
    onp.testing.assert_allclose(updated["rows"][0], updated["whole table"][0], rtol=1e-5)
    for rows, whole in zip(updated["rows"][1], updated["whole table"][1]):
        onp.testing.assert_allclose(rows, whole, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_clipping_bounds_the_update_of_the_mean_gradient(max_norm):
    """apply_update returns the norm of the mean gradient and, with SGD at lr 1, moves the weights by
    that gradient scaled to at most `max_norm` (clipping is folded into the optimizer's rescaling)."""
    net, mean_grads = dense_with_gradients()
    trainer = gluon.Trainer(net.collect_params(), "sgd", {"learning_rate": 1.0}, update_on_kvstore=False)
    params = net.collect_params()
    before = {name: p.data().asnumpy().copy() for name, p in params.items()}
    norm = train.apply_update(trainer, params, CPU, 6, max_norm)
    expected_norm = onp.sqrt(sum((g ** 2).sum() for g in mean_grads.values()))
    assert float(norm.asscalar()) == pytest.approx(expected_norm, rel=1e-5)
    scale = min(1.0, max_norm / expected_norm)
    for name, p in params.items():
        onp.testing.assert_allclose(before[name] - p.data().asnumpy(), scale * mean_grads[name], rtol=1e-4, atol=1e-7)
        assert not p.grad().asnumpy().any()  # zeroed for the next accumulation


@pytest.mark.parametrize("max_norm", [0.05, 1e3])
def test_adamw_clips_with_the_factor_on_the_device_as_with_the_host_number(max_norm):
    """AdamW takes the clipping factor as an array; its update is the one the factor given as a number makes."""
    updated = {}
    for way in ("device", "host"):
        net, mean_grads = dense_with_gradients()
        params = net.collect_params()
        trainer = train.make_trainer(net, dataclasses.replace(TUNED, lr=0.1, warmup_ratio=0.0), "device", 10)
        if way == "device":
            train.apply_update(trainer, params, CPU, 6, max_norm)
        else:
            factor = min(1.0, max_norm / (onp.sqrt(sum((g ** 2).sum() for g in mean_grads.values())) + 1e-6))
            assert (factor < 0.1) == (max_norm < 1)  # clipped hard, or not at all
            trainer.update(6 / factor)
        assert trainer.optimizer.clip_factor is None  # the factor does not outlive the update (nor is it pickled)
        # Adam's first step is about lr whatever the gradient's scale: the moments show the factor
        updated[way] = [p.data().asnumpy() for p in params.values()] + [
            moment.asnumpy() for states in trainer._updaters[0].states.values() for moment in states]
    # The two factors differ in the last bit (float32 on the device, float64 on the host), and in this first step, where
    # the second moment is tiny, MXNet's kernel turns that into up to 1.2e-4 of it (measured); a factor left out or
    # applied twice moves the moments 37x.
    for device, host in zip(updated["device"], updated["host"]):
        onp.testing.assert_allclose(device, host, rtol=2e-4, atol=1e-9)


def test_an_update_whose_gradient_norm_is_not_a_number_is_skipped_and_stops_the_run(training_bert_dir, pairs,
                                                                                     tmp_path):
    net, mean_grads = dense_with_gradients()
    params = net.collect_params()
    trainer = train.make_trainer(net, dataclasses.replace(TUNED, lr=0.1, warmup_ratio=0.0), "device", 10)
    before = {name: p.data().asnumpy().copy() for name, p in params.items()}
    net.weight.grad()[0, 0] = float("nan")
    norm = train.apply_update(trainer, params, CPU, 6, 1.0)
    assert onp.isnan(float(norm.asscalar()))
    assert all(onp.array_equal(before[name], p.data().asnumpy()) for name, p in params.items())  # kept as it was
    assert all(not s.asnumpy().any() for states in trainer._updaters[0].states.values() for s in states)  # moments too
    # In a run: the loss is a number, but not its gradient (0 * sqrt(0)), and the run stops naming the update
    with pytest.raises(train.TrainingDiverged, match=r"gradient norm is nan at step 3 \(epoch 1, batch 3\).*"
                                                     r"last good checkpoint is .*checkpoint"):
        small_run(training_bert_dir, pairs, run_dir=str(tmp_path / "run"), save_every=2, max_grad_norm=1.0,
                  loss=GradientTurningNaN(3))


def test_layer_norm_trains_through_products_as_mxnets_and_predicts_with_mxnets():
    rng = onp.random.RandomState(0)
    x, dy = (mx.np.array(rng.normal(size=(3, 5, 16)).astype("float32")) for _ in range(2))
    ln = bert.LayerNorm(16, 1e-5)
    ln.initialize()
    ln.gamma.set_data(mx.np.array(rng.uniform(0.5, 1.5, 16).astype("float32")))
    ln.beta.set_data(mx.np.array(rng.normal(size=16).astype("float32")))
    reference = [a.copy() for a in (x, ln.gamma.data(), ln.beta.data())]
    for a in reference:
        a.attach_grad()
    with autograd.record():
        expected = npx.layer_norm(*reference, axis=-1, eps=1e-5)
    expected.backward(dy)
    assert onp.array_equal(ln(x).asnumpy(), expected.asnumpy())  # inference: MXNet's LayerNorm itself
    x.attach_grad()
    with autograd.record():
        trained = ln(x)
    trained.backward(dy)
    onp.testing.assert_allclose(trained.asnumpy(), expected.asnumpy(), rtol=1e-5, atol=1e-5)
    for got, want in zip((x.grad, ln.gamma.grad(), ln.beta.grad()), (a.grad for a in reference)):
        onp.testing.assert_allclose(got.asnumpy(), want.asnumpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("hybridized", [False, True])
def test_the_embeddings_are_the_books_sum_and_their_gradients_its_sums_over_the_batch(hybridized):
    rng = onp.random.RandomState(0)
    encoder = bert.BERTEncoder(vocab_size=20, num_hiddens=8, ffn_num_hiddens=16, num_heads=2, num_blks=0, dropout=0.0,
                               max_len=10)
    encoder.initialize(mx.init.Normal(1.0))
    if hybridized:
        encoder.hybridize(static_alloc=True)
    tokens = rng.randint(0, 20, (3, 6))
    segments = onp.array([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 0], [0, 1, 1, 1, 1, 1]])
    dy = rng.normal(size=(3, 6, 8)).astype("float32")
    with autograd.record():
        embedded = encoder(mx.np.array(tokens, dtype="int32"), mx.np.array(segments, dtype="int32"),
                           mx.np.array([6, 5, 6], dtype="float32"))
    embedded.backward(mx.np.array(dy))
    token, segment, position = (p.data().asnumpy() for p in (encoder.token_embedding.weight,
                                                             encoder.segment_embedding.weight, encoder.pos_embedding))
    onp.testing.assert_allclose(embedded.asnumpy(), token[tokens] + segment[segments] + position[:, :6], rtol=1e-6)
    expected_position_grad = onp.zeros_like(position)
    expected_position_grad[0, :6] = dy.sum(axis=0)  # the rows of the first 6 positions, summed over the batch
    onp.testing.assert_allclose(encoder.pos_embedding.grad().asnumpy(), expected_position_grad, rtol=1e-5, atol=1e-6)
    expected_segment_grad = onp.stack([dy[segments == s].sum(axis=0) for s in (0, 1)])
    onp.testing.assert_allclose(encoder.segment_embedding.weight.grad().asnumpy(), expected_segment_grad, rtol=1e-5,
                                atol=1e-6)


def test_a_hybridized_classifier_keeps_a_graph_for_training_and_one_for_inference(training_bert_dir):
    net, vocab = model.from_pretrained(training_bert_dir, CPU, dropout=0.0)  # no dropout: the modes differ by LayerNorm
    rng = onp.random.RandomState(0)
    inputs = [mx.np.array(rng.randint(5, len(vocab), (4, 12)), dtype="int32"), mx.np.zeros((4, 12), dtype="int32"),
              mx.np.array([12, 9, 7, 12], dtype="float32")]
    before = net(*inputs).asnumpy()
    with autograd.record():
        in_training = net(*inputs)
    in_training.backward()
    assert not onp.array_equal(in_training.asnumpy(), before)  # products: within rounding of MXNet's LayerNorm
    onp.testing.assert_allclose(in_training.asnumpy(), before, rtol=1e-4, atol=1e-5)
    assert onp.array_equal(net(*inputs).asnumpy(), before)  # inference's own graph again, not training's
