"""Small file helpers shared by model saving and training checkpoints."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def umask() -> int:
    """The process's umask, read without changing it (Linux's /proc), else by setting it back."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def set_default_mode(path: str | Path) -> None:
    """Give `path` the mode a plain ``open(path, "w")`` would (0666 less the umask: 0644 by
    default). ``tempfile.mkstemp`` and safetensors create files as 0600, which a rename keeps."""
    os.chmod(path, 0o666 & ~umask())


def fsync_path(path: str | Path) -> None:
    """Flush a file's data, or a directory's entries (a rename or a new file), to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if Path(path).is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the whole new one, never a
    part: a temporary file beside it, flushed to disk, then renamed over it. The file gets the
    umask's mode (``set_default_mode``), not mkstemp's 0600."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)  # the rename itself


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    return False  # EINVAL / ENOSYS: a file system or kernel without it


def replace_dir(new: str | Path, target: str | Path) -> None:
    """Put the finished folder ``new`` in place of ``target``, then delete the old one: at every
    moment ``target`` is the whole old folder or the whole new one. Where the kernel cannot swap
    two paths in one step, the old folder is first renamed aside (``<target>.old``, deleted last)."""
    import shutil

    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
    elif _exchange(new, target):
        shutil.rmtree(new)  # now the old folder
    else:
        old = target.with_name(target.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old)
    fsync_path(target.parent)


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def git_commit(root: str | os.PathLike, short: bool = False) -> str | None:
    """The HEAD commit of the git checkout holding `root` (``short``: abbreviated), with
    ``+dirty`` when tracked files have uncommitted changes; None outside a checkout (an installed
    copy). ``MMSPARSE_GIT_COMMIT``, when set, is taken instead: a run from a copied tree whose
    git history is not the code's."""
    import subprocess

    if os.environ.get("MMSPARSE_GIT_COMMIT"):
        return os.environ["MMSPARSE_GIT_COMMIT"]
    rev = ["rev-parse", "--short", "HEAD"] if short else ["rev-parse", "HEAD"]
    try:
        head = subprocess.run(["git", "-C", str(root), *rev], capture_output=True, text=True, timeout=10)
        if head.returncode or not head.stdout.strip():
            return None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=30)
        return head.stdout.strip() + ("+dirty" if dirty.returncode == 0 and dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
