"""What a fine-tuning run is configured with, in one object: `Recipe`. The recipes `book` and `tuned` are
instances of it, an exercise changes one with `dataclasses.replace`, and `nli finetune` makes
its options from its fields. A run prints it when it starts and saves it whole in config.json and in
each checkpoint, which `--resume` reads it back from.
"""
import argparse
import dataclasses
import re

from .errors import UserError
from .snli import TRUNCATION_RULES

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "linear", "cosine")
MODES = ("full", "freeze-encoder", "features")  # everything trains; the head; the head on cached features
KVSTORES = ("device", "local", "dist_sync", "dist_device_sync")
DTYPES = ("float32", "float16")
POOLINGS = ("cls", "mean")


MIN_MAX_LEN = 4  # <cls>, two <sep> and at least one token of the pair


def at_least(low, why=""):
    """A check of a number: `low` or more; it returns what is wrong, or None."""
    return lambda value: None if value >= low else f"expected at least {low}{why}"


def above(low):
    """A check of a number: more than `low`."""
    return lambda value: None if value > low else f"expected a number above {low}"


def rate_factor(value):
    """A check of a number: a factor in (0, 1]."""
    return None if 0 < value <= 1 else "expected a factor in (0, 1]"


def fraction(value):
    """A check of a number: a share in [0, 1)."""
    return None if 0 <= value < 1 else "expected a fraction in [0, 1)"


# --average: each kind's number when none is given. EMA's decay: the usual 0.999, about the last 1,000 updates
# once warmed up (`train.WeightAverage`); SWA's epochs: the last one, which every run has.
AVERAGES = {"ema": 0.999, "swa": 1}


def parse_average(text):
    """(kind, number) of an --average value, ema[:DECAY] (DECAY in [0, 1)) or swa[:EPOCHS] (at least 1), the
    number filled in when it is left out; None for anything else."""
    match = re.fullmatch(r"\s*(ema|swa)(?::(.*))?", str(text))
    if not match:
        return None
    kind, number = match.group(1), match.group(2)
    try:
        number = AVERAGES[kind] if number is None else (float if kind == "ema" else int)(number)
    except ValueError:
        return None
    return (kind, number) if (0 <= number < 1 if kind == "ema" else number >= 1) else None


def averaging(value):
    """A check of --average: a value `parse_average` reads."""
    if parse_average(value) is None:
        return "expected ema[:DECAY] with DECAY in [0, 1), or swa[:EPOCHS] with EPOCHS at least 1"


SIZE_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def size(text):
    """Bytes from a size such as 6G, 512M, 1.5GB or 8GiB (powers of 1024): the type of --max-memory."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([KMGT]?)(?:I?B)?\s*", str(text), re.I)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: expected a size such as 6G, 512M or 1.5G")
    return int(float(match.group(1)) * SIZE_UNITS[match.group(2).upper()])


def checked(kind, check):
    """An argparse type: `kind(text)`, refused with what `check` finds wrong (argparse names the option)."""
    if check is None:
        return kind

    def parse(text):
        value = kind(text)
        if problem := check(value):
            raise argparse.ArgumentTypeError(f"{text}: {problem}")
        return value
    parse.__name__ = kind.__name__  # argparse says "invalid int value" of a text that is no number
    return parse


def option(default, help, kind=None, choices=None, check=None, option_only=False):
    """A field of `Recipe`, with what its command-line option says and takes, and the check of its value: of
    both the option and the Recipe, or with `option_only` of the option alone."""
    return dataclasses.field(default=default, metadata={"help": help, "kind": kind or type(default),
                                                        "choices": choices, "check": check,
                                                        "option_only": option_only})


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything a fine-tuning run is configured with; the defaults are the book's recipe.

    Separate from the live objects (network, data, devices), as Hugging Face's `TrainingArguments` is.
    """
    name: str = option("book", "the recipe these settings started from")
    # How the optimizer sees the data
    # 0 epochs: nothing trains. In Python, the way to the starting weights; as an option, a mistake.
    epochs: int = option(5, "passes over the training pairs", check=at_least(1), option_only=True)
    batch_size: int = option(512, "pairs per batch (and per worker)", check=at_least(1))
    bucket_width: int = option(1, "a batch takes pairs whose lengths round up to the same multiple of N tokens, "
                                  "shuffled within that bucket, and is padded to that multiple: 1 pads least, as "
                                  "the pairs of a batch are of one length where there are enough (runs saved before "
                                  "this setting existed trained with 8)", check=at_least(1))
    max_len: int = option(128, "tokens per pair, at most: longer pairs are truncated; at most the model's positions",
                           check=at_least(MIN_MAX_LEN, ": <cls>, two <sep> and one token of the pair"))
    optimizer: str = option("adam", "adam: the book's; adamw: decoupled weight decay, none on biases and LayerNorm",
                            choices=OPTIMIZERS)
    lr: float = option(1e-4, "the learning rate (its peak, with a schedule)", check=above(0))
    weight_decay: float = option(0.0, "weight decay", check=at_least(0))
    warmup_ratio: float = option(0.0, "share of the updates warming the rate up from 0", check=fraction)
    schedule: str = option("constant", "the learning rate after the warmup: constant, or decayed to 0",
                           choices=SCHEDULES)
    max_grad_norm: float = option(0.0, "clip gradients to this global norm (0: off)", check=at_least(0))
    accumulate: int = option(1, "update every N batches, as one batch N times larger would",
                            check=at_least(1))
    layer_decay: float = option(1.0, "layer-wise rate decay F: encoder layer l of L learns at lr * F^(L-l), the "
                                     "embeddings at lr * F^L, the head at lr (1: every layer at lr)", check=rate_factor)
    average: str = option(None, "save the average of the weights over the updates: ema[:DECAY] (exponential, "
                                "decay 0.999, warmed up so a short run averages its last tenth) or swa[:EPOCHS] "
                                "(uniform over the last EPOCHS epochs, 1); the raw weights are scored beside it",
                          str, check=averaging)
    # What trains, and on what input
    mode: str = option("full", "full: everything trains; freeze-encoder: only the head (hidden + output); "
                               "features: the head on the encoder's <cls> features, computed once (cached in "
                               "the run dir): the fastest way, a baseline", choices=MODES)
    pooling: str = option("cls", "what the head reads: cls, the encoding of <cls> (the book's); mean, the mean of "
                                 "the pair's token encodings (how sentence-embedding checkpoints were trained)",
                          choices=POOLINGS)
    freeze_epochs: int = option(0, "train only the head for the first N epochs, then everything", check=at_least(0))
    truncation: str = option("longest_first", "pairs over max-len: cut the longer side first (the book's), or "
                                              "both sides in proportion to their lengths", choices=TRUNCATION_RULES)
    dropout: float = option(None, "default: the model's own (0.1)", float, check=fraction)
    # The run
    seed: int = option(0, "seeds every random draw: a run can be repeated")
    devices: str = option("auto", "auto (every GPU, else the CPU), cpu, cpu:N (N CPU contexts, as several devices), "
                                  "gpu (every GPU) or gpu:0,1 (those GPUs)")
    kvstore: str = option("device", "how gradients are summed: over this machine's devices, or over the "
                                    "workers that `python -m nli.launch` starts", choices=KVSTORES)
    dtype: str = option("float32", "float16 is refused on every device: MXNet 1.9.1's AMP lists hold no operator of "
                                   "the numpy interface this BERT uses, so it would stay float32", choices=DTYPES)
    max_memory: int = option(None, "memory the run may take, e.g. 6G or 512M: each batch trains in micro-batches "
                                   "that fit, their gradients summed into the batch's one update; default: 60%% of "
                                   "the RAM available (85%% of each GPU's free memory)", size, check=at_least(1))
    save_every: int = option(None, "checkpoint every N updates too (there is one at each epoch's end)", int,
                             check=at_least(1))
    log_every: int = option(10, "a step entry in metrics.jsonl every N updates", check=at_least(1))
    # The model and the data it is fine-tuned on, and where the run is written
    model: str = option(None, "bert.small, bert.base, a model directory, hf:DIR (a Hugging Face BERT checkpoint: "
                              "config.json, vocab.txt, model.safetensors) or hf:ORG/NAME[@REVISION] (one on the "
                              "Hugging Face Hub, downloaded into its cache; an existing directory DIR wins); required "
                              "but with --resume", str)
    data: str = option(None, "SNLI: download the dataset and use its splits", str)
    train: str = option(None, "a .tsv/.jsonl/.txt file of training pairs", str)
    test: str = option(None, "a .tsv/.jsonl/.txt file of test pairs", str)
    dev: str = option(None, "a file of pairs to pick the best epoch on; it is kept in OUT/best/", str)
    dev_fraction: float = option(None, "hold out this share of the training pairs as --dev", float)
    test_fraction: float = option(None, "instead of --test: hold out this share of the --train pairs, drawn with "
                                        "--seed (the same split each time), as the test set", float)
    limit_train: int = option(None, "use the first N train pairs", int, check=at_least(1))
    limit_test: int = option(None, "use the first N test pairs", int, check=at_least(1))
    out: str = option(None, "run directory to write; required but with --resume", str)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            choices, value = field.metadata["choices"], getattr(self, field.name)
            if choices and value not in choices:
                raise UserError(f"{field.name} {value!r}: expected one of {', '.join(choices)}.")
            check = not field.metadata["option_only"] and field.metadata["check"]
            if check and value is not None and (problem := check(value)):
                raise UserError(f"--{field.name.replace('_', '-')} {value}: {problem}.")
        if self.average is not None:  # recorded with its number: config.json says what was averaged
            kind, number = parse_average(self.average)
            object.__setattr__(self, "average", f"{kind}:{number}")
            if kind == "swa" and number > self.epochs:
                raise UserError(f"--average {self.average} averages the last {number} epochs, but the run has "
                                f"{self.epochs}: give swa:N with N at most --epochs.")
        if self.freeze_epochs and self.mode != "full":
            raise UserError(f"--freeze-epochs unfreezes the encoder later: it needs full fine-tuning, not {self.mode}.")
        if self.dev and self.dev_fraction:
            raise UserError("--dev FILE or --dev-fraction F: choose one.")
        for name in ("dev_fraction", "test_fraction"):
            if getattr(self, name) is not None and not 0 < getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: expected a fraction in (0, 1).")
        if self.test and self.test_fraction:
            raise UserError("--test FILE or --test-fraction F: choose one.")

    @classmethod
    def from_checkpoint(cls, state):
        """The Recipe a checkpoint's `state` was written with.

        Checkpoints written before the Recipe existed keep the command's options as `settings`: the same
        names, but with the recipe's name as `recipe` and the mode as two flags."""
        if "recipe" in state:
            return cls(**{**LEGACY, **state["recipe"]})
        options = dict(state.get("settings") or {})
        if "recipe" not in options:
            raise UserError("this checkpoint was not written by `nli finetune`: continue it with the "
                            "script that started it.")
        mode = "features" if options.pop("extract_features") else "full"
        mode = "freeze-encoder" if options.pop("freeze_encoder") else mode
        return cls(**{**LEGACY, "name": options.pop("recipe"), "mode": mode, **options})

    def run_config(self):
        """config.json's entries about training: what encoding the input needs, and the whole recipe."""
        return {"max_len": self.max_len, "truncation": self.truncation, "pooling": self.pooling,
                "recipe": dataclasses.asdict(self)}


# What runs saved before a setting existed trained with, where that is not the setting's default now
LEGACY = {"bucket_width": 8}
BOOK = Recipe()  # the chapter's: plain Adam at a constant 1e-4, batch 512, max_len 128, 5 epochs
# How BERT is usually fine-tuned (Devlin et al., 2019): decoupled weight decay, a linear warmup over the
# first 10% of updates then a linear decay to 0, gradients clipped.
TUNED = dataclasses.replace(BOOK, name="tuned", optimizer="adamw", lr=2e-4, weight_decay=0.01, warmup_ratio=0.1,
                            schedule="linear", max_grad_norm=1.0)
# For thousands of training pairs rather than SNLI's 550,152 (the README says why): small batches for enough
# updates, a higher rate at the top than at the bottom, the mean of the tokens. bench/bench_small_data.py: on
# all-MiniLM-L6-v2 and 7,873 SNLI pairs, 0.999 points above the Hugging Face peer over 3 seeds, in its wall time.
SMALL_DATA = dataclasses.replace(TUNED, name="small-data", batch_size=32, lr=1e-4, epochs=4, layer_decay=0.8,
                                 pooling="mean")
RECIPES = {recipe.name: recipe for recipe in (BOOK, TUNED, SMALL_DATA)}
