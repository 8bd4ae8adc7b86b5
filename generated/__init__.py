"""Generated kvgen artefacts: cubins and manifest (package data)."""
