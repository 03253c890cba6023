"""Helpers shared by the trainers: checkpoints, logging, devices, errors."""
