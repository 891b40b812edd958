# %% [markdown]
# # Exercise 2: Truncating a Pair by the Ratio of Its Lengths
#
# The book's `SNLIBERTDataset` makes a long pair fit `max_len` by popping tokens from the end of the
# longer sentence until it fits (`longest_first`). The exercise asks for the alternative: keep each
# sentence in proportion to its length (`ratio`), and to weigh the two. Here we count what each rule
# cuts, then fine-tune the same model with each rule and compare test accuracy.
#
# Run it as a script (`python chapters/exercise_truncation.py [--quick] [--model M] [--pairs FILE]`) or open its
# notebook, `exercise_truncation.ipynb`, which takes the same options from `NLI_CHAPTER_ARGS`.

# %% [markdown]
# **Set-up.** On Colab, the next cell installs what Colab lacks: MXNet 1.9.1, `nli`, and numpy 1.26 in place of
# Colab's numpy 2 (MXNet 1.9.1 needs numpy<2). Colab must then restart its runtime once: **Runtime → Restart
# session, then run from the next cell**. Anywhere else the cell does nothing (`pip install -r requirements.txt`
# installed all of it).

# %%
import sys

if "google.colab" in sys.modules:
    import importlib.metadata
    import importlib.util
    import subprocess
    NLI_SOURCE = "git+https://github.com/OWNER/nli"  # the repository this notebook comes from
    if importlib.util.find_spec("nli") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "mxnet==1.9.1", "numpy==1.26.4",
                        f"nli @ {NLI_SOURCE}"], check=True)
    if "numpy" in sys.modules and sys.modules["numpy"].__version__ != importlib.metadata.version("numpy"):
        print("Installed numpy 1.26 in place of Colab's numpy 2, which is still loaded: "
              "Runtime → Restart session, then run from the next cell.")

# %%
import argparse
import json
import os
import sys

import numpy as onp

import nli
from nli import chapter, errors, figures, hub, snli
from nli.recipe import RECIPES

plt = figures.pyplot()  # Agg in a script: figures are saved as PNG, which a notebook shows

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `nli`

parser = argparse.ArgumentParser(description="The book's truncation against the ratio rule.")
chapter.add_run_arguments(parser)
parser.add_argument("--max-len", type=int, default=24, help="short enough that truncation matters")
parser.add_argument("--recipe", default="tuned", choices=sorted(RECIPES))
parser.add_argument("--epochs", type=int)
parser.add_argument("--batch-size", type=int)
parser.add_argument("--lr", type=float)
parser.add_argument("--out", default="runs/exercise_truncation", help="where the figure and runs are saved")
args = chapter.parse_args(parser)
os.makedirs(args.out, exist_ok=True)

# %% [markdown]
# ## The Data
#
# SNLI's training pairs, or the pairs of `--pairs FILE`: what the rules are counted on.

# %%
if args.pairs:
    pairs = snli.read_pairs(args.pairs)
else:
    pairs = snli.read_snli(hub.download_extract("SNLI"), True)
if args.quick:
    pairs = [column[:chapter.QUICK["limit_train"]] for column in pairs]
print(f"{len(pairs[2])} pairs")

# %% [markdown]
# ## What Each Rule Cuts
#
# For several `max_len`, count the pairs that must be cut and the tokens each rule removes from the
# premise and from the hypothesis. `longest_first` cuts the longer sentence first (usually the
# premise) down to the shorter's length before touching the other; `ratio` takes from both in
# proportion, so a short hypothesis (often the part that decides the label) loses tokens too.

# %%
p_lens = onp.array([len(snli.tokenize(s)) for s in pairs[0]])
h_lens = onp.array([len(snli.tokenize(s)) for s in pairs[1]])
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
plt.close(fig)
chapter.show(os.path.join(args.out, "tokens_cut.png"))

# %% [markdown]
# ## Accuracy of Each Rule
#
# The same model, recipe and seed, fine-tuned once per rule at the short `max_len`, then tested on the
# test pairs encoded with the same rule: one run each, in `OUT/longest_first` and `OUT/ratio`.

# %%
given = {"epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr}
overrides = {name: value for name, value in given.items() if value is not None} | (chapter.QUICK if args.quick else {})
accuracy, training = {}, {}
for rule in snli.TRUNCATION_RULES:
    run_dir = nli.run(args.recipe, overwrite=True, model=args.model, devices=args.devices,
                      out=os.path.join(args.out, rule), max_len=args.max_len, truncation=rule,
                      **chapter.data_settings(args), **overrides)
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    accuracy[rule] = results["test_accuracy"]
    training[rule] = {"seconds": results["train_seconds"], "wall_seconds": results["wall_seconds"],
                      "examples_per_sec": results["examples_per_sec"]}
    print(f"{rule}: test accuracy {accuracy[rule]:.4f}, {training[rule]['examples_per_sec']:.1f} examples/sec")

with open(os.path.join(args.out, "truncation.json"), "w") as f:
    json.dump({"command": " ".join([sys.executable] + sys.argv), "model": args.model, "max_len": args.max_len,
               "recipe": args.recipe, "settings": overrides, "train_pairs": results["train_pairs"],
               "test_pairs": results["test_pairs"], "cuts": cuts, "test_accuracy": accuracy, "training": training},
              f, indent=1)

# %% [markdown]
# **Pros and cons.** `longest_first` keeps the hypothesis whole as long as it is the shorter side,
# and the hypothesis is where the label is decided, but it may cut a long premise hard. `ratio`
# treats both sides alike and keeps the start of each, but trims even a short hypothesis. On SNLI,
# where pairs average 26.5 word tokens, both rules matter only at small `max_len`; `truncation.json`
# in the output folder holds the counts and accuracies measured by this run.
