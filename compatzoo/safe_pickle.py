"""Read user-supplied pickle files (CIFAR-100, revisitop ground truth) without running code.

Some public datasets are only distributed as pickles. ``pickle.load`` can execute
arbitrary code, so these files are read with an unpickler that resolves only plain
containers and numpy array reconstruction; anything else is refused with a clear error.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

from compatzoo.errors import DatasetError

_ALLOWED_GLOBALS = {
    ("builtins", "dict"), ("builtins", "list"), ("builtins", "tuple"), ("builtins", "set"),
    ("builtins", "frozenset"), ("builtins", "bytearray"), ("builtins", "str"),
    ("builtins", "int"), ("builtins", "float"), ("builtins", "bool"), ("builtins", "complex"),
    ("collections", "OrderedDict"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")


def load_data_pickle(path: str | Path, encoding: str = "latin1") -> Any:
    """Load a data-only pickle (containers, strings, numbers, numpy arrays)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"expected a file at {path}, found nothing there")
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, encoding=encoding).load()
    except pickle.UnpicklingError as exc:
        if "truncated" in str(exc):
            raise DatasetError(f"{path} is truncated ({exc}); download it again") from exc
        raise DatasetError(
            f"{path} is not a data-only pickle ({exc}); compatzoo refuses to unpickle "
            "objects other than containers and numpy arrays. Re-export the file with plain "
            "lists/dicts/arrays."
        ) from exc
    except (EOFError, ValueError, TypeError) as exc:
        raise DatasetError(f"{path} is truncated or corrupt ({exc}); download it again") from exc
