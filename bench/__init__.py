"""Benchmark harness: eva-ws and the servers a team would pick instead, under one load generator."""
