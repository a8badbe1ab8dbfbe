"""Disk image building (QVD's DIG): Debian rootfs + display server + desktop + guest agent."""
