"""Names in a run directory that several commands share (see :mod:`medtvt_core.run.orchestrator`)."""

#: ``<run>/<stage>/final/``: the stage's complete saved model.
FINAL = "final"
