"""What a desktop offers the browser besides its picture (issue 14): files, printing; per tenant and per OSF.

One reading of the ``portal.*`` switches for the portal's desktop list, the files ticket and the broker's file
channel (``broker/files.py``), so the three never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncConnection

from deckard.services.config import read_configs

PRINT_DIR = "PDF"  # where the desktop's PDF printer (cups-pdf: ``Out ${HOME}/PDF``) leaves each job, in the home


@dataclass(frozen=True)
class Peripherals:
    files: bool  # the file panel: upload into ~/Uploads, download from the home
    printing: bool  # print jobs reach the browser as PDFs (read from PRINT_DIR)
    max_upload_bytes: int

    @property
    def channel(self) -> bool:
        """Whether the desktop needs the file channel at all (printing rides on it)."""
        return self.files or self.printing

    def features(self) -> dict[str, bool]:
        return {"files": self.files, "printing": self.printing}


async def peripherals(conn: AsyncConnection, tenant_id: int, osf_id: int | None) -> Peripherals:
    config = await read_configs(conn, "portal.", tenant_id, osf_id)
    return Peripherals(
        files=bool(config["portal.files.enabled"]),
        printing=bool(config["portal.printing.enabled"]),
        max_upload_bytes=int(config["portal.files.max_upload_mib"]) << 20,
    )
