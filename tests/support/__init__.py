"""Helpers shared by the test suites: real Envoy processes, free ports, the shared conformance data."""
