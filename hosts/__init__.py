"""Hosts: the namespace test cluster (N hosts with tbf-shaped links on one machine) and local
process groups of several ranks for tests and benchmarks."""
