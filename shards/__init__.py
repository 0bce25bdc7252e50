"""Curated clips -> WebDataset shards and the training loader.

writer (lvd shards write), manifest (sample -> shard, byte ranges, checksums, scores), query (subsets),
verify (lvd shards verify / stats), plan (batches, ranks, workers, resume), loader (ShardLoader),
bench (python -m shards.bench.loader). Shards never import curation's scoring code: they read the ledger's columns.
"""
