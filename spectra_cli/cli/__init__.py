"""The typer CLI: one module per command. Parses, calls the core, renders. No math, no file formats."""
