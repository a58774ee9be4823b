"""Built-in games plugins."""
