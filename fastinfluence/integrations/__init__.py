"""Adapters that run fastinfluence's weighted unlearning losses inside other unlearning codebases.

``open_unlearning``: trainer classes for locuslab/open-unlearning, built on its own trainer
base class (imported only when it is used); see docs/unlearning.md.
"""
