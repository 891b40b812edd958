"""`nli.run`, the one entry that fine-tunes: the command line is only its parser, a run records what trained, and
every setting is used or refused."""
import dataclasses
import json
import os

import numpy as onp
import pytest
from mxnet import npx

import nli
from conftest import DEV_PAIRS
from nli import cli, model, runner, snli, train
from nli.errors import UserError
from nli.recipe import BOOK, TUNED

npx.set_np()
OPTIONS = dict(train=DEV_PAIRS, test_fraction=0.25, limit_train=48, limit_test=16, epochs=2, batch_size=16,
               max_len=48, lr=1e-3, devices="cpu", max_memory=8 * 2 ** 30, log_every=1)


def as_flags(options):
    """`nli finetune`'s flags for `nli.run`'s keyword arguments."""
    return [str(token) for name, value in options.items() for token in ("--" + name.replace("_", "-"), value)]


def test_the_library_and_the_command_line_write_the_same_run(training_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    options = dict(OPTIONS, model=training_bert_dir, recipe="tuned")  # a named recipe changed by options
    assert cli.main(["finetune", *as_flags(options), "--out", str(tmp_path / "cli"), "--quiet"]) == 0
    library = dict(options)
    assert nli.run(library.pop("recipe"), **library, out=str(tmp_path / "lib"), quiet=True) == str(tmp_path / "lib")
    by_cli, by_library = (npx.load(str(tmp_path / run / "model.params")) for run in ("cli", "lib"))
    assert by_cli.keys() == by_library.keys()
    assert all(onp.array_equal(by_cli[k].asnumpy(), by_library[k].asnumpy()) for k in by_cli)
    configs = [json.load(open(tmp_path / run / "config.json")) for run in ("cli", "lib")]
    for config, run in zip(configs, ("cli", "lib")):
        assert config["recipe"].pop("out") == str(tmp_path / run)
    assert configs[0] == configs[1] and configs[0]["recipe"]["name"] == "tuned"
    results = json.load(open(tmp_path / "lib" / "results.json"))
    assert results["train_pairs"] + results["test_pairs"] == 48 + 16 and len(results["accuracy_per_epoch"]) == 2


def test_a_held_out_test_share_is_drawn_with_the_seed_and_shares_no_pair(training_bert_dir):
    vocab = model.from_pretrained(training_bert_dir, [npx.cpu()])[1]
    encoded = snli.load_encoded(DEV_PAIRS, vocab, 48, progress=False).head(400)
    rest, held = runner.split_off(encoded, 0.25, seed=3)
    again, held_again = runner.split_off(encoded, 0.25, seed=3)
    other = runner.split_off(encoded, 0.25, seed=4)[1]
    assert len(held) == 100 and len(rest) == 300
    assert onp.array_equal(held.token_ids, held_again.token_ids) and not onp.array_equal(held.labels, other.labels)

    def pairs(e):
        return {tuple(e.token_ids[e.offsets[i]:e.offsets[i + 1]]) for i in range(len(e))}
    assert pairs(rest) | pairs(held) == pairs(encoded) and len(pairs(rest) & pairs(held)) <= 1  # duplicates in SNLI


def test_a_setting_that_is_not_one_is_refused_with_a_guess():
    with pytest.raises(UserError, match="'batchsize' is not a setting of a run; did you mean 'batch_size'"):
        nli.run(model="bert.small", batchsize=32, out="unused")
    with pytest.raises(UserError, match="--test FILE or --test-fraction F"):
        runner.recipe_of("book", {"test": DEV_PAIRS, "test_fraction": 0.2})


@pytest.mark.parametrize("setting", [dict(pooling="mean"), dict(max_len=32), dict(truncation="ratio"),
                                     dict(dropout=0.3), dict(devices="cpu:2")])
def test_finetune_refuses_a_recipe_that_its_network_or_pairs_contradict(training_bert_dir, setting):
    # A recipe saying one thing and live objects another would record a run that is not the one that trained.
    net, vocab = model.from_pretrained(training_bert_dir, [npx.cpu()], dropout=0.1)
    pairs = snli.encode_pairs(*(c[:8] for c in snli.read_pairs(DEV_PAIRS)), vocab, 48)
    recipe = dataclasses.replace(dataclasses.replace(BOOK, max_len=48, dropout=0.1, devices="cpu", epochs=1), **setting)
    name = next(iter(setting))
    with pytest.raises(UserError, match=f"The recipe says {name}"):
        train.finetune(net, pairs, pairs, recipe, progress=False)


def test_config_records_the_objects_that_trained(training_bert_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path / "data"))
    out = nli.run(TUNED, **dict(OPTIONS, epochs=1), model=training_bert_dir, pooling="mean", truncation="ratio",
                  out=str(tmp_path / "run"), quiet=True)
    config = json.load(open(os.path.join(out, "config.json")))
    loaded, _, _ = model.load_run(out, [npx.cpu()])
    assert loaded.pooling == config["pooling"] == "mean"
    assert (config["max_len"], config["truncation"]) == (48, "ratio")
