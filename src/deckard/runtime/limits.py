"""Counting connections per client address against a cap: shared by the API's server and the broker."""

from __future__ import annotations


class AddressCounts:
    """Open connections per address; an address at zero is forgotten.

    The cap is given at each ``add`` so a server always applies its current setting.
    """

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}

    def add(self, address: str, cap: int) -> bool:
        """Count one more connection from ``address``; False (nothing counted) when it already has ``cap``."""
        n = self._counts.get(address, 0)
        if n >= cap:
            return False
        self._counts[address] = n + 1
        return True

    def remove(self, address: str) -> None:
        n = self._counts.get(address, 0) - 1
        if n > 0:
            self._counts[address] = n
        else:
            self._counts.pop(address, None)

    def __getitem__(self, address: str) -> int:
        return self._counts.get(address, 0)

    def __contains__(self, address: object) -> bool:
        return address in self._counts
