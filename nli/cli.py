"""Argument parsing over the package's functions: download, finetune, soup, ensemble, evaluate, predict, export,
serve."""
import argparse
import dataclasses
import json
import os
import sys

from . import __version__
from .errors import OS_ERROR_STATUS, UserError, describe_os_error
from .recipe import RECIPES, Recipe, at_least, checked


SCORING_DEVICES_HELP = ("the devices to score on, named as `finetune --devices` names them; default: one device, the "
                        "first GPU, else the CPU")


class HelpFormatter(argparse.HelpFormatter):
    """`--help` that gives each option's default, when it has one, and marks the required options."""

    def _get_help_string(self, action):  # the hook argparse.ArgumentDefaultsHelpFormatter overrides too
        help = action.help or ""
        if action.required:
            help += " (required)"
        if all(action.default is not no_default for no_default in (None, False, argparse.SUPPRESS)) \
                and action.option_strings:
            help += " (default: %(default)s)"
        return help


def build_parser():
    """The `python -m nli` argument parser, one sub-command per step of the flow."""
    prog = "nli" if os.path.basename(sys.argv[0]) == "nli" else "python -m nli"  # the console script, or -m
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    download = commands.add_parser("download", help="download and extract a registry entry")
    download.add_argument("name", nargs="?", help="bert.small, bert.base, SNLI, or a manifest's entry")
    download.add_argument("--list", action="store_true", help="every entry: URL, size, cached and verified?")
    download.add_argument("--from", dest="source", metavar="FILE",
                          help="import NAME from a file fetched by other means (its SHA-1 is checked)")
    download.add_argument("--replace", action="store_true",
                          help="move a cached file whose SHA-1 is not NAME's aside (to FILE.mismatch-SHA1) "
                               "instead of refusing it, then download or import NAME")
    download.add_argument("--quiet", action="store_true", help="no progress bar or notes")

    finetune = commands.add_parser("finetune", help="fine-tune a pretrained BERT on SNLI pairs")
    add_recipe_arguments(finetune)
    finetune.add_argument("--resume", metavar="RUN_DIR",
                          help="continue RUN_DIR from its checkpoint, as it was set (but for --max-memory: a run "
                               "stopped for memory goes on in less)")
    finetune.add_argument("--keep-checkpoint", action="store_true",
                          help="keep checkpoint/ when the run ends (model.params and best/ stay in any case)")
    finetune.add_argument("--force", action="store_true",
                          help="with --resume: go on even though the data files changed since the run started")
    finetune.add_argument("--overwrite", action="store_true",
                          help="replace the run that --out holds (its model, checkpoint and evaluation files)")
    finetune.add_argument("--quiet", action="store_true", help="no progress bars")

    soup = commands.add_parser("soup", help="one run whose weights are the mean of runs fine-tuned from one "
                                            "checkpoint (a model soup)")
    soup.add_argument("--run", action="append", required=True, metavar="RUN_DIR",
                      help="a run to average, fine-tuned from the same checkpoint as the others, in the same shape "
                           "(repeat: --run A --run B ...)")
    soup.add_argument("--out", required=True, help="the run dir to write")
    soup.add_argument("--greedy", action="store_true",
                      help="with --dev: add the runs best first, each only if the soup's dev accuracy does not drop")
    soup.add_argument("--dev", metavar="FILE", help="labelled pairs (.tsv, SNLI .txt or .jsonl) that --greedy "
                                                    "chooses the runs on")
    soup.add_argument("--devices", help=SCORING_DEVICES_HELP)
    soup.add_argument("--batch-size", type=checked(int, at_least(1)), default=256, help="pairs per batch, with --dev")
    soup.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")

    ensemble = commands.add_parser("ensemble", help="one run whose predictions are the mean of runs' probabilities")
    ensemble.add_argument("--run", action="append", required=True, metavar="RUN_DIR",
                          help="a run to ensemble, with the same labels as the others (repeat: --run A --run B ...)")
    ensemble.add_argument("--out", required=True, help="the run dir to write: its members/ hold copies of the runs")
    ensemble.add_argument("--overwrite", action="store_true", help="replace the run that --out holds")

    evaluate = commands.add_parser("evaluate", help="accuracy, per-class F1, confusion matrix, errors of a run")
    evaluate.add_argument("--run", required=True, help="the run directory (its best/, a soup, an ensemble) to evaluate")
    add_data_arguments(evaluate)
    evaluate.add_argument("--limit-test", type=checked(int, at_least(1)), metavar="N",
                          help="evaluate on the first N pairs")
    evaluate.add_argument("--devices", help=SCORING_DEVICES_HELP)
    evaluate.add_argument("--batch-size", type=checked(int, at_least(1)), default=512, help="pairs per batch")
    add_memory_argument(evaluate)
    evaluate.add_argument("--errors", type=int, default=0, metavar="N",
                          help="write the N most confident mistakes to errors.tsv")
    evaluate.add_argument("--out", default=None, help="folder for eval.json, confusion.png, errors.tsv "
                                                      "(default: the run dir)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")

    export = commands.add_parser("export", help="write a run as ONNX (model.onnx), to predict without MXNet")
    export.add_argument("--run", required=True, help="the run dir `finetune`, `soup` or `ensemble` wrote")
    export.add_argument("--out", required=True, help="the run dir to write: config.json, vocabulary, model.onnx")
    export.add_argument("--int8", action="store_true",
                        help="quantize the matrix products' weights to int8 (dynamic, per channel)")
    export.add_argument("--opset", type=int, help="ONNX opset (default 17, the first with LayerNormalization)")
    export.add_argument("--overwrite", action="store_true", help="replace the run or export that --out holds")

    predict = commands.add_parser("predict", help="labels of raw premise/hypothesis pairs: one, a file or stdin")
    predict.add_argument("--run", required=True, help="the run directory (its best/, a soup, an ensemble) to predict with")
    predict.add_argument("--devices", help=SCORING_DEVICES_HELP)
    predict.add_argument("--batch-size", type=checked(int, at_least(1)), default=256, help="pairs per batch")
    add_memory_argument(predict)
    predict.add_argument("premise", nargs="?", help="one pair's premise")
    predict.add_argument("hypothesis", nargs="?", help="and its hypothesis")
    predict.add_argument("--file", help="a .tsv (premise<TAB>hypothesis[<TAB>label], header optional), "
                                        "SNLI .txt or .jsonl file: one output line per input line")
    predict.add_argument("--stdin", action="store_true", help="read premise<TAB>hypothesis lines from stdin")
    predict.add_argument("--output", help="JSON lines file to write (default: stdout)")
    predict.add_argument("--tokenized", action="store_true",
                         help="the text is already tokenized as SNLI's is: split on spaces only")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    predict.add_argument("--attention", metavar="FILE",
                         help="also draw the pair's attention weights: FILE.png, a figure of every layer and "
                              "head, or FILE.html, a page to explore them (one pair only)")
    predict.add_argument("--heads", choices=["all", "mean"],
                         help="with --attention FILE.png: the figure shows every head (the default: all), or each "
                              "layer's mean of the heads")
    serve = commands.add_parser("serve", help="a page and a JSON API over a run: labels, probabilities, attention")
    serve.add_argument("--run", required=True, help="the run directory (its best/, a soup, an ensemble, an export) to serve")
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to listen on; 0.0.0.0 opens the API, which has no authentication, to others")
    serve.add_argument("--port", default=8000, help="port to listen on; 0 takes any free one",
                       type=checked(int, lambda port: None if 0 <= port <= 65535 else "expected a port, 0 to 65535"))
    serve.add_argument("--devices", help=SCORING_DEVICES_HELP)
    serve.add_argument("--batch-size", type=checked(int, at_least(1)), default=8,
                       help="pairs in one forward pass: requests that arrive together are sorted by length and run "
                            "in passes of this many (on a CPU, short passes pad least)")
    add_memory_argument(serve)
    doctor = commands.add_parser("doctor", help="versions, MXNet's build, devices, OpenMP, the download cache, and "
                                                "the fix for each known problem found")
    doctor.add_argument("--test", action="store_true",
                        help="also fine-tune a tiny BERT for a few steps on every device, together and one by one, "
                             "and on the CPU: the losses must agree and the devices hold the same weights")
    for command in commands.choices.values():
        command.formatter_class = HelpFormatter
    return parser


def add_recipe_arguments(parser):
    """`finetune`'s options: `--recipe NAME`, then one option per field of `Recipe`, which it overrides."""
    parser.add_argument("--recipe", choices=list(RECIPES), default=argparse.SUPPRESS,
                        help="book (the default): the chapter's (Adam, lr 1e-4, batch 512, max-len 128, 5 epochs); "
                             "tuned: AdamW, 10%% warmup, linear decay, clipping at 1; small-data: tuned for "
                             "thousands of pairs (batch 32, lr 1e-4, layer decay 0.8, mean pooling, 4 epochs); the "
                             "options below override it")
    modes = parser.add_mutually_exclusive_group()
    for field in dataclasses.fields(Recipe)[1:]:  # all but the name, which --recipe gives
        add_field_argument(modes if field.name == "mode" else parser, field, argparse.SUPPRESS)
    for flag, mode in (("--freeze-encoder", "freeze-encoder"), ("--extract-features", "features")):
        modes.add_argument(flag, dest="mode", action="store_const", const=mode, default=argparse.SUPPRESS,
                           help=f"--mode {mode}")


def add_field_argument(parser, field, default, help=None):
    """The option of a `Recipe` field: its help (with the book's value), type (checked) and choices."""
    book = "" if field.default is None else f" (book: {field.default})"
    kind = checked(field.metadata["kind"], field.metadata["check"])
    parser.add_argument("--" + field.name.replace("_", "-"), type=kind, choices=field.metadata["choices"],
                        default=default, help=(help or field.metadata["help"]) + book)


def add_memory_argument(parser):
    """`--max-memory`, as `finetune` takes it, but for batches that are only scored."""
    add_field_argument(parser, next(f for f in dataclasses.fields(Recipe) if f.name == "max_memory"), None,
                       "memory the command may take, e.g. 6G or 512M: pairs are scored in batches that fit; "
                       "default: 60%% of the RAM available (85%% of each GPU's free memory)")


def add_data_arguments(parser):
    """`--data SNLI` or `--test FILE`, as `finetune` takes them."""
    for field in dataclasses.fields(Recipe):
        if field.name in ("data", "test"):
            add_field_argument(parser, field, None)


def finetune_settings(args):
    """(the recipe named, or None, and the settings given) of `finetune ARGS`: what `runner.run` takes."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(Recipe) if hasattr(args, f.name)}
    return getattr(args, "recipe", None), given


def run_finetune(args):
    from . import runner
    recipe, settings = finetune_settings(args)
    runner.run(recipe, resume=args.resume, overwrite=args.overwrite, force=args.force,
               keep_checkpoint=args.keep_checkpoint, quiet=args.quiet, **settings)


def run_evaluate(args):
    from . import data, evaluate, predict, runner, snli
    predictor = predict.load_predictor(args.run, data.scoring_devices(args.devices), args.batch_size, args.max_memory)
    _, test_file = runner.data_files(args.data, None, args.test, need_train=False)
    test_pairs = [column[:args.limit_test] for column in snli.read_pairs(test_file)]
    runner.require_pairs(len(test_pairs[2]), test_file, "evaluate on")
    out_dir = args.out or args.run
    result = evaluate.evaluate_run(predictor, *test_pairs, out_dir, args.errors, args.test or "SNLI test split",
                                   progress=not args.quiet)
    print(f"accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f} on {result['n']} pairs; "
          f"wrote eval.json, confusion.png{', errors.tsv' if args.errors > 0 else ''} to {out_dir}")
    if warning := predict.unknown_warning(result["unknown_share"]):
        print(warning, file=sys.stderr)


def run_predict(args):
    from . import attention, data, predict
    one_pair = args.premise is not None
    if one_pair + (args.file is not None) + args.stdin != 1 or one_pair != (args.hypothesis is not None):
        raise UserError("Give one pair (PREMISE HYPOTHESIS), or --file FILE, or --stdin.")
    if args.attention and not one_pair:
        raise UserError("--attention draws one pair: give PREMISE HYPOTHESIS, not --file or --stdin.")
    view_format = attention.view_format(args.attention) if args.attention else None
    if args.heads and view_format != ".png":
        raise UserError("--heads chooses what the --attention FILE.png figure shows (the .html page has a menu "
                        "for it): add --attention FILE.png, or drop --heads.")
    predictor = predict.load_predictor(args.run, data.scoring_devices(args.devices), args.batch_size, args.max_memory)
    if one_pair:
        # the attention first: an export, which cannot draw it, refuses before anything is printed
        view = args.attention and predictor.attention(args.premise, args.hypothesis, args.tokenized)
        result = predictor.predict(args.premise, args.hypothesis, args.tokenized)
        print(json.dumps(result, ensure_ascii=False))
        if warning := predict.unknown_warning(result["unknown_share"]):
            print(warning, file=sys.stderr)
        if view:
            attention.save_view(view, args.attention, args.heads or "all")
            print(f"wrote {args.attention}: attention of {view.weights.shape[0]} layers x {view.weights.shape[1]} "
                  f"heads over {len(view.tokens)} tokens", file=sys.stderr)
    else:
        summary = predict.predict_file(predictor, args.file, args.output, args.tokenized, progress=not args.quiet)
        print(predict.describe_summary(summary), file=sys.stderr)


def run_soup(args):
    from . import combine, data
    if args.greedy != (args.dev is not None):
        raise UserError("--greedy and --dev FILE go together: the greedy soup keeps a run only if the accuracy on "
                        "FILE does not drop.")
    config = combine.soup(args.run, args.out, args.dev, data.scoring_devices(args.devices), args.batch_size,
                          args.overwrite)
    record = config["soup"]
    kept = f"{len(record['members'])} of {len(args.run)}"
    print(f"wrote {args.out}: the mean of the weights of {kept} runs" +
          (f", dev accuracy {record['dev_accuracy']:.4f}" if record["method"] == "greedy" else ""))


def run_ensemble(args):
    from . import combine
    combine.ensemble(args.run, args.out, args.overwrite)
    print(f"wrote {args.out}: the mean of the probabilities of {len(args.run)} runs, copied into "
          f"{args.out}/{combine.MEMBERS_DIR}/")


def run_export(args):
    from . import export
    config = export.export_run(args.run, args.out, args.int8, args.opset or export.OPSET, args.overwrite)
    print(f"wrote {args.out}/{config['onnx']['file']} (opset {config['onnx']['opset']}, "
          f"{'int8' if args.int8 else 'fp32'}); evaluate and predict take --run {args.out}")


def run_serve(args):
    from . import serve
    serve.serve(args)


def run_download(args):
    from . import hub
    from tqdm import tqdm
    if args.list:
        rows = hub.status()
        for name, url, size, state in rows:
            size = "-" if size is None else tqdm.format_sizeof(size, "B", 1024)
            print(f"{name:<12} {state:<14} {size:>8}  {url}")
        for name in (name for name, _, _, state in rows if state == "SHA-1 differs"):
            print(f"{name}: the cached file is not the one the registry names; `nli download {name} "
                  f"--replace` keeps it aside and downloads the right one.")
        return
    if args.name is None:
        raise UserError("Say which entry to download; `nli download --list` shows them.")
    if args.source:
        hub.import_file(args.name, args.source, quiet=args.quiet, replace=args.replace)
    print(hub.download_extract(args.name, quiet=args.quiet, replace=args.replace))


def run_doctor(args):
    from . import doctor
    return doctor.main(args.test)


def main(argv=None):
    """Run one command; user mistakes print one sentence and exit 2, without a traceback."""
    args = build_parser().parse_args(argv)
    commands = {"download": run_download, "finetune": run_finetune, "evaluate": run_evaluate,
                "predict": run_predict, "doctor": run_doctor, "export": run_export, "serve": run_serve,
                "soup": run_soup, "ensemble": run_ensemble}
    try:
        status = commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # a full disk, a refused permission, a path through a file: the system's sentence
        print(f"error: {describe_os_error(e)}", file=sys.stderr)
        return OS_ERROR_STATUS
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return status or 0
