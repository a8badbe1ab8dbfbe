"""Deckard: a Linux virtual-desktop platform built on QVD's architecture (see ARCHITECTURE.md)."""

__version__ = "0.1.0"
