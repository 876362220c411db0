"""Data: the built-in synthetic data set, image folders, and near-duplicate removal.

Each module adds its public names below (additive edits only: several people own modules here).
"""
