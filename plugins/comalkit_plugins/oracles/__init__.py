"""Built-in oracles plugins."""
