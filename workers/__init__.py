"""Workers: the broker, the four actors, the money-path service, providers and the CLI."""
