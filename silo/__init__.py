"""SILO: isolate legal risk in a nonparametric datastore."""
__version__ = "0.1.0"
