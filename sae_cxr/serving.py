"""What the dashboard needs to serve safely: run names, uploads, the bind address, secrets in logs.

The dashboard (app/) takes run names and image uploads from a browser. Everything it must not
trust is checked here, in the package, so the rules are tested once and shared with the CLI:

- run names resolve only to directories inside artifacts/ (`open_run_checked`);
- an uploaded file keeps only a sanitised base name, is size-limited, decoded in memory with the
  image loader's pixel limit, and, when it must touch disk, is written into a private temporary
  directory (mode 0700) with O_EXCL|O_NOFOLLOW and removed with it (`UploadDir`);
- the server binds to localhost unless remote access is asked for by name (`bind_address`);
- log records pass through `SecretFilter`, which masks the values of secret-looking environment
  variables and API-key shapes, so a key that reaches an exception message never reaches a log.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np

from sae_cxr.data.images import ImageReadError, decode_image
from sae_cxr.run import RunDir, RunError, open_run

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
_SECRET_ENV = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_KEY_SHAPES = re.compile(r"(sk-[A-Za-z0-9_-]{12,}|(?<=Bearer )[A-Za-z0-9._~+/=-]{12,}|hf_[A-Za-z0-9]{20,})")


class UploadError(ValueError):
    """An upload that is refused; the message says which file and what the user can do."""


@dataclass(frozen=True)
class UploadLimits:
    """Per-session limits on uploads (Streamlit's own cap is per file and in MB only)."""

    max_bytes: int = 50 * 2 ** 20
    """A 16-bit 4k x 4k radiograph as PNG is about 32 MB; a DICOM a little more."""
    max_files: int = 20
    max_name_chars: int = 100
    suffixes: tuple[str, ...] = IMAGE_SUFFIXES


# -- run names -------------------------------------------------------------------------------------

def open_run_checked(root: str | os.PathLike, name: str) -> RunDir:
    """The run `name` under `root`, refused (ValueError naming it) if the name or a symlink leads out
    of `root` or the directory is not a run; the dashboard calls this with whatever the URL says."""
    try:
        return open_run(root, name)
    except RunError:  # no such directory, or one without a manifest
        raise ValueError(f"run {name!r} does not exist under {Path(root).resolve()}; "
                         "pick one of the runs listed in the sidebar") from None


# -- uploads ---------------------------------------------------------------------------------------

def safe_upload_name(name: str, limits: UploadLimits = UploadLimits()) -> str:
    """A base name that is safe as a file name in a private directory, or UploadError.

    Browsers send whatever name the user's file had (and a hostile client sends anything): keep
    the last path component under either separator, drop control characters and anything
    outside [A-Za-z0-9._-], no leading dots (no hidden files, no '..'), a known image suffix.
    """
    if not isinstance(name, str) or not name.strip():
        raise UploadError("an uploaded file has no name; upload it again from a file on disk")
    base = re.split(r"[\\/]", name.replace("\x00", ""))[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    stem, dot, ext = _SAFE_CHARS.sub("_", base).rpartition(".")
    suffix = (dot + ext).lower()
    if not dot or suffix not in limits.suffixes:
        raise UploadError(f"{name!r} is not an accepted image: upload a file ending in "
                          f"{', '.join(limits.suffixes)}")
    stem = stem.lstrip("._-")[: max(1, limits.max_name_chars - len(suffix))] or "upload"
    return stem + suffix


def check_upload(name: str, data: bytes, limits: UploadLimits = UploadLimits()) -> str:
    """The safe name of an upload whose size is acceptable, or UploadError."""
    safe = safe_upload_name(name, limits)
    if len(data) == 0:
        raise UploadError(f"{safe} is empty; upload the image file itself")
    if len(data) > limits.max_bytes:
        raise UploadError(f"{safe} is {len(data) / 2 ** 20:.1f} MiB, above the limit of "
                          f"{limits.max_bytes / 2 ** 20:.0f} MiB; downscale or crop it first")
    return safe


def decode_upload(name: str, data: bytes, limits: UploadLimits = UploadLimits()) -> np.ndarray:
    """Decode an uploaded image in memory (nothing written to disk) into float32 [H, W] in [0, 1]."""
    safe = check_upload(name, data, limits)
    try:
        return decode_image(data, name=safe)
    except ImageReadError as e:
        raise UploadError(f"{safe} cannot be used: {e.reason}; upload a PNG, JPEG or DICOM radiograph") from None


@dataclass
class UploadDir:
    """A private temporary directory for one session's uploads, removed on exit.

    Use it when a library needs a path (a DICOM reader, an LMM back end); prefer `decode_upload`.
    """

    limits: UploadLimits = field(default_factory=UploadLimits)
    parent: str | None = None
    path: Path | None = None
    _names: set[str] = field(default_factory=set)

    def __enter__(self) -> "UploadDir":
        self.path = Path(tempfile.mkdtemp(prefix="sae-cxr-upload-", dir=self.parent))
        os.chmod(self.path, 0o700)  # mkdtemp already does; stated because other users share /tmp
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.path is not None:
            shutil.rmtree(self.path, ignore_errors=True)
            self.path = None

    def save(self, name: str, data: bytes) -> Path:
        """Write an upload under its safe name (made unique); never follows or replaces a file."""
        if self.path is None:
            raise RuntimeError("UploadDir is closed; use it as a context manager")
        if len(self._names) >= self.limits.max_files:
            raise UploadError(f"at most {self.limits.max_files} uploads per session; remove some first")
        safe = check_upload(name, data, self.limits)
        stem, suffix = os.path.splitext(safe)
        candidate, k = safe, 1
        while candidate in self._names or (self.path / candidate).exists():
            candidate, k = f"{stem}-{k}{suffix}", k + 1
        target = self.path / candidate
        if target.resolve().parent != self.path.resolve():  # cannot happen with a safe name; checked anyway
            raise UploadError(f"{name!r} would be written outside the upload directory")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._names.add(candidate)
        return target


# -- binding ---------------------------------------------------------------------------------------

def bind_address(host: str | None = None, allow_remote: bool = False) -> str:
    """The address the dashboard listens on: localhost unless a remote address is allowed by name.

    Run outputs can hold patient images: listening on 0.0.0.0 by accident would publish them.
    """
    host = (host or os.environ.get("SAE_CXR_HOST") or "127.0.0.1").strip()
    if host not in LOCAL_HOSTS and not allow_remote:
        raise ValueError(f"refusing to serve on {host!r}: the dashboard binds to localhost by default; "
                         "pass --allow-remote (and put authentication in front of it) to listen elsewhere")
    return host


def streamlit_flags(host: str | None = None, allow_remote: bool = False,
                    limits: UploadLimits = UploadLimits()) -> list[str]:
    """Command-line flags for `streamlit run` that apply the address and the upload cap."""
    return ["--server.address", bind_address(host, allow_remote),
            "--server.maxUploadSize", str(max(1, limits.max_bytes // 2 ** 20)),
            "--server.enableXsrfProtection", "true", "--browser.gatherUsageStats", "false"]


# -- secrets ---------------------------------------------------------------------------------------

def secret_values(environ: dict[str, str] | None = None) -> list[str]:
    """Values of environment variables whose names look secret (API keys, tokens, passwords)."""
    env = os.environ if environ is None else environ
    return sorted({v.strip() for k, v in env.items() if _SECRET_ENV.search(k) and len(v.strip()) >= 8},
                  key=len, reverse=True)


def redact(text: str, environ: dict[str, str] | None = None) -> str:
    """`text` with secret environment values and API-key shapes replaced by ***."""
    for value in secret_values(environ):
        text = text.replace(value, "***")
    return _KEY_SHAPES.sub("***", text)


class SecretFilter(logging.Filter):
    """Masks secrets in every record (message, arguments and exception text) a handler emits."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        record.exc_info = None if record.exc_text else record.exc_info
        return True


def install_secret_filter(logger: logging.Logger | None = None) -> SecretFilter:
    """Attach a SecretFilter to every handler of `logger` (the root logger by default)."""
    logger = logger or logging.getLogger()
    flt = SecretFilter()
    for handler in logger.handlers:
        if not any(isinstance(f, SecretFilter) for f in handler.filters):
            handler.addFilter(flt)
    return flt
