"""Export formats read by other engines."""
