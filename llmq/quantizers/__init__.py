"""Solvers for one weight matrix; they know nothing about models."""
