"""An example moat plugin (see pyproject.toml for its entry points)."""
