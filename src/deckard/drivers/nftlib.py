"""nftables through libnftables, in this process: the library the ``nft`` command is a thin wrapper of.

A node changes its filter on every desktop start (a table loaded, one address added to a verdict map).  Through
the ``nft`` command each change costs a fork of the node's process and a program start: 2 ms on a quiet machine,
20-35 ms in a busy farm process, which was the longest step of a warm pool take-over.  The library does the same
netlink transaction in ~0.2 ms.  Commands are the ``nft -f`` language, so a table's text is the same either way.

A new context per transaction (~0.1 ms: it caches the ruleset, and other processes change it), one at a time
under a lock, from a worker thread so a large table's parse never holds the event loop.  Where the library cannot
be loaded, :func:`run` returns None and the caller runs the command as before.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import threading
from dataclasses import dataclass

NFT_CTX_DEFAULT = 0


@dataclass(frozen=True)
class NftResult:
    returncode: int
    stderr: str


class _Library:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lib: ctypes.CDLL | None = None
        self.tried = False

    def load(self) -> ctypes.CDLL | None:
        """The library, opened once; None when it is not there (the command is used instead)."""
        if self.tried:
            return self.lib
        self.tried = True
        try:
            lib = ctypes.CDLL(ctypes.util.find_library("nftables") or "libnftables.so.1", use_errno=True)
        except OSError:
            return None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_output.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_buffer_error.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_ctx_get_error_buffer.restype = ctypes.c_char_p
        lib.nft_ctx_get_error_buffer.argtypes = [ctypes.c_void_p]
        self.lib = lib
        return lib

    def run(self, commands: str) -> NftResult | None:
        with self.lock:
            lib = self.load()
            if lib is None:
                return None
            ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
            if not ctx:
                return None
            try:
                # errors and any listing go to the context's buffers, never to this process's stdout and stderr
                lib.nft_ctx_buffer_output(ctx)
                lib.nft_ctx_buffer_error(ctx)
                rc = lib.nft_run_cmd_from_buffer(ctx, commands.encode())
                err = lib.nft_ctx_get_error_buffer(ctx) or b""
            finally:
                lib.nft_ctx_free(ctx)
            return NftResult(0 if rc == 0 else 1, err.decode(errors="replace"))


_library = _Library()


async def run(commands: str) -> NftResult | None:
    """Run ``commands`` (the ``nft -f`` language: a table's text, or ``add element ...``) as one transaction in
    this process's network namespace; None when libnftables is not available."""
    return await asyncio.to_thread(_library.run, commands)
