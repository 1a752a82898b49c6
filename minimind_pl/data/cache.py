"""Token cache: a jsonl file tokenized once into memory-mapped arrays beside it.

A cache is a directory ``<file>.<settings-key>.cache/`` (beside the jsonl file, or under
``cache_dir``; where the file's folder cannot be written, under :func:`user_cache_dir`) holding

- ``tokens.bin``  token ids of all documents, concatenated (uint16 when the vocabulary fits, else uint32)
- ``offsets.bin`` int64 document boundaries: document ``i`` is ``tokens[offsets[i]:offsets[i+1]]``
- ``mask.bin``    uint8 per token, only for formats with a loss mask (SFT): 1 = the token is a target
- only for formats with images (:mod:`minimind_pl.data.formats.vlm`): ``images.bin``, every image reference
  concatenated (``meta["images"]`` says what they are: ``"paths"``, UTF-8 paths as a jsonl line wrote them, relative
  to its folder; ``"bytes"``, the encoded image copied out of a Parquet file), ``image_offsets.bin`` (int64, n_images
  + 1: image ``j`` is ``images[image_offsets[j]:image_offsets[j+1]]``), ``doc_images.bin`` (int64, n_docs + 1:
  document ``i`` has images ``doc_images[i]`` to ``doc_images[i+1]``) and ``doc_lines.bin`` (int64: the line or
  row each document came from, for the errors of an image that fails to load)
- ``meta.json``   what it was built from (file size, mtime, sha256 of the bytes, tokenizer fingerprint,
  the settings that change tokens) and what it holds (documents, tokens, skipped lines).

The directory name is keyed by the settings (format, tokenizer fingerprint, augmentation
ratios, ...), so changing one of them builds a new cache. The source file is checked against
``meta.json``: same size + mtime + sampled-bytes hash -> reused at once; otherwise the full
sha256 decides (a touched but unchanged file is reused, a changed one re-tokenized). A cache is
written into a temporary directory and renamed into place, so a killed run never leaves a
half-written cache behind.

Tokenization streams the file in blocks (RAM does not grow with the file), runs in a process
pool (JSON parsing, chat templates and BPE all in parallel; :mod:`minimind_pl.data.block_map`), and shows a
progress bar. What a
line becomes is decided by a :class:`RecordEncoder` (pretrain text, SFT conversations, ...).
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from minimind_pl.files import TEMP_MARK, atomic_file, stale_temporaries, temporary_path
from minimind_pl.errors import UserError, check_input_file

from .block_map import BLOCK_BYTES, block_records, map_blocks
from .parquet import is_parquet

FORMAT_VERSION = 1
MAX_REPORTED_ERRORS = 20
_SAMPLE_BLOCK = 1 << 16
SKIP_INVALID_HINT = "skip and count bad lines with --data.skip_invalid true (skip_invalid=True in Python)"


class DataFormatError(UserError):
    """A jsonl line that cannot become a training document (names the file and line)."""


# ====================================================================== encoders
class RecordEncoder:
    """Turns parsed jsonl records into token documents; one subclass per data format.

    Subclasses set :attr:`kind` (and bump :attr:`version` when their output changes), set
    :attr:`has_mask` if they produce a per-token loss mask, :attr:`has_images` if their documents carry images,
    and implement :meth:`encode_records`.
    Everything that changes the produced tokens must appear in :meth:`settings` (it keys the cache).
    A record may produce several documents (``docs_per_record``, e.g. chosen + rejected for DPO);
    they are stored consecutively.

    Args:
        tokenizer: a :class:`minimind_pl.tokenizer.Tokenizer` (picklable).
    """

    kind: str = "base"
    version: int = 1
    has_mask: bool = False
    has_images: bool = False
    docs_per_record: int = 1

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def settings(self) -> dict:
        """Everything that changes the produced tokens (JSON-serializable); keys the cache."""
        return {
            "kind": self.kind,
            "version": self.version,
            "format_version": FORMAT_VERSION,
            "tokenizer": self.tokenizer.fingerprint,
            "has_mask": self.has_mask,
            "docs_per_record": self.docs_per_record,
        }

    def encode_records(self, records: Sequence[tuple[int, Any]]) -> list:
        """Encode parsed records.

        Args:
            records: ``(line_number, parsed_json)`` pairs, in file order.

        Returns:
            One entry per record: either a list of ``docs_per_record`` ``(ids, mask)`` pairs
            (``ids`` an int array or list, ``mask`` a uint8 array of the same length or None when
            ``has_mask`` is False; with ``has_images``, ``(ids, mask, images)`` triples, ``images`` a list of
            bytes), or a string saying why the record is invalid.
        """
        raise NotImplementedError


def settings_key(settings: dict) -> str:
    """Stable hex digest of a settings dict."""
    blob = json.dumps(settings, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= (1 << 16) else np.dtype(np.uint32)


# ====================================================================== file fingerprints
def sample_hash(path: Path, size: Optional[int] = None) -> str:
    """Cheap fingerprint: sha256 of 16 blocks of 64 KiB spread over the file (incl. head and tail)."""
    size = os.path.getsize(path) if size is None else size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        if size <= 16 * _SAMPLE_BLOCK:
            h.update(f.read())
        else:
            for i in range(16):
                f.seek((size - _SAMPLE_BLOCK) * i // 15)
                h.update(f.read(_SAMPLE_BLOCK))
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    """sha256 of a file's bytes, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(BLOCK_BYTES):
            h.update(block)
    return h.hexdigest()


# ====================================================================== reading side
class TokenCache:
    """Read-only view of a built cache (memory-mapped; cheap to open, pickles by path).

    Attributes:
        path: the cache directory.
        meta: the parsed ``meta.json``.
        tokens: (n_tokens,) memmap of token ids.
        offsets: (n_docs + 1,) int64 memmap of document boundaries.
        mask: (n_tokens,) uint8 memmap of the loss mask, or None.
        has_images: whether its documents carry images (:meth:`doc_images`, :meth:`doc_line`).
    """

    def __init__(self, path: str | Path, meta: Optional[dict] = None) -> None:
        self.path = Path(path)
        self.meta = meta if meta is not None else json.loads((self.path / "meta.json").read_text())
        self._arrays: Optional[tuple] = None
        self._image_arrays: Optional[tuple] = None

    def _open(self) -> tuple:
        if self._arrays is None:
            m = self.meta
            tokens = np.memmap(self.path / "tokens.bin", dtype=np.dtype(m["dtype"]), mode="r",
                               shape=(m["n_tokens"],))
            offsets = np.memmap(self.path / "offsets.bin", dtype=np.int64, mode="r", shape=(m["n_docs"] + 1,))
            mask = None
            if m["has_mask"]:
                mask = np.memmap(self.path / "mask.bin", dtype=np.uint8, mode="r", shape=(m["n_tokens"],))
            self._arrays = (tokens, offsets, mask)
        return self._arrays

    @property
    def tokens(self) -> np.ndarray:
        """Token ids of all documents, concatenated."""
        return self._open()[0]

    @property
    def offsets(self) -> np.ndarray:
        """Document boundaries (int64, n_docs + 1 entries)."""
        return self._open()[1]

    @property
    def mask(self) -> Optional[np.ndarray]:
        """Per-token loss mask (uint8) or None."""
        return self._open()[2]

    @property
    def n_docs(self) -> int:
        """Number of documents."""
        return int(self.meta["n_docs"])

    @property
    def n_tokens(self) -> int:
        """Number of tokens."""
        return int(self.meta["n_tokens"])

    def doc(self, i: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Token ids (and mask) of document ``i``."""
        tokens, offsets, mask = self._open()
        a, b = int(offsets[i]), int(offsets[i + 1])
        return tokens[a:b], (mask[a:b] if mask is not None else None)

    @property
    def has_images(self) -> bool:
        """Whether the documents carry images (an image format's cache)."""
        return bool(self.meta.get("has_images"))

    def _open_images(self) -> tuple:
        if self._image_arrays is None:
            m = self.meta
            self._image_arrays = tuple(_read_array(self.path / name, dtype, count) for name, dtype, count in (
                ("images.bin", np.uint8, m["image_bytes"]), ("image_offsets.bin", np.int64, m["n_images"] + 1),
                ("doc_images.bin", np.int64, m["n_docs"] + 1), ("doc_lines.bin", np.int64, m["n_docs"])))
        return self._image_arrays

    def doc_images(self, i: int) -> list[bytes]:
        """The image references of document ``i``, in order (paths or encoded bytes: ``meta["images"]``)."""
        return [self.image(j) for j in range(self.first_image(i), self.first_image(i + 1))]

    def first_image(self, i: int) -> int:
        """The cache-wide index of document ``i``'s first image (of its images ``first_image(i)`` to
        ``first_image(i + 1)``); ``first_image(n_docs)`` is the number of images."""
        return int(self._open_images()[2][i])

    def image(self, j: int) -> bytes:
        """The reference of the cache's ``j``-th image (a path or encoded bytes: ``meta["images"]``)."""
        blob, image_offsets, _, _ = self._open_images()
        return blob[int(image_offsets[j]):int(image_offsets[j + 1])].tobytes()

    def image_counts(self) -> np.ndarray:
        """Images per document (int64, n_docs)."""
        return np.diff(self._open_images()[2])

    def doc_line(self, i: int) -> int:
        """The line (jsonl) or row (Parquet) document ``i`` came from."""
        return int(self._open_images()[3][i])

    def __getstate__(self) -> dict:
        return {"path": self.path, "meta": self.meta}

    def __setstate__(self, state: dict) -> None:
        self.path, self.meta, self._arrays, self._image_arrays = state["path"], state["meta"], None, None

    def __repr__(self) -> str:
        return f"TokenCache({str(self.path)!r}, docs={self.n_docs}, tokens={self.n_tokens})"


def _read_array(path: Path, dtype: Any, count: int) -> np.ndarray:
    """``count`` values of ``dtype`` memory-mapped from ``path`` (numpy cannot map an empty file)."""
    if count == 0:
        return np.zeros(0, dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


# ====================================================================== locating / validating
def cache_path(source: str | Path, settings: dict, cache_dir: Optional[str | Path] = None) -> Path:
    """Directory of the cache for ``source`` built with ``settings``.

    Beside the file by default; under ``cache_dir`` the name also carries a hash of the source's
    absolute path, so two files with the same name in different folders do not collide.
    """
    source = Path(source).resolve()
    key = settings_key(settings)[:16]
    if cache_dir is None:
        return source.parent / f"{source.name}.{key}.cache"
    tag = hashlib.sha256(str(source).encode()).hexdigest()[:8]
    return Path(cache_dir).expanduser().resolve() / f"{source.name}.{tag}.{key}.cache"


def user_cache_dir() -> Path:
    """Where token caches go when a data file's own folder is read-only: ``$XDG_CACHE_HOME/minimind_pl/tokens``,
    else ``~/.cache/minimind_pl/tokens`` (a relative ``XDG_CACHE_HOME`` is ignored, as the XDG spec says)."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(base) if os.path.isabs(base) else Path.home() / ".cache") / "minimind_pl" / "tokens"


def _denied(err: OSError) -> bool:
    """Whether ``err`` means "this folder cannot be written" (permission, or a read-only file system)."""
    return isinstance(err, PermissionError) or err.errno == errno.EROFS


def writable(folder: Path) -> bool:
    """Whether files can be created in ``folder`` (made if missing), found by creating one.

    Permission bits cannot tell: root writes anywhere they forbid, and a read-only mount forbids what they allow.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".write-test-", dir=folder)
    except OSError as err:
        if _denied(err):
            return False
        raise
    os.close(handle)
    os.unlink(probe)
    return True


def _read_meta(path: Path) -> Optional[dict]:
    try:
        return json.loads((path / "meta.json").read_text())
    except (OSError, ValueError):
        return None


def _write_json_atomic(path: Path, data: dict) -> None:
    with atomic_file(path) as handle:
        handle.write(json.dumps(data, indent=1, ensure_ascii=False).encode())


def _files_complete(path: Path, meta: dict) -> bool:
    itemsize = np.dtype(meta["dtype"]).itemsize
    try:
        ok = (path / "tokens.bin").stat().st_size == meta["n_tokens"] * itemsize
        ok &= (path / "offsets.bin").stat().st_size == (meta["n_docs"] + 1) * 8
        if meta["has_mask"]:
            ok &= (path / "mask.bin").stat().st_size == meta["n_tokens"]
        if meta.get("has_images"):
            ok &= (path / "images.bin").stat().st_size == meta["image_bytes"]
            for name, count in (("image_offsets.bin", meta["n_images"] + 1), ("doc_images.bin", meta["n_docs"] + 1),
                                ("doc_lines.bin", meta["n_docs"])):
                ok &= (path / name).stat().st_size == count * 8
    except OSError:
        return False
    return bool(ok)


def check_cache(path: Path, source: Path, settings: dict, verbose: bool = True) -> Optional[dict]:
    """Return the cache's meta if it is complete and matches ``source`` and ``settings``, else None.

    Same size, mtime and sampled-bytes hash: valid at once. Same size but another mtime: the
    full sha256 decides (and the recorded mtime is refreshed when it matches).
    """
    meta = _read_meta(path)
    if meta is None or meta.get("format_version") != FORMAT_VERSION or meta.get("settings") != settings:
        return None
    if not _files_complete(path, meta):
        return None
    st = os.stat(source)
    if st.st_size != meta["source_size"]:
        return None
    if st.st_mtime_ns == meta["source_mtime_ns"] and sample_hash(source, st.st_size) == meta["source_sample_hash"]:
        return meta
    if verbose:
        print(f"[minimind_pl.data] {source} was modified since it was tokenized; checking its content hash")
    if file_sha256(source) != meta["source_sha256"]:
        return None
    meta = dict(meta, source_mtime_ns=st.st_mtime_ns, source_sample_hash=sample_hash(source, st.st_size))
    with contextlib.suppress(OSError):
        _write_json_atomic(path / "meta.json", meta)
    return meta


# ====================================================================== building
@dataclass
class _ChunkResult:
    tokens: np.ndarray
    mask: Optional[np.ndarray]
    lengths: np.ndarray
    n_lines: int
    n_records: int
    errors: list = field(default_factory=list)
    images: list = field(default_factory=list)  # image references (bytes) of every document, in order
    image_counts: list = field(default_factory=list)  # images per document
    doc_lines: list = field(default_factory=list)  # line (row) number per document, for image caches


def encode_block(encoder: RecordEncoder, first_line: int, data: Any, dtype: np.dtype) -> _ChunkResult:
    """Parse and tokenize one block of :func:`~minimind_pl.data.block_map.iter_blocks` (jsonl lines or Parquet
    rows) starting at line (row) ``first_line``."""
    records, errors, n_lines = block_records(first_line, data)
    results = encoder.encode_records(records) if records else []
    limit = np.iinfo(dtype).max
    toks, masks, lengths = [], [], []
    chunk = _ChunkResult(tokens=np.zeros(0, dtype), mask=None, lengths=np.zeros(0, np.int64), n_lines=n_lines,
                         n_records=len(records), errors=errors)
    for (line_no, _), res in zip(records, results):
        if isinstance(res, str):
            errors.append((line_no, res))
            continue
        for ids, mask, *images in res:
            if encoder.has_images:
                chunk.images += images[0]
                chunk.image_counts.append(len(images[0]))
                chunk.doc_lines.append(line_no)
            ids = np.asarray(ids, dtype=np.int64)
            if ids.size and (ids.min() < 0 or ids.max() > limit):
                raise ValueError(f"token id {int(ids.max())} does not fit the cache dtype {dtype}")
            toks.append(ids.astype(dtype))
            if encoder.has_mask:
                masks.append(np.asarray(mask, dtype=np.uint8))
            lengths.append(ids.size)
    errors.sort()
    if toks:
        chunk.tokens = np.concatenate(toks)
    if encoder.has_mask:
        chunk.mask = np.concatenate(masks) if masks else np.zeros(0, np.uint8)
    chunk.lengths = np.asarray(lengths, dtype=np.int64)
    return chunk


def _format_error(source: Path, line_no: int, msg: str) -> str:
    return f"{source}, {'row' if is_parquet(source) else 'line'} {line_no}: {msg}"


def _clean_stale_tmp(final: Path) -> None:
    """Remove temporary build folders of this cache left by killed runs on this host (named as checkpoints'
    temporary files are: ``files.temporary_path``)."""
    for tmp in stale_temporaries(final.parent, folders=True):
        if tmp.name.startswith(f"{final.name}{TEMP_MARK}"):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def _build_lock(final: Path) -> Iterator[None]:
    """Exclusive lock so that concurrent builders (ranks, nodes) wait instead of duplicating work."""
    lock_path = final.parent / f"{final.name}.lock"
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _no_documents(source: Path, argument: Optional[str], size: int, n_skipped: int, errors: list) -> str:
    """The message for a data file without a single document: empty, only blank lines, or only bad lines."""
    named = f"{source} (from {argument})" if argument else str(source)
    if n_skipped:
        line_no, msg = errors[0]
        return (f"{named} holds no valid documents: none of its {n_skipped} non-blank lines is valid "
                f"(first: line {line_no}: {msg}); fix them")
    why = "the file is empty" if size == 0 else "it has only blank lines"
    return f"{named} holds no documents ({why}); fill it with one JSON object per line, or name another file"


@dataclass
class _BuildCounts:
    """What a build has written so far, and the bad lines it skipped (at most ``MAX_REPORTED_ERRORS`` kept)."""

    n_docs: int = 0
    n_tokens: int = 0
    n_lines: int = 0
    n_records: int = 0
    n_skipped: int = 0
    errors: list = field(default_factory=list)
    n_images: int = 0
    image_bytes: int = 0

    def add(self, chunk: _ChunkResult, source: Path, skip_invalid: bool) -> None:
        """Count one block in; its first bad line raises :class:`DataFormatError` unless ``skip_invalid``."""
        if chunk.errors:
            if not skip_invalid:
                line_no, msg = chunk.errors[0]
                raise DataFormatError(f"{_format_error(source, line_no, msg)} (fix the line, or {SKIP_INVALID_HINT})")
            self.n_skipped += len(chunk.errors)
            self.errors.extend(chunk.errors[: max(0, MAX_REPORTED_ERRORS - len(self.errors))])
        self.n_tokens += int(chunk.lengths.sum())
        self.n_docs += int(chunk.lengths.size)
        self.n_lines += chunk.n_lines
        self.n_records += chunk.n_records
        self.n_images += len(chunk.images)
        self.image_bytes += sum(map(len, chunk.images))


class _ImageFiles:
    """The image files of a cache being built (see the module doc), written chunk by chunk."""

    NAMES = ("images.bin", "image_offsets.bin", "doc_images.bin", "doc_lines.bin")

    def __init__(self, folder: Path, files: contextlib.ExitStack) -> None:
        self.handles = [files.enter_context(open(folder / name, "wb")) for name in self.NAMES]
        for handle in self.handles[1:3]:  # both offset arrays start at 0
            handle.write(np.zeros(1, np.int64).tobytes())

    def write(self, chunk: _ChunkResult, counts: _BuildCounts) -> None:
        """Append ``chunk``'s images; ``counts`` are the totals before it."""
        blob, image_offsets, doc_images, doc_lines = self.handles
        for image in chunk.images:
            blob.write(image)
        sizes = np.fromiter(map(len, chunk.images), np.int64, len(chunk.images))
        (counts.image_bytes + np.cumsum(sizes)).tofile(image_offsets)
        (counts.n_images + np.cumsum(np.asarray(chunk.image_counts, np.int64))).tofile(doc_images)
        np.asarray(chunk.doc_lines, np.int64).tofile(doc_lines)


def _write_arrays(source: Path, encoder: RecordEncoder, folder: Path, dtype: np.dtype, skip_invalid: bool,
                  num_proc: Optional[int], progress: bool, hasher: Any) -> _BuildCounts:
    """Tokenize ``source`` into ``folder``'s ``tokens.bin``, ``offsets.bin`` (and ``mask.bin``), synced to disk."""
    counts = _BuildCounts()
    with contextlib.ExitStack() as files:
        f_tok = files.enter_context(open(folder / "tokens.bin", "wb"))
        f_off = files.enter_context(open(folder / "offsets.bin", "wb"))
        f_mask = files.enter_context(open(folder / "mask.bin", "wb")) if encoder.has_mask else None
        image_files = _ImageFiles(folder, files) if encoder.has_images else None
        f_off.write(np.zeros(1, np.int64).tobytes())
        chunks = files.enter_context(contextlib.closing(map_blocks(
            source, functools.partial(encode_block, encoder, dtype=dtype), num_proc, f"tokenizing {source.name}",
            progress, block_bytes=BLOCK_BYTES, hasher=hasher)))
        for chunk in chunks:
            first_offset = counts.n_tokens
            if image_files is not None:
                image_files.write(chunk, counts)  # before add() moves the totals on past this chunk
            counts.add(chunk, source, skip_invalid)
            chunk.tokens.tofile(f_tok)
            if f_mask is not None:
                chunk.mask.tofile(f_mask)
            if chunk.lengths.size:
                (first_offset + np.cumsum(chunk.lengths)).astype(np.int64).tofile(f_off)
        for fh in (f_tok, f_off, f_mask, *(image_files.handles if image_files else ())):
            if fh is not None:
                fh.flush()
                os.fsync(fh.fileno())
    return counts


def _check_built(source: Path, before: os.stat_result, counts: _BuildCounts, argument: Optional[str]) -> None:
    """Refuse a build without a single document, or of a file that changed while it was read."""
    if counts.n_docs == 0:
        raise DataFormatError(_no_documents(source, argument, before.st_size, counts.n_skipped, counts.errors))
    after = os.stat(source)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise RuntimeError(f"{source} changed while it was being tokenized; run again")


def _cache_meta(source: Path, st: os.stat_result, encoder: RecordEncoder, dtype: np.dtype, sha256: str,
                counts: _BuildCounts, seconds: float) -> dict:
    """The ``meta.json`` of a built cache (its keys and their order are the cache format: keep them)."""
    return {
        "format_version": FORMAT_VERSION,
        "settings": encoder.settings(),
        "source": str(source.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "source_sha256": sha256,
        "source_sample_hash": sample_hash(source, st.st_size),
        "dtype": dtype.name,
        "has_mask": encoder.has_mask,
        "docs_per_record": encoder.docs_per_record,
        **({"has_images": True, "images": "bytes" if is_parquet(source) else "paths", "n_images": counts.n_images,
            "image_bytes": counts.image_bytes} if encoder.has_images else {}),
        "n_docs": counts.n_docs,
        "n_tokens": counts.n_tokens,
        "n_lines": counts.n_lines,
        "n_records": counts.n_records,
        "n_skipped": counts.n_skipped,
        "skipped_examples": [{"line": ln, "error": msg} for ln, msg in counts.errors],
        "build_seconds": round(seconds, 3),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }


def _move_into_place(built: Path, final: Path) -> None:
    """Rename the built folder to ``final``, replacing an old cache there (renamed away first, then removed)."""
    if final.exists():
        old = final.parent / f"{final.name}.old-{uuid.uuid4().hex[:6]}"
        os.rename(final, old)
        os.rename(built, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(built, final)


def build_cache(source: str | Path, encoder: RecordEncoder, final: str | Path, skip_invalid: bool = False,
                num_proc: Optional[int] = None, progress: bool = True, argument: Optional[str] = None) -> dict:
    """Tokenize ``source`` into the cache directory ``final`` (atomically); return its meta.

    Args:
        source: the jsonl file.
        encoder: turns parsed lines into documents.
        final: the cache directory to create (replaced if it exists).
        skip_invalid: skip (and count) bad lines instead of raising :class:`DataFormatError`.
        num_proc: tokenizer processes (None: all CPUs up to 32; 1: this process only).
        progress: show a progress bar.
        argument: the argument ``source`` came from (``--data.val_path``), for the messages.
    """
    source, final = Path(source), Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_stale_tmp(final)
    tmp = temporary_path(final)
    tmp.mkdir()
    dtype = token_dtype(encoder.tokenizer.vocab_size)
    st = os.stat(source)
    hasher = hashlib.sha256()
    started = time.time()
    try:
        counts = _write_arrays(source, encoder, tmp, dtype, skip_invalid, num_proc, progress, hasher)
        _check_built(source, st, counts, argument)
        meta = _cache_meta(source, st, encoder, dtype, hasher.hexdigest(), counts, time.time() - started)
        _write_json_atomic(tmp / "meta.json", meta)
        _move_into_place(tmp, final)
        return meta
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def find_cache(source: Path, settings: dict, cache_dir: Optional[str | Path] = None,
               verbose: bool = True) -> tuple[Optional[Path], Optional[dict]]:
    """``(directory, meta)`` of a valid cache of ``source``, or ``(None, None)``; reads only, writes nothing.

    Looks under ``cache_dir`` if given, else beside the file and then in :func:`user_cache_dir` (where a
    read-only data folder sends its caches).
    """
    folders = [cache_dir] if cache_dir is not None else [None, user_cache_dir()]
    for folder in folders:
        path = cache_path(source, settings, folder)
        meta = check_cache(path, source, settings, verbose) if path.exists() else None
        if meta is not None:
            return path, meta
    return None, None


def writable_cache_path(source: Path, settings: dict, cache_dir: Optional[str | Path] = None,
                        verbose: bool = True) -> Path:
    """Where to build the cache of ``source``: under ``cache_dir`` if given (a :class:`UserError` if it cannot
    be written), else beside the file, else (a read-only data folder) in :func:`user_cache_dir`, saying so."""
    if cache_dir is not None:
        path = cache_path(source, settings, cache_dir)
        if not writable(path.parent):
            raise UserError(f"cache_dir {path.parent} is not writable, so the token cache of {source} cannot be "
                            "built there; give a writable folder with --data.cache_dir PATH, or leave it unset "
                            "to keep caches beside the data")
        return path
    beside = cache_path(source, settings)
    if writable(beside.parent):
        return beside
    path = cache_path(source, settings, user_cache_dir())
    if not writable(path.parent):
        raise UserError(f"cannot build the token cache of {source}: neither its folder nor {path.parent} is "
                        "writable; give a writable folder with --data.cache_dir PATH")
    if verbose:
        print(f"[minimind_pl.data] {beside.parent} is not writable; the token cache of {source.name} goes to {path}")
    return path


def ensure_cache(source: str | Path, encoder: RecordEncoder, cache_dir: Optional[str | Path] = None,
                 skip_invalid: bool = False, num_proc: Optional[int] = None, progress: bool = True,
                 verbose: bool = True, argument: Optional[str] = None) -> TokenCache:
    """Open the valid cache of ``source`` or build it (once, under a lock); return it.

    A cache built with ``skip_invalid=True`` that skipped lines is refused when ``skip_invalid``
    is False (the error names the first bad line), so bad data never passes silently.

    Args:
        source: the jsonl file.
        encoder: turns parsed lines into documents; its settings key the cache.
        cache_dir: where caches go (default: beside the file, or :func:`user_cache_dir` if its folder is read-only).
        skip_invalid: skip and count bad lines instead of raising.
        num_proc: tokenizer processes (None: all CPUs up to 32).
        progress: show a progress bar while building.
        verbose: print what happens (built / skipped lines / where a cache goes).
        argument: the argument ``source`` came from (``--data.train_path``), for the messages.
    """
    source = check_input_file(source, argument)
    settings = encoder.settings()
    final, meta = find_cache(source, settings, cache_dir, verbose)
    if meta is None:
        final, meta = _build_once(source, encoder, writable_cache_path(source, settings, cache_dir, verbose),
                                  skip_invalid, num_proc, progress, verbose, argument)
    elif verbose and final.parent == user_cache_dir().resolve():
        print(f"[minimind_pl.data] using the token cache of {source.name} in {final}")
    if meta["n_skipped"]:
        first = meta["skipped_examples"][0] if meta["skipped_examples"] else {"line": "?", "error": "?"}
        if not skip_invalid:
            raise DataFormatError(f"{_format_error(source, first['line'], first['error'])} ({meta['n_skipped']} "
                                  f"invalid lines in this file; fix them, or {SKIP_INVALID_HINT})")
        if verbose:
            print(f"[minimind_pl.data] {source}: skipped {meta['n_skipped']} invalid lines "
                  f"(first: line {first['line']}: {first['error']})")
    return TokenCache(final, meta)


def _build_once(source: Path, encoder: RecordEncoder, final: Path, skip_invalid: bool, num_proc: Optional[int],
                progress: bool, verbose: bool, argument: Optional[str]) -> tuple[Path, dict]:
    """Build the cache ``final`` under a lock, unless a concurrent builder made it meanwhile: ``(final, meta)``."""
    settings = encoder.settings()
    try:
        with _build_lock(final):
            meta = check_cache(final, source, settings, verbose) if final.exists() else None
            if meta is not None:
                return final, meta
            meta = build_cache(source, encoder, final, skip_invalid=skip_invalid, num_proc=num_proc,
                               progress=progress, argument=argument)
    except OSError as err:
        if not _denied(err):
            raise
        raise UserError(f"cannot write the token cache of {source} in {final.parent} ({err.strerror}: "
                        f"{err.filename}); give a writable folder with --data.cache_dir PATH") from err
    if verbose:
        print(f"[minimind_pl.data] tokenized {source}: {meta['n_docs']:,} documents, "
              f"{meta['n_tokens']:,} tokens in {meta['build_seconds']:.1f}s -> {final}")
    return final, meta
