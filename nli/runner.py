"""A whole fine-tuning run, from settings to a finished run directory: `run`, the one entry that fine-tunes.

`nli finetune`, the chapters, the notebooks and the benchmarks all call it, as every Hugging Face example calls
`Trainer.train`. It chooses the memory budget, fingerprints and encodes the data (cached), builds the classifier,
trains it (`train.finetune`, the book's `train_ch13`), and leaves model, best/, metrics, curves and results.json in
the run directory; a run that fails or is stopped keeps its last checkpoint, for `resume`.
"""
import dataclasses
import difflib
import os
import sys
import time

import numpy as onp

from . import data, hf, hub, model, rundir, snli, train
from .errors import UserError
from .recipe import RECIPES, Recipe

# What a resumed run may change: where it runs, not what it computes (micro-batches and devices sum to the same
# update, within rounding)
RESUME_MAY_CHANGE = ("max_memory", "devices")


def run(recipe=None, *, resume=None, overwrite=False, force=False, keep_checkpoint=False, quiet=False,
        **settings):
    """Fine-tune as `nli finetune` does and return the run directory: `recipe` (a name or a `Recipe`; the book's by
    default) changed by `settings`, named as its options (model, train, test, epochs, batch_size, devices, out, ...).

    `resume=RUN_DIR` continues a run from its checkpoint (settings then only `max_memory` and `devices`),
    `overwrite` replaces the run `out` holds, `force` resumes on changed data, `keep_checkpoint` keeps
    checkpoint/ of a finished run."""
    if resume and rundir.finished_run(resume):  # what resuming is for is done
        print(f"{resume} is a finished run: nothing to resume. Evaluate it with `nli evaluate --run {resume}`, or "
              f"start another run with --out.")
        return resume
    if force and not resume:
        raise UserError("--force goes with --resume: it resumes a run on changed data.")
    if overwrite and resume:
        raise UserError("--resume continues a run and --overwrite replaces it: choose one.")
    recipe, devices, started_from = run_recipe(recipe, settings, resume)
    earlier_run = [] if resume else rundir.check_new_run_dir(recipe.out, overwrite)
    train.check_dtype(recipe.dtype, devices)
    train.check_kvstore(recipe.kvstore)
    train_file, test_file = data_files(recipe.data, recipe.train, recipe.test, recipe.test_fraction)
    fingerprint = data_fingerprint(recipe, train_file, test_file, resume, force)
    start = time.perf_counter()  # the run's wall time: reading and encoding the data, training, testing
    train.seed_everything(recipe.seed)
    net, vocab = model.from_pretrained(hf.pinned(recipe.model, started_from), devices, recipe.dropout, recipe.max_len,
                                       recipe.pooling, quiet)
    net.pretrained = started_from or net.pretrained  # the run records the model as it was named when it started
    train_set, test_set, dev_set = encoded_sets(recipe, vocab, train_file, test_file, progress=not quiet)
    rundir.remove_run_files(recipe.out, earlier_run)
    print(f"{len(train_set)} training pairs, {len(test_set)} test pairs"
          + (f", {len(dev_set)} dev pairs" if dev_set else "") + f", devices {devices}", flush=True)
    warn_if_one_update_an_epoch(recipe, len(train_set))

    def save_model(folder):  # config.json from the objects that trained: the network, its encoder, the pairs
        model.save_run(folder, net, vocab, {**train.run_config(net, train_set, recipe), "data": fingerprint})
    epochs = train.finetune(net, train_set, test_set, recipe, dev_set=dev_set, resume=bool(resume),
                            progress=not quiet, data_fingerprint=fingerprint, save_model=save_model)
    # The worker that scores the epochs writes the run: the only one, or rank 0 of a distributed run
    if epochs and "test_acc" in epochs[-1] and rundir.finished_run(recipe.out):
        rundir.save_results(os.path.join(recipe.out, "results.json"), epochs, time.perf_counter() - start,
                            model=recipe.model, recipe=dataclasses.asdict(recipe), train_pairs=len(train_set),
                            test_pairs=len(test_set))
        if not keep_checkpoint:  # it is only for resuming
            rundir.RunDir(recipe.out).drop_checkpoint()
    return recipe.out


def run_recipe(recipe, settings, resume):
    """(the Recipe of the run, its devices, the pretrained model its checkpoint records): the named recipe changed by
    `settings`, or the recipe of the run that `resume` continues, moved to the devices and memory budget given, if
    any, with the model it started from (`hf.pinned`; None for a new run, or a checkpoint older than the record)."""
    if not resume:
        recipe = recipe_of(recipe, settings)
        if recipe.model is None or recipe.out is None:
            raise UserError("finetune needs --model and --out (or --resume RUN_DIR to continue a run).")
        devices = data.parse_devices(recipe.devices)
        return train.with_memory_budget(recipe, devices), devices, None  # config.json records the budget chosen
    if changed := [name for name in settings if name not in RESUME_MAY_CHANGE] + ["recipe"] * (recipe is not None):
        raise UserError(f"--resume continues a run as it was set; drop --{changed[0].replace('_', '-')}.")
    state = rundir.read_checkpoint(resume)[1]
    recipe = dataclasses.replace(Recipe.from_checkpoint(state), out=resume, **settings)
    devices = data.parse_devices(recipe.devices)
    moved = state.get("devices", [str(d) for d in devices]) != [str(d) for d in devices]  # older runs: not recorded
    if moved and "max_memory" not in settings:
        # The budget recorded was a share of the memory where the run was (60% of a CPU's RAM, 85% of a GPU's):
        # choose it again where the run now is.
        recipe = train.with_memory_budget(dataclasses.replace(recipe, max_memory=None), devices)
    return recipe, devices, state.get("pretrained")


def recipe_of(recipe, settings):
    """The recipe named (a name, a `Recipe`, or None: the book's) changed by `settings`, each named as a field."""
    fields = [f.name for f in dataclasses.fields(Recipe)]
    if unknown := [name for name in settings if name not in fields]:
        close = difflib.get_close_matches(unknown[0], fields, 1)
        raise UserError(f"{unknown[0]!r} is not a setting of a run" + (f"; did you mean {close[0]!r}?" if close
                                                                        else "; see `nli finetune --help`."))
    base = recipe if isinstance(recipe, Recipe) else RECIPES.get(recipe or "book")
    if base is None:
        raise UserError(f"recipe {recipe!r}: expected one of {', '.join(RECIPES)}.")
    return dataclasses.replace(base, **settings)


def data_files(data_name, train_file, test_file, test_fraction=None, need_train=True):
    """(train file or None, test file or None) from `data="SNLI"` or the files given; the test file is None when
    `test_fraction` holds out part of the training file instead."""
    if data_name is not None:
        if data_name != "SNLI":
            raise UserError(f"--data {data_name}: only SNLI is known; pass files with --train/--test.")
        snli_dir = hub.download_extract("SNLI")
        return (snli.snli_file(snli_dir, True) if need_train else None), snli.snli_file(snli_dir, False)
    if need_train and train_file is None or test_file is None and not test_fraction:
        needed = "--train FILE with --test FILE or --test-fraction F" if need_train else "--test FILE"
        raise UserError(f"Say which data to use: --data SNLI, or {needed}.")
    return (train_file if need_train else None), test_file


def require_pairs(count, path, use):
    """Refuse a data set without a labelled pair, which would train nothing or score NaN."""
    if not count:
        raise UserError(f"{path} has no labelled pair to {use} (pairs labelled '-' are skipped, as the book does).")


def check_resume_data(run_dir, recorded, current, force):
    """Continue a run only on the data it started on, unless forced; runs older than data fingerprints are not
    checked."""
    if recorded is None:
        print(f"note: {run_dir} was written before runs recorded their data, so it is resumed without checking "
              f"that the data is the same.", flush=True)
        return
    if changes := rundir.data_changes(recorded, current):
        if not force:
            raise UserError(f"{run_dir} started on other data: {'; '.join(changes)}. Resume it on the data it "
                            f"started on, or go on with this data with --force.")
        print(f"warning: --force: resuming on changed data: {'; '.join(changes)}.", file=sys.stderr, flush=True)


def data_fingerprint(recipe, train_file, test_file, resume, force):
    """The fingerprint of the run's data (`rundir.data_fingerprint`); a resumed run's is checked against its own."""
    recorded = rundir.read_checkpoint(resume)[1].get("data") if resume else None
    limits = {"limit_train": recipe.limit_train, "limit_test": recipe.limit_test, "dev_fraction": recipe.dev_fraction}
    if recipe.test_fraction:  # runs that never had it keep their fingerprints
        limits.update(test_fraction=recipe.test_fraction, seed=recipe.seed)
    fingerprint = rundir.data_fingerprint({"train": train_file, "test": test_file, "dev": recipe.dev}, limits,
                                          recorded)
    if resume:
        check_resume_data(resume, recorded, fingerprint, force)
    return fingerprint


def split_off(encoded, fraction, seed):
    """(rest, held out): a share `fraction` of the pairs drawn with `seed`, so the same split comes back."""
    order = onp.random.default_rng(seed).permutation(len(encoded))
    n_out = max(1, int(len(encoded) * fraction))
    return encoded.take(onp.sort(order[n_out:])), encoded.take(onp.sort(order[:n_out]))


def encoded_sets(recipe, vocab, train_file, test_file, progress):
    """The encoded (train, test, dev or None) pairs of a run, each refused if it has no labelled pair."""
    def load(path):
        return snli.load_encoded(path, vocab, recipe.max_len, recipe.truncation, progress)
    train_set = load(train_file)
    if recipe.test_fraction:
        train_set, test_set = split_off(train_set, recipe.test_fraction, recipe.seed)
    else:
        test_set = load(test_file)
    train_set, test_set = train_set.head(recipe.limit_train), test_set.head(recipe.limit_test)
    dev_set = None
    if recipe.dev_fraction:
        train_set, dev_set = train.hold_out(train_set, recipe.dev_fraction)
    elif recipe.dev:
        dev_set = load(recipe.dev)
    require_pairs(len(train_set), train_file, "train on")
    require_pairs(len(test_set), test_file or f"the {recipe.test_fraction} of {train_file} held out", "test on")
    if recipe.dev:
        require_pairs(len(dev_set), recipe.dev, "choose the best epoch on")
    return train_set, test_set, dev_set


def warn_if_one_update_an_epoch(recipe, num_pairs):
    """Say so when a batch holds more than every training pair: each epoch is then a single update."""
    if recipe.batch_size * recipe.accumulate > num_pairs:
        print(f"warning: batches of {recipe.batch_size * recipe.accumulate} pairs hold more than the {num_pairs} "
              f"training pairs, so each epoch is one update; a smaller --batch-size gives more.",
              file=sys.stderr, flush=True)

