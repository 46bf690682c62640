"""The ComNeck bitstream container (format spec: docs/bitstream.md).

One image per container: a fixed 16-byte header (magic, version, codec id and two flags, rate
index, codec-weight fingerprint), varint sizes (and, flagged, the photo's own size and the resize
policy), stream lengths, the rANS streams, a CRC32.
Parsing never trusts the input: every failure is a :class:`BitstreamError` with a
machine-readable ``code``, so a gateway answers 4xx and keeps serving.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from .errors import ComneckInputError, ErrorCode
from .latents import EncodedLatents
from .photo import padding_of
from .presets import RATE_LAMBDAS, RESIZE_POLICIES

MAGIC = b"CNKB"
VERSION = 1
FINGERPRINT_BYTES = 8
#: Codec ids on the wire; 0 is reserved.
CODEC_IDS: dict[str, int] = {"elic2022-chandelier": 1, "elic2022-official": 2, "mbt2018-mean": 3}
#: Set in the codec id byte when the entropy parameters were evaluated in fixed point
#: (comneck.fixed_point); clear: CompressAI's float path, as in containers written before it.
FIXED_POINT_FLAG = 0x80
#: Set in the codec id byte when the photo's size and the edge's resize policy follow the padded size.
SOURCE_FLAG = 0x40
#: Resize policies on the wire (comneck.image.RESIZE_POLICIES, in that order).
RESIZE_IDS: dict[str, int] = {name: i for i, name in enumerate(RESIZE_POLICIES)}
#: Largest photo side a container may report (the edge resizes before coding; this only bounds the field).
MAX_SOURCE_SIDE = 1 << 20
#: Largest image side a parser accepts unless told otherwise.
DEFAULT_MAX_SIDE = 8192
_HEADER = struct.Struct(">4sBBB8s")  # magic, version, codec id, rate, fingerprint
_CRC = struct.Struct(">I")


class BitstreamError(ComneckInputError):
    """A container that cannot be decoded; ``code`` says why (see docs/bitstream.md)."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message, code)


def _put_varint(value: int, out: bytearray) -> None:
    """Unsigned LEB128: 7 bits a byte, high bit set on all but the last."""
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return


class _Reader:
    """Bounds-checked reads from the body; running out means a truncated container."""

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def varint(self) -> int:
        value = shift = 0
        while True:
            if self.pos >= self.end:
                raise BitstreamError(ErrorCode.TRUNCATED, "bitstream is truncated: it ends inside its header")
            byte = self.data[self.pos]
            self.pos += 1
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
            if shift > 35:
                raise BitstreamError(ErrorCode.CORRUPTED, "bitstream header holds an over-long number")

    def take(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise BitstreamError(ErrorCode.TRUNCATED, f"bitstream is truncated: a stream needs {n} bytes, {self.end - self.pos} left")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk


@dataclass(frozen=True)
class Source:
    """The photo before the edge resized it for the codec: its size and the resize policy, so a
    gateway can map boxes back to the photo's pixels and tell a backend how the image was framed."""

    size: tuple[int, int]  # (H, W)
    resize: str  # one of comneck.image.RESIZE_POLICIES


@dataclass(frozen=True)
class Bitstream:
    """Everything the gateway needs to decode one image's latents."""

    codec: str
    rate: int
    fingerprint: bytes
    image_size: tuple[int, int]  # (H, W) the codec saw, before padding
    latents: EncodedLatents
    source: Source | None = None  # absent in containers of edges that do not record it

    def to_bytes(self) -> bytes:
        """Serialise (one image: ``latents`` must hold a batch of one)."""
        if self.latents.batch_size != 1:
            raise ValueError("a bitstream holds one image; encode batch items separately")
        if len(self.fingerprint) != FINGERPRINT_BYTES:
            raise ValueError(f"fingerprint must be {FINGERPRINT_BYTES} bytes")
        codec_byte = (CODEC_IDS[self.codec] | (FIXED_POINT_FLAG if self.latents.fixed_point else 0)
                      | (SOURCE_FLAG if self.source else 0))
        out = bytearray(_HEADER.pack(MAGIC, VERSION, codec_byte, self.rate, self.fingerprint))
        for value in (*self.image_size, *self.latents.padded_size):
            _put_varint(value, out)
        if self.source is not None:
            for value in self.source.size:
                _put_varint(value, out)
            out.append(RESIZE_IDS[self.source.resize])
        _put_varint(len(self.latents.strings), out)
        streams = [stream[0] for stream in self.latents.strings]
        for s in streams:
            _put_varint(len(s), out)
        for s in streams:
            out += s
        out += _CRC.pack(zlib.crc32(out))
        return bytes(out)

    def check_codec(self, arch: str, fingerprint: bytes) -> None:
        """Refuse to be decoded by another codec (``codec_mismatch``) instead of yielding garbage."""
        if self.codec != arch:
            raise BitstreamError(ErrorCode.CODEC_MISMATCH, f"bitstream was coded with {self.codec}; this decoder runs {arch}")
        if self.fingerprint != fingerprint:
            raise BitstreamError(
                ErrorCode.CODEC_MISMATCH,
                f"bitstream codec weights {self.fingerprint.hex()} differ from this decoder's {fingerprint.hex()} "
                "(another preset, rate point or checkpoint)",
            )

    @property
    def overhead_bytes(self) -> int:
        """Container bytes beyond the entropy-coded streams."""
        return len(self.to_bytes()) - self.latents.num_bytes

    @classmethod
    def from_bytes(cls, data: bytes, max_side: int = DEFAULT_MAX_SIDE) -> "Bitstream":
        """Parse and validate; raises :class:`BitstreamError` for anything malformed."""
        if len(data) < _HEADER.size + _CRC.size:
            if not data.startswith(MAGIC[: len(data)]) or not data:
                raise BitstreamError(ErrorCode.BAD_MAGIC, "not a ComNeck bitstream (wrong magic bytes)")
            raise BitstreamError(ErrorCode.TRUNCATED, f"bitstream is truncated ({len(data)} bytes)")
        magic, version, codec_byte, rate, fingerprint = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise BitstreamError(ErrorCode.BAD_MAGIC, "not a ComNeck bitstream (wrong magic bytes)")
        if version != VERSION:
            raise BitstreamError(ErrorCode.UNSUPPORTED_VERSION, f"bitstream version {version} is not supported (this build reads {VERSION})")
        body = _Reader(data, _HEADER.size, len(data) - _CRC.size)
        h, w, ph, pw = (body.varint() for _ in range(4))
        raw_source = (body.varint(), body.varint(), body.take(1)[0]) if codec_byte & SOURCE_FLAG else None
        n = body.varint()
        if n > 64:
            raise BitstreamError(ErrorCode.CORRUPTED, f"bitstream declares {n} streams")
        lengths = [body.varint() for _ in range(n)]
        streams = [body.take(length) for length in lengths]
        if body.pos != body.end:
            raise BitstreamError(ErrorCode.CORRUPTED, f"bitstream has {body.end - body.pos} stray bytes before its checksum")
        (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
        if zlib.crc32(data[: -_CRC.size]) != crc:
            raise BitstreamError(ErrorCode.CRC_MISMATCH, "bitstream is corrupted (CRC32 mismatch)")
        codec_id = codec_byte & ~(FIXED_POINT_FLAG | SOURCE_FLAG)
        codec = next((name for name, i in CODEC_IDS.items() if i == codec_id), None)
        if codec is None:
            raise BitstreamError(ErrorCode.UNKNOWN_CODEC, f"bitstream names codec id {codec_id}, unknown to this build")
        if rate not in RATE_LAMBDAS:
            raise BitstreamError(ErrorCode.BAD_RATE, f"bitstream names rate index {rate}; valid are 1..4")
        if not (0 < h <= max_side and 0 < w <= max_side):
            raise BitstreamError(ErrorCode.BAD_SIZE, f"image size {w}x{h} is outside 1..{max_side}")
        if (ph, pw) != padding_of(h, w).padded_size(h, w):
            raise BitstreamError(ErrorCode.BAD_SIZE, f"padded size {pw}x{ph} does not match image size {w}x{h}")
        latents = EncodedLatents([[s] for s in streams], (ph, pw), bool(codec_byte & FIXED_POINT_FLAG))
        return cls(codec, rate, fingerprint, (h, w), latents, _check_source(*raw_source) if raw_source else None)


def _check_source(sh: int, sw: int, policy: int) -> Source:
    """The flagged photo size and resize policy, refused when impossible."""
    if not (0 < sh <= MAX_SOURCE_SIDE and 0 < sw <= MAX_SOURCE_SIDE):
        raise BitstreamError(ErrorCode.BAD_SIZE, f"photo size {sw}x{sh} is outside 1..{MAX_SOURCE_SIDE}")
    if policy >= len(RESIZE_POLICIES):
        raise BitstreamError(ErrorCode.CORRUPTED, f"bitstream names resize policy {policy}, unknown to this build")
    return Source((sh, sw), RESIZE_POLICIES[policy])
