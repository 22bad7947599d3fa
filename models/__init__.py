"""Pure-torch models: the VQ-VAE tokenizer, the sliding-window GPT, its samplers and checkpoint I/O.

Nothing here imports web or training code.
"""
