"""graphopt's version (in manifests, reports and cache keys); the package and its modules read it here."""
__version__ = "0.1.0"
