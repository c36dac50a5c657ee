"""Multi-reference IP-Adapter: decoupled attention (Ye et al. 2023, arXiv 2308.06721) and aggregation of several
references (Kazistova, Stepanov, Filatov, "Создание персонализированных генераций изображений" [Creating
personalized image generations], MIPT / Skoltech; undated, no arXiv id)."""
