"""The research harness: SILO's risk-performance trade-off in one command (`silo report`).

config.py (the `research:` section), snapshots.py (in-memory views of a store), experiments.py (sweep,
scaling, opt-out effect, variants), modes.py (the inf-gram rows, each mode's bytes on disk), tables.py and
plots.py (outputs), report.py (all of it in one folder).
"""

from .config import ResearchConfig, load_research
from .experiments import ensure_blocks, owner_effect, scaling, sweep, variant_rows
from .report import report
from .snapshots import subsample, without_owners

__all__ = ["ResearchConfig", "load_research", "report", "sweep", "scaling", "owner_effect", "subsample",
           "without_owners", "ensure_blocks", "variant_rows"]
