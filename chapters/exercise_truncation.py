# %% [markdown]
# # Exercise 2: Truncating a Pair by the Ratio of Its Lengths
#
# The book's `SNLIBERTDataset` makes a long pair fit `max_len` by popping tokens from the end of the
# longer sentence until it fits (`longest_first`). The exercise asks for the alternative: keep each
# sentence in proportion to its length (`ratio`), and to weigh the two. Here we count what each rule
# cuts, then fine-tune the same model with each rule and compare test accuracy.
#
# Run it as a script (`python chapters/exercise_truncation.py [--quick]`) or open it as a notebook.

# %%
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # scripts have no display: figures are saved as PNG
import numpy as onp  # noqa: E402
from matplotlib import pyplot as plt  # noqa: E402

from nli import data, errors, hub, model, predict, rundir, snli, train  # noqa: E402
from nli.recipe import RECIPES  # noqa: E402

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `python -m nli`

parser = argparse.ArgumentParser(description="The book's truncation against the ratio rule.")
parser.add_argument("--model", default="bert.small", help="bert.small, bert.base, a directory, hf:DIR or hf:ORG/NAME")
parser.add_argument("--pairs", help="a file of labelled pairs, split 80/20 (default: SNLI's train and test)")
parser.add_argument("--max-len", type=int, default=24, help="short enough that truncation matters")
parser.add_argument("--recipe", default="tuned", choices=sorted(RECIPES))
parser.add_argument("--epochs", type=int)
parser.add_argument("--batch-size", type=int)
parser.add_argument("--lr", type=float)
parser.add_argument("--devices", default="auto")
parser.add_argument("--quick", action="store_true", help="a few hundred pairs, one epoch")
parser.add_argument("--out", default="runs/exercise_truncation")
args, _ = parser.parse_known_args()  # notebooks pass their own arguments
os.makedirs(args.out, exist_ok=True)

# %% [markdown]
# ## The Data
#
# SNLI's train and test splits, or a file of labelled pairs split 80/20 by a fixed permutation.

# %%
if args.pairs:
    pairs = snli.read_pairs(args.pairs)
    order = onp.random.RandomState(0).permutation(len(pairs[2]))
    cut = int(0.8 * len(order))
    train_pairs, test_pairs = ([[column[i] for i in order[part]] for column in pairs]
                               for part in (slice(None, cut), slice(cut, None)))
else:
    data_dir = hub.download_extract("SNLI")
    train_pairs, test_pairs = snli.read_snli(data_dir, True), snli.read_snli(data_dir, False)
if args.quick:
    train_pairs, test_pairs = [c[:512] for c in train_pairs], [c[:256] for c in test_pairs]
print(f"{len(train_pairs[2])} training pairs, {len(test_pairs[2])} test pairs")

# %% [markdown]
# ## What Each Rule Cuts
#
# For several `max_len`, count the pairs that must be cut and the tokens each rule removes from the
# premise and from the hypothesis. `longest_first` cuts the longer sentence first (usually the
# premise) down to the shorter's length before touching the other; `ratio` takes from both in
# proportion, so a short hypothesis (often the part that decides the label) loses tokens too.

# %%
p_lens = onp.array([len(snli.tokenize(s)) for s in train_pairs[0]])
h_lens = onp.array([len(snli.tokenize(s)) for s in train_pairs[1]])
cuts = {}
for rule in snli.TRUNCATION_RULES:
    for max_len in (16, 24, 32, 48, 128):
        p_kept, h_kept = snli.truncated_lengths(p_lens, h_lens, max_len, rule)
        cuts[f"{rule}@{max_len}"] = {
            "rule": rule, "max_len": max_len, "pairs_cut": int(((p_kept < p_lens) | (h_kept < h_lens)).sum()),
            "premise_tokens_cut": int((p_lens - p_kept).sum()), "hypothesis_tokens_cut": int((h_lens - h_kept).sum()),
            "hypotheses_cut": int((h_kept < h_lens).sum())}
        print(cuts[f"{rule}@{max_len}"])

fig, ax = plt.subplots(figsize=(7, 3))
lengths = (16, 24, 32, 48)
for offset, (rule, side) in enumerate([(r, s) for r in snli.TRUNCATION_RULES for s in ("premise", "hypothesis")]):
    ax.bar(onp.arange(len(lengths)) + 0.2 * offset - 0.3, [cuts[f"{rule}@{n}"][f"{side}_tokens_cut"] for n in lengths],
           width=0.2, label=f"{rule}: {side}")
ax.set_xticks(range(len(lengths)), [f"max_len {n}" for n in lengths])
ax.set_ylabel("tokens cut")
ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(args.out, "tokens_cut.png"))

# %% [markdown]
# ## Accuracy of Each Rule
#
# The same model, recipe and seed, fine-tuned once per rule at the short `max_len`, then evaluated
# on the test pairs encoded with the same rule.

# %%
overrides = dict(epochs=1 if args.quick else args.epochs, batch_size=64 if args.quick else args.batch_size,
                 lr=args.lr, max_len=args.max_len, devices=args.devices)
recipe = dataclasses.replace(RECIPES[args.recipe], **{k: v for k, v in overrides.items() if v is not None})
devices = data.parse_devices(recipe.devices)
accuracy, training = {}, {}
for rule in snli.TRUNCATION_RULES:
    start = time.perf_counter()  # wall time as `nli finetune` spends it: loading, encoding, training, evaluating
    train.seed_everything(0)
    net, vocab = model.from_pretrained(args.model, devices, max_len=args.max_len)
    train_set, test_set = (snli.encode_pairs(*pairs, vocab, args.max_len, rule) for pairs in (train_pairs, test_pairs))
    epochs = train.finetune(net, train_set, test_set, dataclasses.replace(recipe, truncation=rule,
                                                                          out=os.path.join(args.out, rule)))
    seconds, speed = rundir.training_speed(epochs)
    training[rule] = {"seconds": seconds, "wall_seconds": time.perf_counter() - start, "examples_per_sec": speed}
    accuracy[rule] = predict.accuracy(net, test_set, devices, 256)
    print(f"{rule}: test accuracy {accuracy[rule]:.4f}, {training[rule]['examples_per_sec']:.1f} examples/sec")

with open(os.path.join(args.out, "truncation.json"), "w") as f:
    json.dump({"command": " ".join([sys.executable] + sys.argv), "model": args.model, "max_len": args.max_len,
               "recipe": dataclasses.asdict(recipe),
               "train_pairs": len(train_pairs[2]), "test_pairs": len(test_pairs[2]), "cuts": cuts,
               "test_accuracy": accuracy, "training": training}, f, indent=1)

# %% [markdown]
# **Pros and cons.** `longest_first` keeps the hypothesis whole as long as it is the shorter side,
# and the hypothesis is where the label is decided, but it may cut a long premise hard. `ratio`
# treats both sides alike and keeps the start of each, but trims even a short hypothesis. On SNLI,
# where pairs average 26.5 word tokens, both rules matter only at small `max_len`; `truncation.json`
# in the output folder holds the counts and accuracies measured by this run.
