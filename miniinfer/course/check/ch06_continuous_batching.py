"""Checks for chapter 06."""

__all__: list[str] = []
