"""A script that calls `errors.report_user_errors()` reports a UserError as the CLI does, and nothing else."""
import subprocess
import sys

from conftest import ROOT

SCRIPT = """
from nli import errors
errors.report_user_errors()
print("before")
raise {raised}
"""


def run_script(raised):
    return subprocess.run([sys.executable, "-c", SCRIPT.format(raised=raised)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_a_user_error_is_one_line_and_status_2():
    result = run_script('errors.UserError("data.tsv, line 3: expected 3 fields.")')
    assert result.returncode == 2 and result.stdout == "before\n"
    assert result.stderr == "error: data.tsv, line 3: expected 3 fields.\n"


def test_any_other_error_keeps_its_traceback():
    result = run_script('ValueError("a bug")')
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.strip().endswith("ValueError: a bug")


def test_the_machines_refusal_is_one_line_and_status_1():
    result = run_script('OSError(30, "Read-only file system", "/mnt/ro/out")')  # as a chapter's --out would raise
    assert result.returncode == 1 and result.stdout == "before\n"
    assert result.stderr == "error: /mnt/ro/out: Read-only file system\n"  # was: OSError's traceback
