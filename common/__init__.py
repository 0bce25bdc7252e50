"""Pieces shared by every lvd package: recipes and typed configs, run metadata, torch compat."""
