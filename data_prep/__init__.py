"""Raw images + captions -> WebDataset shards + manifest.

    sources.py  (iter_image_folder: SourceItem | Skip)
      -> shard.py  (process_item: image_ops.decode_image -> resize_center_crop -> encode_image)
      -> shard_writer.py  (ShardWriter: shard-NNNNNN.tar, published by rename when complete)
      -> manifest.py  (write_manifest, last and atomic; read_manifest / verify_shards for readers)

synth.py generates a captioned shape dataset with known ground truth for demos, tests and evaluation.
"""
