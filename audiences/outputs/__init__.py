"""Audience outputs: one module per destination, all speaking the contract in base.py."""
