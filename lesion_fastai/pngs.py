"""DeepLesion's slice files: 16-bit single-channel PNGs holding HU + 32768, read (`load_hu`), checked
without decoding (`check_png`) and written (`save_hu`); a file that is not such a slice is a
`SliceFileError` naming it and saying what is wrong. `deeplesion.py` reads the dataset around them.
"""
from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ['HU_OFFSET', 'MAX_SLICE_PX', 'SliceFileError', 'open_png', 'load_hu', 'check_png', 'save_hu']

HU_OFFSET = 32768  # DeepLesion PNGs store HU + 32768 as uint16
MAX_SLICE_PX = 4096       # the largest slice side read (DeepLesion's are 512, about 0.1% 768 or 1024): larger is not CT slice data

_SLICE_MODES = ('I;16', 'I;16B', 'I;16L', 'I')
_EXPECTED = 'expected a 16-bit single-channel DeepLesion slice (I;16)'


class SliceFileError(ValueError):
    "A slice file that cannot be used; `path` is the file, the message says what is wrong with it."
    def __init__(self, path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = Path(path)


def open_png(path) -> Image.Image:
    "Open a slice (header only); an unreadable file raises `SliceFileError` naming it and saying what is wrong."
    path = Path(path)
    if not path.is_file(): raise FileNotFoundError(f"{path}: no such slice")
    if path.stat().st_size == 0: raise SliceFileError(path, f"empty file (0 bytes), {_EXPECTED}")
    size = _png_header_size(path)
    if size and max(size) > MAX_SLICE_PX: _too_large(path, size)         # named by its header, before Pillow decodes anything
    try: im = Image.open(path)
    except UnidentifiedImageError: raise SliceFileError(path, f"not an image file (unreadable header), {_EXPECTED}") from None
    except Image.DecompressionBombError as e:       # Pillow refuses before we can read the size: its message has it
        raise SliceFileError(path, f"far larger than a CT slice ({e}); expected at most {MAX_SLICE_PX} x {MAX_SLICE_PX} px") from None
    except (ValueError, OSError, SyntaxError) as e:  # a text chunk that inflates past Pillow's limit, a broken header
        raise SliceFileError(path, f"unreadable PNG header ({e}), {_EXPECTED}") from None
    if im.mode not in _SLICE_MODES:
        im.close()
        raise SliceFileError(path, f"PNG mode {im.mode!r}, {_EXPECTED}")
    if max(im.size) > MAX_SLICE_PX:
        im.close()
        _too_large(path, im.size)
    return im


def _png_header_size(path: Path) -> tuple[int, int] | None:
    "Width and height as a PNG's IHDR chunk states them (the file's first 24 bytes); None for anything else."
    with open(path, 'rb') as f: head = f.read(24)
    if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR': return struct.unpack('>II', head[16:24])
    return None


def _too_large(path: Path, size) -> None:
    raise SliceFileError(path, f"{size[0]} x {size[1]} px, larger than the {MAX_SLICE_PX} x {MAX_SLICE_PX} px read "
                               f"(DeepLesion's slices are 512 px, a few 768 or 1024)")


def load_hu(path: Path | str) -> np.ndarray:
    """A DeepLesion slice in HU as float32 [H, W] (value - 32768), any image size.

    Raises `SliceFileError` (a `ValueError`) naming the file for one that is empty, not an image,
    truncated or corrupt, or not 16-bit single channel: such a file is not DeepLesion data.
    """
    open_png(path).close()                               # the header: size, mode, a bomb
    raw = _checked_chunks(path)
    with Image.open(io.BytesIO(raw)) as im:
        try: a = np.asarray(im)
        except (OSError, SyntaxError, ValueError) as e:   # truncated or corrupt pixel data
            raise SliceFileError(path, f"corrupt or truncated image data ({e}), {_EXPECTED}") from None
    if a.dtype != np.uint16: a = a.astype(np.int64)
    return (a.astype(np.int32) - HU_OFFSET).astype(np.float32)


def check_png(path: Path | str) -> None:
    """Check a slice without decoding its pixels: header, mode, and every chunk's checksum through to the
    end of the file (as Pillow's `verify` does, faster). Catches empty, foreign, 8-bit / RGB and truncated files, as
    `load_hu` would, at a fraction of the cost of decoding; raises `SliceFileError`."""
    open_png(path).close()
    _checked_chunks(path)


def _checked_chunks(path) -> bytes:
    """The bytes of the PNG at `path` once every chunk's CRC matches and the file reaches IEND: a flipped
    bit in the pixel data can still inflate (Pillow checks those CRCs only in `verify`), and a copy cut
    short at its end still decodes."""
    raw = Path(path).read_bytes()
    at = 8
    while True:
        if at + 12 > len(raw):
            raise SliceFileError(path, f"corrupt or truncated image data (the file ends at byte {len(raw)} before its IEND chunk), {_EXPECTED}")
        length, kind = int.from_bytes(raw[at:at + 4], 'big'), raw[at + 4:at + 8]
        end = at + 8 + length
        if end + 4 > len(raw):
            raise SliceFileError(path, f"corrupt or truncated image data (chunk {kind!r} at byte {at} runs past the end), {_EXPECTED}")
        if zlib.crc32(raw[at + 4:end]) != int.from_bytes(raw[end:end + 4], 'big'):
            raise SliceFileError(path, f"corrupt or truncated image data (chunk {kind!r} at byte {at} fails its CRC), {_EXPECTED}")
        if kind == b'IEND': return raw
        at = end + 4


def save_hu(path: Path | str, hu: np.ndarray, compress_level: int = 1) -> None:
    "Write HU [H, W] as a DeepLesion 16-bit PNG (rounded, value = HU + 32768)."
    a = np.clip(np.rint(hu) + HU_OFFSET, 0, 65535).astype(np.uint16)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, compress_level=compress_level)
