"""The standard compressors as the LM's anchor: a language model is a compressor, so its held-out
bits per byte compare directly with what zlib, bzip2 and xz make of the same bytes.

Each compressor gets the held-out documents concatenated, at its strongest setting (zlib level 9,
bzip2 level 9, xz preset 9 with the extreme flag: a 64 MiB window). "xz given the training text"
is what a compressor that has read the training files pays for the held-out bytes:
``size(xz(train + heldout)) - size(xz(train))``, the held-out bytes within reach of its window
(the last 64 MiB of training text), like an LM that learned from the training files.
"""

from __future__ import annotations

import bz2
import lzma
import zlib

XZ_PRESET = 9 | lzma.PRESET_EXTREME
NAMES = {"zlib": "zlib -9", "bzip2": "bzip2 -9", "xz": "xz -9e",
         "xz_given_training_text": "xz -9e given the training text"}


def compressor_bits_per_byte(heldout: bytes, train: bytes | None = None) -> dict[str, float]:
    """Bits per held-out byte of each compressor (keys of :data:`NAMES`); the last only with
    ``train``."""
    if not heldout:
        raise ValueError("no held-out bytes to compress")
    n = len(heldout)
    out = {"zlib": 8 * len(zlib.compress(heldout, 9)) / n,
           "bzip2": 8 * len(bz2.compress(heldout, 9)) / n,
           "xz": 8 * len(lzma.compress(heldout, preset=XZ_PRESET)) / n}
    if train is not None:
        alone = len(lzma.compress(train, preset=XZ_PRESET))
        out["xz_given_training_text"] = 8 * (len(lzma.compress(train + heldout, preset=XZ_PRESET)) - alone) / n
    return out
