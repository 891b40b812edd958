"""`python -m nli.launch ...`: MXNet's own distributed launcher (mxnet/tools/launch.py), made to run here.

It takes launch.py's arguments unchanged, e.g. `-n 2 -s 1 --launcher local python -m nli finetune ...`
or `-n 4 -s 4 -H hosts --launcher ssh python -m nli finetune ...`. Four repairs, nothing else:
- the dmlc_tracker that mxnet 1.9.1 ships calls `Thread.isAlive`, which Python 3.9 removed;
- with `--launcher local` every process is on this machine, so the scheduler listens on the loopback
  address instead of whatever address the tracker would guess for the host;
- with `--launcher local` each worker is shown its own share of the GPUs (CUDA_VISIBLE_DEVICES);
- with `--launcher local` a process that fails stops the job: the tracker would raise in a thread
  (printing a traceback with the whole environment) and wait forever for the scheduler, which waits
  for the dead worker. Instead the other processes are ended and the launcher exits with one line.
"""
import importlib.util
import os
import runpy
import socket
import subprocess
import sys
import threading

from .errors import UserError, report_user_errors

MXNET_DIR = importlib.util.find_spec("mxnet").submodule_search_locations[0]
LAUNCH_PY = os.path.join(MXNET_DIR, "tools", "launch.py")
GRACE_SECONDS = 10  # after SIGTERM, a process may save a checkpoint before it is killed


class LocalJob:
    """The scheduler, servers and workers of `--launcher local`, so that the first to fail ends the rest."""

    def __init__(self):
        self.processes, self.failure, self.lock = [], None, threading.Lock()
        self.stopped = threading.Event()  # set once a failure has ended every other process

    def run(self, cmdline, env, role):
        """Run one process of the job to its end; the first that fails records why and stops the others."""
        with self.lock:
            if self.failure:
                return
            process = subprocess.Popen(cmdline, shell=True, executable="/bin/bash", env=env)
            self.processes.append(process)
        status = process.wait()
        with self.lock:
            if status == 0 or self.failure:
                return
            who = "the scheduler" if role == "scheduler" else f"a {role} (task {env['DMLC_TASK_ID']})"
            self.failure = f"{who} exited with status {status}"
            others = [p for p in self.processes if p.poll() is None]
        for p in others:
            p.terminate()
        for p in others:
            try:
                p.wait(GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.stopped.set()

    def exec_cmd(self, cmd, num_attempt, role, taskid, pass_env):
        """dmlc_tracker.local.exec_cmd's contract (a worker or server), without its retries; each worker is
        shown its own share of this machine's GPUs."""
        env = {**os.environ, **{k: str(v) for k, v in pass_env.items()},
               "DMLC_TASK_ID": str(taskid), "DMLC_ROLE": role, "DMLC_JOB_CLUSTER": "local"}
        if role == "worker" and (gpus := worker_gpus(visible_gpus(), taskid, int(env["DMLC_NUM_WORKER"]))):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.run(" ".join(cmd), env, role)

    def check_call(self, cmdline, env, **_):
        """The scheduler's `subprocess.check_call` in dmlc_tracker.tracker.PSTracker."""
        self.run(cmdline, env, "scheduler")


def visible_gpus():
    """The GPUs this machine shows, as CUDA_VISIBLE_DEVICES names them (its own list, when it is set)."""
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return [gpu for gpu in os.environ["CUDA_VISIBLE_DEVICES"].split(",") if gpu.strip()]
    import mxnet as mx
    return [str(i) for i in range(mx.context.num_gpus())]


def worker_gpus(gpus, rank, num_workers):
    """The GPUs worker `rank` of `num_workers` is shown: an even share of `gpus`, or one of them (shared) when workers
    outnumber them (GPUs left over by an even share stay idle). Without it every worker would take every GPU, and
    plan its memory as if alone on each.
    Not verified on a GPU (the project's machines have none)."""
    if not gpus:
        return []
    if num_workers > len(gpus):
        return [gpus[rank % len(gpus)]]
    share = len(gpus) // num_workers
    return gpus[rank * share:(rank + 1) * share]


def free_port():
    """A port that is free now, as the OS picks one: the tracker's own choice, the first free from 9091, gives two
    jobs started together on one machine the same scheduler port."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        return probe.getsockname()[1]


def main(argv):
    """Run mxnet's tools/launch.py with `argv` as its arguments."""
    threading.Thread.isAlive = threading.Thread.is_alive
    launcher = next((b for a, b in zip(argv, argv[1:]) if a == "--launcher"), None)
    job = None
    if launcher == "local" or "--launcher=local" in argv:
        from dmlc_tracker import local, tracker
        job = LocalJob()
        tracker.get_host_ip = lambda host_ip=None: "127.0.0.1"
        local.exec_cmd = job.exec_cmd
        tracker.subprocess = job  # the tracker starts the scheduler with `subprocess.check_call`, nothing else
        port = free_port()
        tracker.PSTracker.__init__.__defaults__ = (port, port + 1, None)  # (port, port_end, envs)
    sys.argv = [LAUNCH_PY, *argv]
    runpy.run_path(LAUNCH_PY, run_name="__main__")
    if job and job.failure:
        job.stopped.wait()
        raise UserError(f"The job stopped: {job.failure}; its own message is above. "
                        f"The other processes were ended.")


if __name__ == "__main__":
    report_user_errors()
    main(sys.argv[1:])
