"""``kfopt compare``: side-by-side training of every optimizer on a real task.

Modules: ``data`` (texts and images already on the machine), ``models`` (CharGPT, DigitsCNN),
``tasks`` (data + model + batches + evaluation per size), ``registry`` (the optimizers and their
defaults), ``runner`` (one training run and its measurements), ``report`` (table, JSON, PNG),
``cli`` (arguments and the sequence of runs). The entry point is ``kfopt.__main__.main``.
"""
