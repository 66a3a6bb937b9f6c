"""Heads shipped with sali (installed as ``sali.heads``): ``<name>.npz`` plus a model card in README.md."""
