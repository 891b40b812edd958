# %% [markdown]
# # Natural Language Inference and the Dataset
#
# Natural language inference asks whether a *hypothesis* can be inferred from a *premise*:
# *entailment* (it follows), *contradiction* (its negation follows) or *neutral* (neither). The
# Stanford Natural Language Inference corpus (SNLI) holds over 500,000 labelled English pairs.
#
# Run it as a script (`python chapters/natural_language_inference_and_dataset.py [--pairs FILE]`) or open its
# notebook, `natural_language_inference_and_dataset.ipynb`, which takes the same options from `NLI_CHAPTER_ARGS`.

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
import collections
import os

from nli import chapter, errors, figures, hub, snli

plt = figures.pyplot()  # Agg in a script: the figure is saved as a PNG, which a notebook shows

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `nli`

parser = argparse.ArgumentParser(description="Read SNLI, show examples, counts and lengths.")
parser.add_argument("--pairs", help="a .tsv/.jsonl/.txt file of labelled pairs to look at in place of SNLI's "
                                    "splits (no download)")
parser.add_argument("--quick", action="store_true", help="accepted for symmetry: reading SNLI is quick")
parser.add_argument("--out", default="runs/chapter_dataset", help="where the length plot is saved")
args = chapter.parse_args(parser)

# %% [markdown]
# ## Reading the Dataset
#
# The archive holds one tab-separated file per split. We keep the premise, the hypothesis and the
# gold label of each pair, and drop the pairs without an agreed label (marked `-`). The sentences
# come from the binary parse columns, so they are already tokenized: punctuation is split off.
# With `--pairs FILE`, the file's pairs are the one split looked at.

# %%
if args.pairs:
    splits = {os.path.basename(args.pairs): snli.read_pairs(args.pairs)}
else:
    data_dir = hub.download_extract("SNLI")
    splits = {split: snli.read_pairs(os.path.join(data_dir, f"snli_1.0_{split}.txt"))
              for split in ("train", "dev", "test")}
premises, hypotheses, labels = next(iter(splits.values()))
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
plt.close(fig)
chapter.show(os.path.join(args.out, "lengths.png"))
