"""Rendering only: rows → table / JSON / CSV / Markdown, and figures."""
