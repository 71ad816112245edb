"""Measuring without changing anything: decoding and timing (decode), generation, the cost model (cost), slowdown
curves (throughput), the GPU prediction, `bench` on every engine, `compare`."""
