"""avprep: raw audio-visual datasets -> manifests -> WebDataset shards."""

__version__ = "0.1.0"
