"""One module per method: its loss, its model wrapper and its tasks."""
