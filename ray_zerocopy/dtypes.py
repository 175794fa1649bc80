"""Mapping between torch dtypes and the arena's dtype codes (docs/format.md)."""

from __future__ import annotations

import torch

from . import _zc

TORCH_TO_CODE: dict[torch.dtype, int] = {}
CODE_TO_TORCH: dict[int, torch.dtype] = {}

for _name, _code in _zc.DTYPE_CODES.items():
    _dt = getattr(torch, _name, None)  # the arena's dtype names are torch's
    if isinstance(_dt, torch.dtype):
        TORCH_TO_CODE[_dt] = _code
        CODE_TO_TORCH[_code] = _dt


def code_of(dtype: torch.dtype) -> int | None:
    """Returns the arena code of a torch dtype, or None if the arena cannot hold it."""
    return TORCH_TO_CODE.get(dtype)


def torch_dtype(code: int) -> torch.dtype:
    """Returns the torch dtype of an arena code.

    Raises:
        ArenaError-compatible ValueError if this torch build lacks the dtype.
    """
    try:
        return CODE_TO_TORCH[code]
    except KeyError:
        name = _zc.dtype_name(code) if code in _zc.DTYPE_CODES.values() else "unknown"
        raise _zc.ArenaError(
            f"dtype code {code} ({name}) is not available in torch {torch.__version__}"
        ) from None
