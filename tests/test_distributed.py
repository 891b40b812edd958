"""Distributed fine-tuning on loopback: MXNet's launcher, a parameter server and two workers."""
import json
import os
import subprocess
import sys

import numpy as onp
from mxnet import npx

from conftest import DEV_PAIRS, ROOT

npx.set_np()


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


def test_a_worker_that_fails_stops_the_job_with_one_message(tmp_path):
    out = tmp_path / "run"  # in every process's command line: how the test finds any left running
    finetune = [sys.executable, "-m", "nli", "finetune", "--model", tmp_path / "no-such-model", "--train", DEV_PAIRS,
                "--test", DEV_PAIRS, "--devices", "cpu", "--kvstore", "dist_sync", "--quiet", "--out", out]
    launch = [sys.executable, "-m", "nli.launch", "-n", "2", "-s", "1", "--launcher", "local", *finetune]
    env = {**os.environ, "PYTHONPATH": ROOT, "NLI_DATA_DIR": str(tmp_path / "data"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(list(map(str, launch)), capture_output=True, text=True, env=env, cwd=ROOT,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    *workers, message = result.stderr.strip().splitlines()
    assert workers and all(line.startswith(f"error: '{tmp_path / 'no-such-model'}'") for line in workers)
    assert message.startswith("error: The job stopped: a worker (task ") and "exited with status 2" in message
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(out) not in ps, "a process of the job is still running"


def test_two_jobs_started_together_get_their_own_scheduler_ports(tmp_path):
    # Each process of a job prints its role and the scheduler's port; the tracker alone would give both 9091.
    show = tmp_path / "show.py"  # a file: the launcher hands its command to a shell as one line
    show.write_text("import os\nprint(os.environ['DMLC_ROLE'], os.environ['DMLC_PS_ROOT_PORT'])\n")
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
