"""Vision: untrusted image decoding (images), face detection and embeddings (faces)."""
