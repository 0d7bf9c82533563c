"""Vision: untrusted image decoding (images), face detection and embeddings (faces, with the model files they
need: face_models), and the geometry of faces on a canvas (geometry: layouts, sizes, crops, masks, keypoint
drawing; no model)."""
