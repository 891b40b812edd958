"""The run directory: everything a fine-tuning run writes there, each file replaced whole.

    config.json, vocab, model.params   what rebuilds the classifier (`model.save_run`); best/: the best epoch's
    checkpoint/                        weights (and their --average), optimizer state and where the run is, to
                                       resume bit for bit
    metrics.jsonl                      one JSON object per logged update and per epoch
    curves.png                         the loss and the accuracies per epoch
    results.json                       a finished run's accuracy, time and speed, for results tables

A crash at any moment leaves every file whole: each is written to a temporary name, then renamed.
"""
import functools
import glob
import json
import os
import shutil
import sys

from .errors import UserError, first_line
from .figures import pyplot
from .fileio import replace_dir, sha1_of, write_atomically, write_json

CHECKPOINT = "checkpoint"
AVERAGE = "average.params"  # in a checkpoint: the weights' average (--average), beside the raw weights
# What `finetune`, `soup`, `ensemble`, `evaluate` and `predict --attention` write into a run directory (glob patterns):
# `--overwrite` removes these, and only these.
RUN_FILES = ("config.json", "vocab.json", "vocab.txt", "model.params", "model.onnx", "worker-*.params",
             "metrics.jsonl", "curves.png", "results.json", "best", CHECKPOINT + "*", "features", "eval.json",
             "confusion.png", "errors.tsv", "attention*", "members")


def save_checkpoint(run_dir, net, trainer, average, state):
    """Write weights, their `average` (`train.WeightAverage`), optimizer state and `state` (JSON: where the run is,
    RNG states, recipe) to RUN_DIR/checkpoint."""
    def write(folder):
        net.save_parameters(os.path.join(folder, "model.params"))
        average.save(os.path.join(folder, AVERAGE))
        trainer.save_states(os.path.join(folder, "trainer.states"))
        with open(os.path.join(folder, "state.json"), "w", encoding="utf-8") as f:  # last: marks it complete
            json.dump(state, f)
    replace_dir(os.path.join(run_dir, CHECKPOINT), write)


def find_checkpoint(run_dir):
    """The complete checkpoint directory of a run, or None: the current one, else a swap's survivor."""
    for suffix in ("", ".new", ".old"):
        folder = os.path.join(run_dir, CHECKPOINT + suffix)
        if os.path.exists(os.path.join(folder, "state.json")):
            return folder
    return None


def read_checkpoint(run_dir):
    """(directory, state) of the run's checkpoint; a clear error when there is none."""
    folder = find_checkpoint(run_dir)
    if folder is None:
        raise UserError(f"{run_dir} has no checkpoint to resume from ({CHECKPOINT}/state.json is missing).")
    canonical = os.path.join(run_dir, CHECKPOINT)
    if folder != canonical:  # a swap cut short: its survivor becomes the checkpoint
        shutil.rmtree(canonical, ignore_errors=True)
        os.replace(folder, canonical)
        folder = canonical
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        return folder, json.load(f)


def check_new_run_dir(path, overwrite=False):
    """The files of an earlier run in `path` that `--overwrite` will replace (none for a new or empty directory);
    without `overwrite`, a clear refusal of a directory that holds a run, finished or interrupted."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"--out {path} is a file, not a directory: name a new directory for the run.")
    finished = any(os.path.exists(os.path.join(path, name)) for name in ("config.json", "model.params"))
    interrupted = find_checkpoint(path) is not None
    if not (finished or interrupted):
        return []
    if not overwrite:
        if interrupted and not finished:
            raise UserError(f"{path} holds an interrupted run: continue it with `finetune --resume {path}`, or "
                            f"replace it with --overwrite.")
        raise UserError(f"{path} holds a finished run: choose another --out, or replace it with --overwrite.")
    return sorted({os.path.basename(found) for pattern in RUN_FILES
                   for found in glob.glob(os.path.join(path, pattern))})


def check_whole_run_out(path, sources, overwrite=False):
    """Refuse an --out that a run directory written whole (`replace_run_dir`) must not replace: one of the runs it is
    made from, a run there without `overwrite`, or files that are not a run's, which the swap would lose."""
    if any(os.path.abspath(path) == os.path.abspath(source) for source in sources):
        raise UserError(f"--out {path} is one of the runs it is made from: name a new directory.")
    earlier = check_new_run_dir(path, overwrite)
    others = sorted(set(os.listdir(path)) - set(earlier)) if os.path.isdir(path) else []
    if others:
        raise UserError(f"--out {path} holds files that are not a run's ({', '.join(others[:3])}): name a new or "
                        f"empty directory.")
    return earlier


def replace_run_dir(path, write, earlier=()):
    """Write a run directory whole by `write(dir)` and swap it in for `path` (see `fileio.replace_dir`): a crash
    leaves the earlier directory or the new one, never half of it. `earlier` names what `check_whole_run_out` let
    it replace."""
    replace_dir(path, write)
    if earlier:
        print(f"--overwrite: replaced the earlier run's {', '.join(earlier)} in {path}", flush=True)


def remove_run_files(path, names):
    """Remove an earlier run's files (`check_new_run_dir`) from `path`, saying which."""
    if not names:
        return
    for name in names:
        target = os.path.join(path, name)
        if os.path.isdir(target) and not os.path.islink(target):
            shutil.rmtree(target)
        elif os.path.lexists(target):
            os.remove(target)
    print(f"--overwrite: removed the earlier run's {', '.join(names)} from {path}", flush=True)


def data_fingerprint(files, limits, recorded=None):
    """What a run was trained on: size, mtime and SHA-1 of each of its data `files` (role -> path), and the
    `limits` (option -> value). A file whose size and mtime are as `recorded` keeps its recorded SHA-1
    unread, as git's index does."""
    fingerprint = {"files": {}, "limits": dict(limits)}
    for role, path in files.items():
        if path is None:
            continue
        if not os.path.exists(path):
            raise UserError(f"Missing data file {path}.")
        st, known = os.stat(path), ((recorded or {}).get("files") or {}).get(role, {})
        same = known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns
        fingerprint["files"][role] = {"path": os.path.abspath(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                      "sha1": known["sha1"] if same else sha1_of(path)}
    return fingerprint


def data_changes(recorded, current):
    """How the data of `current` differs from the `recorded` fingerprint's: one phrase per change."""
    changes = []
    for role in sorted(set(recorded["files"]) | set(current["files"])):
        old, new = recorded["files"].get(role), current["files"].get(role)
        if old is None or new is None:
            changes.append(f"the {role} file was {old and old['path']}, now {new and new['path']}")
        elif (old["size"], old["sha1"]) != (new["size"], new["sha1"]):
            changes.append(f"the {role} file {new['path']} was {old['size']} bytes with SHA-1 {old['sha1']}, "
                           f"now {new['size']} bytes with SHA-1 {new['sha1']}")
    changes += [f"{option} was {value}, now {current['limits'].get(option)}"
                for option, value in recorded["limits"].items() if current["limits"].get(option) != value]
    return changes


def finished_run(run_dir):
    """Whether `run_dir` holds a finished run: its final model saved, and no checkpoint short of the end."""
    if not os.path.exists(os.path.join(run_dir, "model.params")):
        return False
    folder = find_checkpoint(run_dir)
    if folder is None:
        return True
    with open(os.path.join(folder, "state.json"), encoding="utf-8") as f:
        state = json.load(f)
    return state["epoch"] > (state.get("recipe") or state.get("settings") or {}).get("epochs", float("inf"))


def write_metrics(run_dir, metrics):
    """Rewrite RUN_DIR/metrics.jsonl (atomically) with `metrics`, one JSON object per line."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(m) + "\n" for m in metrics)
    write_atomically(os.path.join(run_dir, "metrics.jsonl"), write)


def append_metrics(run_dir, entry):
    """Add one entry to RUN_DIR/metrics.jsonl."""
    with open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def plot_curves(metrics, path):
    """Save the loss (per logged step and per epoch) and the accuracies per epoch as a PNG."""
    plt = pyplot()
    epochs = [m for m in metrics if m.get("kind", "epoch") == "epoch"]
    steps = [m for m in metrics if m.get("kind") == "step"]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(8, 3))
    if steps:
        ax_loss.plot([m["epochs"] for m in steps], [m["loss"] for m in steps], "-", lw=0.8, alpha=0.6,
                     label="train loss (steps)")
    ax_loss.plot([m["epoch"] for m in epochs], [m["loss"] for m in epochs], "o-", label="train loss")
    ax_acc.plot([m["epoch"] for m in epochs], [m["train_acc"] for m in epochs], "o-", label="train acc")
    ax_acc.plot([m["epoch"] for m in epochs], [m["test_acc"] for m in epochs], "s--", label="test acc")
    if any("dev_acc" in m for m in epochs):
        ax_acc.plot([m["epoch"] for m in epochs], [m.get("dev_acc") for m in epochs], "^:", label="dev acc")
    for ax, title in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(True)
        ax.legend()
    ax_acc.set_ylim(0, 1)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)


def training_speed(epochs):
    """Seconds spent in training steps over `epochs` (finetune's epoch metrics), and examples/sec over them all."""
    seconds = sum(m["examples"] / m["examples_per_sec"] for m in epochs)
    return seconds, sum(m["examples"] for m in epochs) / seconds


def save_results(path, epochs, wall_seconds, **about):
    """A finished run's accuracy, time and speed as JSON with the command that made it: what results tables read.
    With --average, the test accuracy is the averaged weights' (the model saved), and `raw_test_accuracy` the last
    raw weights', so one run gives the gain."""
    seconds, speed = training_speed(epochs)
    raw = {"raw_test_accuracy": epochs[-1]["raw_test_acc"]} if "raw_test_acc" in epochs[-1] else {}
    results = {"command": " ".join([sys.executable] + sys.argv), **about, "test_accuracy": epochs[-1]["test_acc"],
               **raw, "accuracy_per_epoch": [m["test_acc"] for m in epochs], "wall_seconds": wall_seconds,
               "train_seconds": seconds, "examples_per_sec": speed}
    write_json(path, results)


def write_failure(error):
    """Why a write failed, if `error` says one did (an OSError, or MXNet's file stream failing), else None."""
    mxnet = sys.modules.get("mxnet")  # loaded by whatever wrote with it; not imported here, for the CLI's speed
    if isinstance(error, OSError):
        return error.strerror or str(error)
    if mxnet is not None and isinstance(error, mxnet.base.MXNetError):
        return first_line(error)
    return None


def reports_write_failures(method):
    """Make a `RunDir` method's failed write (disk full, no permission) one sentence, a `UserError` naming the
    last good checkpoint, instead of a traceback."""
    @functools.wraps(method)
    def write(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except Exception as error:
            reason = write_failure(error)
            if reason is None:
                raise
            then = (f"continue with `nli finetune --resume {self.path}`"
                    if self.path and find_checkpoint(self.path) else "run it again")
            raise UserError(f"Could not write the run in {self.run_dir} ({reason}); {self.last_checkpoint()}. "
                            f"Free some space or fix the permissions, then {then}.") from None
    return write


class RunDir:
    """The run directory as one worker of a run sees it: the first worker (rank 0) writes it, the others
    and a run without a directory write nothing, so the training loop need not ask."""

    def __init__(self, path, rank=0):
        self.run_dir, self.rank = path, rank
        self.path = path if rank == 0 else None  # where this worker writes

    @reports_write_failures
    def start(self, metrics, checkpoint=None):
        """Create the directory, keep only the `metrics` logged up to the checkpoint, and call `checkpoint`."""
        if self.path:
            os.makedirs(self.path, exist_ok=True)
            write_metrics(self.path, metrics)  # a resumed run drops what was logged after its checkpoint
            if checkpoint:
                checkpoint()

    @reports_write_failures
    def save_checkpoint(self, net, trainer, average, state):
        """`save_checkpoint` into this run's directory."""
        if self.path:
            save_checkpoint(self.path, net, trainer, average, state)

    @reports_write_failures
    def log(self, entry, metrics=None):
        """Append an entry to metrics.jsonl; with all the `metrics` so far (an epoch's end), redraw curves.png."""
        if self.path:
            append_metrics(self.path, entry)
            if metrics:
                plot_curves(metrics, os.path.join(self.path, "curves.png"))

    @reports_write_failures
    def save_model(self, save_model, folder=""):
        """`save_model(dir)` into the run directory, or its `folder` (replaced whole); whether it was written."""
        if not (self.path and save_model):
            return False
        if folder:
            replace_dir(os.path.join(self.path, folder), save_model)
        else:
            save_model(self.path)
        return True

    @reports_write_failures
    def save_final(self, net, save_model, distributed):
        """The run's final model, by `save_model(dir)`. In a distributed run, the workers that write nothing
        else (rank > 0) write their copy of the weights beside it, to check that all of them agree."""
        if self.save_model(save_model):
            print(f"saved the run in {self.path}", flush=True)
        elif self.run_dir and distributed:
            net.save_parameters(os.path.join(self.run_dir, f"worker-{self.rank}.params"))

    @reports_write_failures
    def drop_checkpoint(self):
        """Remove the checkpoint of a run whose final model is saved: it is only for resuming."""
        if self.path:
            for suffix in (".new", ".old", ""):  # the current one last: until then it is complete
                shutil.rmtree(os.path.join(self.path, CHECKPOINT + suffix), ignore_errors=True)

    def where_stopped(self):
        """The sentence saying how to continue a run stopped here."""
        if not self.path:
            return "nothing saved (no run dir)"
        return f"checkpoint saved in {self.path}: continue with `nli finetune --resume {self.path}`"

    def last_checkpoint(self):
        """The sentence naming the last complete checkpoint, for an error that stops the run."""
        kept = find_checkpoint(self.path) if self.path else None
        return f"the last good checkpoint is {kept}" if kept else "no checkpoint was written"
