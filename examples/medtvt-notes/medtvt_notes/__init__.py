"""medtvt-notes: a fourth modality (free-text clinical notes) for medtvt, as a separate distribution."""
