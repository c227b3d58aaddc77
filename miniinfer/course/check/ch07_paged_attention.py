"""Checks for chapter 07."""

__all__: list[str] = []
