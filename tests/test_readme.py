"""The README's results tables are what the results files say, and every file they cite exists."""
import json
import os
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import results_table  # noqa: E402


def readme():
    with open(results_table.README, encoding="utf-8") as f:
        return f.read()


def test_every_cited_results_file_exists():
    cited = results_table.cited_files(readme())
    assert cited, "the README's results tables cite no results file"
    missing = [path for path in cited if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"README cites missing results files: {missing}"


@pytest.mark.parametrize("name", sorted(results_table.TABLES))
def test_table_is_rendered_from_the_results_files(name):
    assert results_table.readme_table(readme(), name) == results_table.TABLES[name](), \
        f"README's {name} table differs from the results files: run python bench/results_table.py --write"


def test_a_missing_figure_stops_rendering_rather_than_leaving_a_blank():
    assert results_table.lookup({"epochs": [{"acc": 0.5}, {"acc": 0.7}]}, "f.json", "epochs.-1.acc") == 0.7
    with pytest.raises(KeyError, match="bench/results/x.json has no nli.accuracy"):
        results_table.lookup({"nli": {"acc": 0.7}}, "bench/results/x.json", "nli.accuracy")


def test_a_run_made_elsewhere_fills_its_row_once_its_file_is_here_and_never_from_quick(tmp_path, monkeypatch):
    source = sorted(results_table.RUN_ELSEWHERE)[0]
    row = ("bert.small", "book", "SNLI train / test", "–", source, results_table.CHAPTER_RUN)
    monkeypatch.setattr(results_table, "ROOT", str(tmp_path))
    assert results_table.NOT_RUN in results_table.run_row(*row)
    (tmp_path / source).parent.mkdir(parents=True)
    figures = {"command": "python chapters/natural_language_inference_bert.py", "test_accuracy": 0.8123,
               "wall_seconds": 5400, "examples_per_sec": 321.0}
    (tmp_path / source).write_text(json.dumps({**figures, "quick": True}))
    with pytest.raises(ValueError, match="--quick"):
        results_table.run_row(*row)
    (tmp_path / source).write_text(json.dumps({**figures, "quick": False}))
    assert results_table.run_row(*row) == (
        f"| bert.small | book | SNLI train / test | – | 0.8123 | 90.0 min | 321.0 | `{source}`: "
        "`python chapters/natural_language_inference_bert.py` |")
