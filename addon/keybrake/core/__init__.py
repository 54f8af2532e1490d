"""Shared basics: money, endpoint paths, vault key material, policy models and the refusal."""
