"""nli: the d2l chapter "Natural Language Inference: Fine-Tuning BERT" as a package."""
import os

# MXNet reads the OpenMP thread count once, when it loads; left unset it kept only one of
# two cores busy in the book's loop, so use every core unless the user chose otherwise.
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))

__version__ = "0.1.0"
