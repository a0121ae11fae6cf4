"""Recipes: per-dataset YAML configs, their schema, the comparison tool and the demo."""
