"""Matplotlib, imported only where a figure is drawn: `import nli.train` or `nli.evaluate` does not load it."""
import sys


def pyplot():
    """matplotlib's pyplot with the backend for where it runs: a notebook kernel's own (figures show inline), else
    Agg (scripts and servers have no display; figures are saved as files)."""
    import matplotlib
    if "ipykernel" not in sys.modules:
        matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    return plt
