"""Every environment variable bla_tvm reads, in one table, with its default."""

from __future__ import annotations

import os
from pathlib import Path

#: name -> what it sets
VARIABLES = {
    "BLA_TVM_CACHE_DIR": "where compiled kernels are cached (default: $XDG_CACHE_HOME/bla_tvm or ~/.cache/bla_tvm)",
    "BLA_TVM_PREBUILT_DIR": "a folder of kernels built elsewhere, with manifest.json (searched before the cache)",
    "BLA_TVM_RUNTIME_DIR": "folder holding libtvm_runtime.so (default: the installed apache-tvm's lib folder)",
    "BLA_TVM_NO_BUILD": "if set to 1, never compile: a kernel missing from the cache and prebuilt folder is an error",
    "BLA_TVM_TUNING_DIR": "a folder of the user's tuning logs (*.json, searched before the ones shipped in tuning_logs/); "
    "`bla-tvm tune` writes there by default (default: $XDG_CONFIG_HOME/bla_tvm/tuning_logs or "
    "~/.config/bla_tvm/tuning_logs)",
    "BLA_TVM_NO_TUNING": "if set to 1, ignore every tuning log: the default schedules and chunk lengths",
}


def cache_dir() -> Path:
    explicit = os.environ.get("BLA_TVM_CACHE_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "bla_tvm"


def prebuilt_dir() -> Path | None:
    explicit = os.environ.get("BLA_TVM_PREBUILT_DIR")
    return Path(explicit) if explicit else None


def runtime_dir() -> Path | None:
    explicit = os.environ.get("BLA_TVM_RUNTIME_DIR")
    return Path(explicit) if explicit else None


def build_allowed() -> bool:
    return os.environ.get("BLA_TVM_NO_BUILD", "0") != "1"


def tuning_dir() -> Path:
    explicit = os.environ.get("BLA_TVM_TUNING_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "bla_tvm" / "tuning_logs"


def tuning_enabled() -> bool:
    return os.environ.get("BLA_TVM_NO_TUNING", "0") != "1"


#: every variable ``snapshot`` reads: the table's and those their defaults come from
READ = (*VARIABLES, "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "HOME")


#: CPython's dictionary behind os.environ (encoded names to encoded values; os.environ's writes update it), and
#: READ's names encoded for it: os.environ.get raises and catches two KeyErrors per unset name, which made a
#: snapshot 15-160 us of a call's host time on the build machine
_RAW = getattr(os.environ, "_data", None)
_RAW_KEYS = tuple(map(os.environ.encodekey, READ)) if _RAW is not None else ()


def snapshot() -> tuple:
    """The values of every variable this table reads (and the folders they default from), encoded, to key what
    is built from them: a few dictionary lookups (take one per call); building paths from them costs far
    more."""
    if _RAW is None:  # another interpreter's os.environ
        return tuple(map(os.environ.get, READ))
    return tuple(map(_RAW.get, _RAW_KEYS))
