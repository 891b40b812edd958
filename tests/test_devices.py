"""Devices: duplicates refused, one device for scoring by default, each local worker its own GPUs; on this machine,
which has no GPU, GPUs are contexts that are named but never computed on."""
import dataclasses

import mxnet as mx
import pytest

from nli import cli, data, launch, train
from nli.errors import UserError
from nli.recipe import Recipe


def test_a_device_named_twice_is_refused():
    with pytest.raises(UserError, match=r"--devices gpu:0,0: each GPU may be named once"):
        data.parse_devices("gpu:0,0")
    with pytest.raises(UserError, match=r"--devices cpu:0,0: cpu:N takes a number of CPU contexts"):
        data.parse_devices("cpu:0,0")
    assert data.parse_devices("cpu:2") == [mx.cpu(0), mx.cpu(1)]


def test_gpus_that_cannot_be_counted_are_a_sentence_and_the_cpu_still_runs(monkeypatch):
    def insufficient_driver():  # what some MXNet versions raise under a driver too old for the build
        raise mx.MXNetError("[12:00:00] include/mxnet/base.h:427: Check failed: e == cudaSuccess (35 vs. 0) :  CUDA: "
                            "CUDA driver version is insufficient for CUDA runtime version\nStack trace: ...")
    monkeypatch.setattr(mx.context, "num_gpus", insufficient_driver)
    for spec in ("auto", "gpu", "gpu:0"):
        with pytest.raises(UserError, match=r"MXNet cannot count the GPUs \(.*insufficient for CUDA runtime "
                                            r"version\); `nli doctor` says why, and --devices cpu runs"):
            data.parse_devices(spec)
    assert data.parse_devices("cpu:2") == [mx.cpu(0), mx.cpu(1)]


def test_a_cuda_build_that_sees_no_gpu_says_so_when_auto_falls_back_to_the_cpu(monkeypatch, capsys):
    assert data.parse_devices("auto") == [mx.cpu()] and capsys.readouterr().err == ""  # the CPU build: as expected

    class CudaBuild:
        def is_enabled(self, name):
            return name == "CUDA"
    monkeypatch.setattr(mx.runtime, "Features", CudaBuild)
    assert data.parse_devices("auto") == [mx.cpu()]
    assert "CUDA build but sees no GPU" in capsys.readouterr().err


def test_evaluate_and_predict_score_on_one_device_unless_told(monkeypatch):
    assert data.scoring_devices(None) == [mx.cpu()]
    monkeypatch.setattr(mx.context, "num_gpus", lambda: 2)  # as a machine with two GPUs answers
    assert data.scoring_devices(None) == [mx.gpu(0)]
    assert data.scoring_devices("auto") == [mx.gpu(0), mx.gpu(1)]
    assert data.scoring_devices("cpu:2") == [mx.cpu(0), mx.cpu(1)]
    for command in ("evaluate", "predict"):
        args = cli.build_parser().parse_args([command, "--run", "r"] + ["p", "h"] * (command == "predict"))
        assert args.devices is None


def test_local_workers_share_the_gpus_out():
    gpus = ["0", "1", "2", "3"]
    assert [launch.worker_gpus(gpus, rank, 2) for rank in range(2)] == [["0", "1"], ["2", "3"]]
    assert [launch.worker_gpus(gpus, rank, 4) for rank in range(4)] == [["0"], ["1"], ["2"], ["3"]]
    assert [launch.worker_gpus(gpus[:2], rank, 3) for rank in range(3)] == [["0"], ["1"], ["0"]]
    assert [launch.worker_gpus(gpus[:3], rank, 2) for rank in range(2)] == [["0"], ["1"]]
    assert launch.worker_gpus([], 0, 2) == []


def started_environments(monkeypatch, visible):
    """The environment a local `launch.Job` gives the workers and the server of a 2-worker job, with CUDA_VISIBLE_DEVICES
    `visible` (None: unset, on this machine without a GPU)."""
    if visible is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    job, started = launch.Job(launch.visible_gpus()), {}
    monkeypatch.setattr(job, "run", lambda cmdline, env, who: started.update({env["DMLC_TASK_ID"]: env}))
    for role, taskid in (("worker", 0), ("worker", 1), ("server", 2)):
        job.exec_cmd(["python", "-m", "nli"], 0, role, taskid, {"DMLC_NUM_WORKER": 2, "DMLC_NUM_SERVER": 1})
    return started


def test_each_local_worker_is_shown_its_own_gpus(monkeypatch):
    started = started_environments(monkeypatch, "4,5")
    assert [started[t]["CUDA_VISIBLE_DEVICES"] for t in "012"] == ["4", "5", "4,5"]  # the server is left as it was
    started = started_environments(monkeypatch, None)  # no GPU here: nothing is set
    assert not any("CUDA_VISIBLE_DEVICES" in env for env in started.values())


def test_float16_is_refused_on_every_device_as_the_help_says():
    dtype_help = next(f for f in dataclasses.fields(Recipe) if f.name == "dtype").metadata["help"]
    assert dtype_help.startswith("float16 is refused on every device")
    for devices in ([mx.cpu()], [mx.gpu(0)], [mx.gpu(0), mx.gpu(1)]):
        with pytest.raises(UserError, match="float16"):
            train.check_dtype("float16", devices)
