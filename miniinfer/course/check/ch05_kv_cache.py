"""Checks for chapter 05."""

__all__: list[str] = []
