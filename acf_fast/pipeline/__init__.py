"""The user-facing steps: CLI, function API, demo, recommend, explain, extract."""
