"""Where a merged model goes, and the one rule for it: never destroy what evomerge did not write.

A model directory is built in a staging folder beside its destination and put in
place only when complete (config, weights, tokenizer and card all written), so a
kill at any moment leaves either the old directory or the new one, never half of
one and never none. Three cases, decided before any work is spent:

* the destination is missing or empty: the staging folder is renamed onto it;
* it is an earlier evomerge output holding nothing but what evomerge wrote
  (listed in its :data:`MANIFEST`): the two folders are exchanged in one atomic
  ``renameat2(RENAME_EXCHANGE)``, so the old model stays until the new one is there;
* an earlier evomerge output beside which the user put files of their own, or a
  folder of someone else's files that the user says ``force`` for: only the
  files evomerge writes are replaced, one atomic rename each, and everything else
  in the folder is left as it was. Without ``force`` a folder of someone else's
  files is refused.

Staging folders carry their host and process id, so the next writer to the same
destination removes those of killed processes. Folders and files are created as
the user's umask says (``mkdtemp`` alone would make the folder private).
"""
from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterable

from evomerge.errors import CheckpointError

# Files that travel with a tokenizer; copied from the tokenizer source model.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "chat_template.jinja",
    "chat_template.json", "generation_config.json",
)
MANIFEST = ".evomerge-output.json"  # the files an evomerge writer put in a directory
_STAGING = ".evomerge-tmp"


def _umask() -> int:
    """The process's umask, read without setting it: ``os.umask`` can only be read by changing it, which
    would race with other threads creating files (Linux reports it in /proc/self/status since 4.7)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # no /proc (macOS): the only portable way
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode ``open()`` would give a new file (safetensors writes 0600 whatever the umask)."""
    return 0o666 & ~_umask()


def check_destination(out: str | Path, *, inputs: Iterable[str | Path] = (), force: bool = False) -> Path:
    """``out`` resolved, or an error naming why writing there would destroy something.

    ``inputs`` are the recipe's model directories and files: the output may not be one of them or hold
    one, whatever ``force`` says (the merge reads them while it writes)."""
    dest = Path(out).expanduser().resolve()
    for given in inputs:
        src = Path(given).expanduser().resolve()
        if src == dest or dest in src.parents:
            raise CheckpointError(
                f"output directory {dest} {'is' if src == dest else 'holds'} an input of this merge ({src}); "
                f"writing there would replace the model being read. Pick a new output directory.")
    if dest.is_file():
        raise CheckpointError(f"output {dest} is a file, not a directory; pick a new output directory.")
    foreign = _foreign_entries(dest)
    if foreign and _written_by_us(dest) is None and not force:
        shown = ", ".join(sorted(foreign)[:5]) + (", ..." if len(foreign) > 5 else "")
        raise CheckpointError(
            f"output directory {dest} already holds files evomerge did not write ({shown}); evomerge never "
            f"replaces them. Pick a new or empty directory, or pass --force to write the merge's files into it "
            f"(only the files a merge writes are replaced; the others stay).")
    return dest


def _written_by_us(dest: Path) -> set[str] | None:
    """The file names an earlier evomerge writer listed in ``dest``, or None if it is not an evomerge output.

    Outputs of evomerge before the manifest existed are recognised by their recipe and card: there, the
    files a merge writes (weights, config, tokenizer files, recipe, card) count as evomerge's."""
    try:
        listed = json.loads((dest / MANIFEST).read_text())["files"]
        return {str(f) for f in listed}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        legacy = (dest / "mergekit_config.yml").is_file() and "evomerge" in (dest / "README.md").read_text()
    except OSError:
        legacy = False
    if not legacy:
        return None
    fixed = {"config.json", "mergekit_config.yml", "README.md", "model.safetensors.index.json", *TOKENIZER_FILES}
    return {p.name for p in dest.iterdir()
            if p.name in fixed or (p.name.startswith("model") and p.name.endswith(".safetensors"))}


def _foreign_entries(dest: Path) -> set[str]:
    if not dest.is_dir():
        return set()
    present = {p.name for p in dest.iterdir()}
    ours = _written_by_us(dest)
    return present - (ours or set()) - {MANIFEST} if ours is not None else present


def staging_dir(dest: Path) -> Path:
    """A fresh staging folder beside ``dest`` (with the umask's permissions); killed writers' ones removed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}{_STAGING}-{socket.gethostname()}-{os.getpid()}-",
                                dir=dest.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


def remove_stale_staging(dest: Path) -> list[Path]:
    """Remove the staging folders of ``dest`` left by dead processes of this host; return them."""
    host = socket.gethostname()
    removed = []
    for p in dest.parent.glob(f".{dest.name}{_STAGING}-*"):
        rest = p.name[len(f".{dest.name}{_STAGING}-"):]
        owner, _, tail = rest.rpartition("-")  # host-pid, then mkdtemp's random part
        who, _, pid = owner.rpartition("-")
        if who == host and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def publish(tmp: Path, dest: Path) -> Path:
    """Put the complete staging folder ``tmp`` at ``dest`` (checked by :func:`check_destination`)."""
    files = sorted(p.name for p in tmp.iterdir())
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1) + "\n")
    os.chmod(tmp / MANIFEST, file_mode())
    if not dest.exists():
        tmp.rename(dest)
        return dest
    if not any(dest.iterdir()):
        os.rename(tmp, dest)  # onto an empty directory: one rename
        return dest
    if not _foreign_entries(dest) and _exchange(tmp, dest):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous model
        return dest
    _merge_into(tmp, dest, files)
    return dest


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories atomically (Linux ``renameat2``); False where the system cannot."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), f"cannot exchange {a} and {b}: {os.strerror(ctypes.get_errno())}")


def _merge_into(tmp: Path, dest: Path, files: list[str]) -> None:
    """Replace the merge's files in ``dest`` one atomic rename at a time; the manifest goes last, and the
    earlier evomerge files the new merge does not write (old shards) are removed; nothing else is touched."""
    old = _written_by_us(dest) or set()
    for name in files:
        os.replace(tmp / name, dest / name)
    for name in old - set(files):
        target = dest / name
        if target.is_file() or target.is_symlink():
            target.unlink()
    os.replace(tmp / MANIFEST, dest / MANIFEST)
    shutil.rmtree(tmp, ignore_errors=True)


def side_files(src_dir: Path, names: Iterable[str]) -> list[Path]:
    """The files of ``names`` present in ``src_dir`` (tokenizer, generation config), safe to copy out.

    A symlink is followed only where it stays inside the model folder, or inside the Hugging Face cache
    repository the folder is a snapshot of (``snapshots/REV/f -> ../../blobs/SHA``): a link to anywhere
    else would carry that file's contents into a model users publish, so it is refused."""
    folder = src_dir.resolve()
    repo_blobs = folder.parent.parent / "blobs" if folder.parent.name == "snapshots" else None
    found = []
    for name in names:
        src = src_dir / name
        if src.is_symlink():
            target = src.resolve()
            if folder not in target.parents and (repo_blobs is None or repo_blobs not in target.parents):
                raise CheckpointError(
                    f"{src} is a symlink to {target}, outside its model folder; evomerge does not copy files "
                    f"from outside a model folder into a merged model. Replace the link with the file itself.")
        if src.is_file():
            found.append(src)
    return found


def copy_files(files: Iterable[Path], dest_dir: Path) -> None:
    """Copy the contents of ``files`` (checked by :func:`side_files`) into ``dest_dir``, umask permissions."""
    for src in files:
        shutil.copyfile(src, dest_dir / src.name)
        os.chmod(dest_dir / src.name, file_mode())
