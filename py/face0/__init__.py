"""Face0 (Valevski et al. 2023): face embedding -> context tokens, three-way CFG, embedding arithmetic."""
