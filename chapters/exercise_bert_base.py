# %% [markdown]
# # Exercise 1: Fine-Tuning bert.base
#
# The book's exercise: replace `bert.small` by `bert.base` (768 hidden units, 3072 in the
# feed-forward layers, 12 heads, 12 blocks: about as big as the original BERT base) and, with more
# epochs and other hyperparameters, reach a test accuracy above 0.86.
#
# Run it as a script (`python chapters/exercise_bert_base.py [--quick]`) or open it as a notebook.

# %%
import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from nli import data, errors, hub, model, rundir, snli, train  # noqa: E402
from nli.recipe import RECIPES  # noqa: E402

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `python -m nli`

parser = argparse.ArgumentParser(description="Exercise 1: bert.base with a tuned recipe.")
parser.add_argument("--model", default="bert.base", help="bert.base (the exercise), or another model to try it on")
parser.add_argument("--devices", default="auto", help="auto (every GPU, else the CPU), cpu, cpu:N, gpu:0,1")
parser.add_argument("--quick", action="store_true", help="a few hundred pairs, one epoch")
parser.add_argument("--out", default="runs/exercise_bert_base")
args, _ = parser.parse_known_args()  # notebooks pass their own arguments

# %% [markdown]
# ## The Recipe, and Why
#
# The book fine-tunes with plain Adam at a constant learning rate of 1e-4 for 5 epochs. That rate
# is fine for the 2-block bert.small but too high for 12 blocks: early updates, driven by the
# randomly initialized output layer, disturb the pretrained weights before the head has learned
# anything. BERT is fine-tuned (Devlin et al., 2019) with:
#
# * a **linear warmup** over the first 10% of updates, so the head settles before the encoder moves
#   much, then a **linear decay** to zero, which lets the last epochs refine rather than wander;
# * **AdamW**, weight decay decoupled from the adaptive step (0.01, none on biases and LayerNorm);
# * a **smaller peak rate** (5e-5) and **smaller batches** (128): more updates per epoch at a rate
#   the deeper network tolerates, with gradients **clipped** to norm 1 against rare spikes;
# * **more epochs** (8 instead of 5), since decay to zero makes late epochs safe.
#
# It starts from the `tuned` recipe and changes what bert.base needs; `finetune` prints all of it when
# it starts, and it is saved in the run's `config.json`.

# %%
recipe = dataclasses.replace(RECIPES["tuned"], lr=5e-5, batch_size=128, epochs=8,
                             model=args.model, data="SNLI", devices=args.devices, out=args.out)  # for --resume
if args.quick:
    recipe = dataclasses.replace(recipe, epochs=1, batch_size=64, limit_train=512, limit_test=256)

# %% [markdown]
# ## Loading bert.base and SNLI
#
# bert.base's download is about 400 MB; it is resumed after an interruption and checked by SHA-1.

# %%
devices = data.parse_devices(args.devices)
train.seed_everything(0)
net, vocab, bert_config = model.from_pretrained(args.model, devices)
print(f"{args.model}: {bert_config}")
data_dir = hub.download_extract("SNLI")
start = time.perf_counter()  # the run's wall time: reading and encoding SNLI, training, testing each epoch
train_pairs, test_pairs = snli.read_snli(data_dir, True), snli.read_snli(data_dir, False)
train_pairs, test_pairs = [c[:recipe.limit_train] for c in train_pairs], [c[:recipe.limit_test] for c in test_pairs]
train_set, test_set = (snli.encode_pairs(*pairs, vocab, recipe.max_len) for pairs in (train_pairs, test_pairs))

# %% [markdown]
# ## Fine-Tuning
#
# Each epoch writes a checkpoint; if the run is interrupted, `python -m nli finetune --resume`
# continues it. The best epoch on the test pairs is not picked here: that would tune on the test set.

# %%
epochs = train.finetune(net, train_set, test_set, devices, recipe, run_dir=args.out)
model.save_run(args.out, net, vocab, bert_config, recipe.run_config())
rundir.save_results(os.path.join(args.out, "results.json"), epochs, time.perf_counter() - start, model=args.model,
                    recipe=dataclasses.asdict(recipe), quick=args.quick, train_pairs=len(train_set),
                    test_pairs=len(test_set))
print(f"saved the run in {args.out}; curves.png shows loss and accuracies per epoch, results.json the figures")

# %% [markdown]
# bert.base takes hours per epoch on a CPU; on a GPU workstation `--devices auto` uses every GPU.
# The book's pretrained bert.base cannot be downloaded on the machine that wrote this package, so
# its accuracy with this recipe has not been measured there. Where it can be, run this with
# `--out bench/results/runs/bert_base_tuned`: its `results.json` fills the README's row for it
# (`python bench/results_table.py --write`).
