"""AdaSpec serving engine."""
