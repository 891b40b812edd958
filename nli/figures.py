"""Matplotlib, imported only where a figure is drawn: `import nli.train` or `nli.evaluate` does not load it."""
import sys


def in_notebook():
    """Whether this runs in a Jupyter kernel (a notebook, Colab), not as a script."""
    return "ipykernel" in sys.modules


def pyplot():
    """matplotlib's pyplot with the backend for where it runs: a notebook kernel's own (figures show inline), else
    Agg (scripts and servers have no display; figures are saved as files)."""
    import matplotlib
    if not in_notebook():
        matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt
