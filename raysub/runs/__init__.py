"""The run-directory service: a run's paths (`layout`), its typed manifest (`manifest`), its state checks and
records (`records`) and the one context manager every workflow opens a run with (`open`)."""
