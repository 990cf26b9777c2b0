"""The model layer: `SiloLM` (a parametric LM plus retrieval), the retrievers it is given (kNN-LM, RIC-LM),
per-request sampling settings and attribution. Imports silo.core and silo.datastore only."""
