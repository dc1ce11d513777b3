"""Training scripts that reproduce arserve's committed checkpoints, one
command each (``arserve train NAME``)."""
