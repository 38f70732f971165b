"""One module per subcommand, named exactly as the subcommand: its options (validated once), its typed result,
and ``run_<command>()`` (plan → execute → summarise). No printing, no CLI."""
