"""Generated CuteDSL kernel modules (build inputs, kept for review)."""
