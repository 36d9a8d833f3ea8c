"""Tuning helpers that probe the real engine before training: the LR range test
(``largebatch.tune.lr_find``). Nothing is re-exported here: a function named like its module
would shadow the module (``import largebatch.tune.lr_find`` would give the function)."""
