"""`nli doctor`: its advice, fed the facts of machines we do not have, and a real run on this one."""
import ctypes.util
import functools
import http.server
import os
import subprocess
import sys
import threading

import pytest

from conftest import ROOT, QuietHandler, closed_port, run_cli
from nli import compat, doctor, selftest

HEALTHY = dict(python=(3, 11, 7), numpy="1.23.5", mxnet="1.9.1", features={"CUDA": False, "MKLDNN": True},
               devices=["cpu (2 cores)"], data_dir="data")


def advice_for(**facts):
    """The doctor's (problem, fix) pairs for a healthy CPU machine changed by `facts`."""
    return doctor.advice(doctor.Facts(**{**HEALTHY, **facts}))


def test_a_healthy_cpu_machine_has_no_problem():
    assert advice_for() == []
    assert advice_for(python=(3, 13, 0), numpy="1.26.4") == []


def test_cpu_only_mxnet_on_a_gpu_machine_gets_the_cuda_build_for_its_driver():
    for driver, build in (("12.2", "mxnet-cu117"), ("11.7", "mxnet-cu117"), ("11.2", "mxnet-cu112"),
                          ("10.2", "mxnet-cu102")):
        [(problem, fix)] = advice_for(driver_cuda=driver)
        assert "CPU-only mxnet" in problem and f"CUDA {driver}" in problem
        assert f"pip install {build}==1.9.1" in fix and "pip uninstall -y mxnet" in fix
    [(_, fix)] = advice_for(driver_cuda="9.2")
    assert "Update the NVIDIA driver" in fix
    assert advice_for(driver_cuda="12.2", features={"CUDA": True},  # a CUDA build that sees its GPU: nothing to say
                      devices=["gpu(0)", "cpu (2 cores)"]) == []


def test_missing_cudnn_8_beside_cudnn_9_gets_the_pypi_package_nli_loads():
    error = "OSError: libcudnn.so.8: cannot open shared object file: No such file or directory"
    facts = dict(mxnet=None, mxnet_error=error, features={}, driver_cuda="12.2",
                 unresolved_libraries=doctor.unresolved_libraries(error))
    assert "libcudnn.so.8" in facts["unresolved_libraries"]
    problems = dict(advice_for(**facts))
    fix = problems["libmxnet.so needs libcudnn.so.8, which this machine does not have."]
    assert "pip install nvidia-cudnn-cu11==8.9.6.50" in fix and "no LD_LIBRARY_PATH" in fix
    assert not any("CPU-only" in p for p in problems)  # mxnet did not import: its build is unknown


def test_a_library_ldd_misses_but_nli_loaded_is_not_reported_missing():
    gpu_build = dict(features={"CUDA": True}, mxnet_package="mxnet-cu117", driver_cuda="12.2", devices=["gpu(0)"])
    unresolved = ["libcublas.so.11", "libcudnn.so.8", "libnccl.so.2"]  # ldd cannot see what compat.py preloads
    problems = [p for p, _ in advice_for(**gpu_build, unresolved_libraries=unresolved,
                                         loaded_libraries=["libcudnn.so.8", "libnccl.so.2"])]
    assert problems == ["libmxnet.so needs libcublas.so.11, which this machine does not have."]
    [(_, fix)] = advice_for(**gpu_build, unresolved_libraries=unresolved[:1])
    assert "pip install nvidia-cublas-cu11==11.10.3.66" in fix
    assert advice_for(**gpu_build, unresolved_libraries=unresolved, loaded_libraries=unresolved) == []


def test_the_driver_library_is_not_sent_to_pypi():
    [(problem, fix)] = advice_for(mxnet=None, mxnet_package="mxnet-cu117", unresolved_libraries=["libcuda.so.1"])
    assert "libcuda.so.1" in problem and "NVIDIA driver" in fix
    assert "pip uninstall -y mxnet-cu117 && pip install mxnet==1.9.1" in fix and "nvidia-" not in fix


def test_loaded_and_loadable_libraries_are_seen(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text("7f00-7f01 r-xp 00000000 08:01 42   /site-packages/nvidia/cudnn/lib/libcudnn.so.8\n"
                    "7f02-7f03 rw-p 00000000 00:00 0 \n"
                    "7f04-7f05 r-xp 00000000 08:01 43   /usr/lib/with space/libnccl.so.2\n")
    assert doctor.mapped_library_names(str(maps)) == {"libcudnn.so.8", "libnccl.so.2"}
    assert doctor.mapped_library_names(str(tmp_path / "none")) == set()
    assert "libc.so.6" in doctor.mapped_library_names()  # this process's own maps
    assert doctor.loadable("libc.so.6") and not doctor.loadable("libnot-a-library.so.9")


def test_gathered_facts_count_a_library_ldd_misses_as_present_when_this_process_has_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(doctor, "unresolved_libraries", lambda error=None: ["libc.so.6", "libnot-a-library.so.9"])
    facts = doctor.gather_facts()
    assert facts.loaded_libraries == ["libc.so.6"]  # mapped in this process, as compat.py's preloads are
    assert [p for p, _ in doctor.advice(facts) if "libmxnet.so needs" in p] == [
        "libmxnet.so needs libnot-a-library.so.9, which this machine does not have."]


def test_cuda_build_with_a_driver_too_old_for_it_says_why_no_gpu_and_what_to_do():
    cuda_build = dict(features={"CUDA": True}, mxnet_package="mxnet-cu117", devices=["cpu (2 cores)"])
    [(problem, fix)] = advice_for(**cuda_build, driver_cuda="11.4")
    assert "CUDA 11.4, older than the CUDA 11.7 that mxnet-cu117 was built for" in problem
    assert "no GPU" in problem and "Update the NVIDIA driver" in fix
    assert "pip uninstall -y mxnet-cu117 && pip install mxnet-cu114==1.9.1" in fix
    error = "CUDA: CUDA driver version is insufficient for CUDA runtime version"  # where MXNet raises instead of 0
    [(problem, fix)] = advice_for(**cuda_build, driver_cuda="10.2", gpu_count_error=error)
    assert "CUDA 10.2, older than the CUDA 11.7" in problem and error in problem and "mxnet-cu102==1.9.1" in fix
    # a CUDA 11 driver older than the build still shows the GPUs, but not run-time compiled kernels
    [(problem, fix)] = advice_for(**{**cuda_build, "devices": ["gpu(0)", "cpu (2 cores)"]}, driver_cuda="11.4")
    assert "NVRTC" in problem and "mxnet-cu114==1.9.1" in fix
    [(problem, fix)] = advice_for(**cuda_build, driver_cuda="12.2", cuda_visible_devices="")
    assert "CUDA_VISIBLE_DEVICES=''" in problem and "Unset it" in fix
    [(problem, fix)] = advice_for(**cuda_build, driver_cuda="12.2")
    assert "sees no GPU" in problem and "nvidia-smi" in fix and "--gpus all" in fix
    [(problem, fix)] = advice_for(**cuda_build)  # no nvidia-smi
    assert "no NVIDIA driver" in problem and "pip install mxnet==1.9.1" in fix
    assert advice_for(**{**cuda_build, "devices": ["gpu(0)", "cpu (2 cores)"]}, driver_cuda="12.2") == []


def test_gpus_that_cannot_be_counted_are_a_fact_not_a_crash(monkeypatch, tmp_path):
    import mxnet as mx
    monkeypatch.setenv("NLI_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(mx.context, "num_gpus", lambda: mx.nd.ones((2,)).reshape((3,)))  # a real MXNetError
    facts = doctor.gather_facts()
    assert facts.gpu_count_error and "\n" not in facts.gpu_count_error
    assert facts.devices == [f"cpu ({os.cpu_count()} cores)"]


def test_a_gpu_whose_small_operation_fails_is_reported():
    facts = dict(features={"CUDA": True}, mxnet_package="mxnet-cu117", driver_cuda="12.2",
                 devices=["gpu(0)", "gpu(1)", "cpu (2 cores)"])
    error = "MXNetError: CUDA: no kernel image is available for execution on the device"
    [(problem, fix)] = advice_for(**facts, gpu_errors={"gpu(1)": error})
    assert problem.startswith("A small matrix product on gpu(1) failed") and error in problem
    assert "nvidia-smi" in fix
    out = doctor.report(doctor.Facts(**{**HEALTHY, **facts, "gpu_errors": {"gpu(1)": error}}), [])
    assert "GPU check  gpu(0) ok, gpu(1) failed" in out


def test_the_small_operation_is_right_on_a_cpu_context():
    import mxnet as mx
    assert doctor.device_error(mx.cpu()) is None
    assert doctor.device_error(mx.gpu(0)) is not None  # this machine has no GPU: the error is caught


def test_unsupported_python_and_numpy_2_are_named_with_their_fix():
    [(problem, fix)] = advice_for(python=(3, 10, 13))
    assert "Python 3.10.13" in problem and "3.11" in fix
    [(problem, fix)] = advice_for(numpy="2.1.0")
    assert "numpy 2.1.0" in problem and "numpy<2" in fix
    [(problem, fix)] = advice_for(mxnet=None, mxnet_error="ModuleNotFoundError: No module named 'mxnet'")
    assert "No module named 'mxnet'" in problem and "requirements.txt" in fix


def real_library():
    """The path of a real shared library (libz) to stand in for a CUDA one, or None."""
    name = ctypes.util.find_library("z")
    folders = ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu", "/lib64", "/usr/lib64", "/lib", "/usr/lib")
    return next((os.path.join(d, name) for d in folders if name and os.path.exists(os.path.join(d, name))), None)


def install_package(site, distribution, files):
    """A package as pip installs it into `site`: its `files` (path -> bytes) and a dist-info whose RECORD lists
    them with their sizes."""
    name, version = distribution.split("==")
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    records = []
    for path, content in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_bytes(content)
        records.append(f"{path},,{len(content)}")
    (info / "RECORD").write_text("\n".join(records + [f"{info.name}/RECORD,,"]) + "\n")


def test_cuda_libraries_from_cu11_packages_are_loaded_before_mxnet_and_cuda_12_ones_are_not(tmp_path):
    source = real_library()
    if source is None:
        pytest.skip("no libz on this machine to stand in for a CUDA library")
    library = open(source, "rb").read()
    cu11, cu12 = tmp_path / "cu11", tmp_path / "cu12"
    install_package(cu11, "nvidia-cudnn-cu11==8.9.6.50", {"nvidia/cudnn/lib/libcudnn.so.8": library,
                                                          "nvidia/cudnn/lib/libcudnn_ops_infer.so.8": library,
                                                          "nvidia/cudnn/include/cudnn.h": b"/* header */"})
    (cu11 / "nvidia/cudnn/lib/libunrelated.so.12").write_bytes(b"not a library")  # in no RECORD: left alone
    cudnn = str(cu11 / "nvidia/cudnn/lib/libcudnn.so.8")
    assert compat.load_cuda_libraries([str(cu11)]) == [cudnn, cudnn.replace("cudnn.so", "cudnn_ops_infer.so")]
    # torch's CUDA 12 NCCL has CUDA 11's name and folder: it is not loaded, as no cu11 package installed it
    install_package(cu12, "nvidia-nccl-cu12==2.21.5", {"nvidia/nccl/lib/libnccl.so.2": library})
    assert compat.cuda11_library_files([str(cu12)]) == [] and compat.load_cuda_libraries([str(cu12)]) == []
    # ... nor when it overwrote the cu11 package's file: the size the cu11 RECORD gives tells
    install_package(cu12, "nvidia-nccl-cu11==2.14.3", {"nvidia/nccl/lib/libnccl.so.2": b"x" * 10})
    (cu12 / "nvidia/nccl/lib/libnccl.so.2").write_bytes(library)
    nccl = str(cu12 / "nvidia/nccl/lib/libnccl.so.2")
    assert compat.cuda11_library_files([str(cu12)]) == [(nccl, False)]
    assert compat.load_cuda_libraries([str(cu12)]) == []
    [(problem, fix)] = advice_for(replaced_libraries=[nccl])
    assert nccl in problem and "CUDA 12" in problem and "--force-reinstall" in fix
    assert compat.load_cuda_libraries([str(tmp_path / "elsewhere")]) == []


def doctor_env(tmp_path, **variables):
    """An environment whose caches are in tmp_path: the data dir, and the Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NLI_MIRROR", "NLI_HUB_MANIFEST"))}
    return {**env, "NLI_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"), **variables}
def test_every_cuda_11_package_is_pinned_to_a_cuda_11_release():
    for library, package in compat.CUDA_LIBRARY_PACKAGES.items():
        name, _, version = package.partition("==")
        assert name.startswith("nvidia-") and name.endswith("-cu11") and version, package
    assert {"libcudart.so.11.0", "libcublas.so.11", "libcublasLt.so.11", "libcufft.so.10", "libcurand.so.10",
            "libcusolver.so.11", "libcusparse.so.11", "libnvrtc.so.11.2", "libnccl.so.2",
            "libcudnn.so.8"} == set(compat.CUDA_LIBRARY_PACKAGES)


def test_every_kernel_runs_on_the_openmp_threads_unless_the_user_chose_and_the_doctor_says_which(tmp_path):
    script = ("import nli, mxnet; from nli import doctor; "
              "print(doctor.gather_facts().omp['MXNET_USE_OPERATOR_TUNING'])")
    for chosen, seen in ((None, "0"), ("1", "1")):
        env = {k: v for k, v in os.environ.items() if k != "MXNET_USE_OPERATOR_TUNING"}
        env.update({"MXNET_USE_OPERATOR_TUNING": chosen} if chosen else {})
        child = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                               env={**env, "PYTHONPATH": ROOT})
        assert child.stdout.split()[-1:] == [seen], child.stderr


def test_doctor_runs_on_this_cpu_machine_and_reports_no_gpu(tmp_path):
    result = run_cli("doctor", env=doctor_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr  # hosts out of reach are no problem of this machine
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert f"Python     {'.'.join(map(str, sys.version_info[:3]))}" in out
    assert "mxnet      1.9.1 (mxnet)" in out and "MKLDNN on" in out and "cpu (" in out
    assert "GPU        none found" in out and "No known problem found." in out
    assert f"data dir   {tmp_path / 'data'}" in out and "bert.small   missing" in out
    [downloads] = [line for line in out.splitlines() if line.startswith("downloads  ")]
    assert "d2l-data.s3-accelerate.amazonaws.com " in downloads and "nlp.stanford.edu " in downloads
    assert f"HF cache   {tmp_path / 'hf' / 'hub'} (--model hf:ORG/NAME): no model yet" in out


def test_the_report_says_when_hf_names_cannot_be_used():
    report = doctor.report(doctor.Facts(**HEALTHY), [])
    assert "HF cache   huggingface_hub does not import: --model hf:ORG/NAME needs it" in report


@pytest.fixture
def mirror(tmp_path):
    """A loopback server holding the registry's files (stand-ins: the doctor only asks whether they are there)."""
    served = tmp_path / "served"
    served.mkdir()
    for file in ("bert.small.zip", "bert.base.zip", "snli_1.0.zip"):
        (served / file).write_bytes(b"stand-in")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                             functools.partial(QuietHandler, directory=str(served)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_doctor_says_in_one_line_whether_the_download_hosts_answer(tmp_path, mirror):
    result = run_cli("doctor", env=doctor_env(tmp_path, NLI_MIRROR=f"http://{mirror}/"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"downloads  {mirror} reachable\n" in result.stdout  # every entry comes from the mirror
    port = closed_port()
    result = run_cli("doctor", env=doctor_env(tmp_path, NLI_MIRROR=f"http://127.0.0.1:{port}/"))
    assert result.returncode == 0, result.stdout + result.stderr  # unreachable hosts alone are no failure
    [downloads] = [line for line in result.stdout.splitlines() if line.startswith("downloads  ")]
    assert downloads.startswith(f"downloads  127.0.0.1:{port} unreachable: Connection refused (without them: "
                                f"--model hf:DIR or hf:ORG/NAME")
    assert "No known problem found." in result.stdout


def test_reach_tells_a_missing_file_from_a_host_that_answers(mirror):
    from nli import hub
    assert hub.reach(f"http://{mirror}/bert.small.zip") == "reachable"
    assert hub.reach(f"http://{mirror}/gone.zip") == f"reachable, but http://{mirror}/gone.zip answers HTTP 404 " \
                                                     f"File not found"


def test_doctor_lists_the_models_in_the_hugging_face_cache(tmp_path):
    from test_hf_hub import write_hub_cache
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text("{}")
    write_hub_cache(str(tmp_path / "hub"), "sentence-transformers/all-MiniLM-L6-v2", "a" * 40, str(tmp_path / "model"))
    result = run_cli("doctor", env=doctor_env(tmp_path, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1",
                                              NLI_MIRROR=f"http://127.0.0.1:{closed_port()}/"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (f"HF cache   {tmp_path / 'hub'} (--model hf:ORG/NAME): sentence-transformers/all-MiniLM-L6-v2; "
            f"HF_HUB_OFFLINE=1: nothing is downloaded") in result.stdout


def test_doctor_test_fine_tunes_on_cpu_and_two_cpu_contexts_and_passes(tmp_path):
    result = run_cli("doctor", "--test", env={**os.environ, "NLI_DATA_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "on cpu, cpu:2" in out and "test passed" in out and "problem:" not in out
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith(("cpu ", "cpu:2 "))}
    losses = {name: [float(x) for x in line.split("losses ")[1].split(";")[0].split()] for name, line in lines.items()}
    assert len(losses["cpu"]) == selftest.PAIRS // selftest.BATCH_SIZE  # one loss per update
    assert losses["cpu"] == pytest.approx(losses["cpu:2"], rel=selftest.LOSS_RTOL)
    assert all("examples/sec" in line and "peak RSS" in line for line in lines.values())


def test_the_device_sets_are_the_cpu_each_gpu_and_all_gpus():
    assert list(selftest.device_sets(0)) == ["cpu", "cpu:2"]
    assert list(selftest.device_sets(1)) == ["cpu", "gpu:0"]
    sets = selftest.device_sets(2)
    assert list(sets) == ["cpu", "gpu:0", "gpu:1", "gpu:0,1"] and [d.device_id for d in sets["gpu:0,1"]] == [0, 1]


def run_selftest(capsys):
    """`selftest.main()`'s exit status and printed text."""
    status = selftest.main()
    return status, capsys.readouterr().out


def test_a_device_whose_weights_drift_is_caught(monkeypatch, capsys):
    from nli import train
    apply_update = train.apply_update

    def drifting_update(trainer, params, devices, *args, **kwargs):  # a stale or corrupted copy on the 2nd device
        norm = apply_update(trainer, params, devices, *args, **kwargs)
        if len(devices) > 1:
            weight = next(iter(params.values())).data(devices[1])
            weight[:] = weight + 1e-3
        return norm
    monkeypatch.setattr(train, "apply_update", drifting_update)
    status, out = run_selftest(capsys)
    assert status == 1 and "test passed" not in out
    assert "problem: cpu:2: after update 1:" in out and "differs between devices by up to 0.001" in out
    assert "after update 0" not in out and out.count("after update 1:") == 1  # once per update, not per device
    assert "loss" not in out.split("problem:", 1)[1]  # LayerNorm hides this drift from the loss: only weights show it
    assert "problem: cpu:" not in out.split("problem: cpu:2")[0]  # one device alone cannot drift


def test_weights_that_never_change_and_a_failing_run_are_problems(monkeypatch, capsys):
    monkeypatch.setattr(selftest.train, "apply_update", lambda *args, **kwargs: None)  # updates that get lost
    status, out = run_selftest(capsys)
    assert status == 1 and "problem: cpu: the weights did not change in 1 updates" in out

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA: out of memory")
    monkeypatch.setattr(selftest.train, "finetune", out_of_memory)
    status, out = run_selftest(capsys)
    assert status == 1 and "problem: cpu:2: fine-tuning failed: RuntimeError: CUDA: out of memory" in out


def test_losses_further_apart_than_the_tolerance_are_a_problem():
    cpu = selftest.Result("cpu", step_losses=[1.1, 1.0])
    near = selftest.Result("gpu:0", step_losses=[1.1 * (1 + selftest.LOSS_RTOL / 2), 1.0])
    far = selftest.Result("gpu:1", step_losses=[1.1, 1.0 * (1 + 2 * selftest.LOSS_RTOL)])
    short = selftest.Result("gpu:0,1", step_losses=[1.1])
    assert selftest.compare([cpu, near]) == []
    [problem] = selftest.compare([cpu, near, far])
    assert problem.startswith("gpu:1: update 2's loss 1.002000 differs from cpu's 1.000000")
    assert selftest.compare([cpu, short]) == ["gpu:0,1: 1 updates, cpu: 2"]
    assert selftest.largest_difference([cpu, near]) == pytest.approx(selftest.LOSS_RTOL / 2)
