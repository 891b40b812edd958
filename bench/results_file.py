"""Where a benchmark's figures go: one JSON file, replaced whole, so a run cut short leaves the last good one; with
the CPU they were measured on, and the code an earlier revision measured with.

Plain Python: bench/hf_peer.py uses it too, from a virtualenv without nli."""
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ONEDNN_ISA_FLAGS = ("avx2", "avx512", "vnni", "amx")  # the instruction sets oneDNN chooses its kernels by


def write_results(results, path):
    """Write `results` to `path` as indented JSON (its folder made if needed), by a rename; say where."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")


def cpu_description():
    """This CPU's model name and the instruction-set flags oneDNN picks kernels by, from /proc/cpuinfo."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            info = f.read()
    except OSError:
        return f"{platform.machine()} (no /proc/cpuinfo)"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {key.strip(): value.strip() for key, value in fields.items()}
    flags = sorted(flag for flag in fields.get("flags", "").split() if any(isa in flag for isa in ONEDNN_ISA_FLAGS))
    return f"{fields.get('model name', platform.machine())}; {' '.join(flags) or 'no AVX2, AVX-512, VNNI or AMX'}"


def checkout(rev, folder):
    """The `nli` package of git revision `rev` of this repository, written into `folder`; its full commit id."""
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--verify", rev + "^{commit}"], check=True,
                            capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "-C", ROOT, "archive", commit, "nli"], check=True, capture_output=True).stdout
    os.makedirs(folder, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", folder], input=archive, check=True)
    return commit
