"""spectra: spectral analysis of neural-network weights.

The library is usable without the CLI::

    import spectra_cli
    result = spectra_cli.analyze("model.safetensors")
    df = result.to_pandas()
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from spectra_cli.flows.analyze import AnalysisResult


def analyze(path: str, **options: Any) -> AnalysisResult:
    """Analyse every weight matrix of the checkpoint at ``path``; see :class:`spectra_cli.flows.analyze.AnalyzeOptions`."""
    from spectra_cli.flows.analyze import AnalyzeOptions, run_analyze

    return run_analyze(path, AnalyzeOptions(**options))


__all__ = ["__version__", "analyze"]
