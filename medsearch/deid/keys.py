"""The site key: the secret behind every pseudonym, and the file that keeps it.

:meth:`SiteKey.load` finds the key (a path, ``MEDSEARCH_SITE_KEY``, ``MEDSEARCH_KEY_FILE``, or
``$XDG_CONFIG_HOME/medsearch/site.key``) and, when asked, creates it. :meth:`SiteKey.pseudonym`
makes a keyed HMAC pseudonym, :meth:`SiteKey.check_value` identifies the key without revealing it,
and :meth:`SiteKey.date_offset_days` gives a patient's keyed date shift. The key itself is never
printed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from medsearch.errors import KeyFileError

__all__ = ["SiteKey"]

logger = logging.getLogger(__name__)

_KEY_BYTES = 32
_ENV_KEY = "MEDSEARCH_SITE_KEY"
_ENV_KEY_FILE = "MEDSEARCH_KEY_FILE"
_HEX = re.compile(r"[0-9a-fA-F]+")
_KIND = re.compile(r"[a-z][a-z0-9_]*")
# Domain labels keep the HMACs of different uses apart, so one can never stand for another.
_PSEUDONYM_DOMAIN = b"medsearch/pseudonym/v1"
_CHECK_LABEL = b"medsearch/site-key-check/v1"
_DATE_OFFSET_DOMAIN = b"medsearch/date-offset/v1"
_MAX_DATE_OFFSET = 365


def _default_key_path() -> Path:
    base = os.environ.get("XDG_CONFIG_HOME", "")
    # The XDG spec says a relative XDG_CONFIG_HOME is invalid and must be ignored.
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".config"
    return root / "medsearch" / "site.key"


def _parse_key(text: str) -> bytes | None:
    text = text.strip()
    if not _HEX.fullmatch(text) or len(text) % 2 or len(text) < 2 * _KEY_BYTES:
        return None
    return bytes.fromhex(text)


def _encode_fields(*items: bytes) -> bytes:
    """Length-prefix each field so that no two different field lists give the same bytes."""
    return b"".join(len(item).to_bytes(8, "big") + item for item in items)


class SiteKey:
    """Secret key for pseudonyms. Never printed (repr shows only the path / 'from environment'
    and the check value).

    Use :meth:`load` to get one. The same key always gives the same pseudonyms, so an index can
    grow over several runs; another key gives unrelated ones, which :meth:`check_value` detects.

    Attributes
    ----------
    path
        The key file, or ``None`` when the key came from ``MEDSEARCH_SITE_KEY``.
    created
        ``True`` when :meth:`load` made a new key file.
    """

    __slots__ = ("_key", "created", "path")

    def __init__(self, key: bytes, *, path: Path | None = None, created: bool = False) -> None:
        if not isinstance(key, bytes) or len(key) < _KEY_BYTES:
            raise ValueError(f"SiteKey needs at least {_KEY_BYTES} bytes of key")
        self._key = key
        self.path = path
        self.created = created

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, *, create: bool = False) -> SiteKey:
        """Load the site key, or create it when asked.

        Resolution order: ``path``; else ``MEDSEARCH_SITE_KEY`` (hex, at least 32 bytes); else the
        file named by ``MEDSEARCH_KEY_FILE``; else ``$XDG_CONFIG_HOME/medsearch/site.key`` (by
        default ``~/.config/medsearch/site.key``). A key file holds the key as hex on one line.

        Parameters
        ----------
        path
            Key file to use, ahead of the environment.
        create
            When the key file does not exist, write a new random key there (mode 0o600, in a
            directory created with mode 0o700) and set ``created``. An existing file is loaded.

        Raises
        ------
        KeyFileError
            The key file is missing (and ``create`` is false), unreadable, not writable when it must
            be created, or does not hold a hex key of at least 32 bytes; or ``MEDSEARCH_SITE_KEY``
            is set to something that is not such a key. A new key is never made silently: it would
            change every pseudonym.
        """
        if path is None:
            env_key = os.environ.get(_ENV_KEY, "")
            if env_key:
                key = _parse_key(env_key)
                if key is None:
                    raise KeyFileError(
                        f"{_ENV_KEY} is not a hex key of at least {_KEY_BYTES} bytes "
                        f"({2 * _KEY_BYTES} hex digits); set it to the site's key or unset it "
                        "to use the key file"
                    )
                return cls(key)
            env_file = os.environ.get(_ENV_KEY_FILE, "")
            key_path = Path(env_file).expanduser() if env_file else _default_key_path()
        else:
            key_path = Path(path).expanduser()

        if create and not key_path.exists():
            return cls._create(key_path)
        return cls(cls._read(key_path), path=key_path)

    @staticmethod
    def _read(key_path: Path) -> bytes:
        try:
            text = key_path.read_text(encoding="ascii")
        except FileNotFoundError as e:
            raise KeyFileError(
                f"Site key file {key_path} does not exist; point MEDSEARCH_KEY_FILE at the key "
                "this index was built with, or load with create=True to make a new key"
            ) from e
        except UnicodeDecodeError as e:
            raise KeyFileError(
                f"Site key file {key_path} is not a hex key of at least {_KEY_BYTES} bytes; "
                "restore the original key file (a new key would change every pseudonym)"
            ) from e
        except OSError as e:
            raise KeyFileError(
                f"Cannot read site key file {key_path} ({e.strerror or type(e).__name__}); "
                "check that it is a file and that this user may read it"
            ) from e
        key = _parse_key(text)
        if key is None:
            raise KeyFileError(
                f"Site key file {key_path} is not a hex key of at least {_KEY_BYTES} bytes; "
                "restore the original key file (a new key would change every pseudonym)"
            )
        try:
            mode = key_path.stat().st_mode
        except OSError:  # pragma: no cover - the file was just read
            mode = 0
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logger.warning("Site key file %s can be read by other users; chmod 600 it", key_path)
        return key

    @classmethod
    def _create(cls, key_path: Path) -> SiteKey:
        key = secrets.token_bytes(_KEY_BYTES)
        parent = key_path.parent
        tmp: Path | None = None
        try:
            if not parent.exists():
                parent.mkdir(mode=0o700, parents=True)
                parent.chmod(0o700)  # mkdir's mode is filtered by the umask
            # Write a private temporary file, then link it into place: the link fails if another
            # process made a key meanwhile, and that key then wins instead of being overwritten.
            candidate = parent / f".{key_path.name}.{secrets.token_hex(8)}.tmp"
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            tmp = candidate
            try:
                os.fchmod(fd, 0o600)
                os.write(fd, (key.hex() + "\n").encode("ascii"))
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.link(tmp, key_path)
            except FileExistsError:
                return cls(cls._read(key_path), path=key_path)
        except OSError as e:
            raise KeyFileError(
                f"Cannot create site key file {key_path} ({e.strerror or type(e).__name__}); "
                "choose a writable path with MEDSEARCH_KEY_FILE"
            ) from e
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        logger.info("Created a new site key at %s", key_path)
        return cls(key, path=key_path, created=True)

    def _mac(self, message: bytes) -> str:
        return hmac.new(self._key, message, hashlib.sha256).hexdigest()

    def pseudonym(self, *parts: str, kind: str) -> str:
        """Return a keyed pseudonym for ``parts``, e.g. ``"c-3fa2..."`` for kind ``"case"``.

        HMAC-SHA256 over the kind and the parts, each length-prefixed so that no two different
        inputs share an encoding; 16 hex digits (64 bits) follow a tag of the kind's first letter.

        Raises
        ------
        ValueError
            If ``kind`` is not a lowercase identifier.
        TypeError
            If a part is not a ``str``.
        """
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(
                f"pseudonym kind must be a lowercase identifier, e.g. 'case'; got {kind!r}"
            )
        for part in parts:
            if not isinstance(part, str):
                raise TypeError(f"pseudonym parts must be str, got {type(part).__name__}")
        message = _encode_fields(
            _PSEUDONYM_DOMAIN, kind.encode(), *(p.encode("utf-8") for p in parts)
        )
        return f"{kind[0]}-{self._mac(message)[:16]}"

    def check_value(self) -> str:
        """Return 16 hex digits that identify this key without revealing it.

        Store it in an index manifest; a later run with another key gives another value.
        """
        return self._mac(_CHECK_LABEL)[:16]

    def date_offset_days(self, patient_pseudonym: str) -> int:
        """Return this patient's keyed date shift in days: in [-365, 365], never 0.

        Zero is left out so that no patient's dates are kept unshifted.
        """
        digest = hmac.new(
            self._key,
            _encode_fields(_DATE_OFFSET_DOMAIN, patient_pseudonym.encode("utf-8")),
            hashlib.sha256,
        ).digest()
        n = int.from_bytes(digest[:8], "big") % (2 * _MAX_DATE_OFFSET)  # 0 .. 729
        return n - _MAX_DATE_OFFSET if n < _MAX_DATE_OFFSET else n - _MAX_DATE_OFFSET + 1

    def __repr__(self) -> str:
        where = (
            f"path={str(self.path)!r}" if self.path is not None else f"from environment {_ENV_KEY}"
        )
        return f"SiteKey({where}, check={self.check_value()})"

    __str__ = __repr__
