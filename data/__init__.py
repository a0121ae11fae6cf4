"""Data pipeline for RI-SGD: WebDataset shards, redundancy manifests, node replication and loaders.

Modules (one job each):
  errors      DataError and shard-name / sha256 helpers shared by everything else
  tario       deterministic tar writing with per-member byte offsets, random-access reads
  index       reading index.json: validation, per-split label / offset arrays, shard verification
  stamps      verification stamps: a replicated, unchanged shard is accepted without re-hashing
  synthetic   small synthetic sources in the real on-disk formats (CIFAR tarball, ILSVRC tree)
  sources     dataset readers (digits, CIFAR tarballs, ImageFolder, ImageNet layout)
  make_shards CLI: source -> train/val tar shards + index.json
  partition   split the training set into p chunks (iid, label_sorted, dirichlet:ALPHA)
  manifest    CLI + API: build / check the per-rank redundancy manifest (YAML)
  replicate   CLI: copy the shards one node needs, sha256-verified, atomic, idempotent
  transforms  train / eval transforms per dataset
  loader      per-rank infinite train loader (per-chunk sub-batches) and the eval loader
"""

if __name__ == "data":  # the checkout's folder name: be risgd_data itself (one import name per file)
    from risgd_common.aliases import alias

    alias(__name__, "risgd_data")
