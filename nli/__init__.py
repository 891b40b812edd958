"""nli: the d2l chapter "Natural Language Inference: Fine-Tuning BERT" as a package."""
import os

# MXNet reads the OpenMP thread count once, when it loads; left unset it kept only one of
# two cores busy in the book's loop, so use every core unless the user chose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
# OpenMP threads that spin while they wait for work take the cores from each other and from any
# other process: on a busy 2-core machine, bert.small's training steps ran 1.6-3x slower than with
# threads that sleep (bench/bench_train.py), and a tiny model's 15x slower.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# MXNet times its elementwise kernels when it loads and runs those it finds cheap on one thread: on the
# 2-core Intel machine that put numpy adds, LayerNorm's elementwise work and the weight decay on one core.
# Without the tuning every kernel uses the OpenMP threads: a bert.small training step 959 -> 845 ms, a
# MiniLM step 500 -> 477 ms (bench/bench_profile.py). Each element is computed alone, so results are unchanged.
os.environ.setdefault("MXNET_USE_OPERATOR_TUNING", "0")

from . import compat  # noqa: E402,F401  (before anything imports mxnet)

__version__ = "0.1.0"


def __getattr__(name):
    """`nli.run`, the one entry that fine-tunes (`runner.run`), loaded on first use: `import nli` stays light."""
    if name == "run":
        from .runner import run
        return run
    raise AttributeError(f"module 'nli' has no attribute {name!r}")
