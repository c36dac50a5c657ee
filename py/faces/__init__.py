"""Faces in, identities out: detection (MTCNN, SCRFD), alignment, crops, embeddings, similarity."""
