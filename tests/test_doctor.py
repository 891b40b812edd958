"""`nli doctor`: its advice, fed the facts of machines we do not have, and a real run on this one."""
import ctypes.util
import functools
import http.server
import os
import shutil
import sys
import threading

import pytest

from conftest import QuietHandler, closed_port, run_cli
from nli import compat, doctor

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
    assert advice_for(driver_cuda="12.2", features={"CUDA": True}) == []  # a CUDA build: nothing to say


def test_missing_cudnn_8_beside_cudnn_9_gets_the_pypi_package_nli_loads():
    error = "OSError: libcudnn.so.8: cannot open shared object file: No such file or directory"
    facts = dict(mxnet=None, mxnet_error=error, features={}, driver_cuda="12.2",
                 missing_libraries=doctor.missing_libraries(error))
    assert "libcudnn.so.8" in facts["missing_libraries"]
    problems = dict(advice_for(**facts))
    fix = problems["libmxnet.so needs libcudnn.so.8, which this machine does not have."]
    assert "pip install nvidia-cudnn-cu11==8.9.6.50" in fix and "no LD_LIBRARY_PATH" in fix
    assert not any("CPU-only" in p for p in problems)  # mxnet did not import: its build is unknown


def test_unsupported_python_and_numpy_2_are_named_with_their_fix():
    [(problem, fix)] = advice_for(python=(3, 10, 13))
    assert "Python 3.10.13" in problem and "3.11" in fix
    [(problem, fix)] = advice_for(numpy="2.1.0")
    assert "numpy 2.1.0" in problem and "numpy<2" in fix
    [(problem, fix)] = advice_for(mxnet=None, mxnet_error="ModuleNotFoundError: No module named 'mxnet'")
    assert "No module named 'mxnet'" in problem and "requirements.txt" in fix


def test_cuda_libraries_from_pypi_packages_are_loaded_before_mxnet(tmp_path):
    real = ctypes.util.find_library("z")  # any real shared library stands in for libcudnn.so.8
    if real is None:
        pytest.skip("no libz on this machine to stand in for a CUDA library")
    source = next(os.path.join(d, real) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                                                  "/lib64", "/usr/lib64", "/lib", "/usr/lib")
                  if os.path.exists(os.path.join(d, real)))
    lib = tmp_path / "nvidia" / "cudnn" / "lib"
    lib.mkdir(parents=True)
    shutil.copy(source, lib / "libcudnn.so.8")
    (lib / "libunrelated.so.12").write_bytes(b"not a library")  # not a name mxnet needs: left alone
    assert compat.load_cuda_libraries([str(tmp_path)]) == [str(lib / "libcudnn.so.8")]
    assert compat.load_cuda_libraries([str(tmp_path / "elsewhere")]) == []


def doctor_env(tmp_path, **variables):
    """An environment whose caches are in tmp_path: the data dir, and the Hugging Face cache."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "NLI_MIRROR", "NLI_HUB_MANIFEST"))}
    return {**env, "NLI_DATA_DIR": str(tmp_path / "data"), "HF_HOME": str(tmp_path / "hf"), **variables}


def test_doctor_runs_on_this_cpu_machine_and_reports_no_gpu(tmp_path):
    result = run_cli("doctor", env=doctor_env(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr  # hosts out of reach are no problem of this machine
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert f"Python     {'.'.join(map(str, sys.version_info[:3]))}" in out
    assert "mxnet      1.9.1" in out and "MKLDNN on" in out and "cpu (" in out
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
