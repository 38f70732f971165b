"""What every command's core returns: rows (one dict per matrix), a summary, the inputs and the options.

The renderer turns these four into the JSON envelope, a table, CSV or Markdown.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


@dataclass
class RunResult:
    rows: list[dict[str, Any]]
    summary: dict[str, Any]
    inputs: dict[str, Any]
    options: dict[str, Any]

    def to_pandas(self) -> pd.DataFrame:
        """The rows as a DataFrame, one row per matrix (as WeightWatcher's ``analyze()`` returns)."""
        import pandas as pd

        return pd.DataFrame(self.rows)
