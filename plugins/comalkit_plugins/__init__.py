"""comalkit's built-in plugins.

Registered through the entry point ``comalkit.plugins: builtin = comalkit_plugins``, the
same way a third-party package registers its own: importing this package's modules runs
their ``@plugin`` decorators. Each module holds one plugin (or one small family of them).
"""
