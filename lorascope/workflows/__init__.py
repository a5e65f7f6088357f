"""What a command does: load runs and models, call the pure analysis, return results for the report."""
