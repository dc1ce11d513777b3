"""The image side of arserve: checkpoints of the digits models and the
quality metric that tests and benchmarks use."""
