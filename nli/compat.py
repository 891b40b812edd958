"""Repairs that let MXNet 1.9.1, retired upstream, import on the Pythons and numpys people have today.

Imported by `nli/__init__.py`, so before any module of the package imports mxnet.
"""
import sys
import warnings

import numpy

# numpy 1.24 removed the aliases of Python's builtins (np.bool, np.int, ...), which mxnet 1.9.1 still
# uses when it is imported (apache/mxnet#21165, open upstream). Put back only those that are missing,
# as the builtins they were; numpy 1.23.5 still has them, and is left as it is. Asking numpy 1.26
# whether a name exists warns about its future meaning: that question is ours, so its warning is not.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for _name, _builtin in (("bool", bool), ("int", int), ("float", float), ("object", object),
                            ("complex", complex), ("str", str)):
        if not hasattr(numpy, _name):
            setattr(numpy, _name, _builtin)

# Python 3.12 removed distutils, which mxnet imports; setuptools provides it again.
if sys.version_info >= (3, 12):
    try:
        import setuptools  # noqa: F401
    except ImportError:
        raise ImportError("mxnet 1.9.1 imports distutils, which Python 3.12 removed: "
                          "`pip install setuptools` puts it back.") from None


# The CUDA 11 libraries that mxnet-cu117 (1.9.1) links to, and the PyPI package that ships each: the releases of
# CUDA 11.7, the CUDA it was built with (cuDNN 8 and NCCL 2 keep their ABI within a major version, so the newest
# cuDNN 8 and an NCCL of CUDA 11.7's time). docs/gpus.md says which of this was checked and how.
CUDA_LIBRARY_PACKAGES = {"libcudart.so.11.0": "nvidia-cuda-runtime-cu11==11.7.99",
                         "libcublas.so.11": "nvidia-cublas-cu11==11.10.3.66",
                         "libcublasLt.so.11": "nvidia-cublas-cu11==11.10.3.66",
                         "libcufft.so.10": "nvidia-cufft-cu11==10.7.2.91",
                         "libcurand.so.10": "nvidia-curand-cu11==10.2.10.91",
                         "libcusolver.so.11": "nvidia-cusolver-cu11==11.4.0.1",
                         "libcusparse.so.11": "nvidia-cusparse-cu11==11.7.4.91",
                         "libnvrtc.so.11.2": "nvidia-cuda-nvrtc-cu11==11.7.99",
                         "libnccl.so.2": "nvidia-nccl-cu11==2.14.3",
                         "libcudnn.so.8": "nvidia-cudnn-cu11==8.9.6.50"}
# Besides those: the parts cuDNN 8 and NVRTC open by name at run time, from their own package's folder.
RUNTIME_PARTS = ("libcudnn_*.so.8", "libnvrtc-builtins.so.*")


def cuda11_library_files(search_path=None):
    """(path, intact) of each library the nvidia-*-cu11 packages installed on `search_path` (default sys.path)
    ship for mxnet: the files their RECORD lists, not whatever lies in the same folder.

    CUDA 12's packages (torch's nvidia-*-cu12) install into the same site-packages/nvidia/<name>/lib/ folders,
    and three of their libraries have CUDA 11's names: libnccl.so.2, libcurand.so.10, libcusolver.so.11. A file
    whose size is not the one the cu11 package's RECORD gives was overwritten by another package: not intact.
    """
    import fnmatch
    import glob
    import importlib.metadata
    import os
    folders = search_path or sys.path
    if not any(glob.glob(os.path.join(folder or ".", "nvidia", "*", "lib")) for folder in folders):
        return []  # no nvidia-* package at all (a CPU machine): the metadata is not read
    patterns = [*CUDA_LIBRARY_PACKAGES, *RUNTIME_PARTS]
    packages = sorted({package.split("==")[0] for package in CUDA_LIBRARY_PACKAGES.values()})
    found = {}
    for package in packages:
        for dist in importlib.metadata.distributions(name=package, path=list(folders)):
            for file in dist.files or ():
                if any(fnmatch.fnmatch(file.name, pattern) for pattern in patterns):
                    path = str(dist.locate_file(file))
                    if os.path.exists(path):
                        found.setdefault(path, file.size is None or os.path.getsize(path) == file.size)
    return sorted(found.items())


def load_cuda_libraries(search_path=None):
    """Load the CUDA 11 libraries that PyPI's nvidia-*-cu11 packages ship, so libmxnet.so finds them.

    mxnet's CUDA builds link to e.g. libcudnn.so.8; a machine with only cuDNN 9 (as Colab has) cannot
    start them. `pip install nvidia-cudnn-cu11` puts the library in site-packages/nvidia/cudnn/lib/,
    where the dynamic linker does not look: loaded here first (globally), it serves mxnet's request.
    Only the cu11 packages' own, intact files are loaded (see `cuda11_library_files`): never a CUDA 12 one.
    Returns the paths loaded; nothing is loaded where no such package is installed (a CPU machine).
    Not verified on a GPU here (the project's machines have none).
    """
    import ctypes
    pending = [path for path, intact in cuda11_library_files(search_path) if intact]
    loaded = []
    while pending:  # a library whose dependency is not loaded yet is tried again after it
        failed = []
        for path in pending:
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                loaded.append(path)
            except OSError:
                failed.append(path)
        if len(failed) == len(pending):
            break  # doctor reports what libmxnet.so still misses
        pending = failed
    return loaded


load_cuda_libraries()
