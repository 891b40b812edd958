# %% [markdown]
# # Natural Language Inference: Fine-Tuning BERT
#
# The section of Dive into Deep Learning, top to bottom, with `nli` doing each step. We fine-tune
# a pretrained BERT on SNLI: the premise and hypothesis are packed into one BERT input,
# `<cls> premise <sep> hypothesis <sep>`, and a small MLP on the encoding of `<cls>` predicts
# entailment, contradiction or neutral.
#
# Run it as a script (`python chapters/natural_language_inference_bert.py [--quick] [--model M] [--pairs FILE]`)
# or open its notebook, `natural_language_inference_bert.ipynb`; a notebook takes the same options from the
# environment variable `NLI_CHAPTER_ARGS`, set before Jupyter starts or in a cell of its own before the options
# are read (`%env NLI_CHAPTER_ARGS=--quick --model hf:DIR`). Without the book's downloads,
# `--model hf:DIR` (a Hugging Face BERT) and `--pairs tests/data/snli_1.0_dev_pairs.tsv` (9,842 real SNLI pairs)
# run offline.

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
import os

import nli
from nli import attention, chapter, data, errors, model, predict, snli

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `nli`

parser = argparse.ArgumentParser(description="The chapter, end to end.")
chapter.add_run_arguments(parser)
parser.add_argument("--out", default="runs/chapter_bert", help="where the fine-tuned run is saved (replaced)")
args = chapter.parse_args(parser)

# %% [markdown]
# ## Loading Pretrained BERT
#
# The book pretrained two BERTs on WikiText-2: `bert.base` (12 layers, 768 hidden units, 12 heads)
# and the smaller `bert.small` (2 layers, 256 hidden units, 4 heads) that we use by default. Each
# download holds `vocab.json` and `pretrained.params`; the SHA-1 of the archive is checked. A Hugging Face
# BERT (`--model hf:DIR` or `hf:ORG/NAME`) brings its own WordPiece vocabulary.
#
# `BERTClassifier` keeps BERT's encoder and its `<cls>` hidden layer (pretrained with next sentence
# prediction) and adds a new output layer of three units. Only the output layer starts from scratch.

# %%
devices = data.parse_devices(args.devices)
max_len = 128  # the book's: tokens per pair, at most
net, vocab = model.from_pretrained(args.model, devices, max_len=max_len)
print(f"{args.model}: {net.bert_config.num_blks} blocks, {net.bert_config.num_hiddens} hidden units, "
      f"{net.bert_config.num_heads} heads, {len(vocab)} tokens in the vocabulary, on {devices}")

# %% [markdown]
# ## The Dataset for Fine-Tuning BERT
#
# Each pair becomes token ids of `<cls> premise <sep> hypothesis <sep>`, segment ids (0 for
# the premise part, 1 for the hypothesis part) and its valid length. Pairs longer than `max_len`
# are truncated from the longer side. The book pads every pair to `max_len`; `nli` pads each batch
# only to its longest pair, which gives the same predictions for far less work. One pair, as BERT reads it:

# %%
premise, hypothesis = "a person on a horse jumps over a broken down airplane .", "a person is outdoors , on a horse ."
encoded = snli.encode_pairs([premise], [hypothesis], [0], vocab, max_len)
tokens = [vocab.idx_to_token[i] for i in encoded.token_ids]
premise_part = int(encoded.segment_a_lens[0])  # <cls> premise <sep>
print("tokens:", tokens)
print("segments:", [0] * premise_part + [1] * (len(tokens) - premise_part), "valid length:", len(tokens))

# %% [markdown]
# Before fine-tuning, we keep what the model attends to in that pair, to compare it with the fine-tuned
# model at the end, as the attention chapters do with heat-maps. Its prediction is still a guess: the output
# layer is random.

# %%
before = predict.Predictor(net, vocab, {"max_len": max_len}, devices).attention(premise, hypothesis, tokenized=True)
print("before fine-tuning:", attention.describe_prediction(before))

# %% [markdown]
# ## Fine-Tuning BERT
#
# One call runs it all with the book's recipe (Adam, lr 1e-4, batch 512, `max_len` 128, 5 epochs): it reads
# and encodes the pairs (SNLI's train and test splits, or `--pairs` split by `--test-fraction`), trains,
# tests after each epoch and writes the run directory: `config.json` and `model.params` (the fine-tuned model),
# `metrics.jsonl` and `curves.png` (loss and accuracies per epoch), `results.json` (test accuracy, time, speed).
# An interrupted run continues with `nli finetune --resume RUN_DIR`.

# %%
run_dir = nli.run("book", overwrite=True, model=args.model, devices=args.devices, out=args.out, max_len=max_len,
                  **chapter.data_settings(args), **(chapter.QUICK if args.quick else {}))
chapter.show(os.path.join(run_dir, "curves.png"))

# %% [markdown]
# The fine-tuned model predicts the relation of any two sentences (tokenized like SNLI: punctuation split off):

# %%
predictor = predict.load_predictor(run_dir, devices)
print(predictor.predict(premise, hypothesis, tokenized=True))

# %% [markdown]
# The pair's attention before and after fine-tuning. What to look for: which layers changed (fine-tuning moves
# the last layers most and the first hardly at all), and the `<cls>` row of the last layer, the only encoding
# the classifier reads: which words does it gather from? Matching words ("horse" in the hypothesis to "horse" in
# the premise) are found by middle layers already before fine-tuning. With all-MiniLM-L6-v2 fine-tuned on 4,000
# SNLI pairs, the last layer's `<cls>` turned from premise words to the hypothesis words that decide the label
# ("woman", "sleeping", "home" against "a man is playing a guitar on stage"): `nli predict --attention FILE.html`
# lets you explore that per head.

# %%
after = predictor.attention(premise, hypothesis, tokenized=True)
for name, pair in (("before", before), ("after", after)):
    attention.save_png(pair, os.path.join(run_dir, f"attention_{name}.png"), heads="mean")
    chapter.show(os.path.join(run_dir, f"attention_{name}.png"))
print(f"before: {attention.describe_prediction(before)}; after: {attention.describe_prediction(after)}")
