"""A run's report: one self-contained HTML file (figures embedded) and the PNGs."""

from .html import write_report

__all__ = ["write_report"]
