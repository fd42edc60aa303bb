"""Built-in components, each module a plugin registered like any third-party one."""
