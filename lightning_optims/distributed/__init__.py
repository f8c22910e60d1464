"""The distributed layer the engines and the families share: where a process's part of a parameter lies
(:mod:`.placements`), sums over the processes that split it (:mod:`.sums`), whole matrices on one owner
(:mod:`.owners`), and what a strategy and a model's layout are (:mod:`.layout`). It knows no optimizer."""
