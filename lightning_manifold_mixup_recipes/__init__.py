"""Recipes for lightning-manifold-mixup: the paper's experiments on data that needs no download.

Presets, data modules (MNIST-1D, scikit-learn's digits, spirals, CIFAR-10/100), models
(PreActResNet, MLPs, small CNNs), a LightningModule with the mixin (``MixupClassifier``) and the
``lightning-manifold-mixup`` command line. They use the core package through its public API
only, and need the ``examples`` extra: ``pip install "lightning-manifold-mixup[examples]"``.
"""
