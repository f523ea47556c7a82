"""The x86 bzImage setup header, read in one place: the kernel's version, its size, its payload.

The boot protocol (Documentation/arch/x86/boot.rst) puts a setup header at 0x1F1:
"HdrS" at 0x202, the protocol version at 0x206, setup_sects at 0x1F1 (0 means 4),
syssize (16-byte units) at 0x1F4, kernel_version (offset - 0x200) at 0x20E, and
from protocol 2.08 on payload_offset/payload_length at 0x248/0x24C.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

from lab.run import BadInput

log = logging.getLogger("racelab.bzimage")

MAGIC = b"HdrS"
_PAYLOADS = {  # payload magic -> decompressor in Python's standard library
    b"\xfd7zXZ\x00": "xz", b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\x5d\x00\x00": "lzma",
}


@dataclass(frozen=True)
class SetupHeader:
    protocol: int              # boot protocol version, e.g. 0x20f
    setup_sects: int           # 512-byte sectors of real-mode setup after the boot sector
    syssize: int               # protected-mode code size in 16-byte units
    version_offset: int        # where the kernel_version string starts (file offset)
    payload_offset: int | None # file offset of the compressed payload (protocol >= 2.08)
    payload_length: int | None

    @property
    def size(self) -> int:
        """The bytes the header says the image has (a signed image is longer)."""
        return (self.setup_sects + 1) * 512 + self.syssize * 16


def setup_header(data: bytes) -> SetupHeader | None:
    """The setup header at the start of data (at least 0x206 bytes), or None if it has none."""
    if len(data) < 0x206 or data[0x202:0x206] != MAGIC:
        return None
    protocol = struct.unpack_from("<H", data, 0x206)[0] if len(data) >= 0x208 else 0
    setup_sects = data[0x1F1] or 4
    offset = length = None
    if protocol >= 0x208 and len(data) >= 0x250:
        offset = (setup_sects + 1) * 512 + struct.unpack_from("<I", data, 0x248)[0]
        length = struct.unpack_from("<I", data, 0x24C)[0]
    version_offset = (int.from_bytes(data[0x20E:0x210], "little") + 0x200) if len(data) >= 0x210 else 0
    return SetupHeader(protocol, setup_sects, int.from_bytes(data[0x1F4:0x1F8], "little"),
                       version_offset, offset, length)


def version(path: Path) -> str:
    """The `uname -r` a bzImage will report, read from its setup header."""
    with open(path, "rb") as f:
        head = f.read(0x10000)
    h = setup_header(head)
    if h is None or len(head) < 0x210:
        raise BadInput(f"not a bzImage (no HdrS setup header): {path}")
    raw = head[h.version_offset:h.version_offset + 256].split(b"\0")[0].decode(errors="replace")
    return raw.split(" ")[0]


def truncation(path: Path) -> str:
    """What is wrong with a bzImage shorter than its setup header says; empty if nothing."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(0x206)
    except OSError as e:
        return f"unreadable ({e.strerror})"
    h = setup_header(head)
    if h is None:
        return f"no boot header ({size} bytes)"
    return "" if size >= h.size else f"truncated: {size} bytes, its header says {h.size}"


def payload(data: bytes) -> bytes | None:
    """The kernel a bzImage carries, decompressed: found through the setup header's
    payload_offset; without one (an old protocol, a bare compressed image), the first
    stream in the file that decompresses to an ELF.  None when neither works."""
    h = setup_header(data)
    if h is not None and h.payload_offset is not None:
        out = _decompress(data[h.payload_offset:])
        if out is not None:
            return out
    return _scan(data)


def _decompress(blob: bytes) -> bytes | None:
    import bz2
    import lzma
    import zlib

    kind = next((k for m, k in _PAYLOADS.items() if blob.startswith(m)), None)
    try:
        if kind in ("xz", "lzma"):
            # A decompressor object: the payload is followed by its size field.
            return lzma.LZMADecompressor().decompress(blob)
        if kind == "gzip":
            return zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(blob)
        if kind == "bzip2":
            return bz2.BZ2Decompressor().decompress(blob)
    except (OSError, EOFError, ValueError, zlib.error, lzma.LZMAError) as e:
        log.debug("cannot decompress the kernel payload (%s): %s", kind, e)
    return None


def _scan(data: bytes) -> bytes | None:
    import bz2
    import lzma
    import zlib

    for magic, make_dec in ((b"\x1f\x8b\x08", lambda: zlib.decompressobj(31)),
                            (b"\xfd7zXZ\x00", lzma.LZMADecompressor),
                            (b"BZh", bz2.BZ2Decompressor)):
        off = data.find(magic)
        while off != -1:
            try:
                out = make_dec().decompress(data[off:])
            except (zlib.error, lzma.LZMAError, OSError, EOFError, ValueError):
                out = b""
            if out.startswith(b"\x7fELF"):
                return out
            off = data.find(magic, off + 1)
    return None
