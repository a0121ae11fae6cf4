"""Moved: the namespace test hosts are their own part, ``hosts/netns_cluster.py``
(``python -m hosts.netns_cluster`` or ``risgd-netns-cluster``). This alias keeps
``python -m recipes.netns_cluster ...`` working."""

import sys

from risgd_hosts.netns_cluster import main

if __name__ == "__main__":
    sys.exit(main())
