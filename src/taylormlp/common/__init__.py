"""The shared leaves every stage imports: errors, progress, paths, hooks, the option tables (choices), the machine."""

__version__ = "0.1.0"
