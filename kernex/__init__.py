"""Kernex: fleet management and over-the-air updates for Linux edge devices."""

__version__ = "0.1.0"
