"""What the ``sdlens`` subcommands do, beyond parsing their arguments (``sdlens.cli``)."""
