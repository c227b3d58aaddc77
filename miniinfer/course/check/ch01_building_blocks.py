"""Checks for chapter 01."""

__all__: list[str] = []
