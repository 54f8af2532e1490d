"""The admin listener: the JSON admin API and the dashboard."""
