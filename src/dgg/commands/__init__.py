"""CLI subcommands; see dgg.cli."""
