# %% [markdown]
# # Natural Language Inference: Fine-Tuning BERT
#
# The section of Dive into Deep Learning, top to bottom, with `nli` doing each step. We fine-tune
# a pretrained BERT on SNLI: the premise and hypothesis are packed into one BERT input,
# `<cls> premise <sep> hypothesis <sep>`, and a small MLP on the encoding of `<cls>` predicts
# entailment, contradiction or neutral.
#
# Run it as a script (`python chapters/natural_language_inference_bert.py [--quick]`) or open it
# as a notebook (Jupyter reads the `# %%` cells).

# %%
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nli import attention, bert, data, errors, hub, model, rundir, snli, train  # noqa: E402  (before mxnet)
from nli.evaluate import Predictor, predict_snli  # noqa: E402
from nli.recipe import RECIPES  # noqa: E402
from mxnet import init  # noqa: E402,I100

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `python -m nli`

parser = argparse.ArgumentParser(description="The chapter, end to end.")
parser.add_argument("--quick", action="store_true", help="a small run on the CPU: few pairs, one epoch")
parser.add_argument("--devices", default="auto", help="auto (every GPU, else the CPU), cpu, cpu:N, gpu:0,1")
parser.add_argument("--out", default="runs/chapter_bert", help="where the fine-tuned run is saved")
args, _ = parser.parse_known_args()  # notebooks pass their own arguments

# %% [markdown]
# ## Loading Pretrained BERT
#
# The book pretrained two BERTs on WikiText-2: `bert.base` (12 layers, 768 hidden units, 12 heads)
# and the smaller `bert.small` (2 layers, 256 hidden units, 4 heads) that we use here. Each
# download holds `vocab.json` and `pretrained.params`; the SHA-1 of the archive is checked.

# %%
devices = data.parse_devices(args.devices)
pretrained, vocab = bert.load_pretrained("bert.small", devices, dropout=0.1)
print(f"bert.small: {len(vocab)} tokens in the vocabulary, on {devices}")

# %% [markdown]
# ## The Dataset for Fine-Tuning BERT
#
# Each SNLI pair becomes token ids of `<cls> premise <sep> hypothesis <sep>`, segment ids (0 for
# the premise part, 1 for the hypothesis part) and its valid length. Pairs longer than `max_len`
# are truncated from the longer side. The book pads every pair to `max_len`; here each batch is
# padded only to its longest pair, which gives the same predictions for far less work.

# %%
# Adam, lr 1e-4, batch 512, max_len 128, 5 epochs; the model and data named, so `nli finetune --resume` can continue
recipe = dataclasses.replace(RECIPES["book"], model="bert.small", data="SNLI", devices=args.devices, out=args.out)
if args.quick:
    recipe = dataclasses.replace(recipe, batch_size=64, epochs=1, limit_train=512, limit_test=256)
max_len = recipe.max_len
data_dir = hub.download_extract("SNLI")
start = time.perf_counter()  # the run's wall time: reading and encoding SNLI, training, testing each epoch
train_pairs, test_pairs = snli.read_snli(data_dir, True), snli.read_snli(data_dir, False)
train_pairs, test_pairs = [c[:recipe.limit_train] for c in train_pairs], [c[:recipe.limit_test] for c in test_pairs]
train_set = snli.encode_pairs(*train_pairs, vocab, max_len)
test_set = snli.encode_pairs(*test_pairs, vocab, max_len)
print(f"read {len(train_set)} training and {len(test_set)} test examples")

# %% [markdown]
# ## Fine-Tuning BERT
#
# `BERTClassifier` keeps BERT's encoder and its `<cls>` hidden layer (pretrained with next sentence
# prediction) and adds a new output layer of three units. Only the output layer starts from scratch.

# %%
net = model.BERTClassifier(pretrained)
net.output.initialize(init.Xavier(), ctx=devices)
net.hybridize(static_alloc=True)
os.makedirs(args.out, exist_ok=True)

# %% [markdown]
# Before training, let us look at what the model attends to in one pair, as the attention chapters
# do with heat-maps. Each row is a token attending, each column a token attended to; a black line
# separates `<cls>` premise `<sep>` from hypothesis `<sep>`. The weights come from the same forward pass
# as the (still untrained) prediction in the title.

# %%
predictor = Predictor(net, vocab, {"max_len": max_len}, devices)
premise, hypothesis = "a person on a horse jumps over a broken down airplane .", "a person is outdoors , on a horse ."
before = predictor.attention(premise, hypothesis, tokenized=True)
attention.save_png(before, os.path.join(args.out, "attention_before.png"), heads="mean")

# %% [markdown]
# Now the fine-tuning itself, with the book's recipe.

# %%
epochs = train.finetune(net, train_set, test_set, devices, recipe, run_dir=args.out)  # prints the recipe first
model.save_run(args.out, net, vocab, pretrained.config, recipe.run_config())
rundir.save_results(os.path.join(args.out, "results.json"), epochs, time.perf_counter() - start, model="bert.small",
                    recipe=dataclasses.asdict(recipe), quick=args.quick, train_pairs=len(train_set),
                    test_pairs=len(test_set))

# %% [markdown]
# The loss and accuracies per epoch are in `curves.png` of the run directory, and the test accuracy,
# wall time and speed in `results.json` (what the README's results table reads). The fine-tuned model
# predicts the relation of any two sentences (tokenized like SNLI: punctuation split off):

# %%
print(predict_snli(net, vocab, premise, hypothesis, devices, max_len))

# %% [markdown]
# The same pair's attention after fine-tuning, beside `attention_before.png`. What to look for: which
# layers changed (fine-tuning moves the last layers most and the first hardly at all), and the `<cls>` row
# of the last layer, the only encoding the classifier reads: which words does it gather from? Matching
# words ("horse" in the hypothesis to "horse" in the premise) are found by middle layers already before
# fine-tuning. With all-MiniLM-L6-v2 fine-tuned on 4,000 SNLI pairs, the last layer's `<cls>` turned from
# premise words to the hypothesis words that decide the label ("woman", "sleeping", "home" against
# "a man is playing a guitar on stage"): `predict --attention FILE.html` lets you explore that per head.

# %%
after = predictor.attention(premise, hypothesis, tokenized=True)
attention.save_png(after, os.path.join(args.out, "attention_after.png"), heads="mean")
print(f"before: {attention.describe_prediction(before)}; after: {attention.describe_prediction(after)}")
