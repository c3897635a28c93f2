"""The i386 Linux syscall layer: typed functions grouped by family, registered by name in TABLE."""
from .base import TABLE, EFault, SysError, syscall   # noqa: F401
from . import files, memory, process, signals, time, thread, futex  # noqa: F401  (register the syscalls)
from .numbers import I386, I386_NAMES                 # noqa: F401
