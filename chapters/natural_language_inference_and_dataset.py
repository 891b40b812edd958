# %% [markdown]
# # Natural Language Inference and the Dataset
#
# Natural language inference asks whether a *hypothesis* can be inferred from a *premise*:
# *entailment* (it follows), *contradiction* (its negation follows) or *neutral* (neither). The
# Stanford Natural Language Inference corpus (SNLI) holds over 500,000 labelled English pairs.
#
# Run it as a script (`python chapters/natural_language_inference_and_dataset.py [--quick]`) or
# open it as a notebook (Jupyter reads the `# %%` cells).

# %%
import argparse
import collections
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # scripts have no display: the figure is saved as a PNG
from matplotlib import pyplot as plt  # noqa: E402

from nli import errors, hub, snli  # noqa: E402

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `python -m nli`

parser = argparse.ArgumentParser(description="Read SNLI, show examples, counts and lengths.")
parser.add_argument("--quick", action="store_true", help="accepted for symmetry: reading SNLI is quick")
parser.add_argument("--out", default="runs/chapter_dataset", help="where the length plot is saved")
args, _ = parser.parse_known_args()  # notebooks pass their own arguments

# %% [markdown]
# ## Reading the Dataset
#
# The archive holds one tab-separated file per split. We keep the premise, the hypothesis and the
# gold label of each pair, and drop the pairs without an agreed label (marked `-`). The sentences
# come from the binary parse columns, so they are already tokenized: punctuation is split off.

# %%
data_dir = hub.download_extract("SNLI")
splits = {split: snli.read_pairs(os.path.join(data_dir, f"snli_1.0_{split}.txt"))
          for split in ("train", "dev", "test")}
premises, hypotheses, labels = splits["train"]
for premise, hypothesis, label in list(zip(premises, hypotheses, labels))[:3]:
    print("premise:", premise)
    print("hypothesis:", hypothesis)
    print("label:", snli.LABELS[label])

# %% [markdown]
# ## How Many of Each Label
#
# The three labels are close to balanced in every split, so accuracy is a fair first measure.

# %%
for split, (_, _, split_labels) in splits.items():
    counts = collections.Counter(split_labels)
    print(f"{split:>5}: {len(split_labels):>7} pairs  " +
          "  ".join(f"{name} {counts[i]}" for i, name in enumerate(snli.LABELS)))

# %% [markdown]
# ## How Long the Pairs Are
#
# BERT reads the pair as one sequence, `<cls> premise <sep> hypothesis <sep>`, so its length is
# the premise's tokens plus the hypothesis's plus three. The book pads every pair to 128 tokens;
# the histogram shows how much of that is padding.

# %%
os.makedirs(args.out, exist_ok=True)
fig, axes = plt.subplots(1, 2, figsize=(9, 3))
for split, (split_premises, split_hypotheses, _) in splits.items():
    pair_lens = [len(snli.tokenize(p)) + len(snli.tokenize(h)) + 3
                 for p, h in zip(split_premises, split_hypotheses)]
    axes[0].hist([len(snli.tokenize(p)) for p in split_premises], bins=30, alpha=0.5, label=split)
    axes[1].hist(pair_lens, bins=30, alpha=0.5, label=split)
    print(f"{split:>5}: pair length mean {sum(pair_lens) / len(pair_lens):.1f}, max {max(pair_lens)}")
axes[0].set_xlabel("premise length (tokens)")
axes[1].set_xlabel("BERT input length (tokens)")
for ax in axes:
    ax.set_ylabel("pairs")
    ax.legend()
fig.tight_layout()
fig.savefig(os.path.join(args.out, "lengths.png"))
print("saved", os.path.join(args.out, "lengths.png"))
