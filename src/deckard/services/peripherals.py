"""What a desktop offers the browser besides its picture (issue 14): files, printing, sound; per tenant and OSF.

One reading of the ``portal.*`` switches for the portal's desktop list, the files and sound tickets and the
broker's channels (``broker/files.py``, ``broker/sound.py``), so they never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.model.errors import PermissionDenied
from deckard.services.config import read_configs

PRINT_DIR = "PDF"  # where the desktop's PDF printer (cups-pdf: ``Out ${HOME}/PDF``) leaves each job, in the home


@dataclass(frozen=True)
class Peripherals:
    files: bool  # the file panel: upload into ~/Uploads, download from the home
    printing: bool  # print jobs reach the browser as PDFs (read from PRINT_DIR)
    max_upload_bytes: int
    sound: bool = True  # the desktop's sound plays in the page (broker/sound.py)

    @property
    def channel(self) -> bool:
        """Whether the desktop needs the file channel at all (printing rides on it)."""
        return self.files or self.printing

    def features(self) -> dict[str, bool]:
        return {"files": self.files, "printing": self.printing, "sound": self.sound}

    def require(self, channel: str) -> None:
        """403 where the administrator turned ``channel`` (``files``: the file channel, ``sound``) off."""
        if channel == "files" and not self.channel:
            raise PermissionDenied(
                "your administrator turned file transfer off for this desktop", code="files_disabled"
            )
        if channel == "sound" and not self.sound:
            raise PermissionDenied("your administrator turned sound off for this desktop", code="sound_disabled")


async def peripherals(conn: AsyncConnection, tenant_id: int, osf_id: int | None) -> Peripherals:
    config = await read_configs(conn, "portal.", tenant_id, osf_id)
    return Peripherals(
        files=bool(config["portal.files.enabled"]),
        printing=bool(config["portal.printing.enabled"]),
        max_upload_bytes=int(config["portal.files.max_upload_mib"]) << 20,
        sound=bool(config["portal.sound.enabled"]),
    )
