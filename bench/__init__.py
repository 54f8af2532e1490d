"""Benchmarks: Keybrake against bare mitmdump (`make bench`)."""
