"""The core's baseline components, so the system runs end to end with no plugin installed."""
