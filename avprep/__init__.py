"""avprep: raw audio-visual datasets -> manifests -> WebDataset shards."""

__version__ = "0.2.0"  # 0.2.0: presets record resampler, mono_mix and pad_mode
