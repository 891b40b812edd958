"""Runs combined into one run directory that every command takes, as it takes a fine-tuned run.

`soup` averages the weights of runs fine-tuned from one pretrained checkpoint (Wortsman et al. 2022, "Model soups":
uniform, or greedy on a dev set); `ensemble` keeps the runs whole, in members/, and averages their probabilities
(`predict.EnsemblePredictor`). Either directory is written whole and swapped in, so a crash leaves no half of it.
"""
import os
import shutil
import sys

import mxnet as mx
import numpy as onp

from . import bert, fileio, model, predict, rundir, snli
from .errors import UserError

MEMBERS_DIR = "members"  # an ensemble's runs: members/0, members/1, ...
# What a soup's members must share besides BERT's shape, checkpoint and vocabulary: (key, default for older runs)
SOUP_SETTINGS = (("pooling", "cls"), ("max_len", None), ("truncation", "longest_first"))
# The entries of a member's config.json that a soup keeps: what rebuilds and feeds the classifier
SOUP_CONFIG = ("bert", "tokenizer", "labels", "max_len", "truncation", "pooling", "pretrained")


def read_member(run_dir):
    """The config.json of a finished fine-tuned run to combine; a missing directory, a directory without a run, an
    export and an ensemble are refused in one sentence."""
    if not os.path.isdir(run_dir):
        raise UserError(f"--run {run_dir}: there is no such directory.")
    config = predict.read_run_config(run_dir)
    if predict.is_ensemble(config):
        raise UserError(f"--run {run_dir} is an ensemble: give the runs it was made of (its {MEMBERS_DIR}/ are runs).")
    if predict.is_exported(run_dir):
        raise UserError(f"--run {run_dir} is an ONNX export: give the run it came from "
                        f"({config['onnx']['source_run']}).")
    if config is None or not rundir.finished_run(run_dir):
        raise UserError(f"--run {run_dir} is not a finished run: it has no config.json and model.params that "
                        f"`nli finetune` wrote.")
    return config


def read_members(run_dirs):
    """{run dir: config} of the runs to combine, each checked by `read_member`; at least one."""
    if not run_dirs:
        raise UserError("Give at least one run to combine (--run RUN_DIR, repeated).")
    seen = set()
    for run_dir in run_dirs:
        if os.path.abspath(run_dir) in seen:
            raise UserError(f"--run {run_dir} is given twice: give each run once.")
        seen.add(os.path.abspath(run_dir))
    return {run_dir: read_member(run_dir) for run_dir in run_dirs}


def label_difference(run_a, a, run_b, b):
    """How two runs' labels differ, in a sentence's words, or None: what no combination allows."""
    if a["labels"] != b["labels"]:
        return f"{run_a} has the labels {', '.join(a['labels'])} and {run_b} {', '.join(b['labels'])}"
    return None


def pretrained_identity(config):
    """(the SHA-1 of its weights file, the model as named) of the checkpoint a run was fine-tuned from. Runs made
    before `nli soup` record no SHA-1 (None), and the oldest name the model in their recipe only."""
    pretrained = config.get("pretrained") or {}
    name = pretrained.get("model") or (config.get("recipe") or config.get("finetune") or {}).get("model")
    if name and "commit" in pretrained:  # a Hub model: the commit its name resolved to
        name += f"@{pretrained['commit']}"
    return pretrained.get("weights_sha1"), name


def checkpoint_difference(run_a, a, run_b, b):
    """How the pretrained checkpoints of two runs differ, in a sentence's words, or None. They are compared by the
    SHA-1 of their weights; runs that record only a name, by name, with a warning; a run without either is refused."""
    (sha1_a, name_a), (sha1_b, name_b) = identities = pretrained_identity(a), pretrained_identity(b)
    for run_dir, (_, name) in zip((run_a, run_b), identities):
        if name is None:
            raise UserError(f"{run_dir} does not record the pretrained checkpoint it was fine-tuned from, so a soup "
                            f"cannot check that its members share one.")
    if sha1_a and sha1_b:
        same = sha1_a == sha1_b
    else:
        print(f"warning: {run_b if sha1_a else run_a} records only the name of its pretrained checkpoint (as runs "
              f"made before `nli soup` do): the soup compares the names, not the weights.", file=sys.stderr, flush=True)
        same = name_a == name_b
    if same:
        return None
    return (f"{run_a} was fine-tuned from {name_a}" + (f" (weights SHA-1 {sha1_a})" if sha1_a else "") +
            f" and {run_b} from {name_b}" + (f" (weights SHA-1 {sha1_b})" if sha1_b else "") +
            ": different pretrained checkpoints")


def vocabulary_difference(run_a, a, run_b, b):
    """How two runs' tokenizers differ, in a sentence's words, or None: their kind, casing and vocabulary file."""
    tokenizers = [config.get("tokenizer", model.BOOK_TOKENIZER) for config in (a, b)]
    files = [fileio.sha1_of(os.path.join(run_dir, tokenizer["vocab"]))
             for run_dir, tokenizer in zip((run_a, run_b), tokenizers)]
    if tokenizers[0] != tokenizers[1] or files[0] != files[1]:
        return (f"{run_a}'s vocabulary ({tokenizers[0]['vocab']}, SHA-1 {files[0]}) differs from {run_b}'s "
                f"({tokenizers[1]['vocab']}, SHA-1 {files[1]})")
    return None


def soup_difference(run_a, a, run_b, b):
    """The first way two runs differ that forbids averaging their weights, in a sentence's words, or None."""
    if found := label_difference(run_a, a, run_b, b):
        return found
    shapes = [{key: value for key, value in config["bert"].items() if key != "dropout"} for config in (a, b)]
    for key in list(shapes[0]) + [key for key in shapes[1] if key not in shapes[0]]:
        if shapes[0].get(key) != shapes[1].get(key):
            return f"{run_a}'s BERT has {key} {shapes[0].get(key)} and {run_b}'s {shapes[1].get(key)}"
    for key, default in SOUP_SETTINGS:
        if a.get(key, default) != b.get(key, default):
            return f"{run_a} has {key} {a.get(key, default)} and {run_b} {b.get(key, default)}"
    return checkpoint_difference(run_a, a, run_b, b) or vocabulary_difference(run_a, a, run_b, b)


def check_members(configs, difference, what):
    """Refuse, in one sentence, runs of `configs` that `difference` finds unlike the first run."""
    (first, config), *others = configs.items()
    for run_dir, other in others:
        if found := difference(first, config, run_dir, other):
            raise UserError(f"Cannot {what} these runs: {found}.")


def member_record(run_dir):
    """What a combined run records of a member: its path and its model.params' SHA-1."""
    return {"path": os.path.abspath(run_dir), "sha1": fileio.sha1_of(os.path.join(run_dir, "model.params"))}


def read_params(run_dir, net):
    """A run's weights as {Gluon name: NumPy array}, from model.params, checked against `net`'s names and shapes (a
    damaged file is named)."""
    path = os.path.join(run_dir, "model.params")
    loaded = bert.read_params_file(path)
    bert.check_params_file(net, path, loaded)
    return {name: array.asnumpy() for name, array in loaded.items()}


def average(params):
    """The uniform mean of weights ({name: array} each), summed in float64 and kept in each weight's dtype."""
    return {name: (sum(p[name].astype(onp.float64) for p in params) / len(params)).astype(array.dtype)
            for name, array in params[0].items()}


def set_weights(net, weights):
    """Put `weights` ({Gluon name: array}) into `net`, on its devices."""
    for name, param in net._collect_params_with_prefix().items():
        param.set_data(mx.np.array(weights[name], dtype=weights[name].dtype))


def greedy_soup(predictor, weights, dev_file):
    """Wortsman et al.'s greedy soup: the members (run dir -> weights) sorted by dev accuracy, each added to the soup
    only if the soup's dev accuracy does not drop; (the runs kept, what each step found). `predictor` holds the net
    the candidate weights go into."""
    premises, hypotheses, labels = snli.read_pairs(dev_file)
    if not len(labels):
        raise UserError(f"{dev_file} has no labelled pair to choose the soup's members on.")
    encoded = predictor.encode(premises, hypotheses, labels)

    def dev_accuracy(candidate):
        set_weights(predictor.net, candidate)
        return float((predictor.probabilities(encoded).argmax(axis=1) == encoded.labels).mean())
    accuracies = {run_dir: dev_accuracy(member) for run_dir, member in weights.items()}
    kept, best, steps = [], -1.0, []
    for run_dir in sorted(weights, key=lambda run_dir: -accuracies[run_dir]):  # stable: ties keep the order given
        accuracy = dev_accuracy(average([weights[r] for r in kept + [run_dir]]))
        if accuracy >= best:
            kept, best = kept + [run_dir], accuracy
        steps.append({**member_record(run_dir), "dev_accuracy": accuracies[run_dir], "soup_dev_accuracy": accuracy,
                      "kept": run_dir in kept})
    return kept, {"dev": {"path": os.path.abspath(dev_file), "sha1": fileio.sha1_of(dev_file), "pairs": len(labels)},
                  "tried": steps, "dev_accuracy": best}


def soup(run_dirs, out, dev=None, devices=None, batch_size=256, overwrite=False):
    """Write run dir `out`, the mean of the weights of `run_dirs` (fine-tuned from one checkpoint, alike in shape,
    vocabulary and encoding; refused, naming the difference, otherwise): uniform, or with `dev` (a labelled pairs
    file) greedy. Its config.json records the members (paths, SHA-1s) and, greedy, each one's dev accuracy."""
    configs = read_members(run_dirs)
    check_members(configs, soup_difference, "average the weights of")
    earlier = rundir.check_whole_run_out(out, run_dirs, overwrite)
    first, config = next(iter(configs.items()))
    devices = devices or [mx.cpu()]
    net, vocab, _ = model.load_run(first, devices)
    weights = {run_dir: read_params(run_dir, net) for run_dir in configs}
    record = {"method": "uniform", "members": [member_record(run_dir) for run_dir in configs]}
    if dev is not None:
        predictor = predict.Predictor(net, vocab, config, devices, batch_size)
        kept, found = greedy_soup(predictor, weights, dev)
        record = {"method": "greedy", "members": [member_record(run_dir) for run_dir in kept], **found}
    else:
        kept = list(configs)
    set_weights(net, average([weights[run_dir] for run_dir in kept]))
    soup_config = {**{key: config[key] for key in SOUP_CONFIG if key in config}, "soup": record}

    def write(folder):
        vocab_file = model.vocab_file(config)
        shutil.copyfile(os.path.join(first, vocab_file), os.path.join(folder, vocab_file))
        net.save_parameters(os.path.join(folder, "model.params"))
        fileio.write_json(os.path.join(folder, "config.json"), soup_config)
    rundir.replace_run_dir(out, write, earlier)
    return soup_config


def link_or_copy(source, target):
    """`target` as a hard link to `source` (no space taken) where both are on one filesystem, else a copy. nli
    replaces files, never rewrites them in place, so a later write to the source leaves the link as it was."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def copy_run(run_dir, config, folder):
    """The files that rebuild a run's classifier (config.json, vocabulary, model.params), into `folder`."""
    os.makedirs(folder)
    for name in ("config.json", model.vocab_file(config), "model.params"):
        link_or_copy(os.path.join(run_dir, name), os.path.join(folder, name))


def ensemble(run_dirs, out, overwrite=False):
    """Write run dir `out`, whose predictions are the mean of the probabilities of `run_dirs` (which share their
    labels; each keeps its own checkpoint, vocabulary and encoding), each copied into out/members/I."""
    configs = read_members(run_dirs)
    check_members(configs, label_difference, "make an ensemble of")
    earlier = rundir.check_whole_run_out(out, run_dirs, overwrite)
    members = [{"dir": f"{MEMBERS_DIR}/{i}", **member_record(run_dir)} for i, run_dir in enumerate(configs)]
    first = next(iter(configs.values()))
    config = {"labels": first["labels"], "max_len": max(c["max_len"] for c in configs.values()),
              "ensemble": {"combine": "mean of the members' probabilities", "members": members}}

    def write(folder):
        for member, (run_dir, member_config) in zip(members, configs.items()):
            copy_run(run_dir, member_config, os.path.join(folder, member["dir"]))
        fileio.write_json(os.path.join(folder, "config.json"), config)
    rundir.replace_run_dir(out, write, earlier)
    return config
