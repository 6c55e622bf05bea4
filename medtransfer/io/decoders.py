"""Which pydicom plugin decodes which compressed transfer syntax, what to install when none can, and what
to say when the installed ones fail.

The default install brings the permissively licensed plugins (pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls,
Pillow). ``pylibjpeg-libjpeg`` is GPL-3.0 and ``python-gdcm`` a separate build, so both are left to the
user; every hint names the licence and puts the permissive choice first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass


@dataclass(frozen=True)
class Plugin:
    """A pydicom decoding plugin for one transfer syntax: the pip package that provides it, its licence and
    the highest BitsStored it decodes in that syntax."""

    name: str
    package: str
    licence: str
    max_bits: int = 16
    extra: str = ""  # the medtransfer extra that installs it, for those not in the default install


_PILLOW_JPEG = Plugin("pillow", "Pillow", "HPND", max_bits=8)
_GDCM = Plugin("gdcm", "python-gdcm", "BSD-3-Clause", extra="gdcm")
_LIBJPEG = Plugin("pylibjpeg", "pylibjpeg-libjpeg", "GPL-3.0", extra="libjpeg")
_OPENJPEG = Plugin("pylibjpeg", "pylibjpeg-openjpeg", "MIT")
_PILLOW_J2K = Plugin("pillow", "Pillow", "HPND; its PyPI wheels include OpenJPEG")
_JPEGLS = Plugin("pyjpegls", "pyjpegls", "MIT")

# Per compressed syntax, the plugins that decode it: permissive licences first, GPL last.
PLUGINS: dict[str, tuple[Plugin, ...]] = {
    "1.2.840.10008.1.2.4.50": (_PILLOW_JPEG, _GDCM, _LIBJPEG),  # JPEG Baseline
    "1.2.840.10008.1.2.4.51": (_PILLOW_JPEG, _GDCM, _LIBJPEG),  # JPEG Extended (8 or 12 bit)
    "1.2.840.10008.1.2.4.57": (_GDCM, _LIBJPEG),  # JPEG Lossless
    "1.2.840.10008.1.2.4.70": (_GDCM, _LIBJPEG),  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80": (_JPEGLS, _GDCM, _LIBJPEG),  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": (_JPEGLS, _GDCM, _LIBJPEG),  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": (_OPENJPEG, _PILLOW_J2K, _GDCM),  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": (_OPENJPEG, _PILLOW_J2K, _GDCM),  # JPEG 2000
    "1.2.840.10008.1.2.4.201": (_OPENJPEG,),  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": (_OPENJPEG,),  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": (_OPENJPEG,),  # HTJ2K
    "1.2.840.10008.1.2.5": (Plugin("pylibjpeg", "pylibjpeg-rle", "MIT"), Plugin("pydicom", "pydicom", "MIT")),  # RLE
}

# Where several installed plugins decode a syntax, the one measured fastest by
# benchmarks/io_bench.py (pylibjpeg-rle is ~2x pydicom's numpy RLE; openjpeg ≈ Pillow for J2K).
PREFERRED_DECODERS = {
    "1.2.840.10008.1.2.5": ("pylibjpeg", "pydicom"),
    "1.2.840.10008.1.2.4.90": ("pylibjpeg", "pillow"),
    "1.2.840.10008.1.2.4.91": ("pylibjpeg", "pillow"),
    "1.2.840.10008.1.2.4.201": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.202": ("pylibjpeg",),
    "1.2.840.10008.1.2.4.203": ("pylibjpeg",),
}

# Uncompressed syntaxes read straight from the PixelData bytes (little/big endian).
NATIVE_SYNTAXES = {
    "1.2.840.10008.1.2": "<",
    "1.2.840.10008.1.2.1": "<",
    "1.2.840.10008.1.2.1.99": "<",
    "1.2.840.10008.1.2.2": ">",
}


def syntax_name(ts: str) -> str:
    """``"JPEG Baseline (Process 1) (1.2.840.10008.1.2.4.50)"``: the UID's name and the UID."""
    try:
        from pydicom.uid import UID

        name = UID(ts).name
        return f"{name} ({ts})" if name != ts else ts
    except Exception:  # pragma: no cover
        return ts


@functools.lru_cache(maxsize=None)
def decoder_for(ts: str) -> tuple[str, tuple[str, ...]]:
    """The plugin medtransfer tries first for transfer syntax ``ts`` and all installed ones.

    ``("", ())`` for uncompressed syntaxes or when pydicom has no decoder for ``ts``.
    """
    if ts in NATIVE_SYNTAXES:
        return "", ()
    try:
        from pydicom.pixels import get_decoder

        available = tuple(get_decoder(ts).available_plugins)
    except Exception:
        return "", ()
    for plugin in PREFERRED_DECODERS.get(ts, ()):
        if plugin in available:
            return plugin, available
    return (available[0] if available else ""), available


def decoder_available(ts: str) -> bool:
    """Whether the installed plugins can decode pixel data in transfer syntax ``ts``."""
    if not ts or ts in NATIVE_SYNTAXES:
        return True
    return bool(decoder_for(ts)[1])


def _install_line(plugins: list[Plugin]) -> str:
    choices = []
    for p in plugins:
        note = f"{p.licence}: check that it suits your use" if p.licence.startswith("GPL") else p.licence
        target = f'"medtransfer[{p.extra}]" ({p.package}, {note})' if p.extra else f"{p.package} ({note})"
        choices.append(f"pip install {target}")
    return ", or ".join(choices)


def plugins_that_decode(ts: str, bits_stored: int | None = None, exclude: tuple[str, ...] = ()) -> list[Plugin]:
    """The plugins able to decode ``ts`` at ``bits_stored``, permissive licences first, minus ``exclude``."""
    return [
        p for p in PLUGINS.get(ts, ())
        if (bits_stored is None or bits_stored <= p.max_bits) and p.name not in exclude
    ]


def missing_decoder_hint(ts: str, bits_stored: int | None = None) -> str:
    """What to install for a transfer syntax no installed plugin decodes (permissive licences first)."""
    plugins = plugins_that_decode(ts, bits_stored)
    if not plugins:
        return "no pydicom decoder plugin is known for this transfer syntax"
    return f"install a decoder plugin: {_install_line(plugins)}"


def plugin_reason(exc: BaseException) -> str:
    """The plugin's own reason from a pydicom decoding error ("Unable to decode as exceptions were raised by
    all available plugins:\n  pillow: <reason>" keeps the reason on its second line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        name, _, reason = lines[1].partition(": ")
        return reason or name
    return lines[0] if lines else type(exc).__name__


def decode_failure_reason(ts: str, bits_stored: int, failures: dict[str, str]) -> str:
    """Why compressed pixel data could not be decoded: the syntax, the bit depth, each plugin tried with
    its own reason (``failures``: plugin → :func:`plugin_reason`), and the plugins (with licence) that would decode it, or a corrupt stream when every
    plugin able to decode this syntax and depth failed."""
    tried = "; ".join(f"{name} ({reason})" for name, reason in failures.items())
    head = f"cannot decode {syntax_name(ts)}, {bits_stored}-bit samples; tried: {tried}"
    known = PLUGINS.get(ts, ())
    unable = [p.name for p in known if p.name in failures and bits_stored > p.max_bits]
    others = plugins_that_decode(ts, bits_stored, exclude=tuple(failures))
    if unable and others:
        return (f"{head}. {', '.join(unable)} cannot decode {bits_stored}-bit data in this syntax; a plugin that can: "
                f"{_install_line(others)}")
    if others:
        return f"{head}. The stream may be corrupt; if it is not, another plugin may decode it: {_install_line(others)}"
    return f"{head}. Every plugin that supports this syntax failed: the pixel data is probably corrupt or truncated"
