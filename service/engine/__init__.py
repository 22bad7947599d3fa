"""The engine: admission, the generation lanes and the batches."""
