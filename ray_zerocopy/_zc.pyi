"""Partial type stub for the C extension ``ray_zerocopy._zc`` (csrc/ext/).

Declares the exceptions and the module constants; the functions and the Mapping, Span, Pool and
TensorIds types are not typed yet and resolve to ``Any`` through ``__getattr__``. Without a stub
mypy cannot find the compiled module, and in the package's import cycle reports a spurious
``no-redef`` on ``from . import _zc``.
"""

from typing import Any

class ZeroCopyError(Exception): ...

class ArenaError(ZeroCopyError, ValueError):
    code: int | None
    code_name: str | None

FORMAT_VERSION: int
HEADER_SIZE: int
STORAGE_ALIGN: int
DATA_ALIGN: int
MAX_NDIM: int
MAX_NAME: int
KIND_PARAMETER: int
KIND_BUFFER: int
KIND_OTHER: int
TFLAG_PERSISTENT: int
TFLAG_REQUIRES_GRAD: int
FLAG_NO_DATA_CRC: int
FILE_HEADER_SIZE: int
FILE_ARENA_ALIGN: int

ZC_EINVAL: int
ZC_ETRUNCATED: int
ZC_EMAGIC: int
ZC_EVERSION: int
ZC_EHEADER: int
ZC_EMANIFEST: int
ZC_ESTORAGE: int
ZC_ETENSOR: int
ZC_ECHECKSUM: int
ZC_EOVERFLOW: int
ZC_ENOMEM: int
ZC_ETOOBIG: int
ZC_ENODATACRC: int

COPY_PLAIN: int
COPY_NT: int
COPY_AUTO: int
POOL_MAX_THREADS: int

#: dtype name -> dtype code (1..ZC_DT_MAX_).
DTYPE_CODES: dict[str, int]

def __getattr__(name: str) -> Any: ...
