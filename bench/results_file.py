"""Where a benchmark's figures go: one JSON file, replaced whole, so a run cut short leaves the last good one.

Plain Python: bench/hf_peer.py uses it too, from a virtualenv without nli."""
import json
import os


def write_results(results, path):
    """Write `results` to `path` as indented JSON (its folder made if needed), by a rename; say where."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
