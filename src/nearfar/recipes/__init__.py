"""Recipes that ship with nearfar (TOML)."""
