"""Checks for chapter 02."""

__all__: list[str] = []
