"""Multi-reference IP-Adapter (Ye et al. 2023; Kazistova et al.): decoupled attention and aggregation."""
