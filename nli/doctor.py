"""`nli doctor`: what this machine gives MXNet, and the fix for every known problem it finds.

Facts are gathered first (`gather_facts`), then judged (`advice`), so the advice can be tested by
feeding it the facts of machines we do not have: GPUs, Colab, other Pythons.
"""
import concurrent.futures
import ctypes
import dataclasses
import importlib.metadata
import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys

from .compat import CUDA_LIBRARY_PACKAGES, cuda11_library_files
from .errors import first_line

SUPPORTED_PYTHONS = ((3, 11), (3, 12), (3, 13))
# mxnet 1.9.1's CUDA builds on PyPI, by the CUDA version each was built for. A driver runs programs
# built for its own CUDA version and older ones, so the newest build the driver supports is the one.
MXNET_CUDA_BUILDS = {(10, 1): "mxnet-cu101", (10, 2): "mxnet-cu102", (11, 0): "mxnet-cu110",
                     (11, 1): "mxnet-cu111", (11, 2): "mxnet-cu112", (11, 3): "mxnet-cu113",
                     (11, 4): "mxnet-cu114", (11, 5): "mxnet-cu115", (11, 6): "mxnet-cu116",
                     (11, 7): "mxnet-cu117"}
FEATURES = ("CUDA", "CUDNN", "NCCL", "MKLDNN", "OPENMP", "BLAS_OPEN", "BLAS_MKL", "DIST_KVSTORE")
OMP_VARIABLES = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "MXNET_USE_OPERATOR_TUNING", "MXNET_CPU_WORKER_NTHREADS",
                 "KMP_AFFINITY")
OFFLINE_ROUTES = (" (without them: --model hf:DIR or hf:ORG/NAME from the Hugging Face cache; the repository's SNLI "
                  "pairs with --pairs FILE or --train FILE --test-fraction 0.2)")
DRIVER_LIBRARY = "libcuda.so.1"  # the CUDA driver's own library: it comes with the NVIDIA driver, not from PyPI


@dataclasses.dataclass
class Facts:
    """What `nli doctor` looks at: versions, MXNet's build, GPUs, OpenMP settings, the download caches and hosts."""
    python: tuple
    numpy: str = None  # None: numpy does not import
    mxnet: str = None  # None: mxnet does not import, see mxnet_error
    mxnet_error: str = None
    mxnet_package: str = None  # the installed distribution: mxnet, mxnet-cu117, ...; None: built from source
    features: dict = dataclasses.field(default_factory=dict)  # MXNet build feature -> enabled
    devices: list = dataclasses.field(default_factory=list)  # what MXNet can compute on
    driver_cuda: str = None  # the CUDA version the NVIDIA driver supports, from nvidia-smi; None: no GPU
    cuda_visible_devices: str = None  # the variable, which can hide every GPU from CUDA
    gpu_count_error: str = None  # why MXNet could not count the GPUs, when it could not
    gpu_errors: dict = dataclasses.field(default_factory=dict)  # GPU -> why a small operation on it failed
    unresolved_libraries: list = dataclasses.field(default_factory=list)  # what ldd or the import could not find
    loaded_libraries: list = dataclasses.field(default_factory=list)  # of those, loaded or loadable all the same
    replaced_libraries: list = dataclasses.field(default_factory=list)  # cu11 packages' files another overwrote
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
                  cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"),
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
        facts.mxnet_package = mxnet_package(facts.features.get("CUDA"))
        try:
            gpus = [mx.gpu(i) for i in range(mx.context.num_gpus())]
        except mx.MXNetError as e:  # a driver too old for the build, in some MXNet versions
            gpus, facts.gpu_count_error = [], first_line(e)
        facts.devices = [str(gpu) for gpu in gpus] + [f"cpu ({os.cpu_count()} cores)"]
        facts.gpu_errors = {str(gpu): error for gpu in gpus if (error := device_error(gpu))}
    facts.unresolved_libraries = unresolved_libraries(facts.mxnet_error)
    mapped = mapped_library_names()
    facts.loaded_libraries = [name for name in facts.unresolved_libraries if name in mapped or loadable(name)]
    facts.replaced_libraries = [path for path, intact in cuda11_library_files() if not intact]
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


def mxnet_package(cuda):
    """The distribution mxnet was installed from (mxnet, mxnet-cu117, ...), or None (built from source). Where a
    CUDA build was installed over the CPU one, both are listed: `cuda` (the build's feature) tells which is in use."""
    for name in (reversed(MXNET_CUDA_BUILDS.values()) if cuda else ("mxnet", "mxnet-native")):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        return name
    return None


def unresolved_libraries(import_error=None):
    """Shared libraries libmxnet.so needs that the dynamic linker alone does not find (from the import error and
    ldd). ldd does not see what nli/compat.py loads before mxnet: `loaded_libraries` says which of these are there."""
    missing = set(re.findall(r"(lib[\w.+-]+\.so[\d.]*): cannot open shared object file", import_error or ""))
    spec = importlib.util.find_spec("mxnet")
    library = spec and os.path.join(spec.submodule_search_locations[0], "libmxnet.so")
    if library and os.path.exists(library) and shutil.which("ldd"):
        out = subprocess.run(["ldd", library], capture_output=True, text=True).stdout
        missing.update(re.findall(r"^\s*(\S+) => not found", out, re.MULTILINE))
    return sorted(missing)


def mapped_library_names(maps="/proc/self/maps"):
    """The file names of the libraries this process has loaded (Linux's /proc/self/maps; empty elsewhere)."""
    try:
        with open(maps, encoding="utf-8", errors="replace") as f:
            return {os.path.basename(line.split(None, 5)[5].strip()) for line in f if len(line.split(None, 5)) == 6}
    except OSError:
        return set()


def loadable(name):
    """Whether the dynamic linker can load library `name` in this process, or has (a library loaded by path, as
    nli/compat.py loads them, answers to its soname)."""
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def device_error(device):
    """Why a small matrix product (cuBLAS's, on a GPU) fails or is wrong on `device`; None when it is right.
    Run here on the CPU only; on a GPU not verified."""
    import mxnet as mx
    try:
        ones = mx.nd.ones((64, 64), ctx=device)
        product = mx.nd.dot(ones, ones).asnumpy()
    except Exception as e:  # a CUDA error, an architecture the build has no kernels for, a missing library
        return f"{type(e).__name__}: {first_line(e)}"
    return None if (product == 64).all() else f"64 x 64 ones times themselves gave {product.min()}..{product.max()}"


def cuda_of(package):
    """The CUDA version (major, minor) an mxnet build was made for ("mxnet-cu117" -> (11, 7)), or None."""
    return next((cuda for cuda, build in MXNET_CUDA_BUILDS.items() if build == package), None)


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
    missing = [name for name in facts.unresolved_libraries if name not in facts.loaded_libraries]
    if facts.mxnet is None and not missing:
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
    found += driver_advice(facts)
    for device, error in facts.gpu_errors.items():
        found.append((f"A small matrix product on {device} failed: {error}",
                      "Run `nvidia-smi` (is the GPU there, and idle?); `nli doctor` lists the CUDA 11 libraries "
                      "still missing; a GPU older than Maxwell (compute capability 5.0) has no kernels in "
                      "mxnet-cu117."))
    for path in facts.replaced_libraries:
        found.append((f"{path} is not the file its nvidia-*-cu11 package installed: another package (a CUDA 12 "
                      f"one, as torch's) wrote over it, so nli does not load it.",
                      "Use a virtualenv for mxnet apart from torch's CUDA 12 packages, and pip install "
                      "--force-reinstall the cu11 package there (docs/gpus.md)."))
    for library in missing:
        package = CUDA_LIBRARY_PACKAGES.get(library)
        if library == DRIVER_LIBRARY:
            fix = (f"It comes with the NVIDIA driver: install the driver; on a machine without an NVIDIA GPU, "
                   f"install the CPU build instead: pip uninstall -y {facts.mxnet_package or 'mxnet-cu117'} && "
                   f"pip install mxnet==1.9.1.")
        elif package:
            fix = (f"pip install {package}: nli loads {library} from that package before mxnet, so "
                   f"no LD_LIBRARY_PATH is needed (a system's newer cuDNN 9 or CUDA 12 does not serve).")
        else:
            fix = "Install the system package that provides it, or put its folder on LD_LIBRARY_PATH."
        found.append((f"libmxnet.so needs {library}, which this machine does not have.", fix))
    return found


def driver_advice(facts):
    """What a CUDA build of mxnet needs from the driver, when it sees no GPU or its driver is older than its CUDA.

    A driver of an older major CUDA version cannot run the build: depending on the MXNet version, counting the
    GPUs then gives 0 (so `--devices auto` would train on the CPU) or fails (Context::GetGPUCount in MXNet's
    include/mxnet/base.h). An older minor version of CUDA 11 runs it (CUDA's minor version compatibility), but
    not the PTX that MXNet compiles at run time with NVRTC, which needs a driver as new as the build.
    Written from CUDA's and MXNet's documentation and sources; not verified on a GPU."""
    gpus = [d for d in facts.devices if d.startswith("gpu")]
    if facts.mxnet is None or not facts.features.get("CUDA"):
        return []
    package = facts.mxnet_package or "this CUDA build of mxnet"
    if facts.driver_cuda is None:
        return [(f"mxnet is a CUDA build ({package}), but there is no NVIDIA driver (no nvidia-smi): MXNet sees no "
                 f"GPU and trains on the CPU.",
                 "On a GPU machine, install the NVIDIA driver; on a machine without one, the CPU build is smaller: "
                 f"pip uninstall -y {facts.mxnet_package or 'mxnet-cu117'} && pip install mxnet==1.9.1.")]
    built_for = cuda_of(facts.mxnet_package)
    driver = tuple(int(x) for x in facts.driver_cuda.split(".")[:2])
    counted = f" (counting them failed: {facts.gpu_count_error})" if facts.gpu_count_error else ""
    if built_for and driver < built_for:
        build = mxnet_build_for(facts.driver_cuda)
        fix = "Update the NVIDIA driver" + (f", or install the build for this driver: pip uninstall -y "
                                            f"{facts.mxnet_package} && pip install {build}==1.9.1" if build else "")
        cuda = ".".join(map(str, built_for))
        if driver[0] < built_for[0] or not gpus:
            return [(f"The NVIDIA driver supports CUDA {facts.driver_cuda}, older than the CUDA {cuda} that "
                     f"{package} was built for: MXNet sees no GPU{counted}, so training would run on the CPU.",
                     fix + ".")]
        return [(f"The NVIDIA driver supports CUDA {facts.driver_cuda}, older than the CUDA {cuda} that {package} "
                 f"was built for: CUDA 11 runs it, but not the kernels MXNet compiles at run time (NVRTC).",
                 fix + ".")]
    if gpus:
        return []
    if facts.cuda_visible_devices is not None:
        return [(f"MXNet sees no GPU{counted}, and CUDA_VISIBLE_DEVICES={facts.cuda_visible_devices!r} chooses which "
                 f"GPUs CUDA shows.", "Unset it, or list the GPUs to use (CUDA_VISIBLE_DEVICES=0,1).")]
    return [(f"mxnet is a CUDA build ({package}) and the driver supports CUDA {facts.driver_cuda}, but MXNet sees "
             f"no GPU{counted}.", "Check that `nvidia-smi` lists a GPU and that this process may use it (in a "
                                  "container: docker run --gpus all).")]


def report(facts, found):
    """The doctor's text: the facts, then each problem with its fix (or that none was found)."""
    lines = [f"Python     {'.'.join(map(str, facts.python))} ({platform.platform()})",
             f"numpy      {facts.numpy or 'does not import'}",
             "mxnet      " + (f"{facts.mxnet} ({facts.mxnet_package or 'built from source'})" if facts.mxnet
                                  else f"does not import: {facts.mxnet_error}")]
    if facts.features:
        lines.append("build      " + ", ".join(f"{name} {'on' if on else 'off'}"
                                               for name, on in facts.features.items()))
    lines.append(f"devices    {', '.join(facts.devices) or 'none (mxnet does not import)'}")
    gpu = f"NVIDIA driver for CUDA {facts.driver_cuda}" if facts.driver_cuda else "none found (no nvidia-smi)"
    lines.append(f"GPU        {gpu}")
    gpus = [d for d in facts.devices if d.startswith("gpu")]
    if gpus:
        lines.append("GPU check  " + ", ".join(f"{d} {'failed' if d in facts.gpu_errors else 'ok'}" for d in gpus))
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


def main(test=False):
    """Print the report, then with `test` run `nli doctor --test` (nli/selftest.py) where mxnet imports; exit status
    1 when a problem was found or the test failed."""
    facts = gather_facts()
    found = advice(facts)
    print(report(facts, found), flush=True)
    failed = False
    if test and facts.mxnet is not None:
        from . import selftest
        failed = selftest.main() != 0
    return 1 if found or failed else 0
