"""Running the method: the orchestrator (PT -> SFT -> RFT -> eval), evaluation, attributions,
reports, ``diagnose`` and ``export`` of saved models."""
