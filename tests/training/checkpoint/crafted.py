"""A pickle that runs code when loaded unsafely: what safe loading must refuse without running it."""

from __future__ import annotations

from pathlib import Path

import torch


class WritesMarker:
    """Unpickling it writes `marker`: proof that the pickle's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


def check_the_payload_is_real(tmp_path: Path, key: str) -> None:
    """The payload does run under torch.load(weights_only=False), the unsafe load it guards against."""
    control = tmp_path / "control-marker"
    torch.save({key: WritesMarker(control)}, tmp_path / "control.pt")
    torch.load(tmp_path / "control.pt", weights_only=False)
    assert control.exists()
