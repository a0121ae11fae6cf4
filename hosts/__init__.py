"""Hosts: the namespace test cluster (N hosts with tbf-shaped links on one machine) and local
process groups of several ranks for tests and benchmarks."""

if __name__ == "hosts":  # the checkout's folder name: be risgd_hosts itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_hosts")
