"""Runs are never lost by accident, and every mistake with a run's options or data is one sentence:
exit status 2, `error: ...`, no traceback, and none of the user's files removed or changed."""
import hashlib
import json
import os
import shutil

import pytest

from conftest import DEV_PAIRS, ROOT, run_cli


def small_run_args(model_dir, out, *extra):
    """A run of seconds: 16 real pairs, one epoch, the tiny BERT."""
    return ["finetune", "--model", model_dir, "--train", DEV_PAIRS, "--test", DEV_PAIRS, "--limit-train", 16,
            "--limit-test", 8, "--epochs", 1, "--batch-size", 8, "--max-len", 32, "--devices", "cpu", "--quiet",
            "--out", out, *extra]


def cli_env(tmp_path):
    return {**os.environ, "NLI_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": ROOT}


def snapshot(folder):
    """Every file under `folder` and the SHA-1 of its bytes: what a refused command must leave as it was."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, folder)] = hashlib.sha1(f.read()).hexdigest()
    return files


def assert_refused(result, *phrases):
    """Exit status 2, the phrases in one `error:` line, and no traceback."""
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")
              or "error: argument" in line]
    assert len(errors) == 1, result.stderr
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


@pytest.fixture(scope="module")
def finished_run(training_bert_dir, tmp_path_factory):
    """A finished small run, evaluated, so that it holds eval.json, confusion.png and errors.tsv too."""
    out = tmp_path_factory.mktemp("finished") / "run"
    env = cli_env(out.parent)
    result = run_cli(*small_run_args(training_bert_dir, out), env=env)
    assert result.returncode == 0, result.stderr
    evaluated = run_cli("evaluate", "--run", out, "--test", DEV_PAIRS, "--devices", "cpu", "--errors", 3,
                        "--quiet", env=env)
    assert evaluated.returncode == 0, evaluated.stderr
    return out


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """A copy of the finished run that a test may change."""
    return shutil.copytree(finished_run, tmp_path / "run")


def test_finetune_refuses_an_out_that_holds_a_finished_run(run_copy, training_bert_dir, tmp_path):
    before = snapshot(run_copy)
    result = run_cli(*small_run_args(training_bert_dir, run_copy), env=cli_env(tmp_path))
    assert_refused(result, str(run_copy), "finished run", "--overwrite")
    assert snapshot(run_copy) == before


def test_finetune_refuses_an_interrupted_run_and_points_to_resume(run_copy, training_bert_dir, tmp_path):
    for name in ("config.json", "model.params", "vocab.json"):  # what a run has before it finishes
        os.remove(run_copy / name)
    os.makedirs(run_copy / "checkpoint", exist_ok=True)
    (run_copy / "checkpoint" / "state.json").write_text(json.dumps({"step": 1}))
    before = snapshot(run_copy)
    result = run_cli(*small_run_args(training_bert_dir, run_copy), env=cli_env(tmp_path))
    assert_refused(result, "interrupted run", f"--resume {run_copy}")
    assert snapshot(run_copy) == before


def test_overwrite_replaces_a_run_and_names_what_it_removed(run_copy, training_bert_dir, tmp_path):
    (run_copy / "notes.txt").write_text("the user's own file")
    old_model = snapshot(run_copy)["model.params"]
    result = run_cli(*small_run_args(training_bert_dir, run_copy, "--overwrite", "--seed", 7), env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    removed = next(line for line in result.stdout.splitlines() if line.startswith("--overwrite: removed"))
    for name in ("model.params", "config.json", "eval.json", "confusion.png", "errors.tsv", "metrics.jsonl"):
        assert name in removed
    for name in ("eval.json", "confusion.png", "errors.tsv"):  # they described the old model
        assert not os.path.exists(run_copy / name)
    assert snapshot(run_copy)["model.params"] != old_model
    assert (run_copy / "notes.txt").read_text() == "the user's own file"  # not the run's: kept


def test_out_naming_a_file_is_refused_and_nothing_created(training_bert_dir, tmp_path):
    (tmp_path / "taken").write_text("a file")
    result = run_cli(*small_run_args(training_bert_dir, tmp_path / "taken"), env=cli_env(tmp_path))
    assert_refused(result, "is a file")
    assert (tmp_path / "taken").read_text() == "a file"
    assert sorted(os.listdir(tmp_path)) == ["taken"]


@pytest.mark.parametrize("args, phrase", [
    (["finetune", "--batch-size", "0"], "argument --batch-size: 0: expected at least 1"),
    (["evaluate", "--run", "x", "--batch-size", "0"], "argument --batch-size: 0: expected at least 1"),
    (["predict", "--run", "x", "--batch-size", "-3"], "argument --batch-size: -3: expected at least 1"),
    (["finetune", "--epochs", "0"], "argument --epochs: 0: expected at least 1"),
    (["finetune", "--lr", "-1"], "argument --lr: -1: expected a number above 0"),
    (["finetune", "--lr", "0"], "argument --lr: 0: expected a number above 0"),
    (["finetune", "--dropout", "1.5"], "argument --dropout: 1.5: expected a fraction in [0, 1)"),
    (["finetune", "--dropout", "1"], "argument --dropout: 1: expected a fraction in [0, 1)"),
    (["finetune", "--limit-train", "-5"], "argument --limit-train: -5: expected at least 1"),
    (["finetune", "--limit-train", "0"], "argument --limit-train: 0: expected at least 1"),
    (["finetune", "--limit-test", "0"], "argument --limit-test: 0: expected at least 1"),
    (["finetune", "--max-len", "3"], "argument --max-len: 3: expected at least 4: <cls>, two <sep> and one token"),
])
def test_numbers_are_checked_when_parsed_naming_the_option(args, phrase, tmp_path):
    result = run_cli(*args, env=cli_env(tmp_path))
    assert_refused(result, phrase)
    assert os.listdir(tmp_path) == []


def test_recipes_check_their_numbers_too():
    import dataclasses
    from nli.errors import UserError
    from nli.recipe import BOOK
    for field, value in (("batch_size", 0), ("lr", -1.0), ("dropout", 1.5), ("limit_train", -5),
                         ("max_len", 3)):
        with pytest.raises(UserError, match=f"--{field.replace('_', '-')} {value}: expected"):
            dataclasses.replace(BOOK, **{field: value})
    assert dataclasses.replace(BOOK, epochs=0).epochs == 0  # no training: in Python, the starting weights


def test_max_len_past_a_book_models_positions_is_refused(training_bert_dir, tmp_path):
    result = run_cli(*small_run_args(training_bert_dir, tmp_path / "run", "--max-len", 100000), env=cli_env(tmp_path))
    assert_refused(result, "--max-len 100000", "has 64 positions", "expected 4 to 64")
    assert not os.path.exists(tmp_path / "run")


def write_pairs(path, lines):
    path.write_text("premise\thypothesis\tlabel\n" + "".join(line + "\n" for line in lines))
    return path


@pytest.mark.parametrize("empty", ["train", "test"])
def test_no_labelled_pair_is_an_error_before_any_run_dir(empty, training_bert_dir, tmp_path):
    no_gold = write_pairs(tmp_path / "no_gold.tsv", ["A man sleeps .\tA man rests .\t-"])  # '-' is no label
    args = small_run_args(training_bert_dir, tmp_path / "run")
    args[args.index("--" + empty) + 1] = no_gold
    before = snapshot(tmp_path)
    result = run_cli(*args, env=cli_env(tmp_path))
    assert_refused(result, f"{no_gold} has no labelled pair to {empty} on")
    assert not os.path.exists(tmp_path / "run")  # no partial run directory
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith("data")} == before


def test_evaluate_refuses_an_empty_test_set_and_limits_its_pairs(finished_run, tmp_path):
    empty = write_pairs(tmp_path / "empty.tsv", [])
    result = run_cli("evaluate", "--run", finished_run, "--test", empty, "--devices", "cpu", "--out",
                     tmp_path / "eval", env=cli_env(tmp_path))
    assert_refused(result, f"{empty} has no labelled pair to evaluate on")
    assert not os.path.exists(tmp_path / "eval")
    limited = run_cli("evaluate", "--run", finished_run, "--test", DEV_PAIRS, "--limit-test", 10, "--devices",
                      "cpu", "--out", tmp_path / "eval", "--quiet", env=cli_env(tmp_path))
    assert limited.returncode == 0, limited.stderr
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["n"] == 10


def interrupted_run(training_bert_dir, tmp_path, train_file):
    """An interrupted run on `train_file`: the small run made a 2-epoch one stopped after its first epoch (its
    checkpoint kept and told of 2 epochs, its final files removed)."""
    out = tmp_path / "interrupted"
    args = small_run_args(training_bert_dir, out, "--keep-checkpoint")
    args[args.index("--train") + 1] = train_file
    result = run_cli(*args, env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    assert (state["epoch"], state["batch"]) == (2, 0)
    state["recipe"]["epochs"] = 2
    (out / "checkpoint" / "state.json").write_text(json.dumps(state))
    for name in ("config.json", "model.params", "vocab.json"):
        os.remove(out / name)
    return out


def test_resume_refuses_changed_data_unless_forced(training_bert_dir, tmp_path):
    train_file = tmp_path / "train.tsv"
    shutil.copy(DEV_PAIRS, train_file)
    out = interrupted_run(training_bert_dir, tmp_path, train_file)
    assert json.loads((out / "checkpoint" / "state.json").read_text())["data"]["files"]["train"]["sha1"]
    with open(train_file, "a") as f:
        f.write("A man sleeps .\tA man rests .\tentailment\n")
    before = snapshot(out)
    refused = run_cli("finetune", "--resume", out, env=cli_env(tmp_path))
    assert_refused(refused, f"{out} started on other data", f"the train file {train_file} was", "--force")
    assert snapshot(out) == before
    forced = run_cli("finetune", "--resume", out, "--force", env=cli_env(tmp_path))
    assert forced.returncode == 0, forced.stderr
    assert "warning: --force: resuming on changed data" in forced.stderr
    assert os.path.exists(out / "model.params")


def test_resume_goes_on_when_only_the_mtime_changed(training_bert_dir, tmp_path):
    train_file = tmp_path / "train.tsv"
    shutil.copy(DEV_PAIRS, train_file)
    out = interrupted_run(training_bert_dir, tmp_path, train_file)
    os.utime(train_file, (1, 1))  # touched, or copied again: the same bytes
    resumed = run_cli("finetune", "--resume", out, env=cli_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stdout and os.path.exists(out / "model.params")


def test_resuming_a_finished_run_says_it_is_finished(run_copy, tmp_path):
    before = snapshot(run_copy)
    result = run_cli("finetune", "--resume", run_copy, env=cli_env(tmp_path))
    assert result.returncode == 0, result.stderr  # what --resume is for is done (see the README)
    assert f"{run_copy} is a finished run: nothing to resume" in result.stdout
    assert " at step " not in result.stdout and "Traceback" not in result.stderr  # no "resuming ... at step"
    assert snapshot(run_copy) == before


def test_a_finished_run_drops_its_checkpoint_unless_kept(training_bert_dir, tmp_path):
    dropped = run_cli(*small_run_args(training_bert_dir, tmp_path / "dropped", "--dev-fraction", 0.25),
                      env=cli_env(tmp_path))
    assert dropped.returncode == 0, dropped.stderr
    assert not any(name.startswith("checkpoint") for name in os.listdir(tmp_path / "dropped"))
    for kept in ("model.params", "best/model.params", "config.json"):
        assert os.path.exists(tmp_path / "dropped" / kept), kept
    kept = run_cli(*small_run_args(training_bert_dir, tmp_path / "kept", "--keep-checkpoint"), env=cli_env(tmp_path))
    assert kept.returncode == 0, kept.stderr
    assert os.path.exists(tmp_path / "kept" / "checkpoint" / "state.json")
    resumed = run_cli("finetune", "--resume", tmp_path / "kept", env=cli_env(tmp_path))  # its checkpoint is at the end
    assert resumed.returncode == 0 and "is a finished run: nothing to resume" in resumed.stdout, resumed.stderr


def test_a_full_disk_stops_the_run_in_one_sentence_keeping_the_last_checkpoint(training_bert_dir, tmp_path,
                                                                                monkeypatch, capsys):
    import errno
    from mxnet import gluon
    from nli import cli
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    save_states, calls = gluon.Trainer.save_states, []

    def disk_fills_up(trainer, path):  # the second checkpoint meets a full disk half-way through its files
        calls.append(path)
        if len(calls) == 1:
            return save_states(trainer, path)
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)
    monkeypatch.setattr(gluon.Trainer, "save_states", disk_fills_up)
    out = tmp_path / "run"
    status = cli.main(list(map(str, small_run_args(training_bert_dir, out))))
    err = capsys.readouterr().err
    assert status == 2 and len(calls) == 2
    assert "error: Could not write the run in" in err and "No space left on device" in err
    assert f"the last good checkpoint is {out / 'checkpoint'}" in err and f"--resume {out}" in err
    assert sorted(os.listdir(out)) == ["checkpoint", "curves.png", "metrics.jsonl"]  # no checkpoint.new, no .tmp
    assert json.loads((out / "checkpoint" / "state.json").read_text())["step"] == 0  # the one from the start
    assert sorted(os.listdir(out / "checkpoint")) == ["model.params", "state.json", "trainer.states"]


def test_a_refused_permission_is_one_sentence(training_bert_dir, tmp_path, monkeypatch, capsys):
    import errno
    from nli import cli, rundir

    def denied(run_dir, metrics):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(run_dir))
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setattr(rundir, "write_metrics", denied)
    status = cli.main(list(map(str, small_run_args(training_bert_dir, tmp_path / "run"))))
    err = capsys.readouterr().err
    assert status == 2 and "Permission denied" in err and "no checkpoint was written" in err and "run it again" in err


def test_help_gives_defaults_and_marks_required_options_and_version_is_the_packages():
    import nli
    from nli import cli
    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    evaluate = " ".join(commands["evaluate"].format_help().split())
    assert "--run RUN the run directory (its best/, a soup, an ensemble) to evaluate (required)" in evaluate
    assert "--batch-size BATCH_SIZE pairs per batch (default: 512)" in evaluate
    assert "--errors N write the N most confident mistakes to errors.tsv (default: 0)" in evaluate
    overview = " ".join(parser.format_help().split())
    assert "soup one run whose weights are the mean of runs fine-tuned from one checkpoint" in overview
    assert "ensemble one run whose predictions are the mean of runs' probabilities" in overview
    finetune = " ".join(commands["finetune"].format_help().split())
    assert "--epochs EPOCHS passes over the training pairs (book: 5)" in finetune
    assert "required but with --resume" in finetune
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.split()[-1] == nli.__version__


def test_a_distributed_kvstore_without_the_launcher_is_one_sentence(training_bert_dir, tmp_path):
    env = {k: v for k, v in cli_env(tmp_path).items() if not k.startswith("DMLC_")}
    result = run_cli(*small_run_args(training_bert_dir, tmp_path / "run", "--kvstore", "dist_sync"), env=env)
    assert_refused(result, "--kvstore dist_sync", "python -m nli.launch")
    assert not os.path.exists(tmp_path / "run")


def test_resume_options_that_contradict_it_are_refused(run_copy, tmp_path):
    os.remove(run_copy / "model.params")  # not finished: the options are looked at
    before = snapshot(run_copy)
    assert_refused(run_cli("finetune", "--resume", run_copy, "--overwrite", env=cli_env(tmp_path)), "choose one")
    assert_refused(run_cli("finetune", "--model", "x", "--out", tmp_path / "new", "--force", env=cli_env(tmp_path)),
                   "--force goes with --resume")
    assert snapshot(run_copy) == before and not os.path.exists(tmp_path / "new")
