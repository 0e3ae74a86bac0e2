"""Per-layer compression search (EvoPress, arXiv 2410.14649): the level database
(:mod:`.levels`), fitness scoring (:mod:`.scoring`), the (1 + λ) evolutionary search
(:mod:`.evopress`), the uniform and error-sum DP baselines (:mod:`.baselines`) and the recipe it
writes (:mod:`.recipe`). The driver that ties them to a model and a target is :mod:`lowc.search_api`."""
