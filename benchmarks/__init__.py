"""crmsync benchmarks: ``python -m benchmarks [SCENARIO] [--quick]`` (never part of the test run)."""
