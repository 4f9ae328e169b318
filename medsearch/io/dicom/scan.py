"""Finding the files under a path and grouping them into cases, from their headers only.

:func:`walk_archive` lists every path under a folder (following links to folders, each folder
once) and says why each one that is not a regular file is left out; :func:`find_files` keeps the
regular files of that walk. :func:`summarize_file` reads one header into a small
:class:`HeaderSummary`, or says why the file is left out; :func:`group_headers` groups summaries
into :class:`CaseFiles` (one per series, or per multi-frame object) and finds duplicates.
:func:`scan` does all three and keeps the first header of each case in a :class:`CaseRef`.
No pixel data is decoded here.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from medsearch.errors import InvalidStudyError
from medsearch.io.dicom.classes import MIN_IMAGE_SIZE, not_an_image
from medsearch.io.dicom.decode import _decoder_problem
from medsearch.io.dicom.mosaic import mosaic_count
from medsearch.io.dicom.read import (
    LoadFailure,
    SkippedFile,
    SkipReason,
    _get,
    _int,
    _one_line,
    _read_header,
    _Skip,
    _sop_class_name,
    _str,
    _transfer_syntax,
)
from medsearch.io.dicom.stack import SliceGeometry, _geometry

__all__ = [
    "CaseFiles",
    "CaseRef",
    "HeaderSummary",
    "ScanResult",
    "find_files",
    "group_headers",
    "scan",
    "printable_path",
    "summarize_file",
    "walk_archive",
]

logger = logging.getLogger(__name__)


@dataclass
class CaseRef:
    """The files of one case, found by reading headers only (no pixel decoding)."""

    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    instance_uids: tuple[str, ...]
    header: pydicom.Dataset = field(repr=False)
    part: str = (
        ""  # set when one series is split into several cases (e.g. several multi-frame objects)
    )
    # The slice geometry of each file, from the scan (see SliceGeometry); () when not known.
    geometry: tuple[SliceGeometry | None, ...] = field(default=(), repr=False)
    header_index: int = 0  # which of ``files`` ``header`` was read from


@dataclass(frozen=True)
class HeaderSummary:
    """The facts :func:`group_headers` needs from one file's header, and nothing else.

    Small and picklable, so that an archive of any size can keep one per file and worker processes
    can send them back; the UIDs identify a study, so a summary stays on the machine that read it.
    ``geometry`` is set for a file holding one grayscale image (see :class:`SliceGeometry`).
    """

    path: Path
    study_uid: str  # "" when the header has none
    series_uid: str
    sop_uid: str
    frames: int
    geometry: SliceGeometry | None = None


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case as :func:`group_headers` finds them, without a header in memory."""

    study_uid: str
    series_uid: str
    files: tuple[Path, ...]
    instance_uids: tuple[str, ...]
    part: str = ""
    geometry: tuple[SliceGeometry | None, ...] = field(default=(), repr=False)  # per file, or ()

    def open(self) -> CaseRef:
        """This case as a :class:`CaseRef`, with the header of its first file read now (no pixels).

        The header is the one :func:`scan` would give: that of the first file in path order.

        Raises
        ------
        LoadFailure
            No file of the case has a readable header any more (changed since it was scanned).
        """
        skipped = []
        for index, path in enumerate(self.files):
            odd = _not_regular(path)  # replaced by a FIFO since the scan: never open one
            if odd is not None:
                skipped.append(odd)
                continue
            try:
                ds = _read_header(path).ds
            except _Skip as skip:
                skipped.append(SkippedFile(path, skip.reason, skip.detail))
                continue
            except Exception as exc:  # noqa: BLE001 - as in scan: an odd header is a skip
                skipped.append(SkippedFile(path, SkipReason.UNREADABLE, f"the header cannot be used: {_one_line(exc)}"))
                continue
            return CaseRef(
                study_uid=self.study_uid,
                series_uid=self.series_uid,
                files=self.files,
                instance_uids=self.instance_uids,
                header=ds,
                part=self.part,
                geometry=self.geometry,
                header_index=index,
            )
        first = skipped[0]
        raise LoadFailure(
            f"no file of the case at {self.files[0]} has a readable header; {first.path}: "
            f"{first.reason.value}: {first.detail}",
            skipped,
        )


@dataclass
class ScanResult:
    """What :func:`scan` found: the cases, the files left out, and how many files it looked at.

    Every file looked at is in exactly one case or in ``skipped``.
    """

    cases: list[CaseRef]
    skipped: list[SkippedFile]
    n_files: int


def walk_archive(root: Path | str) -> Iterator[Path | SkippedFile]:
    """Yield every path met at ``root``: each regular file as a Path, anything else as a SkippedFile.

    Links to folders are followed, and each folder (by device and inode) is walked once: a link
    back to a folder above it is SYMLINK_LOOP, a second way into a folder already walked is
    DUPLICATE. FIFOs, sockets and devices are NOT_A_FILE (never opened), links whose target does
    not exist BROKEN_LINK, a link that leads to itself SYMLINK_LOOP, a folder that cannot be
    listed UNREADABLE. Files and folders whose name starts with '.' are not looked at; the names
    of DICOM files are not checked (archives hold ``.dcm``, extension-less and ``i123.MRDC.4``
    files alike). The folder tree is walked without recursion, so its depth is not limited.

    Parameters
    ----------
    root : Path or str
        A file or a folder.

    Yields
    ------
    Path or SkippedFile
        In path order; a path under a followed link goes through the link (``root/link/file``).

    Raises
    ------
    InvalidStudyError
        If ``root`` does not exist, or is a folder that cannot be listed.
    """
    root = Path(root)
    if not root.exists():
        raise InvalidStudyError(f"{root} does not exist; check the path")
    if not root.is_dir():
        yield _not_regular(root) or root
        return
    top = root.stat()
    found: list[Path | SkippedFile] = []
    visited: dict[tuple[int, int], Path] = {}
    # Folders to walk, with the folders above each (to tell a loop from a second way in); popped
    # in path order, so that of two ways into one folder the first in path order is walked.
    stack: list[_Folder] = [_Folder(root, (top.st_dev, top.st_ino), None)]
    while stack:
        folder = stack.pop()
        if folder.key in visited:
            found.append(_walked_already(folder, visited[folder.key]))
            continue
        visited[folder.key] = folder.path
        try:
            with os.scandir(folder.path) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as e:
            if folder.parent is None:
                raise InvalidStudyError(
                    f"{root} cannot be listed ({e.strerror or type(e).__name__}); check its permissions"
                ) from e
            found.append(SkippedFile(folder.path, SkipReason.UNREADABLE, f"the folder cannot be listed: {e.strerror or e}"))
            continue
        below: list[_Folder] = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = folder.path / entry.name
            if entry.is_file(follow_symlinks=False):  # the common case: no system call
                found.append(path)
                continue
            try:
                st = entry.stat()  # follows a link
            except OSError as e:
                found.append(_unusable(path, e))
                continue
            if stat.S_ISDIR(st.st_mode):
                below.append(_Folder(path, (st.st_dev, st.st_ino), folder))
            else:
                found.append(path if stat.S_ISREG(st.st_mode) else SkippedFile(path, SkipReason.NOT_A_FILE, _what(st.st_mode)))
        stack.extend(reversed(below))
    found.sort(key=_path_of)
    yield from found


def find_files(root: Path | str) -> Iterator[Path]:
    """Yield the regular files at ``root``: the file itself, or every one :func:`walk_archive` finds.

    Parameters
    ----------
    root : Path or str
        A file or a folder. A root that is not a regular file or a folder (a FIFO...) yields nothing.

    Yields
    ------
    Path
        Paths in sorted order.

    Raises
    ------
    InvalidStudyError
        If ``root`` does not exist.
    """
    for entry in walk_archive(root):
        if isinstance(entry, Path):
            yield entry


def printable_path(path: Path | str) -> str:
    """``path`` as text that any UTF-8 file or terminal takes: a byte of a name that is not UTF-8
    (which Python keeps as a surrogate escape) is written ``\\xNN``.

    >>> printable_path(os.fsdecode(b"caf\\xe9.dcm"))
    'caf\\\\xe9.dcm'
    """
    text = str(path)
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that no file system gave (not an escaped byte)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def summarize_file(path: Path | str, *, min_size: int = MIN_IMAGE_SIZE) -> HeaderSummary | SkippedFile:
    """Read one file's header (never its pixels) and say how it would be grouped, or why it is left out.

    This is the per-file half of :func:`scan`, for callers that read headers in parallel or keep
    the result between runs; :func:`group_headers` is the other half. It never raises: a file that
    cannot be used is a :class:`SkippedFile` (NOT_DICOM, UNREADABLE, TRUNCATED, NOT_AN_IMAGE,
    NO_PIXEL_DATA, UNSUPPORTED_TRANSFER_SYNTAX). Duplicates are found by :func:`group_headers`,
    which sees all files.

    Parameters
    ----------
    path : Path or str
        A file.
    min_size : int
        The smallest image side, in pixels, of an image that is kept (0: no minimum); a smaller
        one is NOT_AN_IMAGE (see :mod:`medsearch.io.dicom.classes`).

    Returns
    -------
    HeaderSummary or SkippedFile
        A Siemens mosaic counts its slices as ``frames`` (see :mod:`medsearch.io.dicom.mosaic`).
    """
    found = _summarize(Path(path), min_size)
    return found if isinstance(found, SkippedFile) else found[0]


def group_headers(items: Iterable[HeaderSummary | SkippedFile]) -> tuple[list[CaseFiles], list[SkippedFile]]:
    """Group file summaries into cases, as :func:`scan` does, and find duplicates.

    Parameters
    ----------
    items : iterable of HeaderSummary or SkippedFile
        What :func:`summarize_file` gave for each file, in any order. Skipped files are passed
        through; a second file with the SOP Instance UID of an earlier one (in path order) is
        skipped as DUPLICATE.

    Returns
    -------
    list of CaseFiles
        Sorted by first file, then part (see :func:`scan` for the grouping rules).
    list of SkippedFile
        In path order.
    """
    ordered = sorted(items, key=lambda item: item.path)
    skipped: list[SkippedFile] = []
    seen: dict[str, Path] = {}
    groups: dict[tuple[str, str], list[HeaderSummary]] = {}
    for item in ordered:
        if isinstance(item, SkippedFile):
            skipped.append(item)
            continue
        if item.sop_uid and item.sop_uid in seen:
            detail = f"same SOP instance as {seen[item.sop_uid]}"
            logger.debug("skip %s: %s (%s)", item.path, SkipReason.DUPLICATE.value, detail)
            skipped.append(SkippedFile(item.path, SkipReason.DUPLICATE, detail))
            continue
        if item.sop_uid:
            seen[item.sop_uid] = item.path
        groups.setdefault(_case_key(item), []).append(item)
    cases = [case for key, entries in groups.items() for case in _split(key, entries)]
    cases.sort(key=lambda c: (str(c.files[0]), c.part))
    return cases, skipped


def scan(paths: Path | str | Iterable[Path], *, min_size: int = MIN_IMAGE_SIZE) -> ScanResult:
    """Read the headers of files and group the images into cases.

    Only headers are read (``stop_before_pixels``); pixel data is never decoded here. Each case
    keeps the header of its first file; for archives too large to keep those, use
    :func:`summarize_file` and :func:`group_headers`, then :meth:`CaseFiles.open` per case.

    Parameters
    ----------
    paths : Path, str or iterable of Path
        A root (file or folder, walked with :func:`find_files`) or an explicit list of files.
    min_size : int
        As for :func:`summarize_file`.

    Returns
    -------
    ScanResult
        Cases, one per (StudyInstanceUID, SeriesInstanceUID), sorted by their first file; a
        multi-frame object (or a Siemens mosaic) that shares its series with other files is a case
        of its own, with ``part`` set to ``"mf1"``, ``"mf2"``... A file without those UIDs is a case
        of its own, keyed by a hash of its path. Files left out are in ``skipped`` with a reason:
        NOT_DICOM, UNREADABLE, TRUNCATED, NOT_AN_IMAGE (not an image storage SOP Class, or under
        ``min_size``; detail names the class), NO_PIXEL_DATA (detail names the SOP class),
        UNSUPPORTED_TRANSFER_SYNTAX (detail names the UID), DUPLICATE (a second file with the
        same SOP Instance UID), or one of :func:`walk_archive`'s (NOT_A_FILE, BROKEN_LINK,
        SYMLINK_LOOP). ``n_files`` counts every path met, skipped ones included.

    Raises
    ------
    InvalidStudyError
        If ``paths`` is a root that does not exist.
    """
    if isinstance(paths, (str, Path)):
        files = list(walk_archive(paths))
    else:
        listed: dict[Path, Path | SkippedFile] = {}
        for item in paths:
            item = Path(item)
            for entry in walk_archive(item) if item.is_dir() else [item]:
                listed.setdefault(_path_of(entry), entry)
        files = [listed[p] for p in sorted(listed)]
    headers: dict[Path, Dataset] = {}
    items: list[HeaderSummary | SkippedFile] = []
    for path in files:
        if isinstance(path, SkippedFile):
            items.append(path)
            continue
        found = _summarize(path, min_size)
        if isinstance(found, SkippedFile):
            items.append(found)
        else:
            items.append(found[0])
            headers[path] = found[1]
    groups, skipped = group_headers(items)
    cases = [
        CaseRef(
            study_uid=g.study_uid,
            series_uid=g.series_uid,
            files=g.files,
            instance_uids=g.instance_uids,
            header=headers[g.files[0]],
            part=g.part,
            geometry=g.geometry,
        )
        for g in groups
    ]
    logger.info("scanned %d files: %d cases, %d skipped", len(files), len(cases), len(skipped))
    return ScanResult(cases=cases, skipped=skipped, n_files=len(files))


def _summarize(path: Path, min_size: int = MIN_IMAGE_SIZE) -> tuple[HeaderSummary, Dataset] | SkippedFile:
    odd = _not_regular(path)  # a FIFO would block the read: never open one
    if odd is not None:
        logger.debug("skip %s: %s (%s)", path, odd.reason.value, odd.detail)
        return odd
    try:
        ds = _usable_header(path, min_size)
    except _Skip as skip:
        logger.debug("skip %s: %s (%s)", path, skip.reason.value, skip.detail)
        return SkippedFile(path, skip.reason, skip.detail)
    except Exception as exc:  # noqa: BLE001 - an odd header must not stop an archive scan
        detail = f"the header cannot be used: {_one_line(exc)}"
        logger.debug("skip %s: %s (%s)", path, SkipReason.UNREADABLE.value, detail)
        return SkippedFile(path, SkipReason.UNREADABLE, detail)
    return _summary(path, ds), ds


def _usable_header(path: Path, min_size: int = MIN_IMAGE_SIZE) -> Dataset:
    """The header of an image (by SOP Class and size) that holds decodable pixel data.

    Raises
    ------
    _Skip
        As :func:`_read_header`, or NOT_AN_IMAGE, NO_PIXEL_DATA, UNSUPPORTED_TRANSFER_SYNTAX.
    """
    header = _read_header(path)
    ds = header.ds
    count = mosaic_count(ds)
    grid = math.ceil(math.sqrt(count)) if count else 1
    tile = (_int(_get(ds, "Rows"), 0) // grid, _int(_get(ds, "Columns"), 0) // grid) if count else None
    why = not_an_image(ds, min_size=min_size, tile=tile)
    if why is not None:
        raise _Skip(SkipReason.NOT_AN_IMAGE, why)
    if header.pixel_tag is None:
        raise _Skip(SkipReason.NO_PIXEL_DATA, f"{_sop_class_name(ds)} has no pixel data")
    problem = _decoder_problem(_transfer_syntax(ds))
    if problem:
        raise _Skip(SkipReason.UNSUPPORTED_TRANSFER_SYNTAX, problem)
    return ds


def _summary(path: Path, ds: Dataset) -> HeaderSummary:
    slices = mosaic_count(ds)  # a mosaic is a volume of its own, read whole (no per-slice geometry)
    return HeaderSummary(
        path=path,
        study_uid=_str(ds, "StudyInstanceUID"),
        series_uid=_str(ds, "SeriesInstanceUID"),
        sop_uid=_str(ds, "SOPInstanceUID"),
        frames=slices or _int(_get(ds, "NumberOfFrames"), 1),
        geometry=None if slices else _geometry(ds),
    )


def _case_key(entry: HeaderSummary) -> tuple[str, str]:
    study, series = entry.study_uid, entry.series_uid
    if study and series:
        return study, series
    # No UIDs to group by: the file is a case of its own, under a key that stays the same
    # from run to run for the same path.
    digest = hashlib.sha1(os.fsencode(entry.path.resolve())).hexdigest()[:16]
    return study or f"nouid-{digest}", f"nouid-{digest}"


def _split(key: tuple[str, str], entries: list[HeaderSummary]) -> list[CaseFiles]:
    entries = sorted(entries, key=lambda e: e.path)

    def make(members: list[HeaderSummary], part: str = "") -> CaseFiles:
        return CaseFiles(
            study_uid=key[0],
            series_uid=key[1],
            files=tuple(e.path for e in members),
            instance_uids=tuple(e.sop_uid for e in members),
            part=part,
            geometry=tuple(e.geometry for e in members),
        )

    multi = [e for e in entries if e.frames > 1]
    if len(entries) == 1 or not multi:
        return [make(entries)]
    # A multi-frame object is a volume of its own; stacking it with its siblings would mix
    # several volumes (Siemens XA writes one object per repetition into one series).
    cases = [make([e], f"mf{i}") for i, e in enumerate(multi, start=1)]
    single = [e for e in entries if e.frames <= 1]
    if single:
        cases.append(make(single))
    return cases


# --------------------------------------------------------------------------------------------
# Walking a folder: what is not a regular file


@dataclass(frozen=True)
class _Folder:
    path: Path
    key: tuple[int, int]  # (st_dev, st_ino)
    parent: _Folder | None


def _path_of(entry: Path | SkippedFile) -> Path:
    return entry.path if isinstance(entry, SkippedFile) else entry


def _what(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO), not a file; it is never opened"
    if stat.S_ISSOCK(mode):
        return "a socket, not a file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device, not a file"
    if stat.S_ISDIR(mode):
        return "a folder, not a file"
    return "not a regular file"


def _unusable(path: Path, error: OSError) -> SkippedFile:
    """Why ``path`` cannot be stat'ed (following links)."""
    if error.errno == errno.ELOOP:
        return SkippedFile(path, SkipReason.SYMLINK_LOOP, "the link leads back to itself")
    if error.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
        return SkippedFile(path, SkipReason.BROKEN_LINK, "the link's target does not exist")
    return SkippedFile(path, SkipReason.UNREADABLE, f"the file cannot be read: {error.strerror or type(error).__name__}")


def _not_regular(path: Path) -> SkippedFile | None:
    """None for a regular file (or a link to one); else why it is skipped."""
    try:
        st = os.stat(path)
    except OSError as e:
        return _unusable(path, e)
    return None if stat.S_ISREG(st.st_mode) else SkippedFile(path, SkipReason.NOT_A_FILE, _what(st.st_mode))


def _walked_already(folder: _Folder, first: Path) -> SkippedFile:
    above = folder.parent
    while above is not None:
        if above.key == folder.key:
            return SkippedFile(folder.path, SkipReason.SYMLINK_LOOP, "the link leads back to a folder above it")
        above = above.parent
    return SkippedFile(folder.path, SkipReason.DUPLICATE, f"the same folder as {first}, walked already")
