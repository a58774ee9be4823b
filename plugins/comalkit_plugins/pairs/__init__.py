"""Built-in pairs plugins."""
