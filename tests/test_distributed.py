"""Distributed fine-tuning on loopback: MXNet's launcher (local, ssh to an sshd started here, mpi), a parameter
server and two workers."""
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as onp
import pytest
from mxnet import npx

from conftest import DEV_PAIRS, ROOT, closed_port

npx.set_np()
# What each process of a job prints: its role, the scheduler's port, its working directory. A file, as the launcher
# hands its command to a shell as one line; one write a line, as the processes share stdout.
SHOW = """import os
os.write(1, f"{os.environ['DMLC_ROLE']} {os.environ['DMLC_PS_ROOT_PORT']} {os.getcwd()}\\n".encode())
"""


def test_two_workers_and_a_server_train_one_model(training_bert_dir, tmp_path):
    out = tmp_path / "run"
    finetune = [sys.executable, "-m", "nli", "finetune", "--model", training_bert_dir, "--train", DEV_PAIRS,
                "--test", DEV_PAIRS, "--limit-train", 258, "--limit-test", 64, "--epochs", 6, "--batch-size", 8,
                "--max-len", 64, "--lr", 2e-3, "--dropout", 0, "--log-every", 1, "--devices", "cpu", "--kvstore", "dist_sync",
                "--quiet", "--out", out]
    launch = [sys.executable, "-m", "nli.launch", "-n", "2", "-s", "1", "--launcher", "local", *finetune]
    env = {**os.environ, "PYTHONPATH": ROOT, "NLI_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(list(map(str, launch)), capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    # Worker 0 wrote the run; worker 1 its own final weights: the same, bit for bit.
    chief = npx.load(str(out / "model.params"))
    other = npx.load(str(out / "worker-1.params"))
    assert chief.keys() == other.keys()
    assert all(onp.array_equal(chief[k].asnumpy(), other[k].asnumpy()) for k in chief)

    epochs = [m for m in map(json.loads, open(out / "metrics.jsonl")) if m["kind"] == "epoch"]
    assert [m["epoch"] for m in epochs] == [1, 2, 3, 4, 5, 6]
    assert all(m["examples"] == 129 for m in epochs)  # worker 0's shard: every other pair of 258
    assert epochs[-1]["loss"] < epochs[0]["loss"] - 0.05  # it learns
    # worker 0, which scores the epochs, writes results.json; the other neither writes it nor fails for want of scores
    assert json.load(open(out / "results.json"))["test_accuracy"] == epochs[-1]["test_acc"]


# HOME, an empty folder: the remote shell reads no ~/.bashrc of this machine's user (here, pyenv's, whose rehash races
# between sessions started together and prints to stderr).
SSHD_CONFIG = """ListenAddress 127.0.0.1
Port {port}
HostKey {dir}/host_key
AuthorizedKeysFile {dir}/client_key.pub
PidFile {dir}/sshd.pid
SetEnv HOME={dir}/home
UsePAM no
StrictModes no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
"""
# The launcher runs `ssh -o StrictHostKeyChecking=no HOST -p PORT '...'` (the port from the hosts file); a script
# named ssh, first on PATH, adds this configuration, as ~/.ssh/config would on a cluster.
SSH_CONFIG = """Host *
  IdentityFile {dir}/client_key
  IdentitiesOnly yes
  StrictHostKeyChecking no
  UserKnownHostsFile /dev/null
  LogLevel ERROR
  BatchMode yes
"""


def start_sshd(folder):
    """Debian's sshd on a free loopback port, with its own host key and the key of a client it lets in as this user;
    returns (the sshd process, the hosts file line, a PATH whose `ssh` is that client) or skips saying why."""
    sshd = shutil.which("sshd", path=f"{os.environ['PATH']}:/usr/sbin")  # /usr/sbin: not on every user's PATH
    ssh, keygen = shutil.which("ssh"), shutil.which("ssh-keygen")
    if not (sshd and ssh and keygen):
        pytest.skip("needs Debian's openssh-server and openssh-client (sshd, ssh, ssh-keygen), not installed here")
    try:  # sshd refuses to start without it; its service would create it
        os.makedirs("/run/sshd", exist_ok=True)
    except OSError as e:
        pytest.skip(f"sshd needs its privilege separation directory /run/sshd, which cannot be created here: {e}")
    for key in ("host_key", "client_key"):
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", folder / key], check=True)
    port = closed_port()
    (folder / "sshd_config").write_text(SSHD_CONFIG.format(port=port, dir=folder))
    (folder / "ssh_config").write_text(SSH_CONFIG.format(dir=folder))
    (folder / "bin").mkdir()
    (folder / "home").mkdir()
    (folder / "bin" / "ssh").write_text(f'#!/bin/sh\nexec {ssh} -F {folder / "ssh_config"} "$@"\n')
    (folder / "bin" / "ssh").chmod(0o755)
    with open(folder / "sshd.log", "w") as log:
        server = subprocess.Popen([sshd, "-D", "-e", "-f", folder / "sshd_config"], stderr=log)
    path = f"{folder / 'bin'}:{os.environ['PATH']}"
    for _ in range(100):  # sshd listens within a second
        probe = subprocess.run(["ssh", "127.0.0.1", "-p", str(port), "true"], capture_output=True, text=True,
                               env={**os.environ, "PATH": path})
        if probe.returncode == 0 or server.poll() is not None:
            break
        time.sleep(0.1)
    if probe.returncode != 0:
        server.terminate()
        server.wait()
        pytest.skip(f"could not log in to sshd on 127.0.0.1:{port} ({(folder / 'sshd.log').read_text().strip()} "
                    f"{probe.stderr.strip()})")
    return server, f"127.0.0.1:{port}", path


@pytest.fixture(params=["local", "ssh", "mpi"])
def launcher(request, tmp_path):
    """How to run a job on this machine with each of MXNet's launchers: (its arguments, its environment, how the
    launcher names a failing worker); skipped, saying why, where that launcher cannot run here."""
    env = {**os.environ, "PYTHONPATH": ROOT, "NLI_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    hosts = tmp_path / "hosts"
    if request.param == "local":
        yield ["--launcher", "local"], env, "a worker (task "
    elif request.param == "ssh":
        (tmp_path / "ssh").mkdir()
        server, host, env["PATH"] = start_sshd(tmp_path / "ssh")
        hosts.write_text(host + "\n")
        yield ["-H", hosts, "--launcher", "ssh"], env, "a worker on 127.0.0.1 "
        server.terminate()
        server.wait()
    else:
        if not shutil.which("mpirun"):
            pytest.skip("needs mpirun (Debian's openmpi-bin), not installed here")
        hosts.write_text("127.0.0.1 slots=2\n")  # this machine, with room for both workers, whatever its cores
        env |= {"OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"}  # as root, mpirun needs both
        yield ["-H", hosts, "--launcher", "mpi"], env, "the mpirun of the workers "


def test_each_launcher_starts_the_scheduler_the_servers_and_the_workers(launcher, tmp_path):
    args, env, _ = launcher
    show = tmp_path / "show.py"
    show.write_text(SHOW)
    launch = [sys.executable, "-m", "nli.launch", "-n", "2", "-s", "1", *args, sys.executable, show]
    result = subprocess.run(list(map(str, launch)), capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    roles, ports, folders = zip(*(line.split(" ", 2) for line in result.stdout.splitlines()))
    assert sorted(roles) == ["scheduler", "server", "worker", "worker"] and len(set(ports)) == 1
    assert set(folders) == {ROOT}  # the launcher's, over ssh too: `python -m nli` finds the package without PYTHONPATH


def test_a_worker_that_fails_stops_the_job_with_one_message(launcher, tmp_path):
    args, env, failing_worker = launcher
    out = tmp_path / "run"  # in every process's command line: how the test finds any left running
    finetune = [sys.executable, "-m", "nli", "finetune", "--model", tmp_path / "no-such-model", "--train", DEV_PAIRS,
                "--test", DEV_PAIRS, "--devices", "cpu", "--kvstore", "dist_sync", "--quiet", "--out", out]
    launch = [sys.executable, "-m", "nli.launch", "-n", "2", "-s", "1", *args, *finetune]
    result = subprocess.run(list(map(str, launch)), capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    *above, message = result.stderr.strip().splitlines()
    workers = [line for line in above if line.startswith("error: ")]
    assert workers and all(line.startswith(f"error: '{tmp_path / 'no-such-model'}'") for line in workers)
    if "mpi" not in args:  # mpirun adds its own account of the failure, and logs the two mpiruns it starts
        assert above == workers
    assert message.startswith(f"error: The job stopped: {failing_worker}") and "exited with status 2" in message
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps, "a process of the job is still running"


def test_two_jobs_started_together_get_their_own_scheduler_ports(tmp_path):
    # Each process of a job prints its role and the scheduler's port; the tracker alone would give both 9091.
    show = tmp_path / "show.py"
    show.write_text(SHOW)
    launch = [sys.executable, "-m", "nli.launch", "-n", "1", "-s", "1", "--launcher", "local", sys.executable,
              str(show)]
    env = {**os.environ, "PYTHONPATH": ROOT}
    jobs = [subprocess.Popen(launch, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
            for _ in range(2)]
    outputs = [job.communicate(timeout=120) for job in jobs]
    assert all(job.returncode == 0 for job in jobs), outputs
    ports = [{line.split()[1] for line in out.splitlines() if line.startswith(("scheduler", "worker", "server"))}
             for out, _ in outputs]
    assert all(len(p) == 1 for p in ports) and ports[0] != ports[1], ports
