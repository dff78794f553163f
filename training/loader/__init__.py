"""The training input: each rank's stream of batches, read from WebDataset shards (local or s3://) for GPUs.

The dataset is read through its index (all parts) or a single manifest; shards stream through the
storage layer, so `s3://` data never touches local disk.

Streams. A run has S = world_size * max(1, loader_workers) logical streams; rank r owns streams
r*nw .. r*nw+nw-1 and DataLoader worker j of rank r runs stream r*nw+j (with loader_workers=0 the
rank runs its one stream in-process). Each stream is infinite: when its piece of an epoch is read it
goes on with its piece of the next one, so a batch may straddle two epochs.

Epoch plan. Per (seed, epoch) the shard list is shuffled; the shuffled shards, concatenated, are one
index space of T samples, cut into S contiguous pieces of T // S or T // S + 1 samples (which
streams get the extra sample rotates with the epoch). So every sample of an epoch is read exactly
once across all ranks, whatever the shard count or sizes (uneven shards, fewer shards than ranks),
and nothing is dropped. A piece is a list of segments: (shard, first sample, end sample).

Within a stream, samples come from a random one of the first `mix_shards` unfinished segments of the
epoch (drawn by a hash of seed, epoch, stream and draw count: deterministic, no global RNG), then pass
through a shuffle buffer of `shuffle_buffer` raw samples, drained at the end of the stream's piece: a
stream yields all of its piece of one epoch before any sample of the next. The buffer is checkpointed
exactly: the state lists each buffered sample by reference (epoch, shard, sample index, byte where it
starts), and a resumed stream fetches a buffered sample again (one ranged read) only when it is picked.

Position. A stream's state (`StreamState`, plain JSON) holds its buffer and its remaining segments,
for each the index of the next unread sample and the byte where a known sample starts in the tar. A
resume opens each shard at that byte (a seek for local files, a ranged GET for S3) and never reads,
let alone decodes, what was consumed before. Stepping over samples by their tar headers (a seek past each
member's data locally; read-and-discard bytes on S3, no decoding) happens only where a segment starts
at a sample whose byte is not known: a piece that starts mid-shard (at most one per stream and
epoch) and the cut points of an elastic re-split.

Batches carry uint8 pixels; `to_model_input` moves them to the device and normalises them there.
Every yielded Batch carries its stream's state after it, and ShardStream keeps the state of the
batches actually handed to the trainer, so `ShardStream.state` is exact although the DataLoader
prefetches batches that were never used. Every rank yields batches forever, always full ones (an
undecodable sample is counted and replaced by the stream's next sample), so ranks never disagree on
the number of batches, which would hang DeepSpeed's collectives.

Elastic resume: `LoaderState.resplit` turns the states saved by every rank of a run with W ranks into
this rank's state in a run with W' ranks (or another number of loader workers). See its docstring.
"""
