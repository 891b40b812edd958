"""The README's results table is what the results files say, and every file it cites exists."""
import os
import sys

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import results_table  # noqa: E402


def readme():
    with open(results_table.README, encoding="utf-8") as f:
        return f.read()


def test_every_cited_results_file_exists():
    cited = results_table.cited_files(readme())
    assert cited, "the README's results table cites no results file"
    missing = [path for path in cited if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"README cites missing results files: {missing}"


def test_table_is_rendered_from_the_results_files():
    assert results_table.readme_table(readme()) == results_table.render(), \
        "README's results table differs from the results files: run python bench/results_table.py --write"
