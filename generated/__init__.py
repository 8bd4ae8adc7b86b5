"""A kvgen kernel tree: cubins and manifest (package data)."""
