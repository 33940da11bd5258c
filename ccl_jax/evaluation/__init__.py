"""Scoring a test split class by class, fitting decisions, and evaluating a detector."""
