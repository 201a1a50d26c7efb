"""Stage 1 of the pipeline: build a dataset in the layout that every later stage reads.

Sources: the VIPriors ImageNet subset (`imagenet`), the embedded Fashion-MNIST benchmark
(`fashion`) and a user's own class folders (`folder`). `layout.py` owns the output layout.
"""
