"""`nli doctor`: what this machine gives MXNet, and the fix for every known problem it finds.

Facts are gathered first (`gather_facts`), then judged (`advice`), so the advice can be tested by
feeding it the facts of machines we do not have: GPUs, Colab, other Pythons.
"""
import concurrent.futures
import dataclasses
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

from .compat import CUDA_LIBRARY_PACKAGES

SUPPORTED_PYTHONS = ((3, 11), (3, 12), (3, 13))
# mxnet 1.9.1's CUDA builds on PyPI, by the CUDA version each was built for. A driver runs programs
# built for its own CUDA version and older ones, so the newest build the driver supports is the one.
MXNET_CUDA_BUILDS = {(10, 1): "mxnet-cu101", (10, 2): "mxnet-cu102", (11, 0): "mxnet-cu110",
                     (11, 1): "mxnet-cu111", (11, 2): "mxnet-cu112", (11, 3): "mxnet-cu113",
                     (11, 4): "mxnet-cu114", (11, 5): "mxnet-cu115", (11, 6): "mxnet-cu116",
                     (11, 7): "mxnet-cu117"}
FEATURES = ("CUDA", "CUDNN", "NCCL", "MKLDNN", "OPENMP", "BLAS_OPEN", "BLAS_MKL", "DIST_KVSTORE")
OMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MXNET_CPU_WORKER_NTHREADS", "KMP_AFFINITY")
OFFLINE_ROUTES = (" (without them: --model hf:DIR or hf:ORG/NAME from the Hugging Face cache; the repository's SNLI "
                  "pairs with --pairs FILE or --train FILE --test-fraction 0.2)")


@dataclasses.dataclass
class Facts:
    """What `nli doctor` looks at: versions, MXNet's build, GPUs, OpenMP settings, the download caches and hosts."""
    python: tuple
    numpy: str = None  # None: numpy does not import
    mxnet: str = None  # None: mxnet does not import, see mxnet_error
    mxnet_error: str = None
    features: dict = dataclasses.field(default_factory=dict)  # MXNet build feature -> enabled
    devices: list = dataclasses.field(default_factory=list)  # what MXNet can compute on
    driver_cuda: str = None  # the CUDA version the NVIDIA driver supports, from nvidia-smi; None: no GPU
    missing_libraries: list = dataclasses.field(default_factory=list)  # libraries libmxnet.so cannot find
    omp: dict = dataclasses.field(default_factory=dict)
    data_dir: str = ""
    cached: list = dataclasses.field(default_factory=list)  # (name, state, size in bytes or None)
    hosts: list = dataclasses.field(default_factory=list)  # (host the registry downloads from, hub.reach's words)
    hf_cache: str = None  # the Hugging Face cache `--model hf:ORG/NAME` reads; None: huggingface_hub does not import
    hf_models: list = dataclasses.field(default_factory=list)  # the models in it
    hf_offline: bool = False


def gather_facts():
    """The facts of this machine and this Python."""
    facts = Facts(python=tuple(sys.version_info[:3]), driver_cuda=driver_cuda_version(),
                  omp={name: os.environ.get(name) for name in OMP_VARIABLES})
    try:
        import numpy
        facts.numpy = numpy.__version__
        import mxnet as mx
    except Exception as e:  # what goes wrong here is what the doctor is for
        facts.mxnet_error = f"{type(e).__name__}: {e}"
    else:
        facts.mxnet = mx.__version__
        runtime = mx.runtime.Features()
        facts.features = {name: runtime.is_enabled(name) for name in FEATURES if name in runtime}
        facts.devices = [f"gpu({i})" for i in range(mx.context.num_gpus())] + [f"cpu ({os.cpu_count()} cores)"]
    facts.missing_libraries = missing_libraries(facts.mxnet_error)
    from . import hub
    facts.data_dir = hub.data_dir()
    facts.cached = [(name, state, size) for name, _, size, state in hub.status()]
    hosts = hub.download_hosts()
    with concurrent.futures.ThreadPoolExecutor(max(len(hosts), 1)) as pool:  # one timeout for all, not one each
        facts.hosts = list(zip(hosts, pool.map(hub.reach, hosts.values())))
    facts.hf_cache, facts.hf_models, facts.hf_offline = hugging_face_cache()
    return facts


def hugging_face_cache():
    """(the Hugging Face cache's folder, the models in it, whether HF_HUB_OFFLINE is set); (None, [], False) when
    huggingface_hub does not import."""
    try:
        import huggingface_hub
    except ImportError:
        return None, [], False
    try:
        repos = huggingface_hub.scan_cache_dir().repos
    except (huggingface_hub.CacheNotFound, ValueError):  # no cache yet, or HF_HUB_CACHE names a file
        repos = []
    models = sorted(repo.repo_id for repo in repos if repo.repo_type == "model")
    return huggingface_hub.constants.HF_HUB_CACHE, models, huggingface_hub.is_offline_mode()


def driver_cuda_version():
    """The CUDA version the NVIDIA driver supports ("12.2"), from nvidia-smi; None without a driver."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"CUDA Version:\s*(\d+\.\d+)", out)
    return match.group(1) if match else None


def missing_libraries(import_error=None):
    """Shared libraries libmxnet.so needs and the dynamic linker cannot find (from ldd and the import error)."""
    missing = set(re.findall(r"(lib[\w.+-]+\.so[\d.]*): cannot open shared object file", import_error or ""))
    spec = importlib.util.find_spec("mxnet")
    library = spec and os.path.join(spec.submodule_search_locations[0], "libmxnet.so")
    if library and os.path.exists(library) and shutil.which("ldd"):
        out = subprocess.run(["ldd", library], capture_output=True, text=True).stdout
        missing.update(re.findall(r"^\s*(\S+) => not found", out, re.MULTILINE))
    return sorted(missing)


def mxnet_build_for(driver_cuda):
    """The mxnet 1.9.1 CUDA build for a driver's CUDA version ("12.2" -> mxnet-cu117), or None if too old."""
    version = tuple(int(x) for x in driver_cuda.split(".")[:2])
    fitting = [cuda for cuda in MXNET_CUDA_BUILDS if cuda <= version]
    return MXNET_CUDA_BUILDS[max(fitting)] if fitting else None


def advice(facts):
    """(problem, fix) for each known problem in `facts`; empty when none is found."""
    found = []
    if facts.python[:2] not in SUPPORTED_PYTHONS:
        found.append((f"Python {'.'.join(map(str, facts.python))} is not one nli supports (3.11, 3.12, 3.13).",
                      "Make a virtualenv with Python 3.11 (the book's), 3.12 or 3.13 and install nli there."))
    if facts.numpy is not None and int(facts.numpy.split(".")[0]) >= 2:
        found.append((f"numpy {facts.numpy}: mxnet 1.9.1 is built against numpy 1 and fails with numpy 2.",
                      "pip install 'numpy<2' (1.23.5 on Python 3.11, 1.26.4 on 3.12 and 3.13)."))
    if facts.mxnet is None and not facts.missing_libraries:
        found.append((f"mxnet does not import ({facts.mxnet_error}).",
                      "pip install -r requirements.txt in a virtualenv (mxnet==1.9.1, numpy<2, and setuptools "
                      "on Python 3.12+)."))
    cpu_only_mxnet = facts.mxnet is not None and not facts.features.get("CUDA")
    if facts.driver_cuda and cpu_only_mxnet:
        build = mxnet_build_for(facts.driver_cuda)
        if build:
            fix = (f"pip uninstall -y mxnet && pip install {build}==1.9.1, then "
                   f"`nli doctor` again: it tells which CUDA 11 libraries are still missing.")
        else:
            fix = f"Update the NVIDIA driver: its CUDA {facts.driver_cuda} is older than any mxnet 1.9.1 build (10.1)."
        found.append((f"An NVIDIA GPU (driver for CUDA {facts.driver_cuda}) but a CPU-only mxnet: "
                      f"training would not use the GPU.", fix))
    for library in facts.missing_libraries:
        package = CUDA_LIBRARY_PACKAGES.get(library)
        if package:
            fix = (f"pip install {package}: nli loads {library} from that package before mxnet, so "
                   f"no LD_LIBRARY_PATH is needed (a system's newer cuDNN 9 or CUDA 12 does not serve).")
        else:
            fix = "Install the system package that provides it, or put its folder on LD_LIBRARY_PATH."
        found.append((f"libmxnet.so needs {library}, which this machine does not have.", fix))
    return found


def report(facts, found):
    """The doctor's text: the facts, then each problem with its fix (or that none was found)."""
    lines = [f"Python     {'.'.join(map(str, facts.python))} ({platform.platform()})",
             f"numpy      {facts.numpy or 'does not import'}",
             f"mxnet      {facts.mxnet or 'does not import: ' + str(facts.mxnet_error)}"]
    if facts.features:
        lines.append("build      " + ", ".join(f"{name} {'on' if on else 'off'}"
                                               for name, on in facts.features.items()))
    lines.append(f"devices    {', '.join(facts.devices) or 'none (mxnet does not import)'}")
    gpu = f"NVIDIA driver for CUDA {facts.driver_cuda}" if facts.driver_cuda else "none found (no nvidia-smi)"
    lines.append(f"GPU        {gpu}")
    lines.append("OpenMP     " + ", ".join(f"{k}={v}" for k, v in facts.omp.items() if v is not None))
    lines.append(f"data dir   {facts.data_dir}")
    for name, state, size in facts.cached:
        lines.append(f"           {name:<12} {state:<14} {'-' if size is None else f'{size / 2 ** 20:,.1f} MiB'}")
    lines.append("downloads  " + "; ".join(f"{host} {state}" for host, state in facts.hosts)
                 + (OFFLINE_ROUTES if any(not state.startswith("reachable") for _, state in facts.hosts) else ""))
    if facts.hf_cache is None:
        lines.append("HF cache   huggingface_hub does not import: --model hf:ORG/NAME needs it (pip install -r "
                     "requirements.txt)")
    else:
        models = ", ".join(facts.hf_models) if facts.hf_models else "no model yet"
        lines.append(f"HF cache   {facts.hf_cache} (--model hf:ORG/NAME): {models}"
                     + ("; HF_HUB_OFFLINE=1: nothing is downloaded" if facts.hf_offline else ""))
    if not found:
        lines.append("No known problem found.")
    for problem, fix in found:
        lines += [f"problem: {problem}", f"    fix: {fix}"]
    return "\n".join(lines)


def main():
    """Print the report; exit status 1 when a problem was found."""
    facts = gather_facts()
    found = advice(facts)
    print(report(facts, found))
    return 1 if found else 0
