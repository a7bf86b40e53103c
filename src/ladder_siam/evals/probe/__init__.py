"""The linear probe: a linear classifier on each stage's frozen, pooled features.

:mod:`.linear_probe` is the step: the fast protocol (cached features, all stages at once)
or :mod:`.standard` (the paper's augmented protocol); :mod:`.features` extracts pooled stage
features, :mod:`.heads` trains the classifiers, :mod:`.knn` scores a weighted kNN.
"""
