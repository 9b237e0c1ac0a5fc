"""Tools over the library: the ``clustvit`` command (train, eval, bench, export), data and metrics,
the demo, and the benchmarks of the node (node_bench, camera_bench, thread_bench)."""
