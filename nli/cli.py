"""Argument parsing over the package's functions: download, finetune, evaluate, predict, export."""
import argparse
import json
import sys

from .errors import UserError


def build_parser():
    """The `python -m nli` argument parser, one sub-command per step of the flow."""
    parser = argparse.ArgumentParser(prog="python -m nli", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    download = commands.add_parser("download", help="download and extract a registry entry")
    download.add_argument("name", nargs="?", help="bert.small, bert.base, SNLI, or a manifest's entry")
    download.add_argument("--list", action="store_true", help="every entry: URL, size, cached and verified?")
    download.add_argument("--from", dest="source", metavar="FILE",
                          help="import NAME from a file fetched by other means (its SHA-1 is checked)")
    download.add_argument("--quiet", action="store_true", help="no progress bar or notes")

    finetune = commands.add_parser("finetune", help="fine-tune a pretrained BERT on SNLI pairs")
    finetune.add_argument("--model",
                          help="bert.small, bert.base, a model directory, or hf:DIR (a Hugging Face BERT "
                               "checkpoint: config.json, vocab.txt, model.safetensors)")
    add_data_arguments(finetune, train=True)
    finetune.add_argument("--recipe", choices=["book", "tuned"], default="book",
                          help="book: the chapter's (Adam, lr 1e-4, batch 512, max-len 128, 5 epochs); tuned: "
                               "AdamW, 10%% warmup, linear decay, clipping at 1; the options below override it")
    finetune.add_argument("--epochs", type=int)
    finetune.add_argument("--batch-size", type=int, help="pairs per batch (and per worker)")
    finetune.add_argument("--lr", type=float, help="the learning rate (its peak, with a schedule)")
    finetune.add_argument("--optimizer", choices=["adam", "adamw"],
                          help="adam: the book's; adamw: decoupled weight decay, none on biases and LayerNorm")
    finetune.add_argument("--weight-decay", type=float)
    finetune.add_argument("--schedule", choices=["constant", "linear", "cosine"],
                          help="the learning rate after the warmup: constant, or decayed to 0")
    finetune.add_argument("--warmup-ratio", type=float, help="share of the updates warming the rate up from 0")
    finetune.add_argument("--max-grad-norm", type=float, help="clip gradients to this global norm (0: off)")
    finetune.add_argument("--accumulate", type=int, metavar="N",
                          help="update every N batches, as one batch N times larger would")
    finetune.add_argument("--max-len", type=int)
    finetune.add_argument("--freeze-encoder", action="store_true", help="train only the head (hidden + output)")
    finetune.add_argument("--extract-features", action="store_true",
                          help="compute the encoder's <cls> features once (cached in the run dir) and train "
                               "only the head on them: the fastest way, a baseline")
    finetune.add_argument("--freeze-epochs", type=int, default=0, metavar="N",
                          help="train only the head for the first N epochs, then everything")
    finetune.add_argument("--dev", help="a file of pairs to pick the best epoch on; it is kept in OUT/best/")
    finetune.add_argument("--dev-fraction", type=float, help="hold out this share of the training pairs as --dev")
    finetune.add_argument("--truncation", choices=["longest_first", "ratio"], default="longest_first",
                          help="pairs over --max-len: cut the longer side first (the book's), or both "
                               "sides in proportion to their lengths")
    finetune.add_argument("--dropout", type=float, default=None, help="default: the model's own (0.1)")
    finetune.add_argument("--devices", default="auto", help="auto, cpu, cpu:N, gpu or gpu:0,1")
    finetune.add_argument("--limit-train", type=int, default=None, help="use the first N train pairs")
    finetune.add_argument("--limit-test", type=int, default=None, help="use the first N test pairs")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.add_argument("--kvstore", choices=["device", "local", "dist_sync", "dist_device_sync"],
                          default="device", help="how gradients are summed: over this machine's devices, or "
                                                 "over the workers that `python -m nli.launch` starts")
    finetune.add_argument("--dtype", choices=["float32", "float16"], default="float32",
                          help="float16: mixed precision, on GPUs only")
    finetune.add_argument("--save-every", type=int, metavar="N",
                          help="checkpoint every N updates too (there is one at each epoch's end)")
    finetune.add_argument("--log-every", type=int, default=10, metavar="N",
                          help="a step entry in metrics.jsonl every N updates")
    finetune.add_argument("--resume", metavar="RUN_DIR", help="continue RUN_DIR from its checkpoint, as it was set")
    finetune.add_argument("--quiet", action="store_true", help="no progress bars")
    finetune.add_argument("--out", help="run directory to write")

    evaluate = commands.add_parser("evaluate", help="accuracy, per-class F1, confusion matrix, errors of a run")
    evaluate.add_argument("--run", required=True)
    add_data_arguments(evaluate, train=False)
    evaluate.add_argument("--devices", default="auto")
    evaluate.add_argument("--batch-size", type=int, default=512)
    evaluate.add_argument("--errors", type=int, default=0, metavar="N",
                          help="write the N most confident mistakes to errors.tsv")
    evaluate.add_argument("--out", default=None, help="folder for eval.json, confusion.png, errors.tsv "
                                                      "(default: the run dir)")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")

    export = commands.add_parser("export", help="write a run as ONNX (model.onnx), to predict without MXNet")
    export.add_argument("--run", required=True, help="the run dir `finetune` wrote")
    export.add_argument("--out", required=True, help="the run dir to write: config.json, vocabulary, model.onnx")
    export.add_argument("--int8", action="store_true",
                        help="quantize the matrix products' weights to int8 (dynamic, per channel)")
    export.add_argument("--opset", type=int, help="ONNX opset (default 17, the first with LayerNormalization)")

    predict = commands.add_parser("predict", help="labels of raw premise/hypothesis pairs: one, a file or stdin")
    predict.add_argument("--run", required=True)
    predict.add_argument("--devices", default="auto")
    predict.add_argument("--batch-size", type=int, default=256)
    predict.add_argument("premise", nargs="?")
    predict.add_argument("hypothesis", nargs="?")
    predict.add_argument("--file", help="a .tsv (premise<TAB>hypothesis[<TAB>label], header optional), "
                                        "SNLI .txt or .jsonl file: one output line per input line")
    predict.add_argument("--stdin", action="store_true", help="read premise<TAB>hypothesis lines from stdin")
    predict.add_argument("--output", help="JSON lines file to write (default: stdout)")
    predict.add_argument("--tokenized", action="store_true",
                         help="the text is already tokenized as SNLI's is: split on spaces only")
    predict.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def add_data_arguments(parser, train):
    """`--data SNLI` or explicit files: `--train FILE --test FILE` (training) or `--test FILE`."""
    parser.add_argument("--data", default=None, help="SNLI: download the dataset and use its splits")
    if train:
        parser.add_argument("--train", default=None, help="a .tsv/.jsonl/.txt file of training pairs")
    parser.add_argument("--test", default=None, help="a .tsv/.jsonl/.txt file of test pairs")


def data_files(args, train):
    """(train file or None, test file) from `--data SNLI` or the given files."""
    from . import hub, snli
    if args.data is not None:
        if args.data != "SNLI":
            raise UserError(f"--data {args.data}: only SNLI is known; pass files with --train/--test.")
        snli_dir = hub.download_extract("SNLI")
        return (snli.snli_file(snli_dir, True) if train else None), snli.snli_file(snli_dir, False)
    if args.test is None or (train and args.train is None):
        needed = "--train FILE --test FILE" if train else "--test FILE"
        raise UserError(f"Say which data to use: --data SNLI, or {needed}.")
    return (args.train if train else None), args.test


def read_data(args, train):
    """(train pairs or None, test pairs) from `--data SNLI` or the given files."""
    from . import snli
    train_file, test_file = data_files(args, train)
    return (snli.read_pairs(train_file) if train else None), snli.read_pairs(test_file)


def resumed_arguments(args):
    """The arguments the run in `--resume RUN_DIR` was started with, from its checkpoint."""
    from . import train
    defaults = vars(build_parser().parse_args(["finetune"]))
    changed = [k for k, v in vars(args).items() if v != defaults[k] and k not in ("resume", "quiet")]
    if changed:
        raise UserError(f"--resume continues a run as it was set; drop --{changed[0].replace('_', '-')}.")
    _, state = train.read_checkpoint(args.resume)
    return argparse.Namespace(**{**defaults, **state["settings"], "resume": args.resume, "out": args.resume,
                                 "quiet": args.quiet})


def run_finetune(args):
    from . import model, snli, train
    if args.resume:
        args = resumed_arguments(args)
    elif args.model is None or args.out is None:
        raise UserError("finetune needs --model and --out (or --resume RUN_DIR to continue a run).")
    if args.freeze_encoder and args.extract_features:
        raise UserError("--freeze-encoder or --extract-features: choose one (both train only the head).")
    recipe = train.resolve_recipe(args.recipe, **{k: getattr(args, k) for k in train.RECIPES["book"]})
    vars(args).update(recipe)
    print(f"recipe {args.recipe}: {json.dumps(recipe)}", flush=True)
    devices = train.parse_devices(args.devices)
    train.check_dtype(args.dtype, devices)
    train_file, test_file = data_files(args, train=True)
    train.seed_everything(args.seed)
    net, vocab, bert_config = model.from_pretrained(args.model, devices, args.dropout, args.max_len)
    if args.max_len > bert_config.max_len:
        raise UserError(f"--max-len {args.max_len} exceeds the model's {bert_config.max_len} positions.")
    train_set, test_set = (snli.load_encoded(path, vocab, args.max_len, args.truncation, not args.quiet).head(n)
                           for path, n in ((train_file, args.limit_train), (test_file, args.limit_test)))
    dev_set = None
    if args.dev and args.dev_fraction:
        raise UserError("--dev FILE or --dev-fraction F: choose one.")
    if args.dev_fraction:
        train_set, dev_set = train.hold_out(train_set, args.dev_fraction)
    elif args.dev:
        dev_set = snli.load_encoded(args.dev, vocab, args.max_len, args.truncation, not args.quiet)
    print(f"{len(train_set)} training pairs, {len(test_set)} test pairs"
          + (f", {len(dev_set)} dev pairs" if dev_set else "") + f", devices {devices}", flush=True)
    options = {k: v for k, v in vars(args).items() if k not in ("command", "resume", "quiet")}
    settings = {"max_len": args.max_len, "truncation": args.truncation, "recipe": recipe, "finetune": options}
    mode = "features" if args.extract_features else "freeze-encoder" if args.freeze_encoder else "full"
    train.finetune(net, train_set, test_set, devices, vocab["<pad>"], args.max_len, seed=args.seed,
                   run_dir=args.out, progress=not args.quiet, **train.recipe_options(recipe), mode=mode,
                   freeze_epochs=args.freeze_epochs, dev_set=dev_set, save_every=args.save_every,
                   log_every=args.log_every, resume=bool(args.resume), kvstore=args.kvstore, settings=options,
                   save_model=lambda folder: model.save_run(folder, net, vocab, bert_config, settings))


def run_evaluate(args):
    from . import evaluate, train
    predictor = evaluate.Predictor.from_run(args.run, train.parse_devices(args.devices), args.batch_size)
    _, test_pairs = read_data(args, train=False)
    out_dir = args.out or args.run
    result = evaluate.evaluate_run(predictor, *test_pairs, out_dir, args.errors, args.test or "SNLI test split",
                                   progress=not args.quiet)
    print(f"accuracy {result['accuracy']:.4f}, macro F1 {result['macro_f1']:.4f} on {result['n']} pairs; "
          f"wrote eval.json, confusion.png{', errors.tsv' if args.errors > 0 else ''} to {out_dir}")
    if warning := evaluate.unknown_warning(result["unknown_share"]):
        print(warning, file=sys.stderr)


def run_predict(args):
    from . import evaluate, train
    one_pair = args.premise is not None
    if one_pair + (args.file is not None) + args.stdin != 1 or one_pair != (args.hypothesis is not None):
        raise UserError("Give one pair (PREMISE HYPOTHESIS), or --file FILE, or --stdin.")
    predictor = evaluate.Predictor.from_run(args.run, train.parse_devices(args.devices), args.batch_size)
    if one_pair:
        result = predictor.predict(args.premise, args.hypothesis, args.tokenized)
        print(json.dumps(result, ensure_ascii=False))
        if warning := evaluate.unknown_warning(result["unknown_share"]):
            print(warning, file=sys.stderr)
    else:
        summary = evaluate.predict_file(predictor, args.file, args.output, args.tokenized, progress=not args.quiet)
        print(evaluate.describe_summary(summary), file=sys.stderr)


def run_export(args):
    from . import export
    config = export.export_run(args.run, args.out, args.int8, args.opset or export.OPSET)
    print(f"wrote {args.out}/{config['onnx']['file']} (opset {config['onnx']['opset']}, "
          f"{'int8' if args.int8 else 'fp32'}); evaluate and predict take --run {args.out}")


def run_download(args):
    from . import hub
    from tqdm import tqdm
    if args.list:
        for name, url, size, state in hub.status():
            size = "-" if size is None else tqdm.format_sizeof(size, "B", 1024)
            print(f"{name:<12} {state:<14} {size:>8}  {url}")
        return
    if args.name is None:
        raise UserError("Say which entry to download; `python -m nli download --list` shows them.")
    if args.source:
        hub.import_file(args.name, args.source, quiet=args.quiet)
    print(hub.download_extract(args.name, quiet=args.quiet))


def main(argv=None):
    """Run one command; user mistakes print one sentence and exit 2, without a traceback."""
    args = build_parser().parse_args(argv)
    commands = {"download": run_download, "finetune": run_finetune, "evaluate": run_evaluate,
                "predict": run_predict, "export": run_export}
    try:
        commands[args.command](args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
