"""CLIP-GEN (docs/DESIGN.md §13): the VQGAN image tokenizer and, on top of it, the transformer
that predicts an image's tokens from its CLIP embedding. Trained on images alone."""
