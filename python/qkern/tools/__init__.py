"""Applications built on the qkern library: the ``qkern`` command (:mod:`.cli`), the demo
(:mod:`.demo`), the benchmarks (:mod:`.bench`) and the accuracy reports (:mod:`.reports`).
Library modules never import this package."""
