"""Celeb Basis (Yuan et al. 2023) and textual inversion for faces (Livshits 2023)."""
