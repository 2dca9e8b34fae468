"""Benchmarks of moelab backends and models against the peers users run today."""
