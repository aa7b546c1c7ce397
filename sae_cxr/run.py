"""The run directory: the only contract between stages, the CLI, the reports and the dashboard.

Layout (artifacts/<run>/):

    manifest.json        config, versions, data set spec, stage status, per-file sha256
    records.parquet      one row per record (labels, concepts, boxes, report, split)
    embeddings/          image/text embeddings and patch tokens, in shards
    classifier/          head weights (safetensors), config, metrics
    transcoders/         ensemble.safetensors, config.json, metrics
    patterns.parquet     one row per pattern (+ patterns.safetensors for arrays)
    galleries/           per-pattern top-k and quantile samples
    indices/             *.faiss
    labels.jsonl         one label per pattern
    attributions/        per-prediction decompositions
    explanations/        natural-language explanations
    reports/             batch reports
    eval/                benchmark metrics and plots

Every file is written to a temporary name in the same directory, fsynced and renamed, so a
killed stage never leaves a half-written file under its real name. The manifest records a
sha256 per file when its stage finishes; `RunDir.verify` detects a file that was changed or
truncated afterwards and names it.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import platform
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

MANIFEST = "manifest.json"
RECORDS = "records.parquet"
RUN_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
T = TypeVar("T")


class RunError(RuntimeError):
    """A run directory that is missing, incomplete or inconsistent."""


class CorruptFileError(RunError):
    """A file whose bytes no longer match the checksum its stage recorded."""

    def __init__(self, path: Path, expected: str, actual: str):
        self.path = path
        super().__init__(f"{path} is corrupt or was modified after its stage finished "
                         f"(sha256 {actual[:12]}…, manifest says {expected[:12]}…); rerun the stage with --force")


class StageMissingError(RunError):
    """A stage's input comes from an earlier stage that has not run."""


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def file_identity(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime_ns): changes when a file is replaced (atomic rename) or rewritten.

    Readers compare it before hashing and after loading, so the bytes they parsed are the bytes
    whose checksum they checked even while a stage rewrites the run next to them.
    """
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success fsync it and rename it into place.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; run files are meant to be shared like any other
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n").encode())


def _json_default(obj: Any) -> Any:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def check_run_name(name: str) -> str:
    """Run names become directory names: refuse anything that could leave artifacts/."""
    if not isinstance(name, str) or not RUN_NAME_RE.fullmatch(name) or name in (".", ".."):
        raise ValueError(f"run name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
                         "starting with a letter or digit")
    return name


def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("sae-cxr", "torch", "numpy", "open_clip_torch", "faiss-cpu"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


@dataclass
class StageInfo:
    status: str  # "running" | "done"
    inputs_hash: str
    started: str
    finished: str | None
    outputs: dict[str, str]  # relative path -> sha256
    summary: dict[str, Any]


class RunDir:
    """A run directory and its manifest."""

    def __init__(self, path: str | os.PathLike, create: bool = False):
        self.path = Path(path).resolve()
        if create:
            self.path.mkdir(parents=True, exist_ok=True)
            if not (self.path / MANIFEST).exists():
                write_json_atomic(self.path / MANIFEST, {
                    "created": _now(), "versions": versions(), "config": {}, "dataset": None, "stages": {},
                })
        elif not (self.path / MANIFEST).exists():
            if self.path.exists():
                raise RunError(f"{self.path} is not a run directory (no {MANIFEST}); "
                               "run `sae-cxr demo` or the first stage to create it")
            raise RunError(f"run directory {self.path} does not exist")

    # -- paths ---------------------------------------------------------------------------------
    def __truediv__(self, rel: str) -> Path:
        return self.sub(rel)

    def sub(self, rel: str | os.PathLike) -> Path:
        """A path inside the run; refuses paths that would leave the run directory."""
        p = (self.path / rel).resolve()
        if p != self.path and self.path not in p.parents:
            raise ValueError(f"path {rel!s} escapes the run directory {self.path}")
        return p

    def rel(self, p: str | os.PathLike) -> str:
        return str(Path(p).resolve().relative_to(self.path))

    # -- manifest ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        lock = self.path / ".manifest.lock"
        with open(lock, "a+") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def manifest(self) -> dict[str, Any]:
        try:
            return json.loads((self.path / MANIFEST).read_text())
        except json.JSONDecodeError as e:
            raise RunError(f"{self.path / MANIFEST} is not valid JSON ({e})") from None

    def update_manifest(self, **fields: Any) -> dict[str, Any]:
        with self._locked():
            m = self.manifest()
            m.update(fields)
            write_json_atomic(self.path / MANIFEST, m)
            return m

    def set_config(self, section: str, cfg: dict[str, Any]) -> None:
        with self._locked():
            m = self.manifest()
            m.setdefault("config", {})[section] = cfg
            write_json_atomic(self.path / MANIFEST, m)

    def config(self, section: str) -> dict[str, Any] | None:
        return self.manifest().get("config", {}).get(section)

    # -- stages --------------------------------------------------------------------------------
    def stage(self, name: str) -> StageInfo | None:
        s = self.manifest().get("stages", {}).get(name)
        if s is None:
            return None
        return StageInfo(status=s["status"], inputs_hash=s.get("inputs_hash", ""), started=s.get("started", ""),
                         finished=s.get("finished"), outputs=s.get("outputs", {}), summary=s.get("summary", {}))

    def is_done(self, name: str, inputs_hash: str | None = None) -> bool:
        s = self.stage(name)
        if s is None or s.status != "done":
            return False
        if inputs_hash is not None and s.inputs_hash != inputs_hash:
            return False
        return all((self.path / rel).exists() for rel in s.outputs)

    def require(self, name: str, hint: str | None = None) -> StageInfo:
        s = self.stage(name)
        if s is None or s.status != "done":
            raise StageMissingError(f"stage {name!r} has not finished in run {self.path}; "
                                    f"{hint or f'run `sae-cxr {name} --run {self.path}` first'}")
        return s

    def begin_stage(self, name: str, inputs_hash: str) -> None:
        with self._locked():
            m = self.manifest()
            m.setdefault("stages", {})[name] = {"status": "running", "inputs_hash": inputs_hash,
                                                 "started": _now(), "finished": None, "outputs": {},
                                                 "summary": {}}
            write_json_atomic(self.path / MANIFEST, m)

    def finish_stage(self, name: str, outputs: list[str | os.PathLike], summary: dict[str, Any] | None = None) -> None:
        """Mark a stage done, recording a sha256 for every output file (directories are walked)."""
        files: dict[str, str] = {}
        for out in outputs:
            p = self.sub(out)
            if p.is_dir():
                for f in sorted(p.rglob("*")):
                    if f.is_file() and not f.name.startswith("."):
                        files[self.rel(f)] = sha256_file(f)
                    elif f.is_file() and f.name.endswith(".tmp"):  # left by a killed earlier attempt
                        f.unlink(missing_ok=True)
            elif p.is_file():
                files[self.rel(p)] = sha256_file(p)
                for f in p.parent.glob(f".{p.name}.*.tmp"):
                    f.unlink(missing_ok=True)
            else:
                raise RunError(f"stage {name!r} claims output {out} but it was not written")
        with self._locked():
            m = self.manifest()
            s = m.setdefault("stages", {}).setdefault(name, {"started": _now(), "inputs_hash": ""})
            s.update(status="done", finished=_now(), outputs=files, summary=summary or {})
            write_json_atomic(self.path / MANIFEST, m)

    def invalidate(self, *names: str) -> None:
        with self._locked():
            m = self.manifest()
            for n in names:
                m.get("stages", {}).pop(n, None)
            write_json_atomic(self.path / MANIFEST, m)

    def stage_hash(self, name: str) -> str:
        """A digest of a finished stage's outputs: what later stages fold into their inputs hash."""
        s = self.require(name)
        return sha256_json(s.outputs)

    # -- integrity -----------------------------------------------------------------------------
    def verify(self, rel: str | os.PathLike) -> Path:
        """Return the path of a recorded output after checking its sha256 against the manifest.

        A file that no finished stage recorded is refused while any stage is running or was
        interrupted (it may be a leftover of the stage being redone); a checksum mismatch caused
        by a stage rewriting the file right now is reported as such, not as corruption.
        """
        return self.verify_identity(rel)[0]

    def verify_identity(self, rel: str | os.PathLike) -> tuple[Path, tuple[int, int, int, int] | None]:
        """`verify`, also returning the file identity that was checked (None for an unrecorded file),
        for readers that check it again after reading (`check_unchanged`)."""
        p = self.sub(rel)
        key = self.rel(p)
        stages = self.manifest().get("stages", {})
        for name, s in stages.items():
            expected = s.get("outputs", {}).get(key)
            if expected is None:
                continue
            try:
                ident = file_identity(p)
            except FileNotFoundError:
                self._raise_if_rerunning(name, key, expected)
                raise RunError(f"{p} is recorded in the manifest but missing; rerun stage {name!r}") from None
            actual = sha256_file(p)
            if actual != expected or file_identity(p) != ident:
                self._raise_if_rerunning(name, key, expected)
                if actual != expected:
                    raise CorruptFileError(p, expected, actual)
                raise StageMissingError(f"{p} changed while it was checked; is a stage writing run {self.path}?")
            return p, ident
        unfinished = sorted(n for n, s in stages.items() if s.get("status") != "done")
        if unfinished:
            raise StageMissingError(f"{p} is not a checksummed output of a finished stage, and stage(s) "
                                    f"{', '.join(unfinished)} of run {self.path} are running or were interrupted; "
                                    "wait for them or rerun them")
        if not p.exists():
            raise RunError(f"{p} does not exist in run {self.path}")
        return p, None

    def _raise_if_rerunning(self, stage: str, key: str, expected: str) -> None:
        """A stage that restarted since we read the manifest explains a changed or vanished file."""
        s = self.manifest().get("stages", {}).get(stage)
        if s is None or s.get("status") != "done" or s.get("outputs", {}).get(key) != expected:
            raise StageMissingError(f"{self.path / key} is being rewritten: stage {stage!r} of run {self.path} "
                                    "was restarted; wait for it to finish")

    def load_verified(self, rel: str | os.PathLike, load: Callable[[Path], T]) -> T:
        """`load(path)` of a recorded output whose checksum matched, guaranteed to have read those bytes.

        The file's identity is taken before hashing and checked again after `load` returns: a file
        replaced in between (a stage being redone) raises StageMissingError instead of handing back
        unverified bytes. `load` must read everything it needs before it returns (no lazy mmap).
        """
        p, ident = self.verify_identity(rel)
        out = load(p)
        if ident is not None:
            self.check_unchanged(p, ident)
        return out

    def check_unchanged(self, path: Path, ident: tuple[int, int, int, int]) -> None:
        """Raise StageMissingError if `path` is no longer the file whose checksum was verified."""
        try:
            now = file_identity(path)
        except FileNotFoundError:
            now = None
        if now != ident:
            raise StageMissingError(f"{path} was replaced while it was read (a stage of run {self.path} is being "
                                    "redone); read it again when the stage has finished")

    # -- writers -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stage_lock(self, name: str) -> Iterator[None]:
        """Hold the run's lock for stage `name`: a second process running the same stage fails fast.

        The lock is an flock on .stage-<name>.lock, released by the kernel when the holder dies
        (kill -9 included), so an interrupted stage never leaves a stale lock behind.
        """
        lock = self.path / f".stage-{name}.lock"
        with open(lock, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise RunError(f"stage {name!r} of run {self.path} is already running ({holder}); "
                               "wait for it or stop it first") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {platform.node()} since {_now()}")
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def verify_all(self) -> list[str]:
        """Check every recorded file; return the relative paths that passed, raise on the first bad one."""
        ok = []
        for s in self.manifest().get("stages", {}).values():
            if s.get("status") != "done":
                continue
            for rel in s.get("outputs", {}):
                self.verify(rel)
                ok.append(rel)
        return ok


def list_runs(root: str | os.PathLike = "artifacts") -> list[Path]:
    """Run directories directly under `root`, newest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    base = r.resolve()
    runs = [p for p in r.iterdir() if RUN_NAME_RE.fullmatch(p.name) and p.is_dir() and (p / MANIFEST).exists()
            and base in p.resolve().parents]  # a symlink leading out of `root` is not listed
    return sorted(runs, key=lambda p: (p / MANIFEST).stat().st_mtime, reverse=True)


def open_run(root: str | os.PathLike, name: str) -> RunDir:
    """The run called `name` under `root`, for callers that take a name from a user (CLI, dashboard).

    The name is checked (no separators, no '..'), and the resolved directory must stay inside
    `root`: a symlink under artifacts/ pointing elsewhere is refused rather than followed.
    """
    check_run_name(name)
    base = Path(root).resolve()
    path = (base / name).resolve()
    if base not in path.parents:
        raise ValueError(f"run {name!r} resolves to {path}, outside {base}; refusing to open it")
    return RunDir(path)
