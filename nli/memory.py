"""How much memory fine-tuning takes, and micro-batches that keep a run under `--max-memory`.

The book's advice on running out of memory is to lower the batch size, which changes the recipe. Instead each
batch is split into micro-batches whose activations fit the budget and their gradients are accumulated: the
update is the whole batch's. The budget is counted in tokens (pairs x padded length), since length buckets make
batches of very different lengths.
"""
import dataclasses
import os
import resource
import sys

import mxnet as mx
import numpy as onp

from . import data
from .errors import UserError
from .recipe import SIZE_UNITS

CPU_SHARE = 0.6  # of the RAM available when the run starts: the OS, the page cache and other programs keep the rest
GPU_SHARE = 0.85  # of each GPU's free memory: CUDA's and cuDNN's workspaces take some on top of MXNet's pool
# MXNet, Python and NumPy, the tokenizer and the encoded pairs: a bare training process held 230-270 MiB here beside
# its weights, gradients and moments (MiniLM and bert.small, one pair of 8 tokens); the CLI's data and evaluation
# take more, so 600 MiB. On a GPU the same room stands for CUDA's context and workspaces (not measured).
RUNTIME_BYTES = 600 * 2 ** 20
# On each GPU, beside MXNet's pool: cuBLAS's and cuDNN's handles and workspaces, and MXNet's temporary space, which
# grows to the largest request an operator makes. A margin, not measured: this project has no GPU.
GPU_WORKSPACE_BYTES = 512 * 2 ** 20
FLOAT_BYTES = 4  # float32 weights, gradients, moments and activations
OPTIMIZER_MOMENTS = 2  # Adam's and AdamW's mean and variance, per trainable parameter
# Calibration of the activation count below against the peak resident memory of training steps of one shape,
# measured on this machine (MXNet 1.9.1, CPU, static_alloc), per token added: MiniLM (6 x 384, ffn 1536, 12 heads)
# 366 KiB at 128 tokens (the count: 387) and 287 at 64 (315); bert.small's shape (2 x 256, ffn 512, 4 heads) 69.5
# at 128 (66); bert.base's (12 x 768, ffn 3072, 12 heads) 975 at 128 (1,242, from 8 and 16 pairs only). Scaled by
# 1.1 so that no model measured is undercounted. Those were measured with MXNet's LayerNorm in training;
# `bert.LayerNorm`'s products then added 84.5 KiB (MiniLM) and 10.2 (bert.small) per token at 128 tokens.
CALIBRATION = 1.1
LAYER_NORM_HIDDENS = 4  # what each LayerNorm keeps beside the count above, in hidden-size tensors per token
# A run whose micro-batches change shape (length buckets, the last part of a batch) peaks higher than steps of one
# shape: MXNet's allocator keeps buffers of earlier shapes. MiniLM at --max-memory 6G (its largest micro-batches
# 86 x 120 and 256 x 48 tokens) peaked at the fixed part plus 1.9 times their activations, and steps of 64 pairs at
# 48, 56, 64 then 120 tokens at 1.3 times those of 120 alone. So a micro-batch is given room for twice its own.
RETAINED = 2


def format_size(num_bytes):
    """Bytes as the largest unit that keeps a number of at least 1: 6.0G, 512M."""
    for unit in "TGMK":
        if num_bytes >= SIZE_UNITS[unit]:
            return f"{num_bytes / SIZE_UNITS[unit]:.1f}{unit}"
    return f"{num_bytes}B"


def ram_available():
    """The RAM programs can still take: the kernel's MemAvailable, which counts reclaimable cache, else free pages."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            fields = dict(line.split(":", 1) for line in f)
        return int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):  # not Linux, or a kernel before 3.14
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def available_bytes(devices):
    """The memory a run may take by default: a share of the RAM available, or of the least free memory among
    the GPUs of `devices`.

    The GPU branch follows MXNet's `gpu_memory_info` documentation; it was not run here (this machine has no GPU)."""
    gpus = [d for d in devices if d.device_type == "gpu"]
    if gpus:
        return int(GPU_SHARE * min(mx.context.gpu_memory_info(d.device_id)[0] for d in gpus))
    return int(CPU_SHARE * ram_available())


GPU_PEAKS = {}  # GPU id -> the most memory seen in use on it by `peak_memory`, as the kernel keeps RSS's peak


def peak_memory(devices):
    """metrics.jsonl's figure of the memory taken so far: the process's peak resident set size on the CPU, or the
    most memory seen in use on each GPU (`gpu_memory_info`, read at each call: MXNet's pool keeps what it allocated,
    so in use stays near the peak between calls; it counts other processes on that GPU too).
    The GPU branch was not verified on a GPU."""
    gpus = [d for d in devices if d.device_type == "gpu"]
    if gpus:
        for gpu in gpus:
            free, total = mx.context.gpu_memory_info(gpu.device_id)
            GPU_PEAKS[gpu.device_id] = max(GPU_PEAKS.get(gpu.device_id, 0), int(total - free))
        return {"peak_gpu_memory_bytes": [GPU_PEAKS[gpu.device_id] for gpu in gpus]}
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"peak_rss_bytes": peak if sys.platform == "darwin" else peak * 1024}  # macOS counts bytes, Linux KiB


@dataclasses.dataclass(frozen=True)
class Shape:
    """The sizes of a BERT classifier that its memory depends on."""
    layers: int
    hidden: int
    ffn: int
    heads: int
    parameters: int  # all of them, trained or not
    trainable: int  # those that get a gradient and optimizer moments

    @classmethod
    def of(cls, net, trains_encoder=True):
        """The shape of a `model.BERTClassifier`, read from its blocks; its encoder trains, or only its head."""
        def size(block):
            return sum(int(onp.prod(p.shape)) for p in block.collect_params().values())
        block = net.encoder.blks[0]
        return cls(layers=len(net.encoder.blks), hidden=block.attention.W_q.weight.shape[0],
                   ffn=block.ffn.dense1.weight.shape[0], heads=block.attention.num_heads, parameters=size(net),
                   trainable=size(net) if trains_encoder else size(net) - size(net.encoder))

    def activation_bytes_per_token(self, length):
        """Bytes that training keeps for the backward pass per token of a batch padded to `length`.

        Counted from the tensors each encoder block keeps: 18 of the hidden size (the input; queries, keys and
        values and their split into heads; the heads merged; the output projection; two dropouts with their masks,
        residual sums and LayerNorms), 2 of the feed-forward size (before and after the activation) and 4 of
        heads x length (scores, softmax, dropout and its mask); plus 6 of the hidden size for the embeddings and 1
        of heads x length for the attention bias the layers share (`bert.attention_bias`); plus 4 of the hidden size
        for each LayerNorm (`bert.LayerNorm` trains through products that keep their inputs: 2.5 and 4.2 measured
        with bert.small's and MiniLM's shapes). Scaled by CALIBRATION, from measured peaks."""
        per_layer = (18 + 2 * LAYER_NORM_HIDDENS) * self.hidden + 2 * self.ffn + 4 * self.heads * length
        shared = (6 + LAYER_NORM_HIDDENS) * self.hidden + self.heads * length
        return int(CALIBRATION * FLOAT_BYTES * (self.layers * per_layer + shared))


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
    """What a run's memory goes to, and the largest micro-batch its budget allows at each padded length."""
    max_memory: int
    shape: Shape
    max_len: int
    num_devices: int = 1
    shared: bool = True  # the devices share one memory (CPU contexts): the budget is the whole process's
    averaged: bool = False  # --average keeps a copy of the trainable parameters

    @property
    def parameter_bytes(self):
        return FLOAT_BYTES * self.shape.parameters

    @property
    def optimizer_bytes(self):
        """The trainable parameters' gradients and optimizer moments."""
        return FLOAT_BYTES * self.shape.trainable * (1 + OPTIMIZER_MOMENTS)

    @property
    def reduce_bytes(self):
        """The kvstore's buffers that sum the gradients over devices, per device: none on one device, else about a
        copy of the gradients (MXNet's CommDevice merges each gradient on one device, into a buffer and one copy
        buffer per other device, and spreads the gradients over the devices)."""
        return FLOAT_BYTES * self.shape.trainable if self.num_devices > 1 else 0

    @property
    def average_bytes(self):
        """`--average`'s copy of the trainable parameters, on the first device only. (Scoring the average sets the
        raw weights aside in a second copy for a moment, between epochs: scoring keeps no activations for a backward
        pass, so that copy takes room the training step's activations leave.)"""
        return FLOAT_BYTES * self.shape.trainable if self.averaged else 0

    @property
    def fixed_bytes(self):
        """What a run holds whatever the batch: the runtime, weights, gradients, moments and the kvstore's reduce
        buffers (on each device), the weights' average (once; on GPUs counted in each one's budget, as the first
        holds it), and on a GPU a margin for workspaces (GPU_WORKSPACE_BYTES, not verified)."""
        copies = self.num_devices if self.shared else 1
        workspace = 0 if self.shared else GPU_WORKSPACE_BYTES
        return (RUNTIME_BYTES + workspace + self.average_bytes
                + copies * (self.parameter_bytes + self.optimizer_bytes + self.reduce_bytes))

    def pairs_per_micro_batch(self, length):
        """The most pairs padded to `length` whose activations fit the budget (over all devices)."""
        activation_budget = self.max_memory - self.fixed_bytes
        pairs = max(0, activation_budget) // self.activation_bytes(1, length)
        return int(pairs if self.shared else pairs * self.num_devices)

    def check(self):
        """Fail, in one sentence, when not even one pair of `max_len` tokens fits the budget."""
        if self.pairs_per_micro_batch(self.max_len) < 1:
            need = self.expected_peak(1, self.max_len)
            raise UserError(f"--max-memory {format_size(self.max_memory)} cannot hold even one pair of {self.max_len} "
                            f"tokens: this model needs about {format_size(need)} for it (weights, gradients, optimizer "
                            f"state and buffers {format_size(self.fixed_bytes - RUNTIME_BYTES)}); give more memory, "
                            f"a lower --max-len or a smaller model.")
        return self

    def expected_peak(self, pairs, length):
        """The memory a micro-batch of `pairs` padded to `length` is expected to take, with the fixed part."""
        return self.fixed_bytes + self.activation_bytes(pairs, length)

    def activation_bytes(self, pairs, length):
        """What a micro-batch of `pairs` padded to `length` takes beyond the fixed part, with room for the buffers
        of earlier shapes (RETAINED)."""
        return RETAINED * pairs * length * self.shape.activation_bytes_per_token(length)

    def describe(self, batch_size):
        """The estimate a run prints before it trains: where the memory goes, and the micro-batch chosen."""
        pairs = self.pairs_per_micro_batch(self.max_len)
        micro = -(-batch_size // -(-batch_size // pairs))  # the batch split evenly into as few parts as fit
        per_token = self.shape.activation_bytes_per_token(self.max_len)
        return (f"memory: --max-memory {format_size(self.max_memory)}; parameters {self.shape.parameters:,} "
                f"({format_size(self.parameter_bytes)}), gradients and optimizer state "
                f"{format_size(self.optimizer_bytes)}"
                + (f", reduce buffers {format_size(self.reduce_bytes)}" if self.reduce_bytes else "")
                + ("" if self.shared else f", workspaces {format_size(GPU_WORKSPACE_BYTES)}")
                + (f" (on each of {self.num_devices} devices)" if self.num_devices > 1 else "")
                + (f", the weights' average {format_size(self.average_bytes)}" if self.averaged else "")
                + (" (on the first)" if self.averaged and self.num_devices > 1 else "")
                + f", activations {format_size(per_token)} per token at "
                f"{self.max_len} tokens (room kept for {RETAINED}x); batches of {batch_size} pairs at {self.max_len} "
                f"tokens train in micro-batches of {micro} (at most {pairs} fit), expected peak "
                f"{format_size(self.expected_peak(micro, self.max_len))}")

    def split(self, indices, lengths, multiple=data.PAD_MULTIPLE):
        """`indices` cut into as few micro-batches of about equal size as fit, each padded to its own longest pair
        rounded up to `multiple` (`lengths`: every pair's tokens); a batch that fits stays whole and in its order."""
        length = data.padded_length(int(lengths[indices].max()), self.max_len, multiple)
        parts = -(-len(indices) // self.pairs_per_micro_batch(length))
        if parts <= 1:
            return [indices]
        by_length = indices[onp.argsort(lengths[indices], kind="stable")]  # shorter parts pad less
        return onp.array_split(by_length, parts)


def plan(net, max_memory, max_len, devices, trains_encoder=True, averaged=False):
    """The checked `MemoryPlan` of training `net` on `devices`, `averaged` or not (prediction is planned as training,
    which keeps more); without `max_memory`, the default share of the memory available."""
    shared = all(d.device_type == "cpu" for d in devices)
    return MemoryPlan(max_memory or available_bytes(devices), Shape.of(net, trains_encoder), max_len, len(devices),
                      shared, averaged).check()
