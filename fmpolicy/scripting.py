"""Loading one script of `scripts/` from another (or from a test) without touching `sys.path`.

Scripts are not a package. Putting `scripts/` on `sys.path` to import a sibling would let any module
named like a script (`train`, `evaluate`, ...) shadow a library module for the rest of the process;
loading the file under a private module name does not.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType


def load_script(name: str, directory: str | Path) -> ModuleType:
    """`<directory>/<name>.py` as a fresh module (`fmpolicy_scripts.<name>`), to call its `main(argv)` or
    its functions."""
    key = f"fmpolicy_scripts.{name}"
    path = Path(directory) / f"{name}.py"
    spec = importlib.util.spec_from_file_location(key, path)
    if spec is None or not path.is_file():
        raise FileNotFoundError(f"no script {name!r}: {path} does not exist")
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # registered: dataclasses and pickling look a class's module up by name
    spec.loader.exec_module(module)
    return module
