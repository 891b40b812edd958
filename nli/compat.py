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
