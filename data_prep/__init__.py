"""Raw images + captions -> WebDataset shards in a dataset of parts, locally or on S3.

    storage.py       local paths and s3:// behind one interface (list, stream, atomic put, delete)
    sources.py       plan a source without reading it: folder (sidecar .txt/.json), table
                     (.csv/.tsv/.jsonl/.parquet of paths or URLs), existing shards -> ItemRefs
    http_fetch.py    concurrent HTTP(S)/file:// downloads with timeouts, retries and a size cap
    image_ops.py     one image: guard, JPEG reduce-on-decode, EXIF, RGB, resize, encode, or a skip reason
    shard_task.py    one task: read -> caption clean-up -> de-duplicate -> process -> its own shards
    shard_writer.py  deterministic tars, limited by samples and bytes, published only when complete
    shard.py         the stage: plan, run tasks (processes or ray_executor.py), merge, manifest, index
    manifest.py      a part's manifest: shards with sha256, skips by reason, stats, content sum
    dataset.py       index.json over parts, content identity, samples lists, verify

synth.py generates a captioned shape dataset with known ground truth for demos, tests and evaluation.
"""
