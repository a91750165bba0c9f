"""Started by ``moeplace sglang-launch`` in every process of the SGLang server (this folder is put first on
PYTHONPATH): installs moeplace's EPLB policy when SGLang's EPLB module is imported, then runs any other
``sitecustomize`` the environment has. Never raises: a failure leaves SGLang's own policy in charge."""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
try:
    from placement.sglang_policy import install_import_hook

    install_import_hook()
except Exception as _exc:  # noqa: BLE001 - never take a server process down
    sys.stderr.write(f"moeplace: EPLB policy hook not installed ({type(_exc).__name__}: {_exc}); SGLang keeps its "
                     f"own EPLB algorithm\n")

_mine = sys.modules.pop("sitecustomize", None)
try:
    _spec = importlib.machinery.PathFinder.find_spec(
        "sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _HERE])
    if _spec is not None and _spec.loader is not None:
        _other = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_other)
finally:
    if _mine is not None:
        sys.modules["sitecustomize"] = _mine
