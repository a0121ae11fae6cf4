"""Ranks of tests/test_live_storm_defects.py: the engine's reconfigurable gloo group built twice under one store
prefix, as a lighthouse started again (its quorum ids counted from 1 again) makes torchft's manager do."""

from __future__ import annotations

import datetime
import os
import time


def scenario_prefix_reused(rank: int, world_size: int) -> list[tuple]:
    """The group configured under torchft's prefix of quorum 2, then of quorum 3, then of quorum 2 again (on the
    same store, the node's), each time an all-reduce of ones: (prefix, the sum or the error, seconds)."""
    import torch
    from torch.distributed import TCPStore
    from torch.distributed.distributed_c10d import AllreduceOptions

    from risgd_ext.live import _reconfigurable_gloo

    port = int(os.environ["MASTER_PORT"])
    store = TCPStore("127.0.0.1", port, world_size, rank == 0, timeout=datetime.timedelta(seconds=30))
    pg = _reconfigurable_gloo(datetime.timedelta(seconds=5))
    out = []
    for quorum in (2, 3, 2):
        prefix = f"torchft/{quorum}/0"
        t0 = time.perf_counter()
        try:
            pg.configure(f"127.0.0.1:{port}/{prefix}", f"w{rank}", rank, world_size, quorum_id=quorum,
                         global_ranks=list(range(world_size)))
            t = torch.ones(4)
            opts = AllreduceOptions()
            opts.timeout = datetime.timedelta(seconds=5)
            pg.allreduce([t], opts).wait()
            result: object = t.tolist()
        except Exception as e:  # what the old code did: gloo read the first group's addresses
            result = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        out.append((prefix, result, round(time.perf_counter() - t0, 2)))
        store.add(f"done{len(out)}", 1)  # both ranks are done with a group before either builds the next
        while store.add(f"done{len(out)}", 0) < world_size:
            time.sleep(0.01)
    # rank 0 holds the store's server: it goes last, once every other rank has made its last call (a rank still
    # polling the barrier above when the server went away failed with "Connection was likely closed")
    store.add("left", 1)
    while rank == 0 and store.add("left", 0) < world_size:
        time.sleep(0.01)
    del store
    return out
