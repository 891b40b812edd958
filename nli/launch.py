"""`python -m nli.launch ...`: MXNet's own distributed launcher (mxnet/tools/launch.py), made to run here.

It takes launch.py's arguments unchanged, e.g. `-n 2 -s 1 --launcher local python -m nli finetune ...`
or `-n 4 -s 4 -H hosts --launcher ssh python -m nli finetune ...`. Five repairs, nothing else:
- the dmlc_tracker that mxnet 1.9.1 ships calls `Thread.isAlive`, which Python 3.9 removed;
- with `--launcher local` every process is on this machine, so the scheduler listens on the loopback
  address instead of whatever address the tracker would guess for the host, and on a port the OS picks,
  so that two jobs started together do not share one;
- with `--launcher local`, `ssh` or `mpi`, a process that fails stops the job: the tracker would raise in a
  thread (printing a traceback with the whole environment) and wait forever for the scheduler, which waits
  for the dead worker. Instead the other processes are ended (over ssh, the remote commands too), and once
  they have, the launcher exits with one line;
- with `--launcher mpi`, each of the two mpiruns started at once has its own Open MPI session directory: sharing
  one, Open MPI 4 fails one of them now and then (open-mpi/ompi#8510);
- with `--launcher local` each worker is shown its own share of the GPUs (CUDA_VISIBLE_DEVICES).
"""
import importlib.util
import os
import re
import runpy
import socket
import subprocess
import sys
import tempfile
import threading

from dmlc_tracker import local, mpi, ssh, tracker

from .errors import UserError, report_user_errors

MXNET_DIR = importlib.util.find_spec("mxnet").submodule_search_locations[0]
LAUNCH_PY = os.path.join(MXNET_DIR, "tools", "launch.py")
GRACE_SECONDS = 10  # after SIGTERM, a process may save a checkpoint before it is killed
# Put before each remote command of `--launcher ssh`: a watcher that sends SIGTERM to the command's process group when
# the command's stdin, its ssh connection, closes. sshd signals nothing to a command without a terminal when its
# client goes, so a remote worker would outlive the job; a terminal (`ssh -tt`) would merge its stderr into stdout.
LIFELINE = "exec 3<&0; { read -r _ <&3; kill 0; } >/dev/null 2>&1 & exec 3<&-;"


class Job:
    """The processes the tracker starts for one job (the scheduler; the servers and workers, or the ssh or mpirun
    commands that start them), so that the first to fail ends the rest."""

    def __init__(self, gpus=()):
        self.gpus = list(gpus)  # this machine's, as CUDA_VISIBLE_DEVICES names them, for local workers to share
        self.processes, self.failure, self.lock = [], None, threading.Lock()
        self.threads = []  # those that start the processes (local, ssh, mpirun), to wait for before the launcher returns
        self.stopped = threading.Event()  # set once a failure has ended every other process

    def run(self, cmdline, env, who, over_ssh=False):
        """Run one process of the job to its end; the first that fails records why and stops the others."""
        with self.lock:
            if self.failure:
                return
            process = subprocess.Popen(cmdline, shell=True, executable="/bin/bash", env=env,
                                       stdin=subprocess.PIPE if over_ssh else None)
            self.processes.append(process)
        status = process.wait()
        with self.lock:
            if status == 0 or self.failure:
                return
            self.failure = f"{who} exited with status {status}"
            others = [p for p in self.processes if p.poll() is None]
        for p in others:
            if p.stdin:  # an ssh client: this ends its remote command (LIFELINE), then it; SIGTERM would end it alone
                p.stdin.close()
            else:
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
        with self.lock:  # the tracker's own thread, a daemon: the launcher waits for it before it exits
            self.threads.append(threading.current_thread())
        env = {**os.environ, **{k: str(v) for k, v in pass_env.items()},
               "DMLC_TASK_ID": str(taskid), "DMLC_ROLE": role, "DMLC_JOB_CLUSTER": "local"}
        if role == "worker" and (gpus := worker_gpus(self.gpus, taskid, int(env["DMLC_NUM_WORKER"]))):
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        self.run(" ".join(cmd), env, f"a {role} (task {taskid})")

    def check_call(self, cmdline, env, **_):
        """The scheduler's `subprocess.check_call` in dmlc_tracker.tracker.PSTracker."""
        self.run(cmdline, env, "the scheduler")

    def ssh_thread(self, target, args):
        """`Thread(target=run, args=(prog,))` in dmlc_tracker.ssh, where `prog` is `ssh host '...'` for one process."""
        role, host = (re.search(rf"\b{name}=([^;]+);", args[0])[1] for name in ("DMLC_ROLE", "DMLC_NODE_HOST"))
        return self.thread(self.run, args[0], None, f"a {role} on {host}", True)

    def mpi_thread(self, target, args):
        """`Thread(target=run, args=(prog,))` in dmlc_tracker.mpi, where `prog` is the `mpirun` of one role."""
        # mpirun itself ends its other processes when one fails, and all of them when it gets SIGTERM
        role = re.search(r"\bDMLC_ROLE=(\w+)", args[0])[1]
        return self.thread(self.mpirun, args[0], f"the mpirun of the {role}s")

    def mpirun(self, cmdline, who):
        """Run an mpirun under a session directory of its own: mpi.py starts the servers' and the workers' at once, and
        Open MPI 4, creating the directory they would share, may fail one of them (open-mpi/ompi#8510)."""
        with tempfile.TemporaryDirectory(prefix="nli-mpirun-") as session_base:
            self.run(cmdline, {**os.environ, "OMPI_MCA_orte_tmpdir_base": session_base}, who)

    def thread(self, target, *args):
        """A thread that runs `target(*args)`, kept to be waited for."""
        self.threads.append(threading.Thread(target=target, args=args))
        return self.threads[-1]


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
    local_job = launcher == "local" or "--launcher=local" in argv
    job = Job(visible_gpus() if local_job else ())
    tracker.subprocess = job  # the tracker starts the scheduler with `subprocess.check_call`, nothing else
    local.exec_cmd = job.exec_cmd
    ssh.Thread, mpi.Thread = job.ssh_thread, job.mpi_thread
    get_env = ssh.get_env  # the `export NAME=value;` lines that begin each remote command
    ssh.get_env = lambda pass_envs: f"{get_env(pass_envs)} {LIFELINE}"
    if local_job:
        tracker.get_host_ip = lambda host_ip=None: "127.0.0.1"
        port = free_port()
        tracker.PSTracker.__init__.__defaults__ = (port, port + 1, None)  # (port, port_end, envs)
    sys.argv = [LAUNCH_PY, *argv]
    runpy.run_path(LAUNCH_PY, run_name="__main__")  # returns when the scheduler has ended
    for thread in job.threads:
        thread.join()
    if job.failure:
        job.stopped.wait()
        raise UserError(f"The job stopped: {job.failure}; its own message is above. "
                        f"The other processes were ended.")


if __name__ == "__main__":
    report_user_errors()
    main(sys.argv[1:])
