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



# The CUDA 11 libraries that mxnet's CUDA 11 builds link to, and the PyPI packages that ship them.
CUDA_LIBRARY_PACKAGES = {"libcudnn.so.8": "nvidia-cudnn-cu11==8.9.6.50",
                         "libcudart.so.11.0": "nvidia-cuda-runtime-cu11",
                         "libcublas.so.11": "nvidia-cublas-cu11", "libcublasLt.so.11": "nvidia-cublas-cu11",
                         "libcufft.so.10": "nvidia-cufft-cu11", "libcurand.so.10": "nvidia-curand-cu11",
                         "libcusolver.so.11": "nvidia-cusolver-cu11", "libcusparse.so.11": "nvidia-cusparse-cu11",
                         "libnvrtc.so.11.2": "nvidia-cuda-nvrtc-cu11", "libnccl.so.2": "nvidia-nccl-cu11"}


def load_cuda_libraries(search_path=None):
    """Load the CUDA 11 libraries that PyPI's nvidia-*-cu11 packages ship, so libmxnet.so finds them.

    mxnet's CUDA builds link to e.g. libcudnn.so.8; a machine with only cuDNN 9 (as Colab has) cannot
    start them. `pip install nvidia-cudnn-cu11` puts the library in site-packages/nvidia/cudnn/lib/,
    where the dynamic linker does not look: loaded here first (globally), it serves mxnet's request.
    Returns the paths loaded; nothing is loaded where no such package is installed (a CPU machine).
    Not verified on a GPU here (the project's machines have none).
    """
    import ctypes
    import glob
    import os
    names = [*CUDA_LIBRARY_PACKAGES, "libcudnn_*.so.8"]  # cuDNN 8 loads its parts from its own folder
    pending = sorted({path for folder in search_path or sys.path for name in names
                      for path in glob.glob(os.path.join(folder or ".", "nvidia", "*", "lib", name))})
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
