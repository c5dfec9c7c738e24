"""``torch.save`` without zip CRC32s, for the duration of one ckptbus save.

``torch.save`` writes a zip archive and by default computes the CRC32 of
every record. For a large optimizer state that checksum is most of the time
``torch.save`` takes (342 MB of AdamW state: 0.32 s with it, 0.11 s without
it, on the development machine). ``torch.load`` never verifies it. A flipped
byte loads silently either way. So ckptbus leaves it out of what it writes,
unless ``dynamic_checkpoint.torch_save_crc32`` asks for it.

The switch is process-wide (``torch.serialization.set_crc32_options``). It
is set only while a ckptbus save writes, and then put back. A ``torch.save``
of your own on another thread at that moment also goes without CRC32s, and
still loads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def torch_save_crc32(enabled: bool) -> Iterator[None]:
    """Inside, ``torch.save`` computes zip CRC32s only if ``enabled``; the previous setting is restored after."""
    previous = torch.serialization.get_crc32_options()
    if previous == enabled:
        yield
        return
    torch.serialization.set_crc32_options(enabled)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)
