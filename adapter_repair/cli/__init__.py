"""The ``adapter-repair`` command: a thin layer that parses, builds a config, calls, renders."""
