"""`python -m nli.launch ...`: MXNet's own distributed launcher (mxnet/tools/launch.py), made to run here.

It takes launch.py's arguments unchanged, e.g. `-n 2 -s 1 --launcher local python -m nli finetune ...`
or `-n 4 -s 4 -H hosts --launcher ssh python -m nli finetune ...`. Two repairs, nothing else:
- the dmlc_tracker that mxnet 1.9.1 ships calls `Thread.isAlive`, which Python 3.9 removed;
- with `--launcher local` every process is on this machine, so the scheduler listens on the loopback
  address instead of whatever address the tracker would guess for the host.
"""
import importlib.util
import os
import runpy
import sys
import threading

MXNET_DIR = importlib.util.find_spec("mxnet").submodule_search_locations[0]
LAUNCH_PY = os.path.join(MXNET_DIR, "tools", "launch.py")


def main(argv):
    """Run mxnet's tools/launch.py with `argv` as its arguments."""
    threading.Thread.isAlive = threading.Thread.is_alive
    launcher = next((b for a, b in zip(argv, argv[1:]) if a == "--launcher"), None)
    if launcher == "local" or "--launcher=local" in argv:
        from dmlc_tracker import tracker
        tracker.get_host_ip = lambda host_ip=None: "127.0.0.1"
    sys.argv = [LAUNCH_PY, *argv]
    runpy.run_path(LAUNCH_PY, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
