"""The package version, in a module of its own so that every layer (the server's /version,
the CLI's --version) can read it without importing the package root, which pulls the engine."""

__version__ = "0.1.0"
