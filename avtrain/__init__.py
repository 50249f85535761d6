"""avtrain: streaming modality-balanced training on avprep shards."""
