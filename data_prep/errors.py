"""The one exception data preparation raises for input that must stop a run before work starts."""

from __future__ import annotations


class DataPrepError(Exception):
    """Bad input or a broken dataset; the message names the problem and how to fix it.

    Per-item problems (an undecodable image, a missing caption) are not errors: they are counted as
    skips by reason and the run goes on. This is for things that make the whole run pointless.
    """
