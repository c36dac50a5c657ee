"""FaceChain's finishing chain (Liu et al. 2023): template-face quality, fusion, similarity ranking."""
