"""Checks for chapter 03."""

__all__: list[str] = []
