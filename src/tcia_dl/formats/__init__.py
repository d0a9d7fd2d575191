"""Output formats, one registry entry each (as tarfile's OPEN_METH): the folder tree, and
archives made of independent compressed units (formats.tarstreams) with their codec.

A new archive format is a module with its Codec (formats.base says what one must do) and a
TarStreamsTarget subclass naming it, plus one line in FORMATS below; its tests come from
the parametrised format tests."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ..errors import UsageError
from ..logs import printable
from .base import Codec, Target
from .tree import DirectoryTarget
from .xz import TarXzTarget
from .zstd import TarZstTarget

# --format's words -> the output's Target class. The first archive format is what the
# seed's --compression asks for.
FORMATS: dict[str, type[Target]] = {
    "dir": DirectoryTarget,
    "tar.xz": TarXzTarget,
    "tar.zst": TarZstTarget,
}


def target_format(name: str) -> type[Target]:
    """The format --format (or a failure list) names; UsageError with the choices."""
    try:
        return FORMATS[name]
    except KeyError:
        raise UsageError(f"--format {printable(name)}: choose {', '.join(FORMATS)}") from None


def archive_codecs() -> list[Codec]:
    return [target.codec for target in FORMATS.values() if target.codec is not None]


def codec_of(path: Path) -> Codec:
    """The codec of an archive (or its .part) by its name as this tool writes it, else by
    its first bytes (a renamed copy); xz, the first format, when neither says."""
    name = path.name[:-len(".part")] if path.name.endswith(".part") else path.name
    codecs = archive_codecs()
    for codec in codecs:
        if name.endswith(codec.suffix):
            return codec
    with open(path, "rb") as handle:
        head = handle.read(max(len(codec.magic) for codec in codecs))
    for codec in codecs:
        if head.startswith(codec.magic):
            return codec
    return codecs[0]


def archive_format(path: Path) -> type[Target]:
    """The format of an archive (or its .part), by its codec (see codec_of)."""
    codec = codec_of(path)
    return next(target for target in FORMATS.values() if target.codec is codec)


def archive_name(path: Path) -> Optional[str]:
    """The output's name of an archive file this tool writes (<name><suffix>), or None."""
    for codec in archive_codecs():
        if path.name.endswith(codec.suffix):
            return path.name[:-len(codec.suffix)]
    return None
