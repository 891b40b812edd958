"""What the chapter scripts share with their notebooks: the model and data options, reading options without a
command line, and figures shown inline.

A chapter runs as a script (`python chapters/X.py --quick`) or as its notebook (chapters/X.ipynb). A Jupyter
kernel has no command line of its own, so a notebook reads the same options from the environment variable
`NLI_CHAPTER_ARGS`, e.g. `NLI_CHAPTER_ARGS="--quick --model hf:DIR" jupyter lab`, or `%env NLI_CHAPTER_ARGS=--quick` in
a cell before the options are read (Colab); unset, it runs with the defaults.
"""
import dataclasses
import os
import shlex

from .figures import in_notebook
from .recipe import Recipe

ARGS_VARIABLE = "NLI_CHAPTER_ARGS"
QUICK = dict(epochs=1, batch_size=64, limit_train=512, limit_test=256)  # --quick's settings: minutes on a CPU


def add_run_arguments(parser, model="bert.small"):
    """The options of a chapter that fine-tunes: --model, --pairs, --test-fraction, --devices and --quick."""
    parser.add_argument("--model", default=model, help="bert.small, bert.base, a model directory, hf:DIR (a Hugging "
                                                       "Face BERT checkpoint) or hf:ORG/NAME[@REVISION] (from the Hub)")
    parser.add_argument("--pairs", help="a .tsv/.jsonl/.txt file of labelled pairs to split into training and test "
                                        "pairs (default: download SNLI and use its train and test splits)")
    parser.add_argument("--test-fraction", type=float, default=0.2,
                        help="with --pairs: the share of its pairs held out (seeded) as the test set")
    devices = next(field for field in dataclasses.fields(Recipe) if field.name == "devices")
    parser.add_argument("--devices", default=devices.default, help=devices.metadata["help"])
    parser.add_argument("--quick", action="store_true", help="a small run: " + ", ".join(
        f"{name.replace('_', ' ')} {value}" for name, value in QUICK.items()))


def data_settings(args):
    """The data settings of `nli.run` for these options: SNLI's splits, or --pairs split by --test-fraction."""
    if args.pairs:
        return {"train": args.pairs, "test_fraction": args.test_fraction}
    return {"data": "SNLI"}


def parse_args(parser):
    """The chapter's options: a script's command line, or in a notebook `$NLI_CHAPTER_ARGS`."""
    if in_notebook():
        return parser.parse_args(shlex.split(os.environ.get(ARGS_VARIABLE, "")))
    return parser.parse_args()


def show(png):
    """Show a saved figure inline in a notebook; a script leaves the file. The file, not the live figure: what `nli`
    draws (curves, attention) is saved and closed, and the notebook shows what the run directory holds."""
    if in_notebook():
        from IPython.display import Image, display
        display(Image(filename=os.fspath(png)))
