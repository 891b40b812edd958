# %% [markdown]
# # Exercise 1: Fine-Tuning bert.base
#
# The book's exercise: replace `bert.small` by `bert.base` (768 hidden units, 3072 in the
# feed-forward layers, 12 heads, 12 blocks: about as big as the original BERT base) and, with more
# epochs and other hyperparameters, reach a test accuracy above 0.86.
#
# Run it as a script (`python chapters/exercise_bert_base.py [--quick] [--model M] [--pairs FILE]`) or open its
# notebook, `exercise_bert_base.ipynb`, which takes the same options from `NLI_CHAPTER_ARGS`.

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

import nli
from nli import chapter, errors

errors.report_user_errors()  # a user's mistake prints one line, `error: ...`, as in `nli`

parser = argparse.ArgumentParser(description="Exercise 1: bert.base with a tuned recipe.")
chapter.add_run_arguments(parser, model="bert.base")
parser.add_argument("--out", default="runs/exercise_bert_base", help="where the fine-tuned run is saved (replaced)")
args = chapter.parse_args(parser)

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
# It starts from the `tuned` recipe and changes what bert.base needs; the run prints all of it when
# it starts, and saves it in the run's `config.json`.

# %%
recipe = {"lr": 5e-5, "batch_size": 128, "epochs": 8} | (chapter.QUICK if args.quick else {})

# %% [markdown]
# ## Fine-Tuning
#
# bert.base's download is about 400 MB; it is resumed after an interruption and checked by SHA-1. Each epoch
# writes a checkpoint; if the run is interrupted, `nli finetune --resume RUN_DIR` continues it. The best epoch
# on the test pairs is not picked here: that would tune on the test set.

# %%
run_dir = nli.run("tuned", overwrite=True, model=args.model, devices=args.devices, out=args.out,
                  **chapter.data_settings(args), **recipe)
chapter.show(os.path.join(run_dir, "curves.png"))
with open(os.path.join(run_dir, "results.json")) as f:
    results = json.load(f)
print(f"test accuracy {results['test_accuracy']:.4f}, {results['examples_per_sec']:.1f} examples/sec; "
      f"the run is in {run_dir}")

# %% [markdown]
# bert.base takes hours per epoch on a CPU; on a GPU workstation `--devices auto` uses every GPU.
# The book's pretrained bert.base cannot be downloaded on the machine that wrote this package, so
# its accuracy with this recipe has not been measured there. Where it can be, run this with
# `--out bench/results/runs/bert_base_tuned`: its `results.json` fills the README's row for it
# (`python bench/results_table.py --write`).
