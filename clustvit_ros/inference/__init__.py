"""The inference layer (no ROS): frames in, labels and statistics out.

``engine`` runs a model on frames; ``runtime`` holds the real-time plumbing
(newest-frame slots, latency statistics and control, transport losses, batching
choice); ``devices`` picks device, precision and threads; ``packaged`` finds the
shipped files; ``image_headers`` reads the size an image file claims.
"""
