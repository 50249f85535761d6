"""Per-dataset YAML: class lists, layout defaults, preset, recommended balancing settings."""
