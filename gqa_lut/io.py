"""Files in and out, for every command: names the system can hold, regular files only, capped
reads, JSON with one-line errors, and atomic writes that never leave a half-written or
replaced file (a temporary beside the target, the target's mode kept, stale temporaries of
killed writers removed)."""
from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

from gqa_lut.errors import UsageError


def check_readable(path: str | os.PathLike, what: str, max_bytes: Optional[int] = None) -> Path:
    """A regular file that exists (never a FIFO, a device or a folder: reading those can block
    forever or never end), at most `max_bytes` long; one-line UsageError otherwise."""
    p = check_name(path, what)
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise UsageError(f"{what} {str(p)!r} does not exist") from None
    except OSError as exc:
        raise UsageError(f"{what} {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a pipe or a device?)"
        raise UsageError(f"{what} {str(p)!r} is {kind}: give a regular file")
    if max_bytes is not None and st.st_size > max_bytes:
        raise UsageError(f"{what} {str(p)!r} is {st.st_size} bytes: at most {max_bytes} are read")
    return p


def read_text_capped(path: str | os.PathLike, what: str, max_bytes: int) -> str:
    """A regular file's UTF-8 text, refusing more than max_bytes (also if it grows while read)."""
    p = check_readable(path, what, max_bytes)
    try:
        with open(p, "rb") as fh:
            data = fh.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise UsageError(f"{what} {str(p)!r} is over {max_bytes} bytes")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{what} {str(p)!r} cannot be read: {exc}") from None


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json's object hook: a key given twice is an error (the last one silently won)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise UsageError(f"key {k!r} is given twice in one object")
        out[k] = v
    return out


def parse_json(text: str, what: str) -> Any:
    """JSON with one-line errors: syntax, nesting too deep, keys given twice."""
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except json.JSONDecodeError as exc:
        raise UsageError(f"{what} is not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise UsageError(f"{what} nests JSON too deeply") from None
    except UsageError as exc:
        raise UsageError(f"{what}: {exc}") from None


NAME_MAX = 255  # bytes of one file name and of a whole path on Linux (and less on most others)
PATH_MAX = 4096
# Temporaries of an atomic write: hidden, beside the target, named by the writing process. A
# write killed by SIGKILL leaves one; the next write into that folder removes those whose
# process is gone (and anyone may delete them: nothing reads them).
TMP_PREFIX = ".gqa-lut-tmp-"


def check_name(path: str | os.PathLike, what: str) -> Path:
    """A path the system can name: not empty, no part over NAME_MAX bytes, all under PATH_MAX."""
    if str(path) == "":
        raise UsageError(f"{what} '' is not a file name")
    p = Path(path)
    too_long = [part for part in p.parts if len(os.fsencode(part)) > NAME_MAX]
    if too_long:
        raise UsageError(f"{what} {str(p)[:60]!r}...: the name {too_long[0][:40]!r}... is "
                         f"{len(os.fsencode(too_long[0]))} bytes, at most {NAME_MAX} are allowed")
    if len(os.fsencode(str(p.absolute()))) > PATH_MAX:
        raise UsageError(f"{what} {str(p)[:60]!r}...: the path is over {PATH_MAX} bytes")
    return p


def check_writable(path: str | os.PathLike, what: str = "--out") -> Path:
    """Refuse, before any work is done, a target that cannot be written or must not be replaced.

    A target that exists must be a regular file (never a symlink, device or folder: writing
    through them would replace or clobber something else), and its folder must exist or be
    creatable and be writable. Returns the path."""
    p = check_name(path, what)
    try:
        st = os.lstat(p)
    except OSError:  # absent, or a path through a file: the folder checks below say which
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a symbolic link" if stat.S_ISLNK(st.st_mode)
                else "not a regular file")
        raise UsageError(f"{what} {str(p)!r} is {kind}: give the name of a regular file")
    parent = p.parent
    while not parent.exists():
        if parent.is_symlink() or parent == parent.parent:
            break
        parent = parent.parent
    if parent.exists() and not parent.is_dir():
        raise UsageError(f"{what} {str(p)!r} cannot be written: {str(parent)!r} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK) or _read_only_fs(parent):
        raise UsageError(f"{what} {str(p)!r} cannot be written: folder {str(parent)!r} is not writable")
    return p


def _read_only_fs(folder: Path) -> bool:
    """os.access ignores read-only mounts for root; statvfs reports them."""
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def write_json_atomic(path: str | os.PathLike, doc: Any) -> None:
    """Write to a temporary file beside the target, then rename: never a half-written file."""
    _write_atomic(path, lambda fh: (json.dump(doc, fh, indent=2), fh.write("\n")))


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    _write_atomic(path, lambda fh: fh.write(text))


def _file_mode(p: Path) -> int:
    """The mode a plain open() would give: an existing file keeps its own, a new one gets the umask."""
    try:
        return stat.S_IMODE(os.stat(p).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def write_atomic(path: str | os.PathLike, write: Callable[[str], None], what: str = "--out") -> None:
    """Call write(tmp_path) for a temporary file beside the target, then rename it over the
    target. Whatever fails, the target is either untouched or complete, and no temporary is
    left; OS errors become one-line UsageErrors naming the target."""
    p = check_writable(path, what)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(p.parent)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{os.getpid()}-", suffix=".tmp", dir=p.parent)
    except OSError as exc:
        raise UsageError(f"{what} {str(p)!r} cannot be written: {exc.strerror or exc}") from None
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _file_mode(p))
        os.replace(tmp, p)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise UsageError(f"{what} {str(p)!r} cannot be written: {exc.strerror or exc}") from None
        raise


def _remove_stale_temporaries(folder: Path) -> None:
    """Delete temporaries left in `folder` by writes whose process no longer runs."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(TMP_PREFIX) and n.endswith(".tmp")]
    except OSError:
        return
    for name in names:
        pid = name[len(TMP_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _running(int(pid)):
            continue
        try:
            os.unlink(folder / name)
        except OSError:
            pass


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _write_atomic(path: str | os.PathLike, write: Any) -> None:
    def to_file(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            write(fh)
    write_atomic(path, to_file)
