"""Each chapter script has its notebook beside it with the same cells and no outputs, and every notebook runs in a
real Jupyter kernel (nbclient + ipykernel) in --quick mode, offline, on the loopback fixtures."""
import importlib.metadata
import importlib.util
import os
import shlex
import subprocess
import sys
import types

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import DEV_PAIRS, ROOT
from test_chapters import CHAPTER_OUTPUTS

CHAPTERS = os.path.join(ROOT, "chapters")
NAMES = sorted(script[:-len(".py")] for script in CHAPTER_OUTPUTS)
RESTART = "Runtime → Restart session, then run from the next cell"


def read_notebook(name):
    return nbformat.read(os.path.join(CHAPTERS, name + ".ipynb"), as_version=4)


def cells(notebook):
    return [(cell.cell_type, cell.source) for cell in notebook.cells]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_its_script(name):
    notebook = read_notebook(name)
    assert cells(notebook) == cells(jupytext.read(os.path.join(CHAPTERS, name + ".py"))), \
        f"chapters/{name}.ipynb differs from its script: run `jupytext --sync chapters/{name}.py`"
    assert notebook.metadata.kernelspec.name == "python3"
    for cell in notebook.cells:  # committed without outputs, so its diffs stay small
        assert not cell.get("outputs") and cell.get("execution_count") is None, cell.source[:80]


def test_every_notebook_has_its_script():
    assert sorted(f[:-len(".ipynb")] for f in os.listdir(CHAPTERS) if f.endswith(".ipynb")) == NAMES


def setup_cell():
    """The first code cell, the one that installs what Colab lacks: the same in every chapter."""
    [source] = {next(c.source for c in read_notebook(name).cells if c.cell_type == "code") for name in NAMES}
    return source


def test_setup_cell_installs_on_colab_only_and_asks_for_a_restart(monkeypatch, capsys):
    installs = []
    monkeypatch.setattr(subprocess, "run", lambda command, check: installs.append(command))
    exec(setup_cell(), {})  # not on Colab: nothing
    assert installs == [] and capsys.readouterr().out == ""

    monkeypatch.setitem(sys.modules, "google.colab", types.ModuleType("google.colab"))
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="2.0.2"))  # Colab's, loaded
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no nli yet
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "1.26.4")  # what pip installs
    exec(setup_cell(), {})
    [command] = installs
    assert command[:4] == [sys.executable, "-m", "pip", "install"]
    assert {"mxnet==1.9.1", "numpy==1.26.4"} <= set(command) and any(a.startswith("nli @ ") for a in command)
    assert RESTART in capsys.readouterr().out

    # After the restart: nli is there and the numpy loaded is the one installed, so the cell does nothing
    monkeypatch.setitem(sys.modules, "numpy", types.SimpleNamespace(__version__="1.26.4"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    exec(setup_cell(), {})
    assert len(installs) == 1 and capsys.readouterr().out == ""


def test_no_cell_uses_file():
    for name in NAMES:  # a notebook kernel has no __file__
        assert not any("__file__" in cell.source for cell in read_notebook(name).cells), name


# The chapters that fine-tune run on the tiny Hugging Face BERT and the in-repo pairs: a few seconds each.
# The dataset chapter reads SNLI from the loopback server.
TINY_RUN = ["--devices", "cpu", "--model", "hf:{tiny}", "--pairs", DEV_PAIRS]
NOTEBOOK_ARGS = {"natural_language_inference_and_dataset": [], "natural_language_inference_bert": TINY_RUN,
                 "exercise_bert_base": TINY_RUN, "exercise_truncation": TINY_RUN}
SHOWN = {"natural_language_inference_and_dataset": 1, "natural_language_inference_bert": 3,  # figures inline
         "exercise_bert_base": 1, "exercise_truncation": 1}


def test_every_notebook_is_executed():
    assert sorted(NOTEBOOK_ARGS) == sorted(SHOWN) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_in_a_kernel(name, hub_env, tiny_hf_bert, tmp_path, monkeypatch):
    out = tmp_path / "out"
    args = ["--quick", "--out", str(out)] + [a.format(tiny=tiny_hf_bert) for a in NOTEBOOK_ARGS[name]]
    monkeypatch.setenv("NLI_CHAPTER_ARGS", shlex.join(args))  # how a notebook gets its options: see nli/chapter.py
    monkeypatch.setenv("PYTHONPATH", ROOT)  # the kernel imports nli from this checkout
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = read_notebook(name)
    NotebookClient(notebook, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    for name_of_output in CHAPTER_OUTPUTS[name + ".py"]:
        assert os.path.getsize(out / name_of_output) > 0, name_of_output
    images = [o for cell in notebook.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
    assert len(images) == SHOWN[name]
