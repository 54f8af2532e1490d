"""Vault key use-cases shared by the admin API, the dashboard and the command line."""
