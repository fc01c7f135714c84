"""Retraining the semantic cache's models: the verifier and the cross-encoder that ship in
``src/spillway/cache/*.npz``. Not part of the gateway, and not installed with it.

These modules import torch, transformers and scikit-learn (the ``train`` extra, in ``dev``);
the gateway runs the shipped weights on numpy and onnxruntime and never imports this package
(tests/unit/test_architecture.py checks). Run the scripts as modules from the repository
root, where this package and ``bench`` (the QQP split in ``bench/semantic_cache_eval.py``)
are importable:

    HF_HUB_OFFLINE=1 .venv/bin/python -m training.train_verifier --help
    HF_HUB_OFFLINE=1 .venv/bin/python -m training.train_cross_encoder --help

- ``train_verifier``: the verifier (scikit-learn MLPs) and its threshold;
- ``train_cross_encoder``: the cross-encoder (LoRA on all-MiniLM-L6-v2, torch) and the blend's
  threshold;
- ``cross_training``: the cross-encoder's torch pieces, shared by ``train_cross_encoder`` and
  the tests that check the run-time model against its torch original.
"""
