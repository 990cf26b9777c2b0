"""Workflows over the model layer: evaluation (perplexity tables, tuning) and the verified removal of a
data owner's content. Used by the research harness, the server and the CLI."""
