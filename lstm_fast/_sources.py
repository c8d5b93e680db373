"""Where the two folders outside the Python package are found: kernels/ and csrc/.

The repository keeps the Triton kernels (kernels/) and the extension's sources
with their build settings (csrc/, csrc/build_config.py) at its top level. An
install maps them into the package (setup.py's package_dir, from FOLDERS):
kernels/ becomes lstm_fast.kernels and csrc/ lstm_fast._csrc, and an editable
install maps the same names onto the repository's folders. A plain checkout on
sys.path has no such mapping; import_folder() then loads the folder under the
same name. setup.py, the extension's JIT build (_ops.py) and the Triton backend
all find the folders through this module. Standard library only: setup.py loads
this file before the package can be imported.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

# package name -> folder at the repository root
FOLDERS = {"lstm_fast.kernels": "kernels", "lstm_fast._csrc": "csrc"}

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def folder(package: str) -> str | None:
    """The folder holding `package` (a key of FOLDERS), or None when neither the
    package nor the repository's folder is there. LSTM_FAST_CSRC overrides csrc/."""
    if package == "lstm_fast._csrc" and os.environ.get("LSTM_FAST_CSRC"):
        return os.environ["LSTM_FAST_CSRC"]
    if __package__ == "lstm_fast":  # imported as part of the package: an install maps it
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            return list(spec.submodule_search_locations)[0]
    path = os.path.join(_REPO_ROOT, FOLDERS[package])
    return path if os.path.isdir(path) else None


def import_folder(package: str) -> ModuleType:
    """`package` (a key of FOLDERS) as a module, from the install or from the repository."""
    if package in sys.modules:
        return sys.modules[package]
    if __package__ == "lstm_fast":
        try:
            return importlib.import_module(package)
        except ImportError:
            pass
    root = folder(package)
    if root is None:
        raise ImportError(f"{package}: neither installed nor found at {os.path.join(_REPO_ROOT, FOLDERS[package])}")
    return _load(package, os.path.join(root, "__init__.py"), [root])


def build_config() -> ModuleType:
    """csrc/build_config.py: compiler flags, CUDA arch list and the source list."""
    root = folder("lstm_fast._csrc")
    if root is None:
        raise ImportError("the extension's sources (csrc/) are not found: set LSTM_FAST_CSRC to that folder")
    name = "lstm_fast._csrc.build_config"
    if name in sys.modules and os.path.dirname(sys.modules[name].__file__) == os.path.abspath(root):
        return sys.modules[name]
    return _load(name, os.path.join(root, "build_config.py"), None)


def _load(name: str, path: str, search: list[str] | None) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path, submodule_search_locations=search)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
